"""Benchmark: trainer -> embedded-engine weight sync, end to end, against a raw broadcast.

    python bench/weight_sync.py --device cuda            # 2 GPUs: trainer GPU0, engine GPU1
    python bench/weight_sync.py --device cpu --reps 3    # gloo, small model: debugging

The trainer (this process) holds a Qwen2 model (``--shape 7b``: hidden 3584, 28 layers, 28
heads, 4 kv heads, intermediate 18944, vocab 152064, bf16, ~15.2 GB; random values). The
engine is the embedded engine's real HTTP server (``create_app`` + ``add_weight_routes``) in
a subprocess, with the same architecture and other random values. Measured, in one run:

- raw:        one broadcast of a single buffer of the model's size over the same group
              (the ceiling: what the link can do);
- bucketed:   ``WeightSender.push`` for several bucket sizes and pipeline depths (embedded
              engine) and serial (what an sglang engine allows); time = push start until
              every engine answered success for the final bucket (received, installed,
              version set);
- per-tensor: load_format None, one broadcast per tensor (the OpenRLHF/TRL way), with one
              HTTP request per bucket and with one request per tensor.
Then: the engine's parameter checksum equals the trainer's, one generation proves it
serves the new version, and (``--fault-check``) a stalled trainer makes the engine give up
after the group timeout, keep its version and still serve; a reconnect + push recovers.

Result (2026-11-22, nvidia-h200-x2: 2x H200 NV18, torch 2.11 + NCCL 2.28.9, ``--reps 7``):
raw 41.5 ms median (367 GB/s); 1 GiB buckets 48.0 ms (317 GB/s, 0.86x raw); per-tensor with
one request per tensor 437 ms (0.09x); sglang-style serial 80.5 ms (0.52x). Full table in
BENCHMARKS.md.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc. set below for both processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v

SHAPES = {
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               max_position_embeddings=4096, tie_word_embeddings=False),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=704, vocab_size=4096,
                  max_position_embeddings=512, tie_word_embeddings=False),
}
GiB = 1 << 30


def build_model(shape: str, device: str, dtype_name: str, seed: int):
    """Random-valued Qwen2 built directly on ``device`` (no checkpoint, no CPU round trip)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = getattr(torch, dtype_name)
    cfg = Qwen2Config(**SHAPES[shape])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)  # allocations on the device; init is device kernels
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def checksum(model) -> float:
    """Order-sensitive float64 checksum of every parameter (identical bytes -> identical sum)."""
    import torch

    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for i, (_, p) in enumerate(model.named_parameters()):
        total += (i + 1) * p.detach().sum(dtype=torch.float64)
    return float(total)


# ----------------------------------------------------------------------------- engine role
def engine_main(args: argparse.Namespace) -> None:
    import torch
    from aiohttp import web
    from transformers import AutoTokenizer

    from nexrl.nodes.inference.engine import Engine
    from nexrl.nodes.inference.server import create_app
    from nexrl.nodes.inference.weights import WEIGHT_ROUTES_KEY, add_weight_routes

    model = build_model(args.shape, args.engine_device, args.dtype, seed=1)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    engine = Engine(model, tok, weight_version="init", model_path="bench-random").start()
    raw: dict = {}

    async def raw_recv(request: web.Request) -> web.Response:
        """Bench only: queue ``reps`` receives of one ``nbytes`` buffer on the weight group."""
        body = await request.json()
        group = request.app[WEIGHT_ROUTES_KEY].groups[body["group_name"]].group
        if raw.get("n") != body["nbytes"]:
            raw["buf"] = torch.empty(body["nbytes"], dtype=torch.uint8, device=group.device)
            raw["n"] = body["nbytes"]
        works = [group.broadcast(raw["buf"]) for _ in range(body["reps"])]
        deadline = time.monotonic() + group.timeout_s * body["reps"]
        for w in works:
            await asyncio.to_thread(group.wait, w, deadline, "raw receive")
        return web.json_response({"success": True, "message": "received"})

    async def engine_checksum(request: web.Request) -> web.Response:
        return web.json_response({"checksum": await asyncio.to_thread(checksum, engine.model),
                                  "weight_version": engine.weight_version})

    def routes(app: web.Application, eng) -> None:
        add_weight_routes(app, eng, timeout_s=60.0)
        app.router.add_post("/bench/raw_recv", raw_recv)
        app.router.add_get("/bench/checksum", engine_checksum)

    async def serve() -> None:
        runner = web.AppRunner(create_app(engine, extra_routes=routes), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print("PORT", runner.addresses[0][1], flush=True)
        parent = os.getppid()
        while os.getppid() == parent:  # exit when the trainer process is gone
            await asyncio.sleep(0.5)

    asyncio.run(serve())


# ----------------------------------------------------------------------------- trainer role
def _stats(times: list[float], nbytes: int) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times),
            "best_GBps": nbytes / min(times) / 1e9,
            "median_GBps": nbytes / statistics.median(times) / 1e9}


def _line(label: str, st: dict, raw_med: float | None) -> str:
    ratio = f"  ratio_vs_raw(median)={st['median_GBps'] / raw_med:.2f}x" if raw_med else ""
    return (f"RESULT {label:<34} min={st['min_s'] * 1e3:8.1f} ms  "
            f"median={st['median_s'] * 1e3:8.1f}"
            f" ms  best={st['best_GBps']:7.1f} GB/s  median={st['median_GBps']:7.1f} GB/s{ratio}")


def _start_engine(args: argparse.Namespace, tokenizer: str, log_path: str):
    """Spawn the engine server process (its model is built while ours is)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = "1,0"  # engine's cuda:0 is GPU1; GPU0 stays visible for P2P
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "engine", "--shape", args.shape,
           "--dtype", args.dtype, "--engine-device", "cuda:0" if args.device == "cuda" else "cpu",
           "--tokenizer", tokenizer]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _engine_url(proc, log_path: str) -> str:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for line in open(log_path).read().splitlines():
            if line.startswith("PORT "):
                return f"http://127.0.0.1:{int(line.split()[1])}"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"bench: engine did not start:\n{open(log_path).read()[-4000:]}")


def generate(client, what: str) -> dict:
    """One short generation; a failure is reported (not raised) so the figures still print."""
    from nexrl.engine_client import EngineError

    t = time.perf_counter()
    try:
        out = client.complete([1, 2, 3], max_tokens=8, ignore_eos=True)["choices"][0]
    except (EngineError, KeyError, IndexError) as e:
        print(f"GENERATION FAILED ({what}): {e}", flush=True)
        return {}
    print(f"INFO generation ({what}): {len(out['token_ids'])} tokens, version "
          f"{out['weight_version']}, {(time.perf_counter() - t) * 1e3:.0f} ms", flush=True)
    return out


def trainer_main(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import psutil
    import torch

    from nexrl.engine_client import EngineClient
    from nexrl.tiny import build_tiny_model
    from nexrl.weight_transfer import SenderConfig, WeightSender

    tmp = tempfile.mkdtemp(prefix="nexrl-bench-")
    tokenizer = build_tiny_model(os.path.join(tmp, "tok"))
    dev = "cuda:0" if args.device == "cuda" else "cpu"
    t0 = time.perf_counter()
    proc, log_path = None, os.path.join(tmp, "engine.log")
    try:
        proc = _start_engine(args, tokenizer, log_path)
        model = build_model(args.shape, dev, args.dtype, seed=2)
        url = _engine_url(proc, log_path)
        params = list(model.named_parameters())
        nbytes = sum(p.numel() * p.element_size() for _, p in params)
        print(f"INFO setup {time.perf_counter() - t0:.1f}s: {len(params)} tensors, "
              f"{nbytes / 1e9:.2f} GB {args.dtype}, device {args.device}, engine {url}", flush=True)
        client = EngineClient(url, timeout=120)
        backend = "nccl" if args.device == "cuda" else "gloo"
        cfg = SenderConfig(engine_urls=[url], backend=backend, device=dev, timeout_s=60.0,
                           bucket_bytes=GiB)
        sender = WeightSender(cfg)
        t = time.perf_counter()
        sender.connect()
        print(f"INFO connect (HTTP init + group join + NCCL comm) {time.perf_counter() - t:.2f}s")
        vcount = [0]
        pool = ThreadPoolExecutor(max_workers=1)

        def push(label: str, reps: int, **over) -> dict:
            for k, v in over.items():
                setattr(sender.cfg, k, v)
            times = []
            for r in range(reps + 1):  # first one is a warm-up (allocator, kernels)
                vcount[0] += 1
                version = f"v{vcount[0]}"
                s = sender.push(params, version)
                if r:
                    times.append(s.seconds)
            st = _stats(times, nbytes)
            st["buckets"] = s.num_buckets
            return st

        def raw(reps: int) -> dict:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            body = {"nbytes": nbytes, "reps": reps + 1, "group_name": cfg.group_name}
            fut = pool.submit(httpx.post, url + "/bench/raw_recv", json=body, timeout=600)
            times = []
            for r in range(reps + 1):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                w = sender.group.broadcast(buf)
                sender.group.wait(w, time.monotonic() + 60, "raw")
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times.append(time.perf_counter() - t)
            reply = fut.result(timeout=120)
            if reply.status_code != 200:
                raise RuntimeError(f"bench: raw receive failed on the engine: {reply.text}")
            return _stats(times, nbytes)

        # warm-up: one push and one generation
        sender.push(params, "warm")
        generate(client, "warm-up")
        results = {"raw": raw(args.reps)}
        raw_med = results["raw"]["median_GBps"]
        print(_line("raw broadcast (1 buffer)", results["raw"], None), flush=True)
        for depth in args.depths:
            for mib in args.bucket_mib:
                lab = f"bucketed {mib} MiB pipelined depth {depth}"
                results[lab] = push(lab, args.reps, bucket_bytes=mib << 20, pipelined=True,
                                    pipeline_depth=depth, per_tensor=False)
                print(_line(lab, results[lab], raw_med) + f"  buckets={results[lab]['buckets']}",
                      flush=True)
        lab = "bucketed 1024 MiB serial (sglang)"
        results[lab] = push(lab, args.reps, bucket_bytes=GiB, pipelined=False, per_tensor=False)
        print(_line(lab, results[lab], raw_med), flush=True)
        lab = "per-tensor, 1 request/GiB"
        results[lab] = push(lab, args.reps, bucket_bytes=GiB, pipelined=True, pipeline_depth=2,
                            per_tensor=True)
        print(_line(lab, results[lab], raw_med), flush=True)
        lab = "per-tensor, 1 request/tensor"
        results[lab] = push(lab, max(1, args.reps // 2), bucket_bytes=1, pipelined=True,
                            per_tensor=True)
        print(_line(lab, results[lab], raw_med), flush=True)

        # correctness: final push with the default setup, then checksum + one generation
        sender.cfg.bucket_bytes, sender.cfg.per_tensor, sender.cfg.pipelined = GiB, False, True
        sender.cfg.pipeline_depth = 2
        t = time.perf_counter()
        s = sender.push(params, "final")
        v = client.get_weight_version()
        t_visible = time.perf_counter() - t
        out = generate(client, "after final push")
        eng = httpx.get(url + "/bench/checksum", timeout=120).json()
        mine = checksum(model)
        ok = eng["checksum"] == mine and v == "final" and out.get("weight_version") == "final"
        print(f"CHECK final push {s.seconds * 1e3:.1f} ms ({s.gb_per_s:.1f} GB/s), version visible "
              f"after {t_visible * 1e3:.1f} ms; engine checksum {eng['checksum']!r} trainer "
              f"{mine!r}; generation {len(out.get('token_ids', []))} tokens at version "
              f"{out.get('weight_version')} -> {'OK' if ok else 'MISMATCH'}", flush=True)
        print(f"INFO engine's reply to the final bucket: {s.final_replies}", flush=True)
        if args.fault_check:
            fault_check(sender, client, params, cfg)
        summary = {k: {kk: round(vv, 5) if isinstance(vv, float) else vv for kk, vv in st.items()}
                   for k, st in results.items()}
        print("JSON " + json.dumps({"nbytes": nbytes, "device": args.device, "shape": args.shape,
                                    "results": summary, "checksum_ok": ok}), flush=True)
        sender.close()
        if not ok:
            raise SystemExit("bench: engine weights do not match the trainer's")
    except BaseException:
        if os.path.exists(log_path):
            print("ENGINE LOG (tail):\n" + open(log_path).read()[-6000:], flush=True)
        raise
    finally:
        if proc is not None:
            if proc.poll() is None:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    p.kill()
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def fault_check(sender, client, params, cfg) -> None:
    """A stalled trainer: the engine must give up after the group timeout and keep serving."""
    from nexrl.engine_client import EngineError
    from nexrl.weight_buckets import FLATTENED_BUCKET

    sender.close()
    sender.cfg.timeout_s = 5.0
    sender.connect()  # group with a 5 s deadline
    before = client.get_weight_version()
    name, p = params[0]
    t = time.perf_counter()
    try:  # announce a bucket the trainer never sends
        client.update_weights_from_distributed(
            [name], [str(p.dtype).removeprefix("torch.")], [list(p.shape)],
            group_name=cfg.group_name, load_format=FLATTENED_BUCKET, weight_version="stalled")
        verdict = "UNEXPECTED success"
    except EngineError as e:
        verdict = f"failed as expected: {str(e)[:160]}"
    elapsed = time.perf_counter() - t
    after = client.get_weight_version()
    gen = generate(client, "after the stalled update")
    print(f"FAULT stalled trainer: engine answered after {elapsed:.2f}s ({verdict}); version "
          f"{before} -> {after}; still serves ({len(gen.get('token_ids', []))} tokens)",
          flush=True)
    sender.close()
    sender.cfg.timeout_s = 60.0
    t = time.perf_counter()
    sender.connect()
    s = sender.push(params, "recovered")
    print(f"FAULT recovery: reconnect + push in {time.perf_counter() - t:.2f}s "
          f"(push {s.seconds * 1e3:.1f} ms), version {client.get_weight_version()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["trainer", "engine"], default="trainer")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--dtype", default=None, help="bfloat16 (cuda default) / float32 (cpu)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per configuration")
    ap.add_argument("--bucket-mib", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 3],
                    help="pipeline depths (buckets in flight) to measure")
    ap.add_argument("--fault-check", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--engine-device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.shape = args.shape or ("7b" if args.device == "cuda" else "small")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    (engine_main if args.role == "engine" else trainer_main)(args)


if __name__ == "__main__":
    main()
