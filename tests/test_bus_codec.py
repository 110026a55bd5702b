"""Property-based round trips of the wire codec (hypothesis), plus the import-time rule.

    python -m pytest tests/test_bus_codec.py -q

Every wire dtype, empty / 0-d / non-contiguous / big-endian arrays, nested bodies, torch
tensors (bfloat16 included), inline and out-of-band, through bytes and through real ZMQ
frames. Values are compared bit for bit (NaNs included) after the little-endian conversion
the wire defines.
"""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nexrl.bus import codec
from nexrl.bus.codec import OOB_THRESHOLD, DecodeError, EncodeError, Message

NUMPY_DTYPES = [d for d in codec.WIRE_DTYPES if d != "bfloat16"]  # numpy needs ml_dtypes for it
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
THRESHOLDS = st.sampled_from([0, 1, 64, OOB_THRESHOLD, 1 << 40])


def wire_bytes(a: np.ndarray) -> bytes:
    """The bytes the wire carries for `a`: C order, little-endian."""
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).tobytes()


def same(x, y) -> bool:
    """Structural equality where arrays compare by dtype, shape and exact bytes."""
    if isinstance(x, np.ndarray):
        return (isinstance(y, np.ndarray) and y.dtype.name == x.dtype.name and y.shape == x.shape
                and wire_bytes(x) == wire_bytes(y))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, list) and len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    if isinstance(x, float):
        return isinstance(y, float) and (x == y or (x != x and y != y))
    return type(x) is type(y) and x == y


def roundtrip(body: dict, threshold: int, as_frames: bool = False) -> Message:
    msg = codec.stamp(Message("ping", {"payload": body}), "prop", 7)
    frames = codec.encode(msg, threshold)
    wire = [bytes(f) for f in frames]  # what a socket delivers
    if as_frames:
        wire = [zmq.Frame(b) for b in wire]
    out = codec.decode(wire)
    assert (out.type, out.sender, out.seq, out.msg_id) == ("ping", "prop", 7, msg.msg_id)
    return out


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    a = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["c", "big-endian", "strided", "transposed", "fortran"]))
    if layout == "big-endian" and dtype.itemsize > 1:
        a = a.astype(dtype.newbyteorder(">"))
    elif layout == "strided" and a.ndim >= 1:
        a = np.repeat(a, 2, axis=0)[::2]
    elif layout == "transposed" and a.ndim >= 2:
        a = a.T
    elif layout == "fortran":
        a = np.asfortranarray(a)
    return a


leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1),
                   st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=40))
bodies = st.recursive(st.one_of(leaves, arrays()),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@SETTINGS
@given(a=arrays(), threshold=THRESHOLDS)
def test_every_numpy_dtype_and_layout_round_trips(a: np.ndarray, threshold: int) -> None:
    out = roundtrip({"a": a}, threshold).body
    b = out["payload"]["a"]
    assert same(a, b), (a, b)
    assert b.dtype.byteorder in "<|=" and b.flags.c_contiguous


@SETTINGS
@given(dtype=st.sampled_from(NUMPY_DTYPES),
       n=st.sampled_from([1, 2, 127, 128, 255, 256, 4096, 65535, 65536, 70_000]),
       threshold=THRESHOLDS, seed=st.integers(0, 2 ** 32 - 1))
def test_array_payloads_are_the_bytes_msgpack_makes(dtype: str, n: int, threshold: int,
                                                    seed: int) -> None:
    """The encoder assembles the common array payloads by hand and the decoder views them
    without msgpack: both must agree byte for byte with plain msgpack [dtype, shape, data]
    (every count and bin width: fixint / uint 8 / 16 / 32 counts, bin 8 / 16 / 32 data)."""
    a = np.frombuffer(np.random.default_rng(seed).bytes(n * np.dtype(dtype).itemsize), dtype)
    frames = codec.encode(codec.stamp(Message("ping", {"payload": a}), "prop", 1), threshold)
    payloads: list = []
    msgpack.unpackb(frames[0], ext_hook=lambda code, p: payloads.append((code, p)))
    inline = a.nbytes < threshold
    expected = msgpack.packb([dtype, [n], a.tobytes() if inline else 0])
    assert payloads == [(codec.EXT_NDARRAY, expected)]
    assert len(frames) == (1 if inline else 2)
    out = codec.decode([bytes(f) for f in frames]).body["payload"]
    assert same(a, out) and not out.flags.writeable


@SETTINGS
@given(body=bodies, threshold=THRESHOLDS, as_frames=st.booleans())
def test_nested_bodies_round_trip(body, threshold: int, as_frames: bool) -> None:
    out = roundtrip({"x": body}, threshold, as_frames).body["payload"]["x"]
    assert same(body, out)


@SETTINGS
@given(data=st.data(), threshold=THRESHOLDS)
def test_torch_tensors_round_trip_including_bfloat16(data, threshold: int) -> None:
    torch = pytest.importorskip("torch")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                       torch.int64, torch.int32, torch.int16, torch.int8,
                                       torch.uint8, torch.bool, torch.complex64]))
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    base = torch.from_numpy(data.draw(hnp.arrays(np.float64, shape,
                                                 elements=st.floats(-1e4, 1e4, width=64))))
    t = base.to(dtype)
    if data.draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous
    out = roundtrip({"t": t, "nested": [t, {"k": t}]}, threshold).body["payload"]
    for got in (out["t"], out["nested"][0], out["nested"][1]["k"]):
        assert isinstance(got, torch.Tensor) and got.dtype == dtype and tuple(got.shape) == tuple(t.shape)
        assert torch.equal(got, t.contiguous())


def test_out_of_band_buffers_are_zero_copy_views_of_the_frames(zmq_ctx) -> None:
    """Sent with copy=False, decoded with frombuffer on the received frame (read-only)."""
    from nexrl.bus.sockets import recv_frames, send_frames

    a, b = zmq_ctx.socket(zmq.PAIR), zmq_ctx.socket(zmq.PAIR)
    a.bind("inproc://codec-oob")
    b.connect("inproc://codec-oob")
    try:
        big = np.arange(OOB_THRESHOLD, dtype=np.float32)            # 256 KiB: out-of-band
        small = np.arange(10, dtype=np.int32)                       # inline
        frames = codec.encode(Message("ping", {"payload": {"big": big, "small": small}}))
        assert len(frames) == 2 and isinstance(frames[1], memoryview)
        assert np.shares_memory(np.frombuffer(frames[1], np.float32), big)  # nothing copied
        send_frames(a, frames)
        parts = recv_frames(b, 1)
        assert isinstance(parts[1], zmq.Frame)
        got = codec.decode(parts).body["payload"]
        assert np.array_equal(got["big"], big) and np.array_equal(got["small"], small)
        assert not got["big"].flags.writeable
        assert np.shares_memory(got["big"], np.frombuffer(parts[1].buffer, np.uint8))
    finally:
        a.close(0)
        b.close(0)


def test_a_transient_header_still_held_is_never_overwritten() -> None:
    """encode_fields(transient=True) packs into a per-thread buffer it reuses; while a caller
    still holds the previous header, the next one goes to a new buffer instead."""
    first = codec.encode_fields("ping", {"payload": "first"}, "s", "m1", None, 1, 1.0,
                                transient=True)
    kept = bytes(first[0])
    second = codec.encode_fields("ping", {"payload": "second"}, "s", "m2", None, 2, 1.0,
                                 transient=True)
    assert bytes(first[0]) == kept
    assert codec.decode([bytes(second[0])]).body == {"payload": "second"}
    del first, second  # released: the buffer is reused, and still encodes right
    again = codec.encode_fields("ping", {"payload": "third"}, "s", "m3", None, 3, 1.0,
                                transient=True)
    assert codec.decode([bytes(again[0])]).msg_id == "m3"


def test_values_that_cannot_travel_are_refused_by_name() -> None:
    with pytest.raises(EncodeError, match=r"dtype\('O'\) cannot travel"):
        codec.encode(Message("ping", {"payload": np.array([object()], dtype=object)}))
    with pytest.raises(EncodeError, match="complex|set|Foo"):
        class Foo:
            pass
        codec.encode(Message("ping", {"payload": Foo()}))
    with pytest.raises(DecodeError, match="ml_dtypes|bfloat16"):
        hdr = codec.encode(Message("ping", {"payload": 1}))[0]
        import msgpack

        d = msgpack.unpackb(hdr)
        d["body"]["payload"] = msgpack.ExtType(1, msgpack.packb(["bfloat16", [1], b"\x00\x00"]))
        codec.decode([msgpack.packb(d, use_bin_type=True)])


def test_scalars_and_containers_are_normalised() -> None:
    out = roundtrip({"i": np.int16(-3), "f": np.float32(0.5), "b": np.bool_(True),
                     "t": (1, 2), "s": frozenset([3])}, OOB_THRESHOLD).body["payload"]
    assert out == {"i": -3, "f": 0.5, "b": True, "t": [1, 2], "s": [3]}


def test_importing_the_bus_never_imports_torch() -> None:
    code = ("import sys, nexrl.bus.codec, nexrl.bus, nexrl.node, nexrl.cli.bus\n"
            "import numpy as np\n"
            "from nexrl.bus.codec import Message, encode, decode\n"
            "decode([bytes(f) for f in encode(Message('ping', {'payload': np.arange(3)}))])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
