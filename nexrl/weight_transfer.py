"""Trainer -> inference-engine weight transfer: bucketed broadcast over a private group.

The wire contract is sglang's (``/init_weights_update_group``, ``/update_weights_from_distributed``,
``/destroy_weights_update_group``; see ``nexrl.nodes.inference.weights`` for the field table).
The trainer is rank 0 of a PRIVATE torch.distributed group; engine ``i`` owns ranks
``rank_offset_i .. rank_offset_i + tp_i - 1``; ``world_size = 1 + sum(tp_i)``.

Who waits for what during ``WeightSender.push`` (pipeline depth 2, embedded engines)::

    trainer   finish k-2 (reply) ─ pack k ─ POST k ─ bcast k ─ finish k-1 ─ pack k+1 ─ ...
    wire      ......... bucket k-1 ..........│......... bucket k .........│ bucket k+1
    engine    recv k issued when POST k arrived and recv k-1 was issued; reply once k landed;
              the last bucket (the only one with weight_version) waits for all, then installs

Why buckets: one NCCL launch moves one buffer near the link's ceiling (368 GB/s GPU0->GPU1,
H200 NVLink), while ~300 separate 8 MiB broadcasts reach ~195 GB/s (ANCHORS.md): every launch
pays a fixed latency, and per tensor the receiver allocates, launches and synchronises once
more. Flattening a dtype-homogeneous run of parameters into one uint8 buffer (sglang's
``load_format="flattened_bucket"`` layout: raw bytes of each tensor, in ``names`` order, no
padding) pays those costs once per bucket. In this protocol a bucket also costs one HTTP
request and its handling on both sides, ~1.4 ms measured, so a bucket must take longer than
that on the wire: 1 GiB moves in 2.9 ms at 368 GB/s. Measured end to end on 2x H200 (7B
bf16, 15.2 GB, bench/weight_sync.py, 2026-11-22): raw single buffer 41.5 ms; buckets of
256 MiB 0.35x raw, 512 MiB 0.66x, 1 GiB 0.86x, 2 GiB 0.86x, 4 GiB 0.84x; per-tensor
broadcasts 0.75x with one request per GiB but 0.09x with one request per tensor (what
OpenRLHF/TRL-style per-parameter calls cost); one bucket at a time, as sglang requires,
0.52x. Hence the default of 1 GiB: larger buckets only add trainer memory (``slots`` pack
buffers of ``bucket_bytes`` each) and lengthen the un-overlapped first and last bucket.
Why overlap: packing a bucket is a device copy (~4 TB/s on H200) and the HTTP round trip that
tells the engine what is coming costs ~1 ms; both happen while earlier buckets are on the
wire (GPU: packing runs on a side stream; CPU/gloo: the broadcast runs on gloo's own threads
while this thread packs), and the engine issues bucket k+1's receive while k is in flight, so
the wire is not idle between buckets.

Timeouts: every collective is waited with a deadline (gloo ``Work.wait(timeout)``; NCCL:
poll ``is_completed`` then ``abort()`` the communicator, which ends the kernel and never
kills the process); every HTTP call has a timeout. A failed push aborts the group and tells
every engine to destroy it (which drops any staged buckets); call ``connect()`` again.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from nexrl.engine_client import DEFAULT_GROUP_NAME, EngineClient, EngineError
from nexrl.weight_buckets import (FLATTENED_BUCKET, Bucket, BucketPlanner, TensorMeta,
                                  WeightSyncError, bytes_view, pack_bucket)

log = logging.getLogger("nexrl.weight_transfer")


# ----------------------------------------------------------------------------- the group
class WeightGroup:
    """One member's handle on the private weight-update group (never the default group).

    Built from a ``TCPStore`` (hosted by rank 0) + ``PrefixStore(group_name)`` and a
    ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` constructed directly (what vLLM calls a
    stateless group): nothing is registered in ``torch.distributed``'s world, so a trainer's
    FSDP default group is untouched and several groups can coexist.
    """

    def __init__(self, *, backend: str, master_address: str, master_port: int, rank: int,
                 world_size: int, group_name: str, timeout_s: float, device: Any = None,
                 store: Any = None, on_backend: Any = None):
        import torch
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight_transfer: backend must be gloo or nccl, got {backend!r}")
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.group_name, self.timeout_s = group_name, timeout_s
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.broken: str | None = None
        td = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(master_address, master_port, None, rank == 0, td,
                                  wait_for_workers=False)
        self.store = store
        prefix = dist.PrefixStore(f"nexrl/{group_name}", store)
        if backend == "gloo":  # blocks until every rank connected, or the store timeout
            self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, td)
        else:
            from torch.distributed.distributed_c10d import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            # Watchdog timeout well past ours: our deadline aborts the communicator first,
            # and a user abort never tears the process down (the watchdog's own timeout would).
            opts._timeout = datetime.timedelta(seconds=2 * timeout_s + 30)
            opts.is_high_priority_stream = False
            self.pg = ProcessGroupNCCL(prefix, rank, world_size, opts)
            self.pg._set_sequence_number_for_group()  # as torch's own group helper does
        if on_backend is not None:
            on_backend(self.pg)  # lets open_group abort a handshake that hangs
        # Handshake: one tiny broadcast proves every rank is in (and creates the NCCL comm now,
        # not inside the first timed push).
        probe = torch.full((1,), 7 if rank == 0 else 0, dtype=torch.int32, device=self.device)
        self.wait(self.broadcast(probe), time.monotonic() + timeout_s, "handshake")
        if int(probe.item()) != 7:
            raise WeightSyncError(f"weight group {group_name}: handshake broadcast corrupted")

    def broadcast(self, tensor: Any) -> Any:
        """Start a broadcast from rank 0 into ``tensor`` on every rank; returns the Work."""
        import torch.distributed as dist

        if self.broken:
            raise WeightSyncError(f"weight group {self.group_name} is broken: {self.broken}")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([tensor], opts)

    def wait(self, work: Any, deadline: float, what: str) -> None:
        """Wait for ``work`` until ``deadline`` (time.monotonic); on failure abort and raise."""
        try:
            if self.backend == "gloo":
                left = max(deadline - time.monotonic(), 0.001)
                work.wait(datetime.timedelta(seconds=left))
                return
            nap = 2e-5
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no data after {self.timeout_s:.1f}s")
                time.sleep(nap)
                nap = min(nap * 2, 2e-4)
            work.wait()  # raises if NCCL reported an error; orders the current stream after it
        except (RuntimeError, TimeoutError) as e:
            self.abort(f"{what}: {type(e).__name__}: {e}")
            raise WeightSyncError(
                f"weight group {self.group_name} rank {self.rank}: {what} failed: {e}"
            ) from e

    def abort(self, reason: str, quiet: bool = False) -> None:
        """Mark broken and abort the communicator so no kernel/thread waits forever."""
        if self.broken is None:
            self.broken = reason
            (log.debug if quiet else log.warning)(
                "weight group %s rank %d aborted: %s", self.group_name, self.rank, reason)
        try:
            self.pg.abort()
        except RuntimeError as e:  # already aborted / backend without abort support
            log.debug("weight group %s: abort: %s", self.group_name, e)

    def close(self) -> None:
        """Release the communicator (abort: never blocks on a dead peer)."""
        self.abort(self.broken or "closed", quiet=True)


def open_group(*, timeout_s: float, **kw: Any) -> WeightGroup:
    """Build a ``WeightGroup`` in a helper thread, giving up after ``timeout_s`` + 5 s.

    The NCCL communicator's creation can block in C++ with no timeout of its own if a rank
    never shows up; running it in a thread keeps the caller's deadline real.
    """
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["group"] = WeightGroup(timeout_s=timeout_s,
                                       on_backend=lambda pg: box.__setitem__("pg", pg), **kw)
        except BaseException as e:  # reported to the caller below, never swallowed
            box["error"] = e

    t = threading.Thread(target=build, name="nexrl-weight-group", daemon=True)
    t.start()
    t.join(timeout_s + 5.0)
    name = kw.get("group_name")
    if t.is_alive():
        pg = box.get("pg")
        if pg is not None:
            try:
                pg.abort()  # ends a communicator creation stuck on a missing rank
            except RuntimeError as e:
                log.debug("weight group %s: abort after join timeout: %s", name, e)
        raise WeightSyncError(f"weight group {name}: joining timed out after {timeout_s:.1f}s")
    if "error" in box:
        e = box["error"]
        raise WeightSyncError(f"weight group {name} rank {kw.get('rank')}: join failed: {e}") from e
    return box["group"]


# ----------------------------------------------------------------------------- trainer side
@dataclass
class PushStats:
    """What one ``push`` moved and how long it took (end to end: engines applied the version)."""

    version: str
    num_tensors: int = 0
    num_buckets: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    final_replies: dict[str, str] = field(default_factory=dict)  # URL -> engine's message

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class SenderConfig:
    """How the trainer (rank 0) reaches its engines."""

    engine_urls: list[str]  # base URLs of the engines' HTTP servers (embedded or sglang)
    engine_tp: list[int] | None = None  # group ranks per engine (sglang tp size); None: 1 each
    master_address: str = "127.0.0.1"  # address the ENGINES use to reach this trainer's TCPStore
    master_port: int = 0  # TCPStore port on the trainer; 0 picks a free one
    group_name: str = DEFAULT_GROUP_NAME  # names the group on every engine (several may coexist)
    backend: str = "nccl"  # "nccl" between GPUs, "gloo" on CPU
    device: str | None = None  # where packed buckets live; default cuda (nccl) / cpu (gloo)
    bucket_bytes: int = 1 << 30  # max bytes per flat bucket (two are held at once)
    timeout_s: float = 60.0  # deadline for each collective wait and each engine reply
    pipelined: bool = True  # NexRL extension: several buckets in flight per engine, ordered
    #   by `nexrl_bucket_index`; only the embedded engine reads it -> False for sglang (then
    #   the next bucket is announced once the previous one was acknowledged)
    pipeline_depth: int = 2  # buckets in flight per engine when pipelined (>= 2); each one
    #   more costs one more bucket_bytes pack buffer on the trainer
    per_tensor: bool = False  # baseline: load_format None, one broadcast per tensor
    flush_cache: bool = True  # ask engines to drop their prefix cache after the update
    keep_buffers: bool = True  # hold the pack buffers between pushes (no re-allocation,
    #   no page faults on CPU); False hands that memory back to training after each push


@dataclass
class _Inflight:
    index: int
    works: list[Any]
    replies: list[tuple[str, Future]]
    keep: Any  # buffers/tensors referenced by the works: alive until they complete


class WeightSender:
    """Trainer side: joins the group as rank 0 and pushes named tensors to every engine.

    ``connect()`` -> ``push(named_params, version)`` (any number of times) -> ``close()``.
    A failed push aborts the group and asks engines to destroy it; ``connect()`` again.
    The engines' weight version changes only with the LAST bucket of a push (the only call
    that carries ``weight_version``), so a push that dies half way changes nothing there.
    """

    def __init__(self, cfg: SenderConfig):
        if not cfg.engine_urls:
            raise ValueError("WeightSender: engine_urls is empty")
        tp = cfg.engine_tp or [1] * len(cfg.engine_urls)
        if len(tp) != len(cfg.engine_urls) or min(tp) < 1:
            raise ValueError(f"WeightSender: engine_tp {tp} does not fit {cfg.engine_urls}")
        self.cfg = cfg
        self.clients = [EngineClient(u, timeout=cfg.timeout_s + 10.0) for u in cfg.engine_urls]
        self.rank_offsets = [1 + sum(tp[:i]) for i in range(len(tp))]
        self.world_size = 1 + sum(tp)
        self.group: WeightGroup | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stream: Any = None
        self._buffers: dict[int, Any] = {}

    # -- lifecycle -------------------------------------------------------------------
    def connect(self) -> None:
        """Host the store, ask every engine to join (concurrently) and join as rank 0."""
        import torch.distributed as dist

        if self.group is not None:
            self.close()
        cfg = self.cfg
        self._pool = ThreadPoolExecutor(max_workers=2 * len(self.clients) + 2,
                                        thread_name_prefix="nexrl-weight-sender")
        store = dist.TCPStore(cfg.master_address, cfg.master_port, None, True,
                              datetime.timedelta(seconds=cfg.timeout_s), wait_for_workers=False)
        extra = {"nexrl_timeout_s": cfg.timeout_s} if cfg.pipelined else {}
        replies = [(c.base_url, self._pool.submit(
            c.init_weights_update_group, master_address=cfg.master_address,
            master_port=store.port, rank_offset=off, world_size=self.world_size,
            group_name=cfg.group_name, backend=cfg.backend, **extra))
            for c, off in zip(self.clients, self.rank_offsets)]
        joining = self._pool.submit(
            open_group, backend=cfg.backend, master_address=cfg.master_address,
            master_port=store.port, rank=0, world_size=self.world_size,
            group_name=cfg.group_name, timeout_s=cfg.timeout_s, device=cfg.device, store=store)
        pending, failed = {f for _, f in replies} | {joining}, False
        while pending and not failed:  # fail fast: one refusal ends the wait
            done, pending = wait(pending, timeout=cfg.timeout_s + 15.0,
                                 return_when=FIRST_COMPLETED)
            failed = not done or any(f.exception() is not None for f in done)
        errors = self._errors(replies, 2.0)  # grace for the engines' own error messages
        if joining.done() and joining.exception() is not None:
            raise WeightSyncError(f"WeightSender.connect: {joining.exception()}; engines: "
                                  f"{errors or 'no reply'}") from joining.exception()
        if errors or not joining.done():
            joining.add_done_callback(lambda f: f.exception() or f.result().abort("join failed"))
            raise WeightSyncError(f"WeightSender.connect: engines failed to join: "
                                  f"{errors or 'no reply'}")
        self.group = joining.result()
        group = self.group
        if group.device.type == "cuda":
            import torch

            self._stream = torch.cuda.Stream(device=group.device)
        log.info("weight group %s up: %d engines, world_size %d, backend %s", cfg.group_name,
                 len(self.clients), self.world_size, cfg.backend)

    def close(self) -> None:
        """Destroy the group on every engine (bounded by the timeout) and locally."""
        if self.group is not None:
            replies = [(c.base_url, self._pool.submit(c.destroy_weights_update_group,
                                                       group_name=self.cfg.group_name))
                       for c in self.clients]
            errors = self._errors(replies, 10.0)
            if errors:
                log.warning("WeightSender.close: destroy failed on %s", errors)
            self.group.close()
            self.group = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._buffers = {}

    def __enter__(self) -> "WeightSender":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the push --------------------------------------------------------------------
    def push(self, named_params: Iterable[tuple[str, Any]], version: str) -> PushStats:
        """Send every (name, tensor) to every engine; return once all engines applied it.

        Raises WeightSyncError (group aborted, engines told to destroy it) on any failure.
        """
        if self.group is None or self.group.broken:
            raise WeightSyncError("WeightSender.push: not connected (call connect())")
        depth = max(2, self.cfg.pipeline_depth) if self.cfg.pipelined else 1
        slots = max(2, depth)  # pack buffers: the next bucket is packed while `depth` fly
        stats, pending = PushStats(str(version)), deque()
        t0 = time.perf_counter()
        try:
            for k, (bucket, last) in enumerate(self._buckets(named_params)):
                while pending and pending[0].index <= k - slots:  # frees slot k % slots
                    self._finish(pending.popleft())
                payload = self._pack(bucket, k % slots)
                while len(pending) >= depth:
                    self._finish(pending.popleft())
                replies = self._post(bucket, k, str(version) if last else None)
                works = self._broadcast(payload)
                pending.append(_Inflight(k, works, replies, payload))
                stats.num_buckets += 1
                stats.num_tensors += len(bucket.metas)
                stats.nbytes += bucket.nbytes
            while pending:
                stats.final_replies = self._finish(pending.popleft())
        except BaseException as e:  # clean up the group, then re-raise as is / wrapped
            self._fail(f"push of version {version} failed: {type(e).__name__}: {e}")
            if isinstance(e, (WeightSyncError, EngineError)):
                raise WeightSyncError(f"WeightSender.push({version}): {e}") from e
            raise
        finally:
            if not self.cfg.keep_buffers:
                self._buffers = {}
        stats.seconds = time.perf_counter() - t0
        return stats

    def _buckets(self, named_params: Iterable[tuple[str, Any]]) -> Iterator[tuple[Bucket, bool]]:
        """Planner output with one bucket of lookahead, so the last one is known as last."""
        planner, prev = BucketPlanner(self.cfg.bucket_bytes), None
        for name, t in named_params:
            for b in planner.add(TensorMeta.of(name, t), t):
                if prev is not None:
                    yield prev, False
                prev = b
        for b in planner.finish():
            if prev is not None:
                yield prev, False
            prev = b
        if prev is None:
            raise WeightSyncError("WeightSender.push: no tensors to send")
        yield prev, True

    def _pack(self, bucket: Bucket, slot: int) -> Any:
        """Flat uint8 buffer for a bucket (or the device tensors themselves, per-tensor mode)."""
        import torch

        dev = self.group.device
        if self.cfg.per_tensor:
            return [t.detach().to(dev).contiguous() for t in bucket.tensors]
        t0 = bucket.tensors[0]
        if len(bucket.tensors) == 1 and t0.device == dev and t0.is_contiguous():
            return bytes_view(t0)  # large tensor: sent in place, no copy
        if bucket.nbytes > self.cfg.bucket_bytes:  # lone tensor needing a copy
            return pack_bucket(bucket.tensors, device=dev)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() != self.cfg.bucket_bytes:
            self._buffers.pop(slot, None)  # free before allocating the replacement
            self._buffers[slot] = torch.empty(self.cfg.bucket_bytes, dtype=torch.uint8, device=dev)
        if self._stream is None:
            return pack_bucket(bucket.tensors, out=self._buffers[slot])
        self._stream.wait_stream(torch.cuda.current_stream(dev))  # params written there
        with torch.cuda.stream(self._stream):  # overlaps the broadcast already on the wire
            return pack_bucket(bucket.tensors, out=self._buffers[slot])

    def _broadcast(self, payload: Any) -> list[Any]:
        import torch

        tensors = payload if isinstance(payload, list) else [payload]
        if self._stream is None or isinstance(payload, list):
            return [self.group.broadcast(t) for t in tensors]
        self._stream.wait_stream(torch.cuda.current_stream(self.group.device))
        with torch.cuda.stream(self._stream):  # NCCL waits for the pack on this stream
            return [self.group.broadcast(t) for t in tensors]

    def _post(self, bucket: Bucket, index: int, version: str | None) -> list[tuple[str, Future]]:
        cfg = self.cfg
        body: dict[str, Any] = dict(
            names=[m.name for m in bucket.metas], dtypes=[m.dtype for m in bucket.metas],
            shapes=[list(m.shape) for m in bucket.metas], group_name=cfg.group_name,
            flush_cache=cfg.flush_cache and version is not None, abort_all_requests=False,
            weight_version=version, load_format=None if cfg.per_tensor else FLATTENED_BUCKET)
        if cfg.pipelined:
            body["nexrl_bucket_index"] = index
        return [(c.base_url, self._pool.submit(c.update_weights_from_distributed, **body))
                for c in self.clients]

    def _finish(self, item: _Inflight) -> dict[str, str]:
        """Wait for the engines' replies to bucket ``item.index``, then for our sends."""
        deadline, messages = time.monotonic() + self.cfg.timeout_s + 10.0, {}
        for url, fut in item.replies:
            try:
                reply = fut.result(timeout=max(deadline - time.monotonic(), 0.0))
            except FutureTimeout as e:
                raise WeightSyncError(f"engine {url}: no reply to bucket {item.index}") from e
            messages[url] = str(reply.get("message", "")) if isinstance(reply, dict) else ""
        for w in item.works:
            self.group.wait(w, deadline, f"bucket {item.index}")
        return messages

    def _fail(self, reason: str) -> None:
        if self.group is not None:
            self.group.abort(reason)
        self.close()

    @staticmethod
    def _errors(replies: list[tuple[str, Future]], timeout: float) -> dict[str, str]:
        """Wait (bounded) for every reply; map URL -> error text for those that failed."""
        deadline, errors = time.monotonic() + timeout, {}
        for url, fut in replies:
            try:
                fut.result(timeout=max(deadline - time.monotonic(), 0.0))
            except FutureTimeout:
                errors[url] = "no reply (yet)"
            except (EngineError, WeightSyncError) as e:
                errors[url] = str(e)
        return errors
