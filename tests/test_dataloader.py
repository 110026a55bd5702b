"""Dataloader node: real `nexrl-node` processes over a real event proxy (no mocks).

    python -m pytest tests/test_dataloader.py -q
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.data_procs import DataBus, NodeProc, wait_for
from nexrl.bus.reqrep import RemoteError


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def prompts(tmp: Path, n: int, name: str = "train.jsonl") -> str:
    return write_jsonl(tmp / name, [{"prompt": f"p{i}", "answer": i} for i in range(n)])


def lease(node: NodeProc, credits: int, wait_s: float = 0.0) -> tuple[list[dict], bool]:
    body = node.client.request("lease.request", {"credits": credits, "wait_s": wait_s},
                               timeout=wait_s + 10).body
    return body["leases"], body.get("exhausted", False)


def ack(node: NodeProc, leases: list[dict]) -> dict:
    return node.client.request("lease.ack", {"lease_ids": [x["lease_id"] for x in leases]}).body


def ids(leases: list[dict]) -> list[str]:
    return [x["item"]["item_id"] for x in leases]


def live(bus: DataBus, version: int) -> None:
    bus.pub.publish("weights.live", {"version": version, "sync_s": 0.01, "engines": []})


def test_jsonl_and_parquet_rows_groups_and_epochs(bus, tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    jl = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "answer": i, "data_source": "math"}
                                            for i in range(3)])
    pa_ = write_parquet(tmp_path / "b.parquet", [{"prompt": chat, "answer": 10 + i} for i in range(2)])
    dl = bus.start("dataloader", {"train_files": [jl, pa_], "n_samples": 3, "num_epochs": 2,
                                  "seed": 1, "admission_control": False})
    leases, exhausted = lease(dl, 100)
    assert not exhausted
    got = ids(leases)
    assert sorted(got) == sorted(f"train/e{e}/{i}" for e in (0, 1) for i in range(5))
    assert all(i.startswith("train/e0/") for i in got[:5])          # epochs in order
    assert got[:5] != [i.replace("e1", "e0") for i in got[5:]]       # reshuffled per epoch
    by_id = {x["item"]["item_id"]: x["item"] for x in leases}
    t = by_id["train/e0/3"]                                          # first parquet row
    assert (t["group_id"], t["mode"], t["n"]) == ("train/e0/3", "train", 3)
    assert t["row"] == {"prompt": chat, "answer": 10} and t["prompt"] == chat
    assert t["data_source"] == "b"                                   # file stem
    assert by_id["train/e1/1"]["row"] == {"prompt": "p1", "answer": 1, "data_source": "math"}
    assert by_id["train/e1/1"]["data_source"] == "math"
    assert all(0 < x["deadline_s"] <= 600 for x in leases)
    assert lease(dl, 5) == ([], False)                               # leased, not acked yet
    assert ack(dl, leases) == {"acked": 10, "unknown": []}
    assert lease(dl, 5) == ([], True)


def test_shuffle_is_seeded_and_reproducible(bus, tmp_path):
    data = prompts(tmp_path, 20)
    orders = {}
    for name, seed in (("dl-a", 7), ("dl-b", 7), ("dl-c", 8)):
        node = bus.start("dataloader", {"train_files": [data], "n_samples": 1, "num_epochs": 2,
                                        "seed": seed, "admission_control": False}, name=name)
        orders[name] = ids(lease(node, 40)[0])
    assert orders["dl-a"] == orders["dl-b"]
    assert orders["dl-a"] != orders["dl-c"]
    assert sorted(orders["dl-c"]) == sorted(orders["dl-a"])


def test_expired_leases_are_reissued_and_acks_count_once(bus, tmp_path):
    dl = bus.start("dataloader", {"train_files": [prompts(tmp_path, 3)], "n_samples": 1,
                                  "lease_timeout_s": 1.0, "admission_control": False})
    a, b = bus.client(dl.endpoint), bus.client(dl.endpoint)
    first = a.request("lease.request", {"credits": 3}).body["leases"]     # worker A never acks
    assert len(first) == 3
    t0 = time.monotonic()
    again = b.request("lease.request", {"credits": 2, "wait_s": 8}, timeout=15).body["leases"]
    assert time.monotonic() - t0 < 4, "the expiry, not wait_s, should answer the request"
    assert sorted(ids(again)) == sorted(ids(first)[:2])                 # oldest leases first
    assert {x["lease_id"] for x in again}.isdisjoint(x["lease_id"] for x in first)
    # A acks late: the two re-issued leases are unknown, the third (still queued) is taken back
    late = a.request("lease.ack", {"lease_ids": [x["lease_id"] for x in first]}).body
    assert late["acked"] == 1 and sorted(late["unknown"]) == sorted(x["lease_id"] for x in first[:2])
    ok = b.request("lease.ack", {"lease_ids": [x["lease_id"] for x in again]}).body
    assert ok == {"acked": 2, "unknown": []}
    twice = b.request("lease.ack", {"lease_ids": [x["lease_id"] for x in again]}).body
    assert twice["acked"] == 0 and len(twice["unknown"]) == 2
    assert lease(dl, 3) == ([], True)                                   # nothing lost, nothing twice
    stats = dl.status()
    assert stats["dataloader/expired"] == 3 and stats["dataloader/reissued"] == 2
    assert stats["dataloader/late_acks"] == 1 and stats["dataloader/acked"] == 3


def test_admission_sync_mode_and_refunds(bus, tmp_path):
    dl = bus.start("dataloader", {"train_files": [prompts(tmp_path, 10)], "n_samples": 2,
                                  "batch_groups": 2, "max_staleness": 0})
    step0, _ = lease(dl, 10)
    assert len(step0) == 2                                  # slot 0 only
    assert lease(dl, 10) == ([], False)
    c = bus.client(dl.endpoint)
    msg_id = c.send("lease.request", {"credits": 10, "wait_s": 8})
    assert c.recv_reply(0.5) is None                        # held: admission closed
    live(bus, 1)
    reply = c.recv_reply(5)
    assert reply is not None and reply.reply_to == msg_id
    assert len(reply.body["leases"]) == 2                   # slot 1 opened by weights.live{1}
    assert lease(dl, 10) == ([], False)
    refund = dl.client.request("admission.refund", {"group_ids": [ids(step0)[0]]}).body
    assert refund == {"refunded": 1}
    assert len(lease(dl, 10)[0]) == 1                       # one replacement group
    again = dl.client.request("admission.refund",
                              {"group_ids": [ids(step0)[0], "val/v0/1", "nonsense"]}).body
    assert again == {"refunded": 0}                         # counted once; non-training ids ignored
    live(bus, 1)                                            # a re-published version opens nothing
    assert lease(dl, 10, wait_s=0.5) == ([], False)
    stats = dl.status()
    assert stats["dataloader/admitted"] == 4 and stats["dataloader/refunded"] == 1


def test_admission_with_max_staleness_1(bus, tmp_path):
    dl = bus.start("dataloader", {"train_files": [prompts(tmp_path, 10)], "n_samples": 1,
                                  "batch_groups": 2, "max_staleness": 1})
    assert len(lease(dl, 10)[0]) == 4                       # slots 0 and 1
    assert lease(dl, 10) == ([], False)
    live(bus, 1)
    assert len(lease(dl, 10, wait_s=5)[0]) == 2             # slot 2
    live(bus, 3)
    assert len(lease(dl, 10, wait_s=5)[0]) == 4             # slots 3 and 4 (end of the data)


def test_validation_items_go_first(bus, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": f"v{i}", "data_source": "gsm"} for i in range(3)])
    dl = bus.start("dataloader", {"train_files": [prompts(tmp_path, 4)], "val_files": [val],
                                  "n_samples": 4, "val_n_samples": 2, "batch_groups": 1})
    assert ids(lease(dl, 1)[0]) and dl.status()["dataloader/admitted"] == 1
    c = bus.client(dl.endpoint)
    c.send("lease.request", {"credits": 2, "wait_s": 8})   # held: slot 1 is not admitted
    assert c.recv_reply(0.3) is None
    start = dl.client.request("validation.start", {"version": 0, "validation_id": "v0"}).body
    assert start == {"num_items": 3, "num_samples": 6}
    held = c.recv_reply(5)
    assert held is not None
    items = [x["item"] for x in held.body["leases"]]
    assert [i["item_id"] for i in items] == ["val/v0/0", "val/v0/1"]
    assert all(i["mode"] == "validate" and i["validation_id"] == "v0" and i["version"] == 0
               and i["n"] == 2 and i["data_source"] == "gsm" for i in items)
    assert ids(lease(dl, 10)[0]) == ["val/v0/2"]            # validation bypasses admission
    again = dl.client.request("validation.start", {"version": 0, "validation_id": "v0"}).body
    assert again == start and lease(dl, 10) == ([], False)  # idempotent


def test_bad_rows_are_skipped_counted_and_named(bus, tmp_path):
    jl = write_jsonl(tmp_path / "messy.jsonl", [
        {"prompt": "good0"}, "{not json", "[1, 2]", {"question": "no prompt"}, {"prompt": 5}, "",
        {"prompt": "good5"}, {"prompt": [{"role": "user"}]}])
    pqf = write_parquet(tmp_path / "messy.parquet", [{"prompt": "good7"}, {"prompt": None}])
    errors = bus.subscriber(("node.error",))
    dl = bus.start("dataloader", {"train_files": [jl, pqf], "n_samples": 1, "admission_control": False})
    assert dl.status()["dataloader/bad_rows"] == 6
    log = dl.log()
    for needle in (f"{jl} line 2: is not valid JSON", f"{jl} line 3: is a list, not an object",
                   f"{jl} line 4: has no 'prompt' field (fields: question)",
                   f"{jl} line 5: field 'prompt' must be", f"{jl} line 8: field 'prompt' must be",
                   f"{pqf} row 1: field 'prompt' must be"):
        assert needle in log, needle
    seen = [wait_for(errors, "node.error", 5, lambda b: b["code"] == "bad_row") for _ in range(6)]
    assert all(seen)
    leases, _ = lease(dl, 10)
    assert sorted(ids(leases)) == ["train/e0/0", "train/e0/5", "train/e0/7"]
    assert dl.client.request("ping", {}).body["state"] == "running"
    with pytest.raises(RuntimeError, match="does not exist"):
        bus.start("dataloader", {"train_files": [str(tmp_path / "missing.jsonl")]}, name="dl-bad")


def test_state_and_resume_never_release_consumed_items(bus, tmp_path):
    data = prompts(tmp_path, 8)
    cfg = {"train_files": [data], "n_samples": 1, "seed": 3, "batch_groups": 2, "max_staleness": 0}
    ref = bus.start("dataloader", dict(cfg, admission_control=False), name="dl-ref")
    order = ids(lease(ref, 8)[0])
    dl = bus.start("dataloader", cfg)
    first = lease(dl, 10)[0]
    live(bus, 1)
    first += lease(dl, 10, wait_s=5)[0]
    assert ids(first) == order[:4]
    ack(dl, first[:3])                                       # the 4th is still out at the snapshot
    state = dl.client.request("state.get", {}).body["state"]
    assert (state["epoch"], state["cursor"], state["admitted"]) == (0, 4, 3)
    assert state["pending"] == [order[3]] and not state["exhausted"]
    dl.kill()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    consumed = order[:2] + [order[5]]       # step 0 trained; order[5] listed to test the filter
    (ckpt / "data_state.json").write_text(json.dumps(
        {"dataloader": state, "pool": {"groups": []}, "consumed": consumed}))
    dl2 = bus.start("dataloader", dict(cfg, resume_from=str(ckpt)), name="dl-resumed")
    assert lease(dl2, 10) == ([], False)     # live version is 0 in the new process: slot 1 waits
    live(bus, 1)
    again = lease(dl2, 10, wait_s=5)[0]
    assert ids(again) == [order[3]]          # the lease out at the snapshot, nothing else
    live(bus, 2)
    more = lease(dl2, 10, wait_s=5)[0]
    assert ids(more) == [order[4], order[6]]
    live(bus, 3)
    last = lease(dl2, 10, wait_s=5)[0]
    assert ids(last) == [order[7]]
    ack(dl2, again + more + last)
    assert lease(dl2, 10) == ([], True)
    assert dl2.status()["dataloader/skipped_consumed"] == 1


def test_unlimited_epochs_metrics_and_bad_requests(bus, tmp_path):
    metrics = bus.subscriber(("metrics",))
    dl = bus.start("dataloader", {"train_files": [prompts(tmp_path, 2)], "num_epochs": 0,
                                  "admission_control": False, "metrics_interval_s": 0.2})
    leases, exhausted = lease(dl, 7)
    assert ids(leases)[-1].startswith("train/e3/") and not exhausted   # never runs out
    ack(dl, leases)
    m = wait_for(metrics, "metrics", 5, lambda b: b["values"].get("dataloader/acked") == 7)
    assert m is not None and m.body["kind"] == "dataloader"
    assert m.body["values"]["dataloader/epoch"] == 3 and m.body["values"]["dataloader/leased"] == 7
    with pytest.raises(RemoteError) as e:
        dl.client.request("lease.request", {"credits": 0})
    assert e.value.code == "invalid_body" and "credits" in e.value.message
    assert len(lease(dl, 5)[0]) == 5
