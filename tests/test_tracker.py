"""The tracker node: progress lines, metrics.jsonl, TensorBoard, summary + plot, error policy.

    python -m pytest tests/test_tracker.py -q
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TRAIN_KEYS = ("train/reward_mean", "train/reward_std", "train/kl", "train/clip_frac",
              "train/response_len_mean", "timing/generate_s", "timing/wait_s", "timing/train_s",
              "timing/weight_sync_s", "throughput/tokens_per_s", "train/staleness_max")


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read TensorBoard event files (TFRecord of Event protos) back."""
    from tensorboard.compat.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for f in tb_dir.rglob("events.out.tfevents.*"):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            ev = Event.FromString(data[pos + 12: pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tracker_writes_curves_summary_and_plot(bus, tmp_path):
    run_dir = tmp_path / "run"
    tracker = bus.start("tracker", {"total_steps": 3}, node={"run_dir": str(run_dir)})
    for step in range(3):
        values = {k: 0.1 * (step + 1) for k in TRAIN_KEYS}
        bus.pub.publish("metrics", {"step": step, "kind": "train", "values": values})
        bus.pub.publish("metrics", {"step": step, "kind": "rollout", "values": {"rollout/groups": 4.0}})
    for version, reward in ((0, 0.05), (2, 0.6)):
        bus.pub.publish("validation.done", {"version": version, "validation_id": f"v{version}",
                                            "num_samples": 8,
                                            "metrics": {"reward_mean": reward, "accuracy": reward}})
    bus.pub.publish("checkpoint.saved", {"step": 2, "path": str(run_dir / "checkpoints" / "step_2")})
    bus.pub.publish("node.heartbeat", {"role": "rollout", "name": "rollout-0", "host": "h", "pid": 1,
                                       "state": "running", "uptime_s": 1.0, "interval_s": 1.0,
                                       "loop_lag_s": 0.0, "endpoint": "tcp://x:1", "dropped_events": 0,
                                       "activity": {"inflight": 2}})
    deadline_stats = None
    for _ in range(50):
        deadline_stats = tracker.status()
        if deadline_stats["steps_seen"] == 3 and deadline_stats["validations"] == 2:
            break
        import time
        time.sleep(0.1)
    assert deadline_stats["steps_seen"] == 3 and deadline_stats["validations"] == 2
    assert deadline_stats["quiescent"] is False          # rollout-0 reported 2 in flight
    assert deadline_stats["torch_imported"] is False     # the tracker never needs torch

    tracker.proc.send_signal(signal.SIGTERM)
    assert tracker.proc.wait(timeout=30) == 0
    log = tracker.log()
    assert "step 2/3 | reward 0.300" in log
    assert "validation v2: reward 0.600" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["train_reward_first"] == pytest.approx(0.1)
    assert summary["train_reward_last"] == pytest.approx(0.3)
    assert [v["reward_mean"] for v in summary["validation"]] == [0.05, 0.6]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in lines} == {"train", "rollout", "validate"}
    scalars = _scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["train/reward_mean"]] == [0, 1, 2]
    assert scalars["val/reward_mean"][-1] == (2, pytest.approx(0.6))
    png = run_dir / "plots" / "reward.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in log and "checkpoints:" in log


def test_tracker_rejects_a_bad_error_policy(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tracker:\n  error_policy: sometimes\n")
    r = subprocess.run([sys.executable, "-m", "nexrl.cli.node", "tracker", "--config", str(recipe)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "tracker.error_policy must be one of" in r.stderr


def test_error_policy_stop_asks_the_supervisor_to_stop_the_job(tmp_path):
    run_dir = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tracker:\n  error_policy: stop\n  stop_on_codes: [test_stop]\n"
                      "  tensorboard: false\n  plot: false\n")
    r = subprocess.run([sys.executable, "-m", "nexrl.launch.cli",
                        str(REPO / "tests/placements/tracker_stop.yaml"), str(recipe),
                        "--run-dir", str(run_dir), "--no-color"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "error policy 'stop'" in out and "test_stop" in out
