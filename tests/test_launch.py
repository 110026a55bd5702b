"""nexrl-launch and nexrl-node --placement with real processes (no mocks).

    python -m pytest tests/test_launch.py -q

Each test runs the real `nexrl-launch` (as `python -m nexrl.launch.cli`) on a placement from
tests/placements/ and watches it from outside: the console output, `<run_dir>/state.json`
and the process table (psutil). The `job` fixture kills every process it may have started
(the launcher's tree, every pid the launcher recorded, anything whose command line names the
run directory) whether the test passed or not. Heartbeats are 0.2 s so the file stays fast.
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

from helpers.procs import free_port, kill_tree

REPO = Path(__file__).resolve().parent.parent
PLACEMENTS = REPO / "tests" / "placements"
HELPERS = REPO / "tests" / "helpers"


# ---------------------------------------------------------------------------- helpers

def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _mentioning(text: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and text in " ".join(p.info["cmdline"] or []) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


class Job:
    """One nexrl-launch run (or nexrl-node process) started by a test."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.procs: list[subprocess.Popen] = []
        self.extra_pids: list[int] = []
        self.launcher: subprocess.Popen | None = None
        self.out_path = tmp / "console.txt"

    def launch(self, placement: Path | str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "nexrl.launch.cli", str(placement), "--run-dir",
               str(self.run_dir), "--no-color", *args]
        self.launcher = self.spawn(cmd, self.out_path, env)
        return self.launcher

    def spawn(self, cmd: list[str], out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=open(out, "w"), stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def out(self) -> str:
        return self.out_path.read_text() if self.out_path.exists() else ""

    def state(self) -> dict:
        try:
            return json.loads((self.run_dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond()
            if got:
                return got
            if self.launcher is not None and self.launcher.poll() is not None and not cond():
                raise AssertionError(f"launcher exited ({self.launcher.returncode}) while waiting "
                                     f"for {what}:\n{self.out()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.out()}")

    def running(self, timeout: float = 45) -> dict:
        return self.wait_for(lambda: self.state().get("job") == "running" and self.state(),
                             timeout, "job.state running")

    def finish(self, timeout: float = 45) -> int:
        assert self.launcher is not None
        try:
            return self.launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launcher still running after {timeout}s:\n{self.out()}") from None

    def job_pids(self) -> set[int]:
        """Every pid this job is known to have had: watchdogs, nodes, grandchildren."""
        st = self.state()
        pids = set(st.get("pids", []))
        for n in st.get("nodes", {}).values():
            pids.update(p for p in (n.get("pid"), n.get("node_pid")) if p)
        for f in self.run_dir.glob("*.child.pid"):
            pids.add(int(f.read_text()))
        return pids | set(self.extra_pids)

    def assert_nothing_left(self, pids: set[int], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = [p for p in pids if _alive(p)] + [p.pid for p in _mentioning(str(self.run_dir))]
            if not left:
                return
            time.sleep(0.1)
        raise AssertionError(f"processes left behind: {left}:\n{self.out()}")

    def cleanup(self) -> None:
        pids = self.job_pids()
        for p in self.procs:
            kill_tree(p.pid, wait_s=3.0)
        for pid in pids:
            kill_tree(pid, wait_s=3.0)
        for p in _mentioning(str(self.run_dir)):
            kill_tree(p.pid, wait_s=3.0)


@pytest.fixture
def job(tmp_path: Path):
    j = Job(tmp_path)
    try:
        yield j
    finally:
        j.cleanup()


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexrl.launch.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _write(path: Path, text: str) -> Path:
    path.write_text(text.replace("HELPERS", str(HELPERS)))
    return path


# ---------------------------------------------------------------------------- plan and errors

def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path: Path) -> None:
    placement = _write(tmp_path / "gpu.yaml", """
hosts:
  - {name: box, gpus: 4}
  - {name: far, ssh: me@far, address: 10.0.0.2, gpus: [4, 5], python: /opt/venv/bin/python}
nodes:
  - {role: HELPERS/echo_node.py:EchoNode, name: trainer, host: box, gpus: 2}
  - {role: HELPERS/echo_node.py:EchoNode, name: engine, host: box, count: 2, gpus: 1}
  - {role: HELPERS/echo_node.py:EchoNode, name: remote, host: far, gpu_ids: [5], env: {X: "1"}}
  - {role: sglang, host: far, command: "{python} -m sglang.launch_server --port {http_port}",
     http_port: auto, ready: "{url}/health"}
""")
    run_dir = tmp_path / "never"
    r = _cli(str(placement), "--dry-run", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "trainer: role" in out and "GPUs 0,1" in out
    assert "engine-0: role" in out and "engine-1: role" in out
    assert "CUDA_VISIBLE_DEVICES=2 " in out and "CUDA_VISIBLE_DEVICES=3 " in out
    assert "remote: role" in out and "GPUs 5," in out and "X=1" in out
    assert "tcp://10.0.0.2:29600" in out  # ssh host: port_base + k
    assert "/opt/venv/bin/python -m sglang.launch_server --port 29602" in out
    assert "url http://10.0.0.2:29602, ready http://10.0.0.2:29602/health" in out
    assert "via:     ssh -o BatchMode=yes me@far '/opt/venv/bin/python -m nexrl.launch.remote" in out
    assert f"--placement {run_dir}/placement.resolved.yaml --name trainer" in out
    assert not run_dir.exists()


@pytest.mark.parametrize("body,expected", [
    ("nodes: [{role: HELPERS/echo_node.py:EchoNode, gpuz: 1}]",
     ["nodes[0] (role", "unknown key 'gpuz'", "did you mean 'gpus'"]),
    ("nodes: [{role: HELPERS/echo_node.py:EchoNode, restart: {policy: sometimes}}]",
     ["restart.policy 'sometimes' is not a restart policy", "never, on-failure"]),
    ("nodes: [{role: HELPERS/echo_node.py:EchoNode, restart: {policy: on-failure, max_restarts: x}}]",
     ["nodes[0]", "max_restarts"]),
    ("hosts: [{name: box, gpus: 1}]\nnodes: [{role: HELPERS/echo_node.py:EchoNode, gpus: 1, count: 2}]",
     ["instance 1 needs 1 GPU(s) on host box, which offers 1", "taken by: nodes[0]"]),
    ("hosts: [{name: box, gpus: 2}]\nnodes:\n  - {role: HELPERS/echo_node.py:EchoNode, name: a, gpu_ids: [1]}"
     "\n  - {role: HELPERS/echo_node.py:EchoNode, name: b, gpu_ids: [1]}",
     ["GPU 1 on host box is already given to nodes[0]"]),
    ("nodes: [{role: HELPERS/echo_node.py:EchoNode, host: gpu9}]",
     ["unknown host 'gpu9'", "hosts are: local"]),
    ("nodez: []", ["unknown key 'nodez'", "did you mean 'nodes'"]),
    ("nodes: [{role: no_such_role}]", ["node no_such_role", "unknown role 'no_such_role'"]),
    ("nodes: [{role: HELPERS/launch_node.py:LaunchTestNode, config: {run_z: 1}}]",
     ["node launch_test", "run_z"]),
    ("nodes: [{role: HELPERS/echo_node.py:EchoNode, name: a}, {role: HELPERS/echo_node.py:EchoNode, name: a}]",
     ["node name 'a' is already used"]),
])
def test_placement_errors_name_the_key(tmp_path: Path, body: str, expected: list[str]) -> None:
    placement = _write(tmp_path / "bad.yaml", body)
    t0 = time.monotonic()
    r = _cli(str(placement), "--dry-run")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert str(placement) in r.stderr or "node " in r.stderr, r.stderr
    for text in expected:
        assert text in r.stderr, r.stderr
    assert time.monotonic() - t0 < 20  # no spawning, no waiting


def test_recipe_errors(tmp_path: Path) -> None:
    # a recipe section that matches no node, and a bad key inside a node's section
    r = _cli(str(PLACEMENTS / "complete.yaml"), "--dry-run", "launch_tset.run_s=1")
    assert r.returncode == 2 and "recipe section 'launch_tset' matches no node" in r.stderr, r.stderr
    r = _cli(str(PLACEMENTS / "complete.yaml"), "--dry-run", "launch_test.run_z=1")
    assert r.returncode == 2 and "node finisher" in r.stderr and "run_z" in r.stderr, r.stderr
    r = _cli(str(PLACEMENTS / "complete.yaml"), "--dry-run", "launch_test.run_s=${vars.nope}")
    assert r.returncode == 2 and "nope" in r.stderr, r.stderr


def _node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexrl.cli.node", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_nexrl_node_with_placement_errors(tmp_path: Path) -> None:
    # auto ports are only known to a running job: point the user to the resolved placement
    r = _node("tests/helpers/echo_node.py:EchoNode", "--placement", str(PLACEMENTS / "echo.yaml"))
    assert r.returncode == 2 and "placement.resolved.yaml" in r.stderr, r.stderr
    fixed = _write(tmp_path / "fixed.yaml", f"""
bus: {{events_pub: {free_port()}, events_sub: {free_port()}, settings: {{handshake_timeout_s: 1}}}}
nodes: [{{role: HELPERS/echo_node.py:EchoNode, count: 2, port: {free_port()}}}]
""")
    r = _node("tests/helpers/echo_node.py:EchoNode", "--placement", str(fixed))
    assert r.returncode == 2 and "several nodes have role" in r.stderr and "--name" in r.stderr
    r = _node("tests/helpers/echo_node.py:EchoNode", "--placement", str(fixed), "--name", "echo-7")
    assert r.returncode == 2 and "no node named 'echo-7'; nodes: echo-0" in r.stderr, r.stderr
    # explicit ports: the node runs standalone and says clearly that its job is not there
    r = _node("tests/helpers/echo_node.py:EchoNode", "--placement", str(fixed), "--name", "echo-1")
    assert r.returncode == 1 and "no event proxy answered" in r.stderr, r.stderr


# ---------------------------------------------------------------------------- running jobs

def test_launch_ready_then_ctrl_c_leaves_nothing(job: Job) -> None:
    job.launch(PLACEMENTS / "echo.yaml")
    st = job.running()
    assert {n: v["phase"] for n, v in st["nodes"].items()} == {
        "echo-0": "up", "echo-1": "up", "parent": "up", "web": "up", "stubborn": "up"}
    cfg = (job.run_dir / "nodes" / "echo-0.yaml").read_text()
    assert "web:\n      role: web\n      endpoint: tcp://127.0.0.1:" in cfg and "url: http://127.0.0.1:" in cfg
    job.wait_for(lambda: (job.run_dir / "parent.child.pid").exists(), 10, "grandchild pid file")
    # the bus sees the nodes the launcher started (nexrl-bus reads the resolved placement)
    r = subprocess.run([sys.executable, "-m", "nexrl.cli.bus", "nodes", "--placement",
                        str(job.run_dir / "placement.resolved.yaml"), "--wait", "1.5"],
                       capture_output=True, text=True, timeout=30)
    assert all(n in r.stdout for n in ("echo-0", "echo-1", "parent")), r.stdout + r.stderr
    for name in ("echo-0", "parent", "stubborn"):
        assert (job.run_dir / "logs" / f"{name}.log").stat().st_size > 0
        assert (job.run_dir / "nodes" / f"{name}.yaml").exists()
    assert "stubborn up" in (job.run_dir / "logs" / "stubborn.log").read_text()
    job.wait_for(lambda: all(v["node_pid"] for n, v in job.state()["nodes"].items()
                             if n not in ("stubborn", "web")), 10, "node pids from heartbeats")
    pids = job.job_pids()
    assert len(pids) >= 9  # 5 watchdogs, 3 Python nodes (+ the command nodes), 1 grandchild
    job.launcher.send_signal(signal.SIGINT)
    assert job.finish() == 130
    out = job.out()
    assert "interrupted by SIGINT" in out
    assert "still running 1s after SIGTERM; SIGKILL" in out  # stubborn ignores SIGTERM
    # ordered: nodes drain in reverse start order
    drained = [out.index(f"nexrl.{role}.{n}: state running -> draining (interrupted by SIGINT)")
               for role, n in (("launch_test", "parent"), ("echo", "echo-1"), ("echo", "echo-0"))]
    assert drained == sorted(drained), out
    assert out.index("still running 1s after SIGTERM") < drained[0]  # stubborn went first
    job.assert_nothing_left(pids)


def test_job_completes_with_exit_0(job: Job) -> None:
    job.launch(PLACEMENTS / "complete.yaml", "launch_test.run_s=0.5")
    job.running()
    assert job.finish() == 0, job.out()
    out = job.out()
    assert "job complete (finisher finished)" in out
    assert "main: working for 0.5s" in (job.run_dir / "logs" / "finisher.log").read_text()
    cfg = (job.run_dir / "nodes" / "finisher.yaml").read_text()
    assert "run_s: 0.5" in cfg  # recipe value through ${vars.work_s}, then the override
    assert job.state()["nodes"]["finisher"]["exit_code"] == 0
    job.assert_nothing_left(job.job_pids())


def test_sigkilled_node_is_restarted_and_job_goes_on(job: Job) -> None:
    job.launch(PLACEMENTS / "restart.yaml")
    job.running()
    first = job.wait_for(lambda: job.state()["nodes"]["worker"]["node_pid"], 10, "worker pid")
    os.kill(first, signal.SIGKILL)
    job.extra_pids.append(first)
    st = job.wait_for(lambda: (lambda s: s["nodes"]["worker"]["restarts"] == 1
                               and s["nodes"]["worker"]["phase"] == "up"
                               and s["nodes"]["worker"]["node_pid"] not in (None, first) and s)(job.state()),
                      30, "worker restarted")
    assert st["job"] == "running"
    assert st["nodes"]["finisher"]["phase"] == "up"  # the rest of the job went on
    pids = job.job_pids()
    assert job.finish() == 0, job.out()
    out = job.out()
    assert "node worker killed by SIGKILL; restarting in 0.2s (restart 1 of 2)" in out
    assert "job complete (finisher finished)" in out
    log = (job.run_dir / "logs" / "worker.log").read_text()
    assert "start #2 (restart 1 of 2)" in log
    job.assert_nothing_left(pids)


def test_node_past_restart_limit_stops_the_job(job: Job) -> None:
    job.launch(PLACEMENTS / "crash.yaml")
    rc = job.finish()
    out = job.out()
    assert rc == 1, out
    assert ("stopping the job: node crasher exited with code 1 (RuntimeError: crasher crashed on "
            "purpose (crash=true)) (no restarts left: 1 used)") in out
    assert "restarting in 0.1s (restart 1 of 1)" in out
    assert "crashed on purpose" in out.split("last lines of")[1]  # the log tail
    st = job.state()
    assert st["nodes"]["crasher"]["starts"] == 2 and st["nodes"]["crasher"]["phase"] == "failed"
    job.assert_nothing_left(job.job_pids())


def test_node_never_ready_fails_the_launch(job: Job, tmp_path: Path) -> None:
    placement = _write(tmp_path / "slow.yaml", """
job: {ready_timeout_s: 60, drain_timeout_s: 2, term_timeout_s: 1}
bus: {settings: {heartbeat_interval_s: 0.2, liveness: 15}}
nodes:
  - {role: HELPERS/echo_node.py:EchoNode}
  - {role: HELPERS/launch_node.py:LaunchTestNode, name: slow, config: {setup_s: 100}, ready_timeout_s: 2,
     restart: on-failure}
""")
    job.launch(placement)
    assert job.finish() == 1
    out = job.out()
    assert "stopping the job: node slow did not become ready within 2s (last state: starting)" in out
    assert "setup: loading for 100.0s" in out.split("last lines of")[1]
    assert "restarting" not in out
    job.assert_nothing_left(job.job_pids())


def test_nexrl_node_joins_a_supervised_job(job: Job) -> None:
    job.launch(PLACEMENTS / "external.yaml")
    resolved = job.run_dir / "placement.resolved.yaml"
    job.wait_for(lambda: "external node ext: start it with" in job.out(), 30, "join instructions")
    line = job.out().split("external node ext: start it with")[1].splitlines()[1]
    cmd_line = line.split(" | ", 1)[1].split()
    assert cmd_line[0] == "nexrl-node" and cmd_line[-1] == "ext" and str(resolved) in cmd_line
    time.sleep(0.5)
    assert job.state()["job"] == "starting"  # the job waits for the external node
    node = job.spawn([sys.executable, "-m", "nexrl.cli.node", *cmd_line[1:]], job.tmp / "ext.txt")
    assert job.finish() == 0, job.out() + (job.tmp / "ext.txt").read_text()
    assert node.wait(20) == 0
    out = job.out()
    assert "node ext ready" in out and "external node ext finished" in out
    assert "job complete (ext finished)" in out
    assert "main: done" in (job.tmp / "ext.txt").read_text()
    job.assert_nothing_left(job.job_pids())


def test_ssh_path_spawns_remote_and_cleans_up(job: Job, tmp_path: Path) -> None:
    text = (PLACEMENTS / "ssh.yaml").read_text()
    text = text.replace("../helpers/", f"{HELPERS}/").replace(
        "ssh_command: [ssh, -o, BatchMode=yes]",
        f"ssh_command: [{sys.executable}, {HELPERS / 'launch_fake_ssh.py'}, -o, BatchMode=yes]").replace(
        "port_base: 29600", f"port_base: {free_port()}").replace(
        'workdir: ""', f"workdir: {tmp_path}")
    placement = tmp_path / "ssh.yaml"
    placement.write_text(text)
    ssh_log = tmp_path / "ssh.log"
    job.launch(placement, env={"FAKE_SSH_LOG": str(ssh_log)})
    st = job.running()
    assert "fake-user@far\t" in ssh_log.read_text()
    assert "nexrl.launch.remote --name remote" in ssh_log.read_text()
    remote = job.wait_for(lambda: job.state()["nodes"]["remote"]["node_pid"], 10, "remote node pid")
    child = int(job.wait_for(lambda: (job.run_dir / "remote.child.pid").exists() and
                             (job.run_dir / "remote.child.pid").read_text(), 10, "grandchild"))
    # env and working directory reached the remote side (read from the grandchild: the node's
    # own /proc environ is overwritten by setproctitle)
    assert psutil.Process(remote).cwd() == str(tmp_path)
    env = psutil.Process(child).environ()
    assert env["NEXRL_TEST_MARK"] == "far" and env["CUDA_VISIBLE_DEVICES"] == ""
    ssh_pid = job.state()["nodes"]["remote"]["pid"]
    # the remote side is not in the ssh client's process tree: only the watchdog can clean it
    ssh_tree = {c.pid for c in psutil.Process(ssh_pid).children(recursive=True)}
    assert remote not in ssh_tree and child not in ssh_tree
    job.extra_pids += [remote, child]
    os.kill(ssh_pid, signal.SIGKILL)  # the connection drops
    job.wait_for(lambda: not _alive(remote) and not _alive(child), 15,
                 "remote node and its grandchild to go after the ssh client died")
    job.wait_for(lambda: (lambda n: n["restarts"] >= 1 and n["phase"] == "up"
                          and n["node_pid"] not in (None, remote))(job.state()["nodes"]["remote"]),
                 30, "remote node restarted over ssh")
    assert job.state()["job"] == "running" and st["nodes"]["echo"]["phase"] == "up"
    pids = job.job_pids()
    job.launcher.send_signal(signal.SIGINT)
    assert job.finish() == 130, job.out()
    job.assert_nothing_left(pids)


def test_silent_node_is_killed_and_restarted(job: Job) -> None:
    # SIGSTOP: the process exists but sends no heartbeats; liveness (15 x 0.2 s) catches it
    job.launch(PLACEMENTS / "restart.yaml")
    job.running()
    first = job.wait_for(lambda: job.state()["nodes"]["worker"]["node_pid"], 10, "worker pid")
    job.extra_pids.append(first)
    os.kill(first, signal.SIGSTOP)
    job.wait_for(lambda: (lambda n: n["restarts"] == 1 and n["phase"] == "up"
                          and n["node_pid"] not in (None, first))(job.state()["nodes"]["worker"]),
                 30, "silent worker restarted")
    assert not _alive(first)
    out = job.out()
    assert "node worker went silent: no heartbeat for" in out and "(liveness 15 x 0.2s)" in out
    pids = job.job_pids()
    job.launcher.send_signal(signal.SIGTERM)
    assert job.finish() == 143, job.out()
    job.assert_nothing_left(pids)


@pytest.mark.parametrize("mode,code", [("ok", 0), ("fail", 1)])
def test_job_stop_request_and_progress_line(job: Job, tmp_path: Path, mode: str, code: int) -> None:
    # a node publishes train metrics (the launcher prints progress: no tracker in this job)
    # and then asks the supervisor to stop the job with job.stop
    placement = _write(tmp_path / "stop.yaml", f"""
job: {{ready_timeout_s: 60, drain_timeout_s: 5, term_timeout_s: 2}}
bus: {{settings: {{heartbeat_interval_s: 0.2, liveness: 15}}}}
nodes:
  - {{role: HELPERS/echo_node.py:EchoNode}}
  - {{role: HELPERS/launch_node.py:LaunchTestNode, name: boss,
     config: {{run_s: 0.5, metrics_steps: 3, stop_job: {mode}}}}}
""")
    job.launch(placement)
    assert job.finish() == code, job.out()
    out = job.out()
    assert "progress: step 1  reward 0.1000  throughput 100 tok/s" in out
    assert "stopping the job: boss asked to stop the job: boss is done" in out
    assert "job.stop answered: {'state': 'stopping'}" in (job.run_dir / "logs" / "boss.log").read_text()
    job.assert_nothing_left(job.job_pids())


def test_launcher_killed_with_sigkill_leaves_nothing(job: Job) -> None:
    job.launch(PLACEMENTS / "echo.yaml")
    job.running()
    job.wait_for(lambda: (job.run_dir / "parent.child.pid").exists(), 10, "grandchild pid file")
    job.wait_for(lambda: all(v["node_pid"] for n, v in job.state()["nodes"].items()
                             if n not in ("stubborn", "web")), 10, "node pids")
    pids = job.job_pids()
    job.launcher.kill()
    job.launcher.wait(10)
    job.assert_nothing_left(pids, timeout=15)
