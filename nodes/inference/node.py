"""The inference node: the embedded engine's HTTP server as a bus node.

    nexrl-node inference --config recipe.yaml node.start=now inference.model_path=/models/tiny

setup() loads the model and starts the HTTP server (OpenAI API + sglang-compatible admin and
weight-update endpoints) on a thread of its own, so the node reports `ready` only once the
engine answers requests; the bus side (heartbeats, ping, node.status, drain) runs as in every
node. The engine is torch-heavy, so torch is imported in setup(), never at import.

Address: the supervisor gives the node its URL (`node.http_url`, from the placement); peers
find it as `peers[<name>].url`. Without one, `inference.host`/`inference.port` are used.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import urlparse

from nexrl.node import Node

from . import InferenceConfig

#: Seconds setup() waits for the model to load and the server to bind.
STARTUP_TIMEOUT_S = 600.0


class InferenceNode(Node):
    role = "inference"
    Config = InferenceConfig

    def setup(self) -> None:
        from .server import run_server
        from .weights import add_weight_routes

        cfg: InferenceConfig = self.cfg
        if self.node_cfg.http_url:
            u = urlparse(self.node_cfg.http_url)
            if u.hostname is None or u.port is None:
                raise ValueError(f"node.http_url {self.node_cfg.http_url!r} must look like "
                                 f"http://host:port")
            cfg.host, cfg.port = u.hostname, u.port
        self._server_stop = threading.Event()
        self._server_bound = threading.Event()
        self._server_error: BaseException | None = None
        self.url = ""

        def on_ready(port: int) -> None:
            self.url = f"http://{cfg.host}:{port}"
            self._server_bound.set()

        def serve() -> None:
            try:
                run_server(cfg, self._server_stop, ready_cb=on_ready, extra_routes=add_weight_routes)
            except BaseException as e:  # reported by setup()/main() on the worker thread
                self._server_error = e
            finally:
                self._server_bound.set()

        self._thread = threading.Thread(target=serve, name="http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server_bound.wait(0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"inference engine did not start within {STARTUP_TIMEOUT_S:.0f}s "
                                   f"(model {cfg.model_path})")
        if self._server_error is not None:
            raise RuntimeError(f"inference engine failed to start: {self._server_error}") \
                from self._server_error
        self.log.info("engine serving %s at %s", cfg.model_path, self.url)

    def main(self) -> None:
        while not self.stopping.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server thread died: {self._server_error}")

    def teardown(self) -> None:
        if hasattr(self, "_server_stop"):
            self._server_stop.set()
            self._thread.join(self.cfg.shutdown_timeout_s + 10)

    def stats_extra(self) -> dict[str, Any]:
        return {"url": getattr(self, "url", "")}
