"""Validator node: a real `nexrl-node` process over a real event proxy; validation.done is
observed with a Subscriber. The test plays weight_sync and the rollout workers.

    python -m pytest tests/test_validator.py -q
"""

from __future__ import annotations

import json
import statistics

import pytest

from helpers.data_procs import NodeProc, trajectory, wait_for
from nexrl.bus.reqrep import RemoteError


def put(node: NodeProc, trajs: list[dict]) -> dict:
    return node.client.request("trajectory.put", {"trajectories": trajs}).body


def vtraj(vid: str, row: int, reward: float, source: str, length: int, **kw) -> dict:
    return trajectory(f"val/{vid}/{row}", 0, reward, mode="validate", validation_id=vid,
                      data_source=source, response_len=length, **kw)


def test_aggregates_per_source_publishes_and_writes_jsonl(bus, tmp_path):
    run_dir = tmp_path / "run"
    done = bus.subscriber(("validation.done",))
    val = bus.start("validator", {"correct_threshold": 1.0}, node={"run_dir": str(run_dir)})
    samples = [vtraj("v3", 0, 1.0, "math", 4),                            # correct: reward >= 1
               vtraj("v3", 1, 0.0, "math", 2),
               vtraj("v3", 2, 0.5, "code", 6, metrics={"correct": 1.0}),  # correct: says so
               vtraj("v3", 3, 0.25, "code", 0)]
    assert put(val, samples[:1]) == {"accepted": 1, "duplicates": 0}     # before validation.begin
    assert val.client.request("validation.begin",
                              {"version": 3, "validation_id": "v3", "num_samples": 4}).body == {}
    assert wait_for(done, "validation.done", 0.3) is None
    assert put(val, samples) == {"accepted": 3, "duplicates": 1}
    msg = wait_for(done, "validation.done", 5)
    assert msg is not None
    body = msg.body
    assert (body["version"], body["validation_id"], body["num_samples"]) == (3, "v3", 4)
    rewards = [1.0, 0.0, 0.5, 0.25]
    want = {"reward_mean": statistics.mean(rewards), "reward_std": statistics.pstdev(rewards),
            "accuracy": 0.5, "response_length_mean": 3.0, "complete": 1.0,
            "math/reward_mean": 0.5, "math/accuracy": 0.5,
            "code/reward_mean": 0.375, "code/accuracy": 0.5}
    assert body["metrics"] == pytest.approx(want)
    lines = (run_dir / "validation.jsonl").read_text().splitlines()
    assert len(lines) == 1
    logged = json.loads(lines[0])
    assert logged["validation_id"] == "v3" and logged["metrics"] == pytest.approx(want)
    assert "validation v3 version 3: 4/4 samples" in val.log()
    # a late copy after the pass is done is dropped; a repeated begin changes nothing
    assert put(val, samples[:1]) == {"accepted": 0, "duplicates": 0}
    val.client.request("validation.begin", {"version": 3, "validation_id": "v3", "num_samples": 4})
    assert wait_for(done, "validation.done", 0.3) is None
    assert val.status()["late"] == 1


def test_timeout_reports_a_partial_pass_and_bad_input_is_refused(bus):
    events = bus.subscriber(("validation.done", "node.error"))
    val = bus.start("validator", {"timeout_s": 0.5})
    val.client.request("validation.begin", {"version": 1, "validation_id": "v1", "num_samples": 3})
    put(val, [vtraj("v1", 0, 1.0, "math", 2)])
    err = wait_for(events, "node.error", 5, lambda b: b["code"] == "timeout")
    assert err is not None and "only 1 of 3 samples" in err.body["message"]
    done = wait_for(events, "validation.done", 5)
    assert done is not None and done.body["num_samples"] == 1
    assert done.body["metrics"]["complete"] == 0.0 and done.body["metrics"]["accuracy"] == 1.0
    assert put(val, [vtraj("v1", 1, 1.0, "math", 2)]) == {"accepted": 0, "duplicates": 0}
    # an empty validation split completes at once
    val.client.request("validation.begin", {"version": 2, "validation_id": "v2", "num_samples": 0})
    empty = wait_for(events, "validation.done", 5)
    assert empty is not None and empty.body["validation_id"] == "v2"
    assert empty.body["num_samples"] == 0 and empty.body["metrics"] == {"complete": 1.0}
    with pytest.raises(RemoteError) as e:
        put(val, [trajectory("train/e0/1", 0, 1.0)])                  # no validation_id
    assert e.value.code == "invalid_body" and "validation_id" in e.value.message
    with pytest.raises(RemoteError) as e:
        val.client.request("validation.begin", {"version": 9, "validation_id": "v1", "num_samples": 3})
    assert e.value.code == "invalid_body"
