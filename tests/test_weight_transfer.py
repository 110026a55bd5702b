"""Weight transfer trainer -> engines: bucket planning, and the real HTTP + gloo path end to end.

Run: ``python -m pytest tests/test_weight_transfer.py -q`` (CPU only, ~40 s on 2 cores).

Two embedded-engine servers run as real subprocesses on 127.0.0.1, each with a tiny Qwen2
(random init, seed 0). The test process is the trainer: it loads tiny models with other seeds,
pushes their weights with ``WeightSender`` (gloo) and checks that each engine's greedy
completion and per-token logprobs become exactly the trainer model's own. The failure tests
use a trainer subprocess that stalls and is killed mid-update, and an "engine" that accepts
TCP connections but never answers; they check the error arrives within the timeout and that
the engines keep serving their previous weights and version.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers.procs import kill_tree
from nexrl.engine_client import EngineClient, EngineError
from nexrl.tiny import build_tiny_model
from nexrl.weight_buckets import (FLATTENED_BUCKET, TensorMeta, WeightSyncError, pack_bucket,
                                  plan_buckets, unpack_bucket)
from nexrl.weight_transfer import SenderConfig, WeightSender

PROMPT = [20, 31, 42, 53, 64, 75, 86]  # char-level ids of the tiny tokenizer
NEW_TOKENS = 6

ENGINE_MAIN = r"""
import sys, threading
from nexrl.nodes.inference import InferenceConfig
from nexrl.nodes.inference.server import run_server
from nexrl.nodes.inference.weights import add_weight_routes
cfg = InferenceConfig(model_path=sys.argv[1], port=0, weight_version="init", num_threads=1)
run_server(cfg, threading.Event(), ready_cb=lambda port: print("PORT", port, flush=True),
           extra_routes=lambda app, eng: add_weight_routes(app, eng, timeout_s=30.0))
"""

STALLING_TRAINER_MAIN = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
from nexrl.weight_transfer import SenderConfig, WeightSender
path, urls, timeout = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
sender = WeightSender(SenderConfig(engine_urls=urls, backend="gloo", bucket_bytes=16384,
                                   timeout_s=timeout))
sender.connect()
def stalling():  # like a trainer stuck gathering a shard after a few buckets went out
    for i, item in enumerate(model.named_parameters()):
        if i == 8:
            print("STALLED", flush=True)
            time.sleep(3600)
        yield item
sender.push(stalling(), "never-applied")
"""


# ----------------------------------------------------------------------------- helpers
def _wait_for_line(log: Path, proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{prefix!r} not seen (exit {proc.poll()}); "
                         f"log:\n{log.read_text()[-3000:]}")


def _spawn(code: str, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", code, *args], stdout=f,
                                stderr=subprocess.STDOUT, env=env)


def _greedy_engine(client: EngineClient) -> tuple[list[int], list[float], str]:
    r = client.complete(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    c = r["choices"][0]
    return c["token_ids"], c["token_logprobs"], c["weight_version"]


def _greedy_reference(model) -> tuple[list[int], list[float]]:
    ids, lps = list(PROMPT), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            tok = int(lp.argmax())
            ids.append(tok)
            lps.append(float(lp[tok]))
    return ids[len(PROMPT):], lps


def _trainer_model(tmp: Path, seed: int):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(str(tmp / f"trainer{seed}"), seed=seed)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Two embedded-engine servers (tiny Qwen2, seed 0) in subprocesses; killed at the end."""
    tmp = tmp_path_factory.mktemp("wt")
    path = build_tiny_model(str(tmp / "engine_model"), seed=0)
    procs, clients = [], []
    try:
        logs = [tmp / f"engine{i}.log" for i in range(2)]
        procs = [_spawn(ENGINE_MAIN, [path], log) for log in logs]
        for proc, log in zip(procs, logs):
            port = int(_wait_for_line(log, proc, "PORT", 120).split()[1])
            clients.append(EngineClient(f"http://127.0.0.1:{port}", timeout=30))
        yield tmp, clients
    finally:
        for c in clients:
            c.close()
        for p in procs:
            kill_tree(p, wait_s=10.0)


# ----------------------------------------------------------------------------- planning
def test_plan_pack_round_trip():
    g = torch.Generator().manual_seed(0)
    tensors = [("a", torch.randn(10, 3, generator=g)),
               ("b", torch.randn(5, generator=g).bfloat16()),
               ("big", torch.randn(100, generator=g)), ("c", torch.randn(7, 2, generator=g)),
               ("d", torch.arange(9)), ("e", torch.randn(3, generator=g).bfloat16()),
               ("f", torch.randn(20, generator=g))]
    metas = [TensorMeta.of(n, t) for n, t in tensors]
    buckets = plan_buckets(metas, bucket_bytes=256)
    seen = [m.name for b in buckets for m in b.metas]
    assert sorted(seen) == sorted(n for n, _ in tensors) and len(seen) == len(set(seen))
    for b in buckets:
        assert {m.dtype for m in b.metas} == {b.dtype}  # dtype-homogeneous
        assert b.nbytes == sum(m.nbytes for m in b.metas)
        assert b.nbytes <= 256 or len(b.metas) == 1  # bound, except a lone oversize tensor
    big = [b for b in buckets if any(m.name == "big" for m in b.metas)]
    assert len(big) == 1 and len(big[0].metas) == 1  # 400 bytes > 256: a bucket of its own
    by_name = dict(tensors)
    for b in buckets:  # pack -> unpack restores every tensor exactly, with or without `out`
        flat = pack_bucket([by_name[m.name] for m in b.metas])
        assert flat.dtype == torch.uint8 and flat.numel() == b.nbytes
        buf = torch.empty(1024, dtype=torch.uint8)
        assert torch.equal(pack_bucket([by_name[m.name] for m in b.metas], out=buf), flat)
        for name, t in unpack_bucket(flat, b.metas):
            assert t.dtype == by_name[name].dtype and torch.equal(t, by_name[name])
    with pytest.raises(WeightSyncError):
        unpack_bucket(torch.zeros(3, dtype=torch.uint8), metas[:1])


def test_install_weights_swaps_aligned_copies_rest_and_validates_first(tmp_path):
    from nexrl.nodes.inference.engine import Engine, load_model
    from nexrl.nodes.inference.weights import install_weights

    model, tok = load_model(build_tiny_model(str(tmp_path / "m"), seed=0), None, "cpu", "float32")
    eng = Engine(model, tok, weight_version="a")  # scheduler not started: install runs alone
    params = dict(model.named_parameters())
    new = {n: torch.randn_like(p) for n, p in params.items()}
    with pytest.raises(ValueError, match="nothing applied"):  # one bad shape: nothing changes
        install_weights(eng, [("model.norm.weight", new["model.norm.weight"]),
                              ("lm_head.weight", torch.zeros(3, 3))], "b")
    assert eng.weight_version == "a" and not torch.equal(params["model.norm.weight"],
                                                         new["model.norm.weight"])
    flat = torch.empty(new["model.norm.weight"].numel() + 1)  # a view 4 bytes off alignment
    odd = flat[1:].view_as(new["model.norm.weight"]).copy_(new["model.norm.weight"])
    items = [(n, t) for n, t in new.items() if n != "model.norm.weight"]
    swapped, copied = install_weights(eng, items + [("model.norm.weight", odd)], "b")
    assert (swapped, copied) == (len(items), 1) and eng.weight_version == "b"
    for n, p in model.named_parameters():
        assert torch.equal(p, new[n])
    emb = new["model.embed_tokens.weight"]
    assert params["model.embed_tokens.weight"].data_ptr() == emb.data_ptr()  # no copy made
    assert params["model.norm.weight"].data_ptr() != odd.data_ptr()


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("per_tensor,pipelined,seed", [(False, True, 11), (True, True, 12),
                                                       (False, False, 13)],
                         ids=["bucketed", "per_tensor", "bucketed_serial"])
def test_push_changes_generations_to_trainer_weights(engines, per_tensor, pipelined, seed):
    tmp, clients = engines
    model = _trainer_model(tmp, seed)
    ref_ids, ref_lps = _greedy_reference(model)
    before = [_greedy_engine(c) for c in clients]
    for ids, lps, _ in before:  # engines start from other weights: they must disagree now
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) > 1e-2 or ids != ref_ids
    version = f"v{seed}"
    cfg = SenderConfig(engine_urls=[c.base_url for c in clients], backend="gloo",
                       bucket_bytes=16 * 1024, timeout_s=20, per_tensor=per_tensor,
                       pipelined=pipelined)
    with WeightSender(cfg) as sender:
        stats = sender.push(model.named_parameters(), version)
    n_params = len(list(model.named_parameters()))
    assert stats.num_tensors == n_params and stats.num_buckets >= 5  # several buckets used
    for c in clients:
        ids, lps, v = _greedy_engine(c)
        assert ids == ref_ids and v == version
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4
        assert c.get_weight_version() == version


# ----------------------------------------------------------------------------- dead peers
def test_trainer_dies_mid_update_engines_keep_old_weights(engines):
    tmp, clients = engines
    before = [_greedy_engine(c) for c in clients]
    versions = [c.get_weight_version() for c in clients]
    path = build_tiny_model(str(tmp / "trainer21"), seed=21)
    timeout = 3.0
    log = tmp / "stalling_trainer.log"
    proc = _spawn(STALLING_TRAINER_MAIN, [path, ",".join(c.base_url for c in clients),
                                          str(timeout)], log)
    try:
        _wait_for_line(log, proc, "STALLED", 120)  # some buckets staged, trainer stuck
        time.sleep(0.5)
        meta = dict(names=["model.norm.weight"], dtypes=["float32"], shapes=[[64]],
                    load_format=FLATTENED_BUCKET, weight_version="never-applied")
        # Engine 0: the trainer is alive but never sends -> the engine's deadline fires.
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="keeps weight version"):
            clients[0].update_weights_from_distributed(**meta)
        elapsed = time.monotonic() - t0
        assert timeout - 0.5 < elapsed < timeout + 3.0, elapsed
        # Engine 1: a receive is in flight when the trainer process is killed.
        box: dict = {}

        def post() -> None:
            try:
                clients[1].update_weights_from_distributed(**meta)
            except EngineError as e:
                box["error"], box["at"] = e, time.monotonic()

        th = threading.Thread(target=post)
        th.start()
        time.sleep(0.5)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        th.join(timeout + 5)
        assert "error" in box and box["at"] - killed_at < timeout + 2.0, box
    finally:
        kill_tree(proc, wait_s=10.0)
    for c, (ids, lps, _), v in zip(clients, before, versions):
        assert c.get_weight_version() == v  # staged buckets were never applied
        ids2, lps2, v2 = _greedy_engine(c)
        assert ids2 == ids and lps2 == lps and v2 == v


def test_engine_never_joins_trainer_errors_in_time(engines):
    tmp, clients = engines
    live = clients[0]
    before, version = _greedy_engine(live), live.get_weight_version()
    hung = socket.socket()  # accepts TCP connections (kernel backlog) but never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        timeout = 3.0
        cfg = SenderConfig(engine_urls=[live.base_url, f"http://127.0.0.1:{hung.getsockname()[1]}"],
                           backend="gloo", timeout_s=timeout)
        sender = WeightSender(cfg)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="join"):
            sender.connect()
        assert time.monotonic() - t0 < timeout + 5.0 + 3.0
        sender.close()
    finally:
        hung.close()
    assert live.get_weight_version() == version
    assert _greedy_engine(live) == before
