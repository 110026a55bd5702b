"""Embedded inference engine over real HTTP, driven by the real ``openai`` client.

Run: python -m pytest tests/test_engine.py -q

One server (``run_server`` in a background thread, port 0) serves a tiny random Qwen2 built
by ``nexrl.tiny``; references come from the same checkpoint loaded separately with
``from_pretrained`` (``model.generate`` and plain forward passes). Tests that change server
state (pause, weights) restore it in ``finally`` blocks.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from openai import AsyncOpenAI, BadRequestError, OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from nexrl.nodes.inference import InferenceConfig
from nexrl.nodes.inference.server import run_server
from nexrl.tiny import build_tiny_model

MAX_LEN = 1024


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; several OpenMP threads on a busy shared CPU
    make every op wait for time slices (10x slower). Restored for the modules after this."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    a = build_tiny_model(str(root / "a"), max_position_embeddings=MAX_LEN)
    b = build_tiny_model(str(root / "b"), max_position_embeddings=MAX_LEN, seed=1)
    return a, b, root


@pytest.fixture(scope="module")
def ref(paths):
    tok = AutoTokenizer.from_pretrained(paths[0])
    model = AutoModelForCausalLM.from_pretrained(paths[0]).eval()
    return model, tok


@pytest.fixture(scope="module")
def base(paths):
    cfg = InferenceConfig(model_path=paths[0], port=0, weight_version="v0",
                          served_model_name="tiny", shutdown_timeout_s=10, num_threads=1)
    stop, ready, port = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=run_server, name="engine-server", daemon=True,
                              args=(cfg, stop, lambda p: (port.append(p), ready.set())))
    thread.start()
    try:
        assert ready.wait(60), "server did not start within 60 s"
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "server thread did not stop"


@pytest.fixture(scope="module")
def client(base):
    return OpenAI(base_url=base + "/v1", api_key="none", timeout=60, max_retries=0)


def http(base: str, path: str, body=None, method: str = "POST", raw: bytes | None = None):
    """(status, parsed JSON or text) of one admin call."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def info(base: str) -> dict:
    return http(base, "/get_server_info", method="GET")[1]


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def greedy_ref(model, prompt_ids: list[int], max_new: int, ignore_eos: bool = False
               ) -> list[int]:
    """HF's own greedy decoding (``model.generate``); with ``ignore_eos`` eos is not a stop."""
    kw = {"eos_token_id": None} if ignore_eos else {}
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                         **kw)
    return out[0, len(prompt_ids):].tolist()


def ext(choice) -> dict:
    return choice.model_extra


def in_background(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 -- re-raised by the test through box
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# --------------------------------------------------------------------------- basics
def test_health_models_and_version(base, client):
    assert http(base, "/health", method="GET")[0] == 200
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert http(base, "/get_weight_version", method="GET") == (200, {"weight_version": "v0"})
    status, text = http(base, "/flush_cache")
    assert status == 200 and text.startswith("Cache flushed")


def test_completion_text_and_token_ids(client, ref):
    _, tok = ref
    r = client.completions.create(model="tiny", prompt="Hello, engine!", max_tokens=8,
                                  temperature=0, extra_body={"return_token_ids": True})
    c = r.choices[0]
    e = ext(c)
    assert e["prompt_token_ids"] == tok.encode("Hello, engine!")
    assert len(e["token_ids"]) == len(e["token_logprobs"]) == r.usage.completion_tokens
    assert c.text == tok.decode(e["token_ids"], skip_special_tokens=True)
    assert e["weight_version"] == "v0" and r.model_extra["metadata"] == {"weight_version": "v0"}
    assert set(e["token_weight_versions"]) == {"v0"}
    by_ids = client.completions.create(model="tiny", prompt=e["prompt_token_ids"],
                                       max_tokens=8, temperature=0)
    assert ext(by_ids.choices[0])["token_ids"] == e["token_ids"]
    many = client.completions.create(model="tiny", prompt=["ab", "cde"], max_tokens=3,
                                     temperature=0)
    assert [ext(ch)["prompt_token_ids"] for ch in many.choices] == [tok.encode("ab"),
                                                                    tok.encode("cde")]


def test_greedy_matches_model_generate(client, ref):
    model, tok = ref
    for text in ["The quick brown fox", "x", "Once upon a time, in a land far away"]:
        ids = tok.encode(text)
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0)
        assert ext(r.choices[0])["token_ids"] == greedy_ref(model, ids, 24), text


def test_logprobs_match_forward_pass(client, ref):
    model, tok = ref
    prompt = tok.encode("logprobs under the sampling distribution")
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=1.0,
                                  seed=7, logprobs=3)
    c = r.choices[0]
    out, lps = ext(c)["token_ids"], ext(c)["token_logprobs"]
    assert c.logprobs.token_logprobs == lps and len(c.logprobs.top_logprobs) == len(out)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(out)[:, None])
    assert torch.allclose(torch.tensor(lps), expected[:, 0], atol=1e-4)
    assert all(max(top.values()) >= lp - 1e-6 for top, lp in zip(c.logprobs.top_logprobs, lps))


def test_top_k_and_top_p_logprobs_are_under_the_sampling_distribution(client, ref):
    model, tok = ref
    prompt = tok.encode("filtered")
    greedy = greedy_ref(model, prompt, 6)
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                      temperature=1.0, extra_body=extra)
        e = ext(r.choices[0])
        assert e["token_ids"] == greedy, extra
        assert all(abs(lp) < 1e-6 for lp in e["token_logprobs"]), extra  # point mass


def test_seed_reproducibility_and_n(client):
    kw = dict(model="tiny", prompt="seeded", max_tokens=12, temperature=1.0)
    a = client.completions.create(seed=42, n=3, **kw)
    b = client.completions.create(seed=42, n=3, **kw)
    c = client.completions.create(seed=43, n=3, **kw)
    ids = lambda r: [ext(ch)["token_ids"] for ch in r.choices]  # noqa: E731
    assert len(a.choices) == 3 and [ch.index for ch in a.choices] == [0, 1, 2]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert len({tuple(x) for x in ids(a)}) > 1  # the n samples differ from each other


def test_stop_strings_and_max_tokens(client, ref):
    _, tok = ref
    kw = dict(model="tiny", prompt="stop here", temperature=0)
    full = client.completions.create(max_tokens=40, extra_body={"ignore_eos": True}, **kw)
    text = full.choices[0].text
    stop = next(text[i:i + 2] for i in range(5, len(text) - 1)
                if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    r = client.completions.create(max_tokens=40, stop=[stop, "\x00never"],
                                  extra_body={"ignore_eos": True}, **kw)
    c = r.choices[0]
    assert c.finish_reason == "stop" and ext(c)["matched_stop"] == stop
    assert ext(c)["stop_reason"] == stop
    assert c.text == text[:text.find(stop)]
    assert stop in tok.decode(ext(c)["token_ids"])  # the tokens are kept, the text trimmed
    short = client.completions.create(max_tokens=5, extra_body={"ignore_eos": True}, **kw)
    assert short.choices[0].finish_reason == "length"
    assert len(ext(short.choices[0])["token_ids"]) == 5


def test_chat_completion_uses_template(client, ref):
    model, tok = ref
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False), add_special_tokens=False)
    assert ext(c)["prompt_token_ids"] == prompt == r.model_extra["prompt_token_ids"]
    assert prompt[-3:] == tok.encode("nt\n")  # ends with "<|im_start|>assistant\n"
    out = ext(c)["token_ids"]
    assert out == greedy_ref(model, prompt, 10)[:len(out)]
    assert [x.logprob for x in c.logprobs.content] == ext(c)["token_logprobs"]
    assert all(len(x.top_logprobs) == 2 for x in c.logprobs.content)
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")


def test_concurrent_requests_are_batched(base, client, ref):
    _, tok = ref
    prompts = [tok.encode(f"request {i}: " + "abc" * (i % 7)) for i in range(32)]
    sequential = [ext(client.completions.create(model="tiny", prompt=p, max_tokens=16,
                                                temperature=0).choices[0])["token_ids"]
                  for p in prompts]
    before = info(base)

    async def burst():
        aclient = AsyncOpenAI(base_url=base + "/v1", api_key="none", timeout=60, max_retries=0)
        try:
            rs = await asyncio.gather(*(aclient.completions.create(
                model="tiny", prompt=p, max_tokens=16, temperature=0) for p in prompts))
        finally:
            await aclient.close()
        return [ext(r.choices[0])["token_ids"] for r in rs]

    concurrent = asyncio.run(burst())
    after = info(base)
    assert concurrent == sequential
    steps = after["steps"] - before["steps"]
    tokens = after["tokens"] - before["tokens"]
    assert tokens / steps > 4, f"average decode batch {tokens / steps:.1f}: not batched"
    assert after["max_running"] >= 8


# --------------------------------------------------------------------------- pause / resume
def _long_request(client, prompt: str, max_tokens: int, **extra):
    return in_background(lambda: client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True, **extra}))


def test_pause_abort_returns_abort_and_holds_new_requests(base, client):
    t, box = _long_request(client, "long one", 900)
    try:
        wait_for(lambda: info(base)["running"] == 1, what="request running")
        assert http(base, "/pause_generation", {"mode": "abort"}) == (
            200, {"message": "Generation paused successfully.", "status": "ok"})
        t.join(20)
        c = box["result"].choices[0]
        assert c.finish_reason == "abort" and 0 < len(ext(c)["token_ids"]) < 900
        t2, box2 = _long_request(client, "after pause", 4)
        time.sleep(0.3)
        assert t2.is_alive() and info(base)["waiting"] == 1  # held while paused
    finally:
        assert http(base, "/continue_generation", {})[0] == 200
    t2.join(20)
    assert box2["result"].choices[0].finish_reason == "length"


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_holds_and_resumes(base, client, ref, mode):
    model, tok = ref
    expected = greedy_ref(model, tok.encode(f"resume {mode}"), 300, ignore_eos=True)
    t, box = _long_request(client, f"resume {mode}", 300)
    try:
        wait_for(lambda: info(base)["running"] == 1, what="request running")
        assert http(base, "/pause_generation", {"mode": mode})[0] == 200
        steps = info(base)["steps"]
        time.sleep(0.3)
        assert info(base)["steps"] == steps and t.is_alive()  # nothing decoded while paused
        assert http(base, "/flush_cache")[0] == 200  # drops KV; the row is prefilled again
    finally:
        http(base, "/continue_generation", {})
    t.join(30)
    c = box["result"].choices[0]
    assert c.finish_reason == "length" and ext(c)["token_ids"] == expected


# --------------------------------------------------------------------------- weights
def test_update_weights_from_disk(base, client, paths, ref):
    a, b, root = paths
    model, tok = ref
    prompt = tok.encode("new weights")
    model_b = AutoModelForCausalLM.from_pretrained(b).eval()
    try:
        status, body = http(base, "/update_weights_from_disk",
                            {"model_path": b, "weight_version": "v1", "load_format": None,
                             "abort_all_requests": False, "flush_cache": True})
        assert status == 200 and body["success"] is True, body
        assert http(base, "/get_weight_version", method="GET")[1] == {"weight_version": "v1"}
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        assert ext(r.choices[0])["token_ids"] == greedy_ref(model_b, prompt, 16)
        assert ext(r.choices[0])["weight_version"] == "v1"

        wrong = build_tiny_model(str(root / "wrong"), hidden_size=32, max_position_embeddings=64)
        for bad in (wrong, str(root / "missing")):
            status, body = http(base, "/update_weights_from_disk",
                                {"model_path": bad, "weight_version": "bad"})
            assert status == 400 and body["success"] is False and body["message"], body
        assert http(base, "/get_weight_version", method="GET")[1] == {"weight_version": "v1"}
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        assert ext(r.choices[0])["token_ids"] == greedy_ref(model_b, prompt, 16)  # untouched
    finally:
        status, body = http(base, "/update_weights_from_disk",
                            {"model_path": a, "weight_version": "v2"})
        assert status == 200, body
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert ext(r.choices[0])["token_ids"] == greedy_ref(model, prompt, 16)


def test_update_during_generation_reports_per_token_versions(base, client, paths):
    t, box = _long_request(client, "spanning", 900)
    wait_for(lambda: info(base)["running"] == 1, what="request running")
    status, body = http(base, "/update_weights_from_disk",
                        {"model_path": paths[0], "weight_version": "v3"})
    assert status == 200, body
    t.join(30)
    c = box["result"].choices[0]
    versions = ext(c)["token_weight_versions"]
    assert len(versions) == 900 and versions[0] != "v3" and versions[-1] == "v3"
    first_new = versions.index("v3")
    assert set(versions[:first_new]) == {versions[0]} and set(versions[first_new:]) == {"v3"}
    assert ext(c)["weight_version"] == "v3"


# --------------------------------------------------------------------------- bad input
def test_bad_requests_get_400_and_server_keeps_serving(base, client):
    status, body = http(base, "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    cases = [
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": "x", "stream": True}, "stream"),
        ({"prompt": "x", "bogus_field": 1}, "bogus_field"),
        ({"prompt": [1, 2, 100000]}, "prompt"),
        ({"prompt": [5] * MAX_LEN}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"max_tokens": 4}, "prompt"),
    ]
    for payload, field in cases:
        status, body = http(base, "/v1/completions", {"model": "tiny", **payload})
        assert status == 400, (payload, body)
        assert field in body["error"]["message"], (payload, body)
    assert http(base, "/v1/chat/completions", {"messages": []})[0] == 400
    assert http(base, "/pause_generation", {"mode": "sideways"})[0] == 400
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    r = client.completions.create(model="tiny", prompt="still alive", max_tokens=3)
    assert len(ext(r.choices[0])["token_ids"]) >= 1
    assert http(base, "/health", method="GET")[0] == 200


def test_abort_request_by_rid(base, client):
    t, box = _long_request(client, "abort me", 900, rid="rid-abort-me")
    wait_for(lambda: info(base)["running"] == 1, what="request running")
    assert http(base, "/abort_request", {"rid": "rid-abort-me"})[0] == 200
    t.join(20)
    c = box["result"].choices[0]
    assert c.finish_reason == "abort" and box["result"].id == "cmpl-rid-abort-me"


# --------------------------------------------------------------------------- engine API
def test_apply_weights_interface(paths, ref):
    """The contract weights.py relies on: validate all, apply all, retract, set version."""
    from nexrl.nodes.inference.engine import Engine, load_model
    from nexrl.nodes.inference.sampling import SamplingParams

    model, tok = load_model(paths[0], None, "cpu", "auto")
    engine = Engine(model, tok, weight_version="a", num_threads=1).start()
    try:
        ref_model, _ = ref
        prompt = tok.encode("apply")
        greedy = SamplingParams(max_tokens=12, temperature=0)
        before = engine.generate(prompt, greedy)[0].output_ids
        assert before == greedy_ref(ref_model, prompt, 12)[:len(before)]
        emb = dict(model.named_parameters())["model.embed_tokens.weight"]
        snapshot = emb.detach().clone()
        bad = [("model.embed_tokens.weight", torch.zeros_like(emb)),
               ("model.no_such.weight", torch.zeros(3)),
               ("model.norm.weight", torch.zeros(7))]
        with pytest.raises(ValueError, match=r"no_such.*model.norm.weight: got \(7,\)"):
            engine.apply_weights(bad, version="b")
        assert torch.equal(emb, snapshot) and engine.weight_version == "a"  # nothing applied

        other = AutoModelForCausalLM.from_pretrained(paths[1])
        with engine.step_lock:  # a multi-bucket update holds generation still between calls
            named = list(other.named_parameters())
            engine.apply_weights(named[: len(named) // 2])
            engine.apply_weights(named[len(named) // 2:], version="b")
        assert engine.weight_version == "b"
        seq = engine.generate(prompt, greedy)[0]
        assert seq.output_ids == greedy_ref(other, prompt, 12)[:len(seq.output_ids)]
        assert set(seq.versions) == {"b"}
        assert engine.pause("in_place") == 0 and engine.paused
        engine.resume()
        assert not engine.paused
    finally:
        engine.close()


def test_timeout_shutdown_and_extra_routes(paths):
    from aiohttp import web

    from nexrl.nodes.inference.server import ENGINE_KEY

    async def version(request):
        return web.json_response({"extra": request.app[ENGINE_KEY].weight_version})

    def extra(app, engine):
        app.router.add_get("/extra", version)

    cfg = InferenceConfig(model_path=paths[0], port=0, weight_version="x1", num_threads=1,
                          shutdown_timeout_s=10, request_timeout_s=1.5)
    stop, ready, port = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=run_server, daemon=True, kwargs=dict(
        cfg=cfg, stop_event=stop, ready_cb=lambda p: (port.append(p), ready.set()),
        extra_routes=extra))
    thread.start()
    try:
        assert ready.wait(60)
        url = f"http://127.0.0.1:{port[0]}"
        assert http(url, "/extra", method="GET") == (200, {"extra": "x1"})
        # a request past request_timeout_s gets 504 and leaves the engine (held by a pause)
        assert http(url, "/pause_generation", {"mode": "in_place"})[0] == 200
        status, body = http(url, "/v1/completions", {"prompt": "late", "max_tokens": 4})
        assert status == 504 and "1.5" in body["error"]["message"]
        wait_for(lambda: info(url)["waiting"] == 0, what="timed-out request aborted")
        assert http(url, "/continue_generation", {})[0] == 200
        cli = OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        t, box = _long_request(cli, "until shutdown", 900)
        wait_for(lambda: info(url)["running"] == 1, what="request running")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    t.join(20)
    assert box["result"].choices[0].finish_reason == "abort"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/health", timeout=5)
