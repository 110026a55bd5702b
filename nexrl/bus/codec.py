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


_TENSOR_TYPE: type | None = None


def _torch_tensor_type() -> type | None:
    global _TENSOR_TYPE
    if _TENSOR_TYPE is None:  # torch not seen yet: look again (it may be imported since)
        torch = sys.modules.get("torch")
        # getattr: another thread may be half-way through `import torch` right now
        _TENSOR_TYPE = getattr(torch, "Tensor", None) if torch is not None else None
    return _TENSOR_TYPE


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
#: dtype -> the first bytes of its ext payload (msgpack array of 3 + the dtype name), for
#: dtypes whose bytes travel as they are (little-endian or single-byte) and which a
#: memoryview can cast to bytes: the fast path of `_encode_ndarray`.
_FAST_HEADS: dict[np.dtype, bytes] = {}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_new_ext = tuple.__new__  # msgpack.ExtType(...) re-validates its two fields in Python


def _wire_name(dt: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = dt.name
        if name not in _WIRE_DTYPE_SET:
            raise EncodeError(f"numpy dtype {dt!r} cannot travel on the wire; "
                              f"allowed: {', '.join(WIRE_DTYPES)}")
        _DTYPE_NAMES[dt] = name
        order = dt.byteorder
        if order in "<|" or (order == "=" and _LITTLE_ENDIAN_HOST):
            try:
                np.zeros(1, dt).data.cast("B")
                _FAST_HEADS[dt] = b"\x93" + msgpack.packb(name)
            except (TypeError, ValueError, NotImplementedError):
                pass  # e.g. a dtype without a buffer format: the general path
    return name


def _bin_header(n: int) -> bytes:
    """msgpack's own bin header for n bytes (bin 8 / 16 / 32), as Packer writes it."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _encode_ndarray(arr: np.ndarray, oob: list, oob_threshold: int) -> msgpack.ExtType:
    head = _FAST_HEADS.get(arr.dtype)
    if head is not None:
        view = arr.data
        n = view.nbytes
        if n and view.c_contiguous:
            # Fast path (the common case): the payload is assembled from its parts, with
            # the array's bytes copied once (inline) or not at all (out-of-band); the same
            # bytes as packing [dtype, shape, data] with msgpack.
            buf = view.cast("B")
            inner = _ENCODER.inner
            if n >= oob_threshold:
                oob.append(buf)
                payload = head + inner.pack(arr.shape) + inner.pack(len(oob) - 1)
            else:
                payload = b"".join((head, inner.pack(arr.shape), _bin_header(n), buf))
            return _new_ext(msgpack.ExtType, (EXT_NDARRAY, payload))
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
        self.scratch = self.new_scratch()  # transient headers (encode_fields(transient=True))

    def new_scratch(self) -> msgpack.Packer:
        return msgpack.Packer(default=self.default, use_bin_type=True, autoreset=False)

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
    return encode_fields(msg.type, msg.body, msg.sender, msg.msg_id, msg.reply_to, msg.seq,
                         msg.ts, oob_threshold, msg.version)


def encode_fields(mtype: str, body: dict[str, Any], sender: str, msg_id: str,
                  reply_to: str | None, seq: int, ts: float,
                  oob_threshold: int = OOB_THRESHOLD, version: str = PROTOCOL_VERSION,
                  transient: bool = False) -> list:
    """`encode` from the envelope's fields (the send paths: no Message is built first).

    transient=True: frame 0 is a view of this thread's scratch buffer instead of a bytes
    object of its own (one copy of the header less), good until the next transient encode on
    this thread: for a sender that copies it into the socket at once and keeps nothing.
    """
    enc = _ENCODER
    outer = enc.cur
    oob: list = []
    enc.cur = (oob, oob_threshold, mtype, _torch_tensor_type())
    header = {
        "version": version,
        "type": mtype,
        "msg_id": msg_id,
        "reply_to": reply_to,
        "sender": sender,
        "seq": seq,
        "ts": ts,
        "body": body,
    }
    try:
        if outer is not None:  # a nested encode (see _Encoder): a Packer of its own
            head: Any = msgpack.Packer(default=enc.default, use_bin_type=True,
                                       autoreset=True).pack(header)
        elif transient:
            scratch = enc.scratch
            try:
                scratch.reset()
            except BufferError:  # the previous view is still held somewhere: a new buffer
                scratch = enc.scratch = enc.new_scratch()
            try:
                scratch.pack(header)
            except BaseException:
                scratch.reset()
                raise
            head = scratch.getbuffer()
        else:
            head = enc.packer.pack(header)  # (a Packer resets itself when this raises)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"cannot encode {mtype!r}: {e}") from e
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


#: The bytes an inline 1-D array's payload starts with (array of 3, fixstr dtype name,
#: shape = array of 1) -> its numpy dtype, for `_view_1d`.
_VIEW_PREFIXES: dict[bytes, np.dtype] = {
    b"\x93" + msgpack.packb(name) + b"\x91": np.dtype(name).newbyteorder("<")
    for name in WIRE_DTYPES if name != "bfloat16"}


def _view_1d(payload: bytes) -> np.ndarray | None:
    """The common case read straight from the payload's bytes, no copy: an inline 1-D array,
    i.e. [fixstr dtype, [count], bin data] exactly as Packer writes it. None: anything else
    (the caller then takes the general path, which does the full checks)."""
    try:
        p = payload[1] - 0x9d                # the prefix: 0x93, fixstr header + name, 0x91
        dt = _VIEW_PREFIXES.get(payload[:p]) if p > 3 else None
        if dt is None:
            return None
        c = payload[p]
        if c < 0x80:                         # count: positive fixint, uint 16 / 32 / 8
            count, p = c, p + 1
        elif c == 0xcd:
            count, p = (payload[p + 1] << 8) | payload[p + 2], p + 3
        elif c == 0xce:
            count, p = int.from_bytes(payload[p + 1:p + 5], "big"), p + 5
        elif c == 0xcc:
            count, p = payload[p + 1], p + 2
        else:
            return None
        b = payload[p]
        if b == 0xc5:                        # data: bin 16 / 32 / 8
            n, p = (payload[p + 1] << 8) | payload[p + 2], p + 3
        elif b == 0xc6:
            n, p = int.from_bytes(payload[p + 1:p + 5], "big"), p + 5
        elif b == 0xc4:
            n, p = payload[p + 1], p + 2
        else:
            return None
    except IndexError:
        return None
    if n != len(payload) - p or n != count * dt.itemsize:
        return None
    return np.frombuffer(payload, dt, count, p)


def _decode_array(code: int, payload: bytes, frames: list) -> Any:
    if code == EXT_NDARRAY:
        arr = _view_1d(payload)
        if arr is not None:
            return arr
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


_NO_OOB_FRAMES = [b""]  # stands for a one-frame message: no out-of-band frame to refer to


def _ext_hook_one_frame(code: int, payload: bytes) -> Any:
    if code == EXT_NDARRAY or code == EXT_TENSOR:
        return _decode_array(code, payload, _NO_OOB_FRAMES)
    raise DecodeError(f"unknown msgpack ext type {code} (known: 1 ndarray, 2 tensor)")


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

    if len(frames) == 1:
        ext_hook = _ext_hook_one_frame  # the common case: no closure over the frames
    else:
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
