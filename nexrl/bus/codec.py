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
import math
import os
import re
import sys
import threading
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
    # getattr: another thread may be half-way through `import torch` right now
    return getattr(torch, "Tensor", None) if torch is not None else None


def _array_payload(dtype: str, shape: tuple[int, ...], buf: memoryview, nbytes: int,
                   oob: list, oob_threshold: int) -> bytes:
    if nbytes >= oob_threshold:
        oob.append(buf)
        data: Any = len(oob) - 1
    else:
        data = buf  # msgpack packs a memoryview as bin directly (no tobytes() copy)
    return _ENCODER.inner.pack([dtype, list(shape), data])


#: dtype -> wire name, for dtypes seen before (numpy's dtype.name is a slow property).
_DTYPE_NAMES: dict[np.dtype, str] = {}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def _wire_name(dt: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = dt.name
        if name not in _WIRE_DTYPE_SET:
            raise EncodeError(f"numpy dtype {dt!r} cannot travel on the wire; "
                              f"allowed: {', '.join(WIRE_DTYPES)}")
        _DTYPE_NAMES[dt] = name
    return name


def _encode_ndarray(arr: np.ndarray, oob: list, oob_threshold: int) -> msgpack.ExtType:
    dt = arr.dtype
    dtype = _wire_name(dt)
    order = dt.byteorder  # the wire is little-endian, whatever the host
    if order == ">" or (order == "=" and not _LITTLE_ENDIAN_HOST):
        arr = arr.astype(dt.newbyteorder("<"))
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


class _Encoder(threading.local):
    """Per-thread encoding state. One msgpack Packer is built per thread and reused (a new
    Packer per message, as msgpack.packb makes, costs about a third of a small encode); its
    `default` hook reads the current message's state (`cur`: out-of-band list, threshold,
    type, torch.Tensor) from here. A nested encode on the same thread (a signal handler
    that publishes while `default` runs) gets a fresh Packer and puts `cur` back after."""

    def __init__(self) -> None:
        self.cur: tuple | None = None
        self.packer = msgpack.Packer(default=self.default, use_bin_type=True, autoreset=True)
        self.inner = msgpack.Packer(use_bin_type=True, autoreset=True)  # ext payloads

    def default(self, obj: Any) -> Any:
        oob, oob_threshold, mtype, tensor_type = self.cur
        if isinstance(obj, np.ndarray):
            return _encode_ndarray(obj, oob, oob_threshold)
        if isinstance(obj, np.generic):
            return obj.item()
        if tensor_type is not None and isinstance(obj, tensor_type):
            return _encode_tensor(obj, oob, oob_threshold)
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        raise EncodeError(f"a value of type {type(obj).__name__} cannot travel on the wire "
                          f"in a {mtype!r} message")


_ENCODER = _Encoder()


def encode(msg: Message, oob_threshold: int = OOB_THRESHOLD) -> list:
    """Frames for `msg`: [header bytes, *out-of-band buffers (memoryviews)]."""
    enc = _ENCODER
    outer = enc.cur
    oob: list = []
    enc.cur = (oob, oob_threshold, msg.type, _torch_tensor_type())
    packer = enc.packer if outer is None else msgpack.Packer(
        default=enc.default, use_bin_type=True, autoreset=True)
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
        head = packer.pack(header)  # (a Packer resets itself when this raises)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"cannot encode {msg.type!r}: {e}") from e
    finally:
        enc.cur = outer
    return [head, *oob] if oob else [head]


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
    # read-only either way, so decoded arrays are read-only views whatever carried them
    return buf.toreadonly() if buf is not None else memoryview(frame)


_NP_DTYPES: dict[str, np.dtype] = {}  # wire name -> little-endian numpy dtype


def _np_dtype(name: str) -> np.dtype:
    dt = _NP_DTYPES.get(name)
    if dt is not None:
        return dt
    if name not in _WIRE_DTYPE_SET:
        raise DecodeError(f"unknown array dtype {name!r}; the wire knows {', '.join(WIRE_DTYPES)}")
    if name == "bfloat16":
        try:
            import ml_dtypes  # optional: numpy has no bfloat16 of its own
        except ImportError as e:
            raise DecodeError("a bfloat16 numpy array needs the ml_dtypes package") from e
        dt = np.dtype(ml_dtypes.bfloat16)
    else:
        dt = np.dtype(name).newbyteorder("<")
    _NP_DTYPES[name] = dt
    return dt


def _decode_array(code: int, payload: bytes, frames: list) -> Any:
    try:
        dtype, shape, data = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DecodeError(f"ext {code} payload is not [dtype, shape, data]: {e}") from e
    if type(dtype) is not str or type(shape) is not list or \
            not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(f"ext {code} payload has a bad dtype {dtype!r} or shape {shape!r}")
    if type(data) is bytes:
        buf: Any = data
    elif type(data) is int:
        if not 0 <= data < len(frames) - 1:
            raise DecodeError(f"array refers to out-of-band frame {data}, "
                              f"but the message has {len(frames) - 1}")
        buf = _frame_buffer(frames[data + 1])
    else:
        raise DecodeError(f"ext {code} data must be bin or a frame index, not {type(data).__name__}")
    if code == EXT_TENSOR:
        return _to_tensor(dtype, shape, buf)
    dt = _np_dtype(dtype)
    count = math.prod(shape)  # exact (numpy's int64 prod overflows on absurd shapes)
    if len(buf) != count * dt.itemsize:
        raise DecodeError(f"array of dtype {dtype} and shape {shape} needs "
                          f"{count * dt.itemsize} bytes, got {len(buf)}")
    arr = np.frombuffer(buf, dtype=dt, count=count)
    if len(shape) == 1:
        return arr
    try:
        return arr.reshape(shape)
    except ValueError as e:  # e.g. more dimensions than numpy supports
        raise DecodeError(f"array shape {shape} is not supported: {e}") from e


def _to_tensor(dtype: str, shape: list, buf: Any) -> Any:
    import warnings

    wire = "int16" if dtype == "bfloat16" else dtype
    dt = _np_dtype(wire)
    count = math.prod(shape)
    if len(buf) != count * dt.itemsize:
        raise DecodeError(f"tensor of dtype {dtype} and shape {shape} needs "
                          f"{count * dt.itemsize} bytes, got {len(buf)}")
    import torch  # only for a well-formed tensor: a bad payload must not pull torch in

    arr = np.frombuffer(buf, dtype=dt, count=count)
    with warnings.catch_warnings():  # read-only view by design: see the module docstring
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    try:
        return t.reshape(shape)
    except (RuntimeError, ValueError, TypeError) as e:  # e.g. a shape torch cannot hold
        raise DecodeError(f"tensor shape {shape} is not supported: {e}") from e


def decode(frames: list, max_bytes: int | None = None) -> Message:
    """Parse frames (bytes or zmq.Frame) into a Message; raises DecodeError saying why not.

    Checks only the envelope; the body is checked against the schema by `schema.check`.
    (Hot path: exact type tests, since msgpack yields exact builtins, and the common
    version string short-cuts the version parse.)
    """
    if not frames:
        raise DecodeError("empty message (no frames)")
    first = frames[0]
    head_buf = first if type(first) is bytes else _frame_buffer(first)
    if max_bytes is not None:
        # bytes, zmq.Frame and 1-D byte memoryviews all have len() == their size in bytes
        total = len(head_buf) if len(frames) == 1 else sum(map(len, frames))
        if total > max_bytes:
            raise DecodeError(f"message of {total} bytes exceeds the limit of {max_bytes}",
                              "too_large")

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == EXT_NDARRAY or code == EXT_TENSOR:
            return _decode_array(code, payload, frames)
        raise DecodeError(f"unknown msgpack ext type {code} (known: 1 ndarray, 2 tensor)")

    try:
        head = msgpack.unpackb(head_buf, raw=False, ext_hook=ext_hook, strict_map_key=True)
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise DecodeError(f"header frame is not valid msgpack: {type(e).__name__}: {e}") from e
    if type(head) is not dict:
        raise DecodeError(f"header must be a map, got {type(head).__name__}")
    get = head.get
    version = get("version")
    if version != PROTOCOL_VERSION:
        if type(version) is not str:
            raise DecodeError("envelope field 'version' is missing or not a string")
        if _VERSION_RE.fullmatch(version) is None:
            raise DecodeError(f"envelope field 'version' must be 'MAJOR.MINOR', not {version!r}")
        if version.split(".", 1)[0] != str(PROTOCOL_MAJOR):
            raise DecodeError(f"protocol version {version!r} is incompatible with "
                              f"{PROTOCOL_VERSION}", "bad_version")
    mtype, msg_id, reply_to = get("type"), get("msg_id"), get("reply_to")
    sender, seq, ts, body = get("sender"), get("seq"), get("ts"), get("body")
    if type(mtype) is not str or not mtype:
        raise DecodeError("envelope field 'type' is missing or not a non-empty string")
    if type(msg_id) is not str:
        raise DecodeError(f"envelope field 'msg_id' of {mtype!r} must be a string")
    if reply_to is not None and type(reply_to) is not str:
        raise DecodeError(f"envelope field 'reply_to' of {mtype!r} must be a string or nil")
    if type(sender) is not str:
        raise DecodeError(f"envelope field 'sender' of {mtype!r} must be a string")
    if type(seq) is not int or seq < 0:
        raise DecodeError(f"envelope field 'seq' of {mtype!r} must be a non-negative integer")
    tst = type(ts)
    if tst is not float:
        if tst is not int:
            raise DecodeError(f"envelope field 'ts' of {mtype!r} must be a number")
        ts = float(ts)
    if type(body) is not dict:
        raise DecodeError(f"envelope field 'body' of {mtype!r} must be a map")
    for k in body:
        if type(k) is not str:  # msgpack lets bin keys through; the wire does not
            raise DecodeError(f"body of {mtype!r} has a key that is not a string")
    return Message(mtype, body, sender, msg_id, reply_to, seq, ts, version)
