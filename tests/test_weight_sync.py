"""weight_sync node: config validation, the ready/pushed handshake against real engines, the
failure paths, weights.live re-publication, drain, validation triggers.

Run: ``python -m pytest tests/test_weight_sync.py -q`` (CPU, ~30 s on 2 cores).

Real processes: an event proxy in the test process; two embedded engines (inference nodes,
tiny Qwen2), the weight_sync node, and a recording dataloader + validator (real bus peers,
tests/helpers/trainer_peers.py) all run as `nexrl-node` subprocesses. The test process plays
the trainer: it sends weights.ready / weights.pushed over the bus and pushes real weights
with nexrl.weight_transfer.WeightSender (gloo).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from helpers.trainer_cluster import Bus, Cluster, status
from nexrl.bus.reqrep import RemoteError
from nexrl.config import ConfigError, build
from nexrl.engine_client import EngineClient
from nexrl.nodes.weight_sync import WeightSyncConfig
from nexrl.tiny import build_tiny_model

PEERS = "tests/helpers/trainer_peers.py"
PUSH_TIMEOUT_S = 4.0


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("cfg, words", [
    (dict(mode="sync", max_staleness=1), "must be 0 in mode sync"),
    (dict(mode="batch-async", max_staleness=0), "must be >= 1 in mode batch-async"),
    (dict(mode="fully-async", max_staleness=0), "must be >= 1 in mode fully-async"),
    (dict(mode="fully-async", max_staleness=1, pause_mode="drain"),
     "not allowed in mode fully-async"),
    (dict(mode="batch-async", max_staleness=1, pause_mode="retract"),
     "not allowed in mode batch-async"),
    (dict(mode="async"), "is not one of"),
])
def test_mode_validation_errors(cfg, words):
    with pytest.raises(ConfigError, match=words):
        build(WeightSyncConfig, cfg)


def test_mode_defaults():
    def pause(**kw):
        return build(WeightSyncConfig, kw).resolved_pause_mode

    assert pause() == "drain"
    assert pause(mode="batch-async", max_staleness=2) == "drain"
    assert pause(mode="fully-async", max_staleness=1) == "retract"


def test_cli_refuses_bad_mode_fast():
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "nexrl.cli.node", "weight_sync",
                        "weight_sync.mode=sync", "weight_sync.max_staleness=2"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "max_staleness must be 0 in mode sync" in r.stderr
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------- live job
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    model = build_tiny_model(str(root / "tiny"))
    other = build_tiny_model(str(root / "tiny-seed1"), seed=1)  # "trained" weights
    bus = Bus()
    cl = Cluster(bus, root)
    try:
        urls = [cl.start_engine(f"inference-{i}", model) for i in range(2)]
        cl.add_peer("dataloader", "dataloader")
        cl.add_peer("validator", "validator")
        cl.add_peer("weight_sync", "weight_sync")
        cl.spawn(f"{PEERS}:RecordingDataloader", "dataloader", [])
        cl.spawn(f"{PEERS}:RecordingValidator", "validator", [])
        for i in range(2):
            cl.wait_healthy(f"inference-{i}")
        cl.spawn("weight_sync", "weight_sync", [
            "weight_sync.republish_s=0.4", f"weight_sync.push_timeout_s={PUSH_TIMEOUT_S}",
            "weight_sync.validate_every=1", "weight_sync.validate_before_train=true",
            "weight_sync.drain_timeout_s=30"],
            peers=["inference-0", "inference-1", "dataloader", "validator"])
        bus.wait("weights.live", timeout=60, version=0)
        ws = bus.client(cl.peers["weight_sync"].endpoint, timeout=60)
        yield dict(bus=bus, cl=cl, urls=urls, ws=ws, model=model, other=other)
        ws.close()
    finally:
        cl.close()
        bus.close()


def _versions(urls):
    out = []
    for u in urls:
        with EngineClient(u) as c:
            out.append(c.get_weight_version())
    return out


def _info(url):
    with EngineClient(url) as c:
        return c._call("GET", "/get_server_info")


def _push(urls, model_path, version):
    import torch
    from transformers import AutoModelForCausalLM

    from nexrl.weight_transfer import SenderConfig, WeightSender

    m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    s = WeightSender(SenderConfig(engine_urls=urls, backend="gloo", bucket_bytes=1 << 16,
                                  timeout_s=30))
    s.connect()
    try:
        stats = s.push(m.named_parameters(), str(version))
    finally:
        s.close()
    return stats


def _wait_recorded(bus, endpoint, key, item, timeout=20.0):
    deadline = time.monotonic() + timeout
    while item not in status(bus, endpoint)["stats"][key]:
        assert time.monotonic() < deadline, f"{item} never recorded in {key}"
        time.sleep(0.1)


def test_validation_before_train(job):
    bus, peers = job["bus"], job["cl"].peers
    _wait_recorded(bus, peers["dataloader"].endpoint, "validations", [0, "v0"])
    _wait_recorded(bus, peers["validator"].endpoint, "begins", [0, "v0", 8])


def test_handshake_makes_version_live(job):
    bus, ws, urls = job["bus"], job["ws"], job["urls"]
    mark = bus.mark()
    r = ws.request("weights.ready", {"version": 1, "step": 1}).body
    assert sorted(r["engines"]) == sorted(urls) and r["paused"] is True
    assert all(_info(u)["paused"] for u in urls)
    stats = _push(urls, job["other"], 1)
    live = ws.request("weights.pushed", {"version": 1, "ok": True, "seconds": stats.seconds,
                                         "bytes": stats.nbytes}).body
    assert live == {"live": True}
    ev = bus.wait("weights.live", since=mark, version=1)
    assert sorted(ev.body["engines"]) == sorted(urls) and ev.body["sync_s"] > 0
    m = bus.wait("metrics", since=mark, kind="sync")
    assert m.body["step"] == 1 and m.body["values"]["sync/version"] == 1.0
    assert m.body["values"]["sync/bytes"] == float(stats.nbytes)
    assert _versions(urls) == ["1", "1"]
    assert not any(_info(u)["paused"] for u in urls)
    # validate_every=1: version 1 is validated once live
    _wait_recorded(bus, job["cl"].peers["dataloader"].endpoint, "validations", [1, "v1"])
    _wait_recorded(bus, job["cl"].peers["validator"].endpoint, "begins", [1, "v1", 8])


def test_weights_live_is_republished(job):
    bus = job["bus"]
    mark = bus.mark()
    time.sleep(1.5)
    again = [m for m in bus.events[mark:] if m.type == "weights.live"]
    assert len(again) >= 2, again
    assert {m.body["version"] for m in again} == {1}


def test_failed_push_resumes_engines_and_keeps_version(job):
    bus, ws, urls = job["bus"], job["ws"], job["urls"]
    mark = bus.mark()
    assert ws.request("weights.ready", {"version": 2, "step": 2}).body["paused"]
    assert all(_info(u)["paused"] for u in urls)
    r = ws.request("weights.pushed", {"version": 2, "ok": False, "seconds": 0.1, "bytes": 0,
                                      "error": "simulated broadcast failure"}).body
    assert r == {"live": False}
    err = bus.wait("node.error", since=mark, code="weight_sync_failed")
    assert "simulated broadcast failure" in err.body["message"]
    assert _versions(urls) == ["1", "1"]
    assert not any(_info(u)["paused"] for u in urls)
    assert not [m for m in bus.events[mark:] if m.type == "weights.live" and m.body["version"] == 2]
    # a push reported ok that the engines never received: caught by the version check
    mark = bus.mark()
    ws.request("weights.ready", {"version": 2, "step": 2})
    r = ws.request("weights.pushed", {"version": 2, "ok": True, "seconds": 0.1, "bytes": 1}).body
    assert r == {"live": False}
    err = bus.wait("node.error", since=mark, code="weight_sync_failed")
    assert "other versions" in err.body["message"]
    assert not any(_info(u)["paused"] for u in urls)


def test_missing_push_report_resumes_engines(job):
    bus, ws, urls = job["bus"], job["ws"], job["urls"]
    mark = bus.mark()
    ws.request("weights.ready", {"version": 2, "step": 2})
    assert all(_info(u)["paused"] for u in urls)
    bus.wait("node.error", since=mark, timeout=PUSH_TIMEOUT_S + 10, code="weights_push_timeout")
    assert not any(_info(u)["paused"] for u in urls)
    assert _versions(urls) == ["1", "1"]


def test_drain_lets_running_requests_finish(job):
    """pause_mode drain (the sync default): weights.ready is answered only after a request
    that was generating has finished, which therefore never spans two versions."""
    ws, urls = job["ws"], job["urls"]
    box = {}

    def generate():
        with EngineClient(urls[0], timeout=60) as c:
            r = c.complete([20, 31, 42], max_tokens=120, temperature=1.0, ignore_eos=True)
        box["done"] = time.monotonic()
        box["choice"] = r["choices"][0]

    t = threading.Thread(target=generate, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while _info(urls[0])["running"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    ws.request("weights.ready", {"version": 3, "step": 3})
    replied = time.monotonic()
    t.join(30)
    assert box["done"] <= replied
    assert box["choice"]["finish_reason"] == "length"
    assert set(box["choice"]["token_weight_versions"]) == {"1"}
    ws.request("weights.pushed", {"version": 3, "ok": False, "seconds": 0.0, "bytes": 0,
                                  "error": "test ends the sync"})
    assert not any(_info(u)["paused"] for u in urls)


def test_unknown_request_is_refused_not_fatal(job):
    ws = job["ws"]
    with pytest.raises(RemoteError, match="not handled here"):
        ws.request("batch.request", {"num_groups": 1})
    assert ws.request("ping", {}).body["state"] == "running"
