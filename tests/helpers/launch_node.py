"""A configurable node for launcher tests: finishes, crashes, never gets ready, or leaves a
grandchild behind, as its config says.

    nexrl-launch tests/placements/complete.yaml     (uses it with completes_job)
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from nexrl.node import Node


@dataclass
class LaunchTestConfig:
    #: Seconds main() works before returning; < 0 = serve until drained.
    run_s: float = -1.0
    #: Raise in main() after run_s instead of returning (the process then exits 1).
    crash: bool = False
    #: Seconds setup() takes (a model load); a large value = the node never becomes ready.
    setup_s: float = 0.0
    #: Start a grandchild `sleep` in a session of its own (tests whole-tree cleanup); its pid
    #: goes to <run_dir>/<name>.child.pid.
    spawn_child: bool = False
    #: Publish this many `metrics` events (kind train, step 1..n) when main() starts.
    metrics_steps: int = 0
    #: After run_s, ask the supervisor to stop the job: "" no, "ok" (failed=false), "fail".
    stop_job: str = ""
    #: After run_s, publish a (non-fatal) node.error with this code and keep serving.
    error_code: str = ""


class LaunchTestNode(Node):
    role = "launch_test"
    Config = LaunchTestConfig

    def setup(self) -> None:
        if self.cfg.spawn_child:
            child = subprocess.Popen(["sleep", "600"], start_new_session=True)
            with open(os.path.join(self.node_cfg.run_dir, f"{self.name}.child.pid"), "w") as f:
                f.write(str(child.pid))
        if self.cfg.setup_s > 0:
            self.log.info("setup: loading for %.1fs", self.cfg.setup_s)
            self.stopping.wait(self.cfg.setup_s)

    def main(self) -> None:
        if self.cfg.run_s < 0:
            self.stopping.wait()
            return
        for step in range(1, self.cfg.metrics_steps + 1):
            self.publish("metrics", {"step": step, "kind": "train", "values": {
                "train/reward_mean": step / 10, "throughput/tokens_per_s": 100.0 * step}})
        self.log.info("main: working for %.1fs", self.cfg.run_s)
        if self.stopping.wait(self.cfg.run_s):
            return
        if self.cfg.crash:
            raise RuntimeError(f"{self.name} crashed on purpose (crash=true)")
        if self.cfg.error_code:
            self.publish("node.error", {"node": self.name, "role": self.role,
                                        "code": self.cfg.error_code, "message": "raised on purpose"})
            self.stopping.wait()
            return
        if self.cfg.stop_job:
            reply = self.client("supervisor").request(
                "job.stop", {"reason": f"{self.name} is done", "failed": self.cfg.stop_job == "fail"})
            self.log.info("job.stop answered: %s", reply.body)
            self.stopping.wait()  # the supervisor drains us in order
            return
        self.log.info("main: done")
