"""Pool node: real `nexrl-node` processes (pool, and a real dataloader where refunds and the
end of the data matter) over a real event proxy. The test plays the rollout and the trainer.

    python -m pytest tests/test_pool.py -q
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from helpers.data_procs import NodeProc, trajectory
from nexrl.bus.reqrep import RemoteError


def put(pool: NodeProc, trajs: list[dict]) -> dict:
    return pool.client.request("trajectory.put", {"trajectories": trajs}).body


def group(gid: str, rewards: list[float], **kw) -> list[dict]:
    return [trajectory(gid, i, r, **kw) for i, r in enumerate(rewards)]


def wait_until(fn, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.05)
    return False


def test_grouping_dedupe_long_poll_and_capacity(bus):
    pool = bus.start("pool", {"max_groups": 2})
    trainer = bus.client(pool.endpoint)
    msg_id = trainer.send("batch.request", {"num_groups": 2, "wait_s": 10})
    a, b = "train/e0/10", "train/e0/9"      # b sorts first: item ids compare numerically
    assert put(pool, group(a, [1.0, 0.0], group_size=2) + group(b, [0.5], group_size=2)) == \
        {"accepted": 3, "duplicates": 0}
    assert trainer.recv_reply(0.3) is None                   # one group still partial: held
    assert put(pool, group(b, [0.5], group_size=2)) == {"accepted": 0, "duplicates": 1}
    assert put(pool, [trajectory(b, 1, 0.25, group_size=2)]) == {"accepted": 1, "duplicates": 0}
    reply = trainer.recv_reply(5)
    assert reply is not None and reply.reply_to == msg_id
    body = reply.body
    assert body["num_groups"] == 2 and not body["exhausted"]
    assert [t["traj_id"] for t in body["trajectories"]] == [f"{b}/0", f"{b}/1", f"{a}/0", f"{a}/1"]
    t = body["trajectories"][0]
    assert t["response_ids"].dtype == np.int32 and t["response_logprobs"].dtype == np.float32
    assert body["stats"]["groups_complete"] == 0 and body["stats"]["trajectories_held"] == 0
    # a late copy of a released group (a re-issued lease finishing) is not a new group
    assert put(pool, group(a, [1.0], group_size=2)) == {"accepted": 0, "duplicates": 1}
    empty = pool.client.request("batch.request", {"num_groups": 1}).body
    assert empty["num_groups"] == 0 and empty["trajectories"] == [] and not empty["exhausted"]
    # capacity: two partial groups fill max_groups=2; a third is refused, the held ones still fill
    put(pool, [trajectory("train/e0/1", 0, 1.0, group_size=2), trajectory("train/e0/2", 0, 1.0, group_size=2)])
    with pytest.raises(RemoteError) as e:
        put(pool, [trajectory("train/e0/3", 0, 1.0, group_size=2)])
    assert e.value.code == "busy" and "max_groups=2" in e.value.message
    assert put(pool, [trajectory("train/e0/1", 1, 0.0, group_size=2)])["accepted"] == 1
    for bad, why in (({"group_id": "g"}, "traj_id"),
                     (trajectory("train/e0/4", 0, 1.0), "group_size"),
                     (trajectory("train/e0/1", 0, 1.0, group_size=3), "earlier ones said 2"),
                     (trajectory("val/v0/1", 0, 1.0, mode="validate", group_size=1), "mode")):
        with pytest.raises(RemoteError) as e:
            put(pool, [bad])
        assert e.value.code == "invalid_body" and why in e.value.message, e.value.message
    stats = pool.status()
    assert stats["late_duplicates"] == 1 and stats["refused_busy"] == 1
    assert stats["groups_complete"] == 1 and stats["groups_partial"] == 1


def test_zero_variance_groups_are_refunded_to_the_dataloader(bus, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    dl = bus.start("dataloader", {"train_files": [str(data)], "n_samples": 2, "batch_groups": 2,
                                  "max_staleness": 0})
    pool = bus.start("pool", {"group_size": 2, "filter_zero_variance": True,
                              "exhausted_poll_s": 0.3}, peers={"dataloader": dl})
    leases = dl.client.request("lease.request", {"credits": 10}).body["leases"]
    g0, g1 = (x["item"]["group_id"] for x in leases)
    assert put(pool, group(g0, [1.0, 1.0]) + group(g1, [0.0, 1.0]))["accepted"] == 4
    # the pool refunds g0, so the dataloader admits a replacement in the same step slot
    more = dl.client.request("lease.request", {"credits": 10, "wait_s": 5}, timeout=15).body["leases"]
    assert len(more) == 1
    g2 = more[0]["item"]["group_id"]
    assert dl.status()["dataloader/refunded"] == 1
    assert wait_until(lambda: pool.status()["refunds_sent"] == 1)
    assert pool.status()["groups_filtered"] == 1
    # neither role needs torch, so neither imports it
    assert dl.status()["torch_imported"] is False and pool.status()["torch_imported"] is False
    assert put(pool, group(g0, [0.0, 1.0]))["duplicates"] == 2   # a filtered group stays closed
    put(pool, group(g2, [0.0, 0.5]))
    batch = pool.client.request("batch.request", {"num_groups": 2}).body
    assert batch["num_groups"] == 2
    assert {t["group_id"] for t in batch["trajectories"]} == {g1, g2}
    dl.client.request("lease.ack", {"lease_ids": [x["lease_id"] for x in leases + more]})
    t0 = time.monotonic()
    end = pool.client.request("batch.request", {"num_groups": 2, "wait_s": 8}, timeout=15).body
    assert end["exhausted"] and end["num_groups"] == 0
    assert time.monotonic() - t0 < 4, "the dataloader's exhaustion, not wait_s, should answer"


def test_state_and_resume(bus, tmp_path):
    pool = bus.start("pool", {"group_size": 2})
    done, part, gone = "train/e0/4", "train/e0/2", "train/e0/7"
    put(pool, group(done, [1.0, 0.0]) + group(part, [0.5]))
    state = pool.client.request("state.get", {}).body["state"]
    text = json.dumps(state)                                 # the trainer stores it as JSON
    assert [(g["group_id"], g["complete"]) for g in state["groups"]] == [(done, True), (part, False)]
    pool.kill()
    run_dir = tmp_path / "run"                  # resume_from=auto: newest complete checkpoint
    for step, pool_state in ((1, {"groups": []}), (2, json.loads(text))):
        ckpt = run_dir / "checkpoints" / f"step_{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
        (ckpt / "data_state.json").write_text(
            json.dumps({"dataloader": None, "pool": pool_state, "consumed": [gone]}))
    pool2 = bus.start("pool", {"group_size": 2, "resume_from": "auto"}, name="pool-resumed",
                      node={"run_dir": str(run_dir)})
    assert "resumed from " + str(run_dir / "checkpoints" / "step_2") in pool2.log()
    stats = pool2.status()
    assert stats["groups_complete"] == 1 and stats["groups_partial"] == 1
    assert put(pool2, group(gone, [1.0, 0.0])) == {"accepted": 0, "duplicates": 2}   # consumed
    assert put(pool2, group(done, [1.0])) == {"accepted": 0, "duplicates": 1}        # held
    assert put(pool2, [trajectory(part, 1, 0.0)]) == {"accepted": 1, "duplicates": 0}
    batch = pool2.client.request("batch.request", {"num_groups": 2}).body
    assert [t["traj_id"] for t in batch["trajectories"]] == [f"{part}/0", f"{part}/1",
                                                             f"{done}/0", f"{done}/1"]
    original = group(done, [1.0, 0.0])
    for got, want in zip(batch["trajectories"][2:], original):
        for key in ("prompt_ids", "response_ids", "response_mask", "response_logprobs"):
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key])
        assert got["reward"] == want["reward"] and got["timing"] == want["timing"]
    # a checkpoint this version cannot read stops the node at start with the cause named
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data_state.json").write_text(json.dumps({"pool": {"groups": [{"group_id": "g"}]},
                                                     "consumed": []}))
    with pytest.raises(RuntimeError, match="malformed pool state"):
        bus.start("pool", {"group_size": 2, "resume_from": str(bad)}, name="pool-bad")
