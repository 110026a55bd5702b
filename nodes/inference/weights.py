"""Engine side of the distributed weight update: sglang's three endpoints on the embedded engine.

``add_weight_routes(app, engine)`` adds, with sglang's request fields, defaults and replies
(``{"success": bool, "message": str}``, HTTP 200 on success, 400 on failure):

``POST /init_weights_update_group`` -- join the trainer's private group (in a worker thread,
the aiohttp loop keeps serving). Rank = ``rank_offset`` (one engine = one rank).

=================  ======================  =====================================================
field              sglang default          what NexRL does
=================  ======================  =====================================================
master_address     (required)              host of the trainer's TCPStore (rank 0 hosts it)
master_port        (required)              its port
rank_offset        (required)              this engine's rank (tp_rank is always 0 here)
world_size         (required)              1 trainer + all engine ranks
group_name         "weight_update_group"   key of the group; re-init of a live name replaces it
backend            "nccl"                  "nccl" (CUDA engines) or "gloo" (any device; CPU
                                           buffers, copied into the model on apply)
nexrl_timeout_s    (NexRL extension)       per-collective deadline for this group (default:
                                           ``add_weight_routes(timeout_s=)``)
=================  ======================  =====================================================

``POST /update_weights_from_distributed`` -- receive one broadcast (one bucket, or one
broadcast per tensor) and stage or apply it.

=================  ======================  =====================================================
names/dtypes/      (required)              what the broadcast carries, in order; dtype names
shapes                                     as ``getattr(torch, name)`` accepts ("bfloat16")
group_name         "weight_update_group"   which group to receive on
load_format        None                    None: one broadcast per tensor (sglang's default);
                                           "flattened_bucket": ONE uint8 broadcast holding the
                                           raw bytes of every tensor in ``names`` order
weight_version     None                    None: STAGE the received tensors (engine unchanged);
                                           a value: apply everything staged + this call
                                           atomically and set the version (see below)
flush_cache        True                    accepted; running rows are ALWAYS retracted after an
                                           update (their KV came from the old weights) and
                                           there is no prefix cache, so nothing more to flush
abort_all_requests False                   before applying: pause("abort") then resume
torch_empty_cache  False (newer sglang)    accepted and ignored (no cache to empty here)
nexrl_bucket_index (NexRL extension)       0, 1, 2, ... within one update: lets a sender keep
                                           two buckets in flight; receives are issued in index
                                           order whatever order the HTTP requests arrive in
=================  ======================  =====================================================

``POST /destroy_weights_update_group`` {group_name} -- abort the group (ends a receive in
flight) and drop anything staged.

Staging (why the engine never serves half an update): sglang loads every call's tensors into
the model immediately, so a trainer that dies between buckets leaves the engine with a mix of
two versions ("please discard the whole weights"). Here calls without ``weight_version`` are
only received into buffers on the engine's device; the call that carries ``weight_version``
(the sender puts it on the LAST bucket only) waits until every earlier bucket of the update
has landed, then ``install_weights`` validates all names and shapes and installs everything
between two decode steps. A client that sends ``weight_version`` on every call gets sglang's
per-call behaviour. Cost: one extra copy of the model's bytes on the engine's device while an
update is in flight (7B bf16: 15 GB). Installing is a pointer swap, not a copy: the received
buffers BECOME the parameters (the old storage is freed), so the final step takes well under
a millisecond instead of a 15 GB device copy (~7 ms on an H200) -- see ``install_weights``.

Failures: any error or timeout while receiving aborts the group (NCCL: the communicator, so
no kernel waits forever), drops the staged buffers and answers ``success: false`` naming the
cause; the engine keeps serving on the weights and version it had. The group must then be
re-initialised (the trainer's ``WeightSender`` does this on its next ``connect()``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from nexrl.engine_client import DEFAULT_GROUP_NAME
from nexrl.weight_buckets import FLATTENED_BUCKET, TensorMeta, WeightSyncError, unpack_bucket
from nexrl.weight_transfer import WeightGroup, open_group

log = logging.getLogger("nexrl.inference.weights")

WEIGHT_ROUTES_KEY = web.AppKey("nexrl_weight_routes", object)
"""``app[WEIGHT_ROUTES_KEY]`` is the ``WeightRoutes`` (its ``groups`` hold the joined groups)."""


@dataclass(eq=False)
class _GroupState:
    """One joined group and the update being staged on it."""

    group: WeightGroup
    serial: asyncio.Lock = field(default_factory=asyncio.Lock)  # requests without an index
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)
    next_index: int = 0  # next nexrl_bucket_index allowed to issue its receive
    num_landed: int = 0  # indexed buckets of this update received and staged so far
    staged: list[tuple[str, Any]] = field(default_factory=list)
    staged_names: set[str] = field(default_factory=set)
    staged_bytes: int = 0
    buffers: list[Any] = field(default_factory=list)  # keep received buffers alive

    def drop_staged(self) -> None:
        self.staged, self.staged_names, self.staged_bytes, self.buffers = [], set(), 0, []
        self.next_index = self.num_landed = 0


def _reply(success: bool, message: str) -> web.Response:
    return web.json_response({"success": success, "message": message},
                             status=200 if success else 400)


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"request body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


def _metas(body: dict) -> list[TensorMeta]:
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise ValueError("names, dtypes and shapes must be lists")
    if not names or not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names/dtypes/shapes must be non-empty and of equal length, got "
                         f"{len(names)}/{len(dtypes)}/{len(shapes)}")
    metas = [TensorMeta(str(n), str(d).removeprefix("torch."), tuple(int(s) for s in shp))
             for n, d, shp in zip(names, dtypes, shapes)]
    for m in metas:
        m.nbytes  # noqa: B018 -- validates the dtype name (ValueError if unknown)
    return metas


_ALIGN = 64  # bytes: a received view becomes a parameter only if it starts on this boundary


def install_weights(engine: Any, named: list[tuple[str, Any]], version: str) -> tuple[int, int]:
    """Put ``named`` into ``engine.model`` at once, between two decode steps.

    Everything is validated first (unknown names or shapes: ValueError, nothing changed).
    Then, under ``engine.step_lock``: a received tensor on the parameter's device, of its
    dtype and aligned is SWAPPED in (the parameter's storage becomes the receive buffer:
    no copy, the old storage is freed); any other (gloo buffers on a CUDA engine, dtype
    casts) is copied by ``engine.apply_weights``. Running rows are retracted (their KV came
    from the old weights) and the version is set. On CUDA the device is synchronised before
    returning, so success means the new weights are in place. Returns (swapped, copied).
    """
    import torch

    params = dict(engine.model.named_parameters(remove_duplicate=False))
    unknown = [n for n, _ in named if n not in params]
    wrong = [f"{n}: got {tuple(t.shape)}, model has {tuple(params[n].shape)}"
             for n, t in named if n in params and tuple(t.shape) != tuple(params[n].shape)]
    if unknown or wrong:
        raise ValueError(f"weight update rejected, nothing applied; unknown names "
                         f"{unknown[:10]} ({len(unknown)}); shape mismatches {wrong[:10]}")
    swap, copy = [], []
    for n, t in named:
        p = params[n]
        ok = (t.device == p.device and t.dtype == p.dtype and t.is_contiguous()
              and t.data_ptr() % _ALIGN == 0)
        (swap if ok else copy).append((n, t))
    with engine.step_lock, torch.no_grad():
        if copy:
            engine.apply_weights(copy, None)
        for n, t in swap:
            params[n].data = t
        engine.flush_cache()  # retract running rows: their KV came from the old weights
        engine.weight_version = str(version)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
    return len(swap), len(copy)


class WeightRoutes:
    """The three handlers plus the per-group state they share (one per app)."""

    def __init__(self, engine: Any, timeout_s: float = 60.0):
        self.engine = engine
        self.timeout_s = timeout_s
        self.groups: dict[str, _GroupState] = {}

    # ------------------------------------------------------------------ init / destroy
    async def init_group(self, request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            name = str(body.get("group_name") or DEFAULT_GROUP_NAME)
            backend = str(body.get("backend") or "nccl")
            rank, world = int(body["rank_offset"]), int(body["world_size"])
            addr, port = str(body["master_address"]), int(body["master_port"])
            timeout = float(body.get("nexrl_timeout_s") or self.timeout_s)
        except (KeyError, TypeError, ValueError) as e:
            return _reply(False, f"init_weights_update_group: bad request: {e}")
        dev = self.engine.device
        if backend == "nccl" and getattr(dev, "type", str(dev)) != "cuda":
            return _reply(False, f"init_weights_update_group: backend nccl needs a CUDA engine, "
                                 f"this one runs on {dev}; use backend gloo")
        if not 0 < rank < world:
            return _reply(False, f"init_weights_update_group: rank_offset {rank} not in "
                                 f"[1, {world}) (rank 0 is the trainer)")
        self._drop(name, "replaced by a new init")
        t0 = time.monotonic()
        try:
            group = await asyncio.to_thread(
                open_group, backend=backend, master_address=addr, master_port=port, rank=rank,
                world_size=world, group_name=name, timeout_s=timeout,
                device=dev if backend == "nccl" else "cpu")
        except WeightSyncError as e:
            return _reply(False, f"init_weights_update_group: {e}")
        self.groups[name] = _GroupState(group)
        return _reply(True, f"joined {name} as rank {rank}/{world} ({backend}) in "
                            f"{time.monotonic() - t0:.2f}s")

    async def destroy_group(self, request: web.Request) -> web.Response:
        try:
            name = str((await _body(request)).get("group_name") or DEFAULT_GROUP_NAME)
        except ValueError as e:
            return _reply(False, f"destroy_weights_update_group: bad request: {e}")
        if name not in self.groups:
            return _reply(False, f"destroy_weights_update_group: no group named {name!r}")
        self._drop(name, "destroyed")
        return _reply(True, f"destroyed {name}")

    def _drop(self, name: str, reason: str) -> None:
        st = self.groups.pop(name, None)
        if st is not None:
            st.drop_staged()
            st.group.abort(reason, quiet=True)

    # ------------------------------------------------------------------ update
    async def update(self, request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            metas = _metas(body)
            name = str(body.get("group_name") or DEFAULT_GROUP_NAME)
            fmt = body.get("load_format")
            if fmt not in (None, FLATTENED_BUCKET):
                raise ValueError(f"load_format {fmt!r} is not None or {FLATTENED_BUCKET!r}")
            index = body.get("nexrl_bucket_index")
            index = None if index is None else int(index)
            version = body.get("weight_version")
        except (TypeError, ValueError) as e:
            return _reply(False, f"update_weights_from_distributed: bad request: {e}")
        st = self.groups.get(name)
        if st is None:
            return _reply(False, f"update_weights_from_distributed: no group {name!r}; call "
                                 "/init_weights_update_group first")
        try:
            named = await self._receive(st, metas, fmt == FLATTENED_BUCKET, index)
            dup = st.staged_names.intersection(n for n, _ in named)
            if dup:
                raise WeightSyncError(f"tensors sent twice in one update: {sorted(dup)[:5]}")
            st.staged += named
            st.staged_names.update(n for n, _ in named)
            st.staged_bytes += sum(m.nbytes for m in metas)
            if index is not None:
                await self._landed(st, index, final=version is not None)
            if version is None:
                return _reply(True, f"staged {len(named)} tensors ({st.staged_bytes} bytes "
                                    "so far); applied with the call that carries weight_version")
            return await self._apply(st, str(version), bool(body.get("abort_all_requests", False)))
        except (WeightSyncError, ValueError, RuntimeError) as e:
            await self._fail(name, st, f"{type(e).__name__}: {e}")
            return _reply(False, f"update_weights_from_distributed: {e}; the engine keeps "
                                 f"weight version {self.engine.weight_version}")

    async def _receive(self, st: _GroupState, metas: list[TensorMeta], bucketed: bool,
                       index: int | None) -> list[tuple[str, Any]]:
        """Issue the receive in order, wait for it (off the loop), return named tensors."""
        g = st.group
        if index is None:
            async with st.serial:  # sglang-style client: one request at a time, FIFO
                works, bufs = self._issue(g, metas, bucketed)
                await asyncio.to_thread(self._wait, g, works)
        else:
            async with st.turn:
                try:
                    await asyncio.wait_for(st.turn.wait_for(
                        lambda: st.next_index >= index or g.broken is not None), g.timeout_s)
                except asyncio.TimeoutError as e:
                    raise WeightSyncError(f"bucket {index} waited {g.timeout_s:.0f}s for bucket "
                                          f"{st.next_index}") from e
                if g.broken is not None:
                    raise WeightSyncError(f"group broken before bucket {index}: {g.broken}")
                if st.next_index != index:
                    raise WeightSyncError(f"bucket {index} out of sequence (expected "
                                          f"{st.next_index})")
                works, bufs = self._issue(g, metas, bucketed)
                st.next_index += 1
                st.turn.notify_all()
            await asyncio.to_thread(self._wait, g, works)
        st.buffers += bufs
        if bucketed:
            return unpack_bucket(bufs[0], metas)
        return [(m.name, b) for m, b in zip(metas, bufs)]

    @staticmethod
    async def _landed(st: _GroupState, index: int, final: bool) -> None:
        """Count a staged bucket; the final one waits until every earlier bucket landed too.

        Receives of consecutive buckets overlap (gloo runs them on several threads, NCCL
        queues them), so bucket k+1 can finish before bucket k: applying on the final
        bucket's arrival alone would miss k.
        """
        g = st.group
        async with st.turn:
            st.num_landed += 1
            st.turn.notify_all()
            if not final:
                return
            try:
                await asyncio.wait_for(st.turn.wait_for(
                    lambda: st.num_landed > index or g.broken is not None), g.timeout_s)
            except asyncio.TimeoutError as e:
                raise WeightSyncError(f"final bucket {index}: only {st.num_landed} of "
                                      f"{index + 1} buckets landed in {g.timeout_s:.0f}s") from e
            if g.broken is not None:
                raise WeightSyncError(f"group broken before the update completed: {g.broken}")

    @staticmethod
    def _issue(g: WeightGroup, metas: list[TensorMeta], bucketed: bool) -> tuple[list, list]:
        import torch

        from nexrl.weight_buckets import torch_dtype

        if bucketed:
            bufs = [torch.empty(sum(m.nbytes for m in metas), dtype=torch.uint8, device=g.device)]
        else:
            bufs = [torch.empty(m.shape, dtype=torch_dtype(m.dtype), device=g.device)
                    for m in metas]
        return [g.broadcast(b) for b in bufs], bufs

    @staticmethod
    def _wait(g: WeightGroup, works: list) -> None:
        deadline = time.monotonic() + g.timeout_s
        for w in works:
            g.wait(w, deadline, "receive")

    async def _apply(self, st: _GroupState, version: str, abort_all: bool) -> web.Response:
        eng, named, nbytes = self.engine, st.staged, st.staged_bytes
        st.drop_staged()  # the buffers stay alive through `named` until applied
        t0 = time.monotonic()

        def apply() -> tuple[int, int]:
            with eng.step_lock:  # generation stays still from abort to apply
                was_paused, mode = eng.paused, eng.pause_mode
                if abort_all:
                    eng.pause("abort")
                try:
                    return install_weights(eng, named, version)
                finally:
                    if abort_all and was_paused:  # a pause by weight-sync stays in force
                        eng.pause(mode or "abort")
                    elif abort_all:
                        eng.resume()

        swapped, copied = await asyncio.to_thread(apply)
        return _reply(True, f"applied {len(named)} tensors ({nbytes} bytes; {swapped} swapped "
                            f"in, {copied} copied) in {time.monotonic() - t0:.4f}s; weight "
                            f"version {version}")

    async def _fail(self, name: str, st: _GroupState, reason: str) -> None:
        """Abort the group, drop the staged tensors, wake queued buckets so they fail now."""
        log.warning("weight update on group %s failed: %s", name, reason)
        st.drop_staged()
        st.group.abort(reason)
        async with st.turn:
            st.turn.notify_all()


def add_weight_routes(app: web.Application, engine: Any, timeout_s: float = 60.0) -> WeightRoutes:
    """Register the three weight-update endpoints on ``app`` for ``engine``; returns the state.

    ``timeout_s`` is the default per-collective deadline (a group's ``nexrl_timeout_s`` wins).
    """
    routes = WeightRoutes(engine, timeout_s)
    app.router.add_post("/init_weights_update_group", routes.init_group)
    app.router.add_post("/update_weights_from_distributed", routes.update)
    app.router.add_post("/destroy_weights_update_group", routes.destroy_group)
    app[WEIGHT_ROUTES_KEY] = routes
    return routes
