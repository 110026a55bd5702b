"""What a weight transfer moves: tensor metadata, dtype-homogeneous buckets, and the packing
of a bucket into one flat uint8 buffer (and back) in sglang's ``flattened_bucket`` layout:
the raw bytes of each tensor, in ``names`` order, no padding.

Both sides use it: the trainer's ``nexrl.weight_transfer.WeightSender`` plans and packs, the
engine's ``nodes/inference/weights.py`` unpacks what it received. Why buckets at all is in
nexrl/weight_transfer.py's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

FLATTENED_BUCKET = "flattened_bucket"  # sglang's load_format for packed buckets


class WeightSyncError(RuntimeError):
    """A weight transfer failed (peer dead, timeout, engine refused); the message says which."""


# ----------------------------------------------------------------------------- metadata
def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bfloat16" (the form sglang's ``getattr(torch, name)`` accepts)."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> Any:
    """"bfloat16" or "torch.bfloat16" -> torch.bfloat16; anything else is a ValueError."""
    import torch

    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"weight_transfer: unknown dtype {name!r}")
    return dt


@dataclass(frozen=True)
class TensorMeta:
    """What the engine needs to receive one tensor: its name, dtype name and shape."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch_dtype(self.dtype).itemsize

    @classmethod
    def of(cls, name: str, tensor: Any) -> "TensorMeta":
        return cls(name, dtype_name(tensor.dtype), tuple(int(s) for s in tensor.shape))


@dataclass
class Bucket:
    """Tensors of ONE dtype sent as one flat uint8 broadcast (or one per tensor if unbucketed)."""

    dtype: str
    metas: list[TensorMeta] = field(default_factory=list)
    tensors: list[Any] = field(default_factory=list)  # trainer side only; empty when planning
    nbytes: int = 0


class BucketPlanner:
    """Streams (name, tensor) pairs into dtype-homogeneous buckets of at most ``bucket_bytes``.

    One open bucket per dtype; it is closed when the next tensor would overflow it. A tensor
    of ``bucket_bytes`` or more gets a bucket of its own (sent without packing when it is
    already contiguous on the transfer device). Works on a generator, so a trainer can gather
    sharded parameters one at a time and never hold more than a bucket of them.
    """

    def __init__(self, bucket_bytes: int):
        if bucket_bytes <= 0:
            raise ValueError(f"weight_transfer: bucket_bytes must be > 0, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self._open: dict[str, Bucket] = {}

    def add(self, meta: TensorMeta, tensor: Any = None) -> list[Bucket]:
        """Add one tensor; return the buckets this closed (0, 1 or 2)."""
        size = meta.nbytes
        if size >= self.bucket_bytes:
            return [Bucket(meta.dtype, [meta], [tensor] if tensor is not None else [], size)]
        closed: list[Bucket] = []
        b = self._open.get(meta.dtype)
        if b is not None and b.nbytes + size > self.bucket_bytes:
            closed.append(self._open.pop(meta.dtype))
            b = None
        if b is None:
            b = self._open[meta.dtype] = Bucket(meta.dtype)
        b.metas.append(meta)
        if tensor is not None:
            b.tensors.append(tensor)
        b.nbytes += size
        return closed

    def finish(self) -> list[Bucket]:
        """Close and return the buckets still open (in the order they were opened)."""
        rest = list(self._open.values())
        self._open.clear()
        return rest


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Plan buckets for known metadata (no tensors): what ``push`` would send, in order."""
    planner, out = BucketPlanner(bucket_bytes), []
    for m in metas:
        out += planner.add(m)
    return out + planner.finish()


# ----------------------------------------------------------------------------- packing
def bytes_view(t: Any) -> Any:
    import torch

    return t.detach().reshape(-1).view(torch.uint8)


def pack_bucket(tensors: list[Any], out: Any = None, device: Any = None) -> Any:
    """Concatenate the raw bytes of ``tensors`` into one flat uint8 tensor (sglang layout).

    ``out`` (a uint8 buffer at least as large) avoids an allocation; tensors on another
    device than ``out``/``device`` are copied over first.
    """
    import torch

    dev = out.device if out is not None else torch.device(device or tensors[0].device)
    views = [bytes_view(t if t.device == dev else t.to(dev)) for t in tensors]
    total = sum(v.numel() for v in views)
    if out is None:
        return torch.cat(views) if len(views) > 1 else views[0].clone()
    flat = out[:total]
    torch.cat(views, out=flat)
    return flat


def unpack_bucket(flat: Any, metas: list[TensorMeta]) -> list[tuple[str, Any]]:
    """Split a flat uint8 buffer back into named tensors (views; copies only if misaligned)."""

    want = sum(m.nbytes for m in metas)
    if want != flat.numel():
        raise WeightSyncError(
            f"weight_transfer: bucket holds {flat.numel()} bytes but metadata describes {want}"
        )
    out, off = [], 0
    for m in metas:
        n = m.nbytes
        chunk = flat[off : off + n]
        dt = torch_dtype(m.dtype)
        if off % dt.itemsize:  # only mixed-dtype buckets from other clients can hit this
            chunk = chunk.clone()
        out.append((m.name, chunk.view(dt).view(m.shape)))
        off += n
    return out
