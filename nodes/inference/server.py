"""HTTP server of the embedded engine: OpenAI API + sglang's non-distributed admin API.

Endpoints (sglang's request fields and replies, checked against sgl-project/sglang
``entrypoints/http_server.py`` and ``managers/io_struct.py``):

| endpoint | request | reply | what NexRL does |
| --- | --- | --- | --- |
| GET /health | - | 200 empty; 503 when the engine is dead/stopping | scheduler thread alive |
| GET /v1/models | - | ``{object: list, data: [{id, object: model, root, max_model_len}]}`` | |
| POST /v1/completions | OpenAI + extensions (openai_api.py) | text_completion | batched |
| POST /v1/chat/completions | OpenAI; model's chat template | chat.completion | batched |
| POST /pause_generation | ``{mode: abort / retract / in_place}`` (default abort; body optional) | ``{message, status: "ok"}`` | engine.pause(mode) |
| POST /continue_generation | ``{}`` | ``{message, status: "ok"}`` | engine.resume() |
| GET /get_weight_version | - | ``{weight_version}`` | |
| GET /get_model_info, /model_info | - | ``{model_path, tokenizer_path, is_generation, preferred_sampling_params, weight_version}`` | |
| GET /get_server_info | - | config + engine counters (max_running, steps, ...) | |
| GET/POST /flush_cache | - | text, 200 | drops the running batch's KV; rows are re-prefilled (never refused: NexRL has no prefix cache to protect) |
| POST /update_weights_from_disk | ``{model_path, load_format, abort_all_requests, weight_version, flush_cache, ...}`` | ``{success, message, num_paused_requests}``, 200 / 400 | loads the checkpoint, copies it in between decode steps, retracts running rows |
| POST /abort_request | ``{rid, abort_all}`` | 200 empty | aborts that request's (or every) sequence |

``update_weights_from_disk`` accepts sglang's other fields (``is_async``, ``torch_empty_cache``,
``keep_pause``, ``recapture_cuda_graph``, ``token_step``, ``manifest``) and ignores them: they
tune sglang's scheduler/CUDA graphs, which this engine does not have. ``load_format`` must be
null or ``auto`` (HF checkpoints only). The distributed weight-update endpoints are added by
``weights.add_weight_routes(app, engine)`` through ``create_app(..., extra_routes=...)``.

Errors are OpenAI-shaped: ``{"error": {message, type, param, code}}``; bad input is a 400,
a full queue 503, a request past ``request_timeout_s`` 504. A request never kills the server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from typing import Any, Callable

from aiohttp import web

from . import InferenceConfig
from .openai_api import ApiError, chat_response, completion_response, parse_chat, \
    parse_completion

log = logging.getLogger("nexrl.inference")

ENGINE_KEY = web.AppKey("nexrl_engine", object)
"""``request.app[ENGINE_KEY]`` is the Engine (for routes added by other modules)."""
SETTINGS_KEY = web.AppKey("nexrl_inference_settings", dict)
_INFLIGHT_KEY = web.AppKey("nexrl_inflight", dict)

ExtraRoutes = Callable[[web.Application, Any], None]


async def _json_body(request: web.Request, required: bool = True) -> dict:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise ApiError("request body is empty; expected a JSON object")
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 -- the server must outlive any one request
        log.exception("inference server: %s %s failed", request.method, request.path)
        err = ApiError(f"internal error in {request.path}: {type(exc).__name__}: {exc}",
                       status=500, kind="internal_error")
        return web.json_response(err.body(), status=500)


async def _generate(request: web.Request, chat: bool) -> web.Response:
    from .engine import EngineClosed, EngineFull

    app = request.app
    engine, settings = app[ENGINE_KEY], app[SETTINGS_KEY]
    body = await _json_body(request)
    parse = parse_chat if chat else parse_completion
    parsed = parse(body, engine.tokenizer, engine.max_model_len)
    seqs = []
    try:
        for prompt in parsed.prompts:
            seqs += engine.submit(prompt, parsed.params, parsed.n)
    except ValueError as exc:
        engine.abort(seqs)
        raise ApiError(str(exc), "prompt") from exc
    except EngineFull as exc:
        engine.abort(seqs)
        raise ApiError(str(exc), status=503, kind="server_overloaded") from exc
    except EngineClosed as exc:
        engine.abort(seqs)
        raise ApiError(str(exc), status=503, kind="server_unavailable") from exc
    app[_INFLIGHT_KEY].setdefault(parsed.request_id, []).extend(seqs)
    try:
        await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(s.future) for s in seqs)),
                               timeout=settings["request_timeout_s"])
    except asyncio.TimeoutError as exc:
        engine.abort(seqs)
        raise ApiError(f"request did not finish within {settings['request_timeout_s']} s",
                       status=504, kind="timeout") from exc
    except asyncio.CancelledError:
        engine.abort(seqs)
        raise
    finally:
        app[_INFLIGHT_KEY].pop(parsed.request_id, None)
    model = parsed.model or settings["served_model_name"]
    build = chat_response if chat else completion_response
    return web.json_response(build(parsed, seqs, engine.tokenizer, model, engine.weight_version))


async def completions(request: web.Request) -> web.Response:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.Response:
    return await _generate(request, chat=True)


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[ENGINE_KEY].healthy else 503)


async def models(request: web.Request) -> web.Response:
    engine, name = request.app[ENGINE_KEY], request.app[SETTINGS_KEY]["served_model_name"]
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "nexrl",
            "root": name, "parent": None, "max_model_len": engine.max_model_len}
    return web.json_response({"object": "list", "data": [card]})


async def pause_generation(request: web.Request) -> web.Response:
    body = await _json_body(request, required=False)
    mode = body.get("mode", "abort")
    if mode not in ("abort", "retract", "in_place"):
        raise ApiError(f"Invalid mode: {mode!r}. Expected one of ['abort', 'retract', "
                       "'in_place'].", "mode")
    await asyncio.to_thread(request.app[ENGINE_KEY].pause, mode)
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    await _json_body(request, required=False)
    request.app[ENGINE_KEY].resume()
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


async def get_weight_version(request: web.Request) -> web.Response:
    return web.json_response({"weight_version": request.app[ENGINE_KEY].weight_version})


async def get_model_info(request: web.Request) -> web.Response:
    engine, settings = request.app[ENGINE_KEY], request.app[SETTINGS_KEY]
    return web.json_response({"model_path": engine.model_path,
                              "tokenizer_path": settings["tokenizer_path"],
                              "is_generation": True, "preferred_sampling_params": None,
                              "weight_version": engine.weight_version})


async def get_server_info(request: web.Request) -> web.Response:
    engine, settings = request.app[ENGINE_KEY], request.app[SETTINGS_KEY]
    return web.json_response({**settings, "model_path": engine.model_path, **engine.info()})


async def flush_cache(request: web.Request) -> web.Response:
    n = await asyncio.to_thread(request.app[ENGINE_KEY].flush_cache)
    return web.Response(text=f"Cache flushed.\n{n} running sequences will be prefilled again.\n")


async def update_weights_from_disk(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await _json_body(request)
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
        raise ApiError("'model_path' must be a non-empty string", "model_path")
    if body.get("load_format") not in (None, "auto"):
        raise ApiError(f"'load_format'={body['load_format']!r} is not supported (null or "
                       "'auto': an HF checkpoint)", "load_format")
    version = body.get("weight_version")
    if version is not None and not isinstance(version, (str, int)):
        raise ApiError("'weight_version' must be a string or null", "weight_version")
    if not isinstance(body.get("abort_all_requests", False), bool):
        raise ApiError("'abort_all_requests' must be a boolean", "abort_all_requests")
    in_flight = engine.num_running + engine.num_waiting
    if body.get("abort_all_requests"):
        await asyncio.to_thread(engine.abort_all)
    try:
        n = await asyncio.to_thread(engine.load_weights_from_disk, path,
                                    None if version is None else str(version))
    except (OSError, ValueError) as exc:
        return web.json_response({"success": False, "num_paused_requests": 0,
                                  "message": f"Failed to update weights: {exc}"}, status=400)
    message = f"Succeeded to update model weights ({n} tensors from {path})."
    if version is not None:
        message += f" Weight version updated to {version}."
    return web.json_response({"success": True, "message": message,
                              "num_paused_requests": in_flight})


async def abort_request(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await _json_body(request, required=False)
    if body.get("abort_all"):
        await asyncio.to_thread(engine.abort_all)
    elif isinstance(body.get("rid"), str):
        engine.abort(request.app[_INFLIGHT_KEY].get(body["rid"], []))
    else:
        raise ApiError("give 'rid' (string) or 'abort_all': true", "rid")
    return web.Response(status=200)


def create_app(engine, *, served_model_name: str | None = None,
               tokenizer_path: str | None = None, request_timeout_s: float = 1800.0,
               extra_routes: ExtraRoutes | None = None) -> web.Application:
    """The aiohttp application serving ``engine`` (an Engine, already started).

    ``extra_routes(app, engine)`` is called last so other modules can add endpoints; the
    distributed weight update plugs in here (``weights.add_weight_routes``).
    """
    app = web.Application(middlewares=[_errors], client_max_size=256 * 1024 * 1024)
    app[ENGINE_KEY] = engine
    app[SETTINGS_KEY] = {"served_model_name": served_model_name or engine.model_path,
                         "tokenizer_path": tokenizer_path or engine.model_path,
                         "request_timeout_s": request_timeout_s}
    app[_INFLIGHT_KEY] = {}
    app.add_routes([
        web.get("/health", health),
        web.get("/v1/models", models),
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/pause_generation", pause_generation),
        web.post("/continue_generation", continue_generation),
        web.get("/get_weight_version", get_weight_version),
        web.get("/get_model_info", get_model_info),
        web.get("/model_info", get_model_info),
        web.get("/get_server_info", get_server_info),
        web.get("/flush_cache", flush_cache),
        web.post("/flush_cache", flush_cache),
        web.post("/update_weights_from_disk", update_weights_from_disk),
        web.post("/abort_request", abort_request),
    ])
    if extra_routes is not None:
        extra_routes(app, engine)
    return app


async def _serve(cfg: InferenceConfig, engine, stop_event: threading.Event,
                 ready_cb: Callable[[int], None] | None, extra_routes: ExtraRoutes | None
                 ) -> None:
    app = create_app(engine, served_model_name=cfg.served_model_name,
                     tokenizer_path=cfg.tokenizer_path, request_timeout_s=cfg.request_timeout_s,
                     extra_routes=extra_routes)
    runner = web.AppRunner(app, shutdown_timeout=cfg.shutdown_timeout_s, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        port = runner.addresses[0][1]
        log.info("inference server: serving %s on %s:%d", engine.model_path, cfg.host, port)
        if ready_cb is not None:
            ready_cb(port)
        while not stop_event.is_set():  # bounded waits: notices the stop within 0.2 s
            await asyncio.to_thread(stop_event.wait, 0.2)
        await site.stop()  # stop accepting new connections
        if cfg.shutdown_mode == "finish":
            if not await asyncio.to_thread(engine.wait_idle, cfg.shutdown_timeout_s):
                log.warning("inference server: in-flight requests did not finish within "
                            "%.1f s; aborting them", cfg.shutdown_timeout_s)
        await asyncio.to_thread(engine.abort_all)
    finally:
        await runner.cleanup()


def run_server(cfg: InferenceConfig, stop_event: threading.Event,
               ready_cb: Callable[[int], None] | None = None,
               extra_routes: ExtraRoutes | None = None) -> None:
    """Load the engine, serve ``cfg.host:cfg.port`` until ``stop_event`` is set, clean up.

    ``ready_cb(port)`` is called once the socket is bound (``cfg.port`` 0 picks a free port).
    On stop: new connections are refused, in-flight requests are aborted or finished per
    ``cfg.shutdown_mode``, the scheduler thread is joined and the model freed.
    """
    import torch

    from .engine import Engine, load_model

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, tokenizer = load_model(cfg.model_path, cfg.tokenizer_path, cfg.device, cfg.dtype)
    engine = Engine(model, tokenizer, weight_version=cfg.weight_version,
                    max_batch_size=cfg.max_batch_size, max_queue_size=cfg.max_queue_size,
                    max_model_len=cfg.max_model_len, max_prefill_tokens=cfg.max_prefill_tokens,
                    model_path=cfg.model_path, num_threads=cfg.num_threads).start()
    try:
        asyncio.run(_serve(cfg, engine, stop_event, ready_cb, extra_routes))
    finally:
        engine.close(timeout=cfg.shutdown_timeout_s)
        del engine, model
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
