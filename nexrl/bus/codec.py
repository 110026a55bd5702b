"""Wire codec: a `Message` <-> the ZeroMQ frames that carry it.

The contract lives in proto/README.md and proto/schema.json; this module is its Python
implementation. A message is one header frame plus zero or more buffer frames:

    frame 0      msgpack map (the envelope), keys in this order:
                 version, type, msg_id, reply_to, sender, seq, ts, body
    frame 1..n   raw little-endian bytes of arrays too large to inline (out-of-band)

Arrays anywhere inside `body` travel as msgpack ext types whose payload is itself a msgpack
array `[dtype, shape, data]`:

    ext 1  numpy array     data = bin (inline) or uint (index of its out-of-band frame, 0-based)
    ext 2  torch tensor    same payload; decoded back to a torch.Tensor

Buffers of `oob_threshold` bytes or more go out-of-band and are sent with copy=False; on the
receiving side they are wrapped with `numpy.frombuffer` on the received frame (no copy), so
decoded arrays are read-only views. Importing this module never imports torch: tensors are
recognised through `sys.modules`, and torch is imported on decode only if a tensor arrives.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = "1.0"
PROTOCOL_MAJOR = 1
EXT_NDARRAY = 1
EXT_TENSOR = 2
#: Buffers at least this large travel as their own frame, zero-copy (pyzmq's own copy threshold).
OOB_THRESHOLD = 64 * 1024

#: The dtypes the wire knows (numpy names; bfloat16 travels for torch tensors and ml_dtypes).
WIRE_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bfloat16",
)
_WIRE_DTYPE_SET = frozenset(WIRE_DTYPES)
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")


class DecodeError(ValueError):
    """Frames that are not a valid NexRL message; the text says what is wrong and `code` is
    the wire error code (malformed | bad_version | too_large)."""

    def __init__(self, message: str, code: str = "malformed"):
        super().__init__(message)
        self.code = code


class EncodeError(TypeError):
    """A value that cannot travel on the wire (e.g. an object array); the text names it."""


@dataclass(slots=True)
class Message:
    """One envelope. Field meanings are in proto/schema.json (`envelope`)."""

    type: str
    body: dict[str, Any] = field(default_factory=dict)
    sender: str = ""
    msg_id: str = ""
    reply_to: str | None = None
    seq: int = 0
    ts: float = 0.0
    version: str = PROTOCOL_VERSION


_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_msg_id() -> str:
    """A process-unique, cheap message id: 8 random hex chars + '-' + a hex counter."""
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


def reset_id_prefix() -> None:
    """Call in a forked child so parent and child never hand out the same ids."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(4).hex()
    _ID_COUNTER = itertools.count(1)


# --------------------------------------------------------------------------- encoding


def _torch_tensor_type() -> type | None:
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _array_payload(dtype: str, shape: tuple[int, ...], buf: memoryview, nbytes: int,
                   oob: list, oob_threshold: int) -> bytes:
    if nbytes >= oob_threshold:
        oob.append(buf)
        data: Any = len(oob) - 1
    else:
        data = buf.tobytes() if not isinstance(buf, bytes) else buf
    return msgpack.packb([dtype, list(shape), data], use_bin_type=True)


def _encode_ndarray(arr: np.ndarray, oob: list, oob_threshold: int) -> msgpack.ExtType:
    dtype = arr.dtype.name
    if dtype not in _WIRE_DTYPE_SET:
        raise EncodeError(f"numpy dtype {arr.dtype!r} cannot travel on the wire; "
                          f"allowed: {', '.join(WIRE_DTYPES)}")
    wire_dtype = arr.dtype.newbyteorder("<")  # the wire is little-endian, whatever the host
    if arr.dtype != wire_dtype:
        arr = arr.astype(wire_dtype)
    if not arr.flags.c_contiguous:  # (not np.ascontiguousarray: it turns 0-d arrays into 1-d)
        arr = np.ascontiguousarray(arr)
    buf = memoryview(arr.reshape(-1).view(np.uint8))
    return msgpack.ExtType(EXT_NDARRAY,
                           _array_payload(dtype, arr.shape, buf, arr.nbytes, oob, oob_threshold))


def _encode_tensor(t: Any, oob: list, oob_threshold: int) -> msgpack.ExtType:
    import torch  # already imported: the caller holds a tensor

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _WIRE_DTYPE_SET:
        raise EncodeError(f"torch dtype {t.dtype} cannot travel on the wire")
    flat = t.reshape(-1)
    if dtype == "bfloat16":
        flat = flat.view(torch.int16)
    arr = flat.numpy()
    buf = memoryview(arr.view(np.uint8))
    return msgpack.ExtType(EXT_TENSOR,
                           _array_payload(dtype, tuple(t.shape), buf, arr.nbytes, oob, oob_threshold))


def encode(msg: Message, oob_threshold: int = OOB_THRESHOLD) -> list:
    """Frames for `msg`: [header bytes, *out-of-band buffers (memoryviews)]."""
    oob: list = []
    tensor_type = _torch_tensor_type()

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return _encode_ndarray(obj, oob, oob_threshold)
        if isinstance(obj, np.generic):
            return obj.item()
        if tensor_type is not None and isinstance(obj, tensor_type):
            return _encode_tensor(obj, oob, oob_threshold)
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        raise EncodeError(f"a value of type {type(obj).__name__} cannot travel on the wire "
                          f"in a {msg.type!r} message")

    header = {
        "version": msg.version,
        "type": msg.type,
        "msg_id": msg.msg_id,
        "reply_to": msg.reply_to,
        "sender": msg.sender,
        "seq": msg.seq,
        "ts": msg.ts,
        "body": msg.body,
    }
    try:
        head = msgpack.packb(header, default=default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"cannot encode {msg.type!r}: {e}") from e
    return [head, *oob]


def stamp(msg: Message, sender: str, seq: int) -> Message:
    """Fill the envelope fields a sender owns (id, sender, seq, timestamp) if empty."""
    if not msg.msg_id:
        msg.msg_id = new_msg_id()
    msg.sender = sender
    msg.seq = seq
    msg.ts = time.time()
    return msg


# --------------------------------------------------------------------------- decoding


def _frame_buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame (received with copy=False)
    return buf if buf is not None else memoryview(frame)


def _np_dtype(name: str) -> np.dtype:
    if name not in _WIRE_DTYPE_SET:
        raise DecodeError(f"unknown array dtype {name!r}; the wire knows {', '.join(WIRE_DTYPES)}")
    if name == "bfloat16":
        try:
            import ml_dtypes  # optional: numpy has no bfloat16 of its own
        except ImportError as e:
            raise DecodeError("a bfloat16 numpy array needs the ml_dtypes package") from e
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name).newbyteorder("<")


def _decode_array(code: int, payload: bytes, frames: list) -> Any:
    try:
        dtype, shape, data = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DecodeError(f"ext {code} payload is not [dtype, shape, data]: {e}") from e
    if not isinstance(dtype, str) or not isinstance(shape, list) or \
            not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(f"ext {code} payload has a bad dtype {dtype!r} or shape {shape!r}")
    if isinstance(data, int) and not isinstance(data, bool):
        if not 0 <= data < len(frames) - 1:
            raise DecodeError(f"array refers to out-of-band frame {data}, "
                              f"but the message has {len(frames) - 1}")
        buf = _frame_buffer(frames[data + 1])
    elif isinstance(data, bytes):
        buf = data
    else:
        raise DecodeError(f"ext {code} data must be bin or a frame index, not {type(data).__name__}")
    if code == EXT_TENSOR:
        return _to_tensor(dtype, shape, buf)
    dt = _np_dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(buf) != count * dt.itemsize:
        raise DecodeError(f"array of dtype {dtype} and shape {shape} needs "
                          f"{count * dt.itemsize} bytes, got {len(buf)}")
    return np.frombuffer(buf, dtype=dt, count=count).reshape(shape)


def _to_tensor(dtype: str, shape: list, buf: Any) -> Any:
    import warnings

    import torch

    wire = "int16" if dtype == "bfloat16" else dtype
    dt = _np_dtype(wire)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(buf) != count * dt.itemsize:
        raise DecodeError(f"tensor of dtype {dtype} and shape {shape} needs "
                          f"{count * dt.itemsize} bytes, got {len(buf)}")
    arr = np.frombuffer(buf, dtype=dt, count=count)
    with warnings.catch_warnings():  # read-only view by design: see the module docstring
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape(shape)


def decode(frames: list, max_bytes: int | None = None) -> Message:
    """Parse frames (bytes or zmq.Frame) into a Message; raises DecodeError saying why not.

    Checks only the envelope; the body is checked against the schema by `schema.check`.
    """
    if not frames:
        raise DecodeError("empty message (no frames)")
    if max_bytes is not None:
        total = sum(len(_frame_buffer(f)) for f in frames)
        if total > max_bytes:
            raise DecodeError(f"message of {total} bytes exceeds the limit of {max_bytes}",
                              "too_large")

    def ext_hook(code: int, payload: bytes) -> Any:
        if code in (EXT_NDARRAY, EXT_TENSOR):
            return _decode_array(code, payload, frames)
        raise DecodeError(f"unknown msgpack ext type {code} (known: 1 ndarray, 2 tensor)")

    try:
        head = msgpack.unpackb(_frame_buffer(frames[0]), raw=False, ext_hook=ext_hook,
                               strict_map_key=True)
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise DecodeError(f"header frame is not valid msgpack: {type(e).__name__}: {e}") from e
    if not isinstance(head, dict):
        raise DecodeError(f"header must be a map, got {type(head).__name__}")
    version = head.get("version")
    if not isinstance(version, str):
        raise DecodeError("envelope field 'version' is missing or not a string")
    if _VERSION_RE.fullmatch(version) is None:
        raise DecodeError(f"envelope field 'version' must be 'MAJOR.MINOR', not {version!r}")
    major = version.split(".", 1)[0]
    if major != str(PROTOCOL_MAJOR):
        raise DecodeError(f"protocol version {version!r} is incompatible with {PROTOCOL_VERSION}",
                          "bad_version")
    mtype, msg_id, reply_to = head.get("type"), head.get("msg_id"), head.get("reply_to")
    sender, seq, ts, body = head.get("sender"), head.get("seq"), head.get("ts"), head.get("body")
    if not isinstance(mtype, str) or not mtype:
        raise DecodeError("envelope field 'type' is missing or not a non-empty string")
    if not isinstance(msg_id, str):
        raise DecodeError(f"envelope field 'msg_id' of {mtype!r} must be a string")
    if reply_to is not None and not isinstance(reply_to, str):
        raise DecodeError(f"envelope field 'reply_to' of {mtype!r} must be a string or nil")
    if not isinstance(sender, str):
        raise DecodeError(f"envelope field 'sender' of {mtype!r} must be a string")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise DecodeError(f"envelope field 'seq' of {mtype!r} must be a non-negative integer")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise DecodeError(f"envelope field 'ts' of {mtype!r} must be a number")
    if not isinstance(body, dict):
        raise DecodeError(f"envelope field 'body' of {mtype!r} must be a map")
    if not all(type(k) is str for k in body):  # msgpack lets bin keys through; the wire does not
        raise DecodeError(f"body of {mtype!r} has a key that is not a string")
    return Message(type=mtype, body=body, sender=sender, msg_id=msg_id, reply_to=reply_to,
                   seq=seq, ts=float(ts), version=version)
