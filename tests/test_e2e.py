"""The whole job through `nexrl-launch` on the CPU: the main recipe (charclass) learns, the engine
serves every new weight version, staleness stays within each mode's bound, a job killed with
SIGKILL resumes with exactly the same data trained, and no process is ever left behind.

    python -m pytest tests/test_e2e.py -q          (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
PLACEMENT = REPO / "recipes" / "charclass" / "placement.yaml"
JOB_TIMEOUT_S = 300


def job_processes(run_dir: Path) -> list[psutil.Process]:
    """Every live process that belongs to the job in run_dir (by its command line)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run_dir) in arg for arg in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def kill_job(launcher: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the launcher and every process of the job, all at once (a crash, nothing saved)."""
    procs = job_processes(run_dir)
    try:
        procs += psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in [*procs]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    launcher.kill()
    launcher.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)


def assert_nothing_left(run_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while (left := job_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {[p.info['cmdline'] for p in left]}"
    state = json.loads((run_dir / "state.json").read_text())
    for pid in state["pids"]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def start_job(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nexrl.launch.cli", str(PLACEMENT), "--run-dir", str(run_dir),
         "--no-color", *overrides],
        cwd=REPO, stdout=open(run_dir.parent / f"{run_dir.name}.out", "ab"),
        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_job(run_dir: Path, *overrides: str) -> None:
    """Run the job to completion (exit 0), or kill it and fail with its output."""
    launcher = start_job(run_dir, *overrides)
    try:
        rc = launcher.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_job(launcher, run_dir)
        rc = None
    out = (run_dir.parent / f"{run_dir.name}.out").read_text(errors="replace")
    assert rc == 0, f"job exited {rc}:\n{out[-6000:]}"
    assert_nothing_left(run_dir)


def train_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r["kind"] == "train"]


def validation(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "validation.jsonl").read_text().splitlines() if x]
    return {r["version"]: r["metrics"]["reward_mean"] for r in rows}


def trained_items(run_dir: Path, step: int) -> list[str]:
    state = json.loads((run_dir / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())
    return state["consumed"]


def sync_versions(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [int(r["sync/version"]) for r in rows if r["kind"] == "sync" and "sync/version" in r]


STEPS = 30
COMMON = (f"trainer.total_steps={STEPS}", "trainer.save_every=5", "weight_sync.validate_every=10")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """An uninterrupted sync-mode run of the main recipe (shared by the tests below)."""
    run_dir = tmp_path_factory.mktemp("e2e") / "sync"
    run_job(run_dir, *COMMON)
    return run_dir


def test_sync_job_learns_and_serves_every_version(baseline):
    val = validation(baseline)
    assert set(val) >= {0, 10, 20, STEPS}
    # the random policy earns ~0.09; GRPO alone must beat it by a clear margin
    assert val[STEPS] >= val[0] + 0.15, val
    rows = train_metrics(baseline)
    assert len(rows) == STEPS
    assert max(r["train/staleness_max"] for r in rows) == 0          # sync: staleness 0
    assert max(r["train/logprob_mismatch"] for r in rows) < 1e-3     # trainer == engine
    # the engine served each new version: weight_sync verified /get_weight_version == v
    assert sorted(set(sync_versions(baseline))) == list(range(1, STEPS + 1))
    summary = json.loads((baseline / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert (baseline / "plots" / "reward.png").exists()


def test_sigkill_then_resume_trains_exactly_the_same_items(baseline, tmp_path):
    run_dir = tmp_path / "killed"
    launcher = start_job(run_dir, *COMMON)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:   # kill mid-run, after the step-10 checkpoint
            if (run_dir / "checkpoints" / "step_10").exists() and \
                    (run_dir / "metrics.jsonl").exists() and len(train_metrics(run_dir)) >= 12:
                break
            assert launcher.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the job never reached step 12")
    finally:
        kill_job(launcher, run_dir)
    assert_nothing_left(run_dir)
    killed_at = len(train_metrics(run_dir))
    assert killed_at < STEPS, "the job finished before the kill: the test proves nothing"

    run_job(run_dir, *COMMON, "trainer.resume=auto")
    resumed_log = (run_dir / "logs" / "trainer.log").read_text(errors="replace")
    assert "resum" in resumed_log.lower()
    assert sorted(trained_items(run_dir, STEPS)) == sorted(trained_items(baseline, STEPS))
    assert len(set(trained_items(run_dir, STEPS))) == len(trained_items(run_dir, STEPS))


@pytest.mark.parametrize("mode,bound", [("batch-async", 1), ("fully-async", 2)])
def test_async_modes_keep_staleness_within_the_bound(tmp_path, mode, bound):
    run_dir = tmp_path / mode
    steps = 12
    run_job(run_dir, f"trainer.total_steps={steps}", f"weight_sync.mode={mode}",
            f"weight_sync.max_staleness={bound}", "weight_sync.validate_every=0",
            "weight_sync.validate_before_train=false")
    rows = train_metrics(run_dir)
    assert len(rows) == steps
    assert max(r["train/staleness_max"] for r in rows) <= bound
    assert sorted(set(sync_versions(run_dir))) == list(range(1, steps + 1))
