"""Generators of malformed frames for tests/test_bus_malformed.py, each with the error code
a NexRL receiver must answer (proto/README.md section 6) and whether the reply can name the
request (reply_to = its msg_id) or not (the frames could not be decoded: reply_to nil).

    for frames, code, msg_id in requests(random.Random(7), 10_000, max_bytes=65536): ...
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import msgpack

Case = tuple[list[bytes], str, "str | None"]   # frames, expected code, expected reply_to


def header(rng: random.Random, mtype: str = "ping", body: Any = None, **override: Any) -> dict:
    h = {"version": "1.0", "type": mtype, "msg_id": f"bad-{rng.getrandbits(48):x}",
         "reply_to": None, "sender": "fuzzer", "seq": 1, "ts": 1.0,
         "body": {} if body is None else body}
    h.update(override)
    return h


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def ext(code: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, payload if isinstance(payload, bytes) else pack(payload))


def _random_bytes(rng: random.Random) -> Case:
    n = rng.randint(0, 300)
    data = bytes(rng.getrandbits(8) for _ in range(n))
    if n and 0x80 <= data[0] <= 0x8F:  # avoid (astronomically unlikely) valid fixmaps
        data = b"\xc1" + data[1:]
    return [data], "malformed", None


def _truncated(rng: random.Random) -> Case:
    full = pack(header(rng, body={"payload": {"k": list(range(rng.randint(1, 40)))}}))
    return [full[:rng.randint(0, len(full) - 1)]], "malformed", None


def _wrong_version(rng: random.Random) -> Case:
    choice = rng.randrange(5)
    if choice == 0:
        return [pack(header(rng, version=f"{rng.randint(2, 99)}.0"))], "bad_version", None
    bad = ["1", "v1.0", "1.0.0", 1][choice - 1]
    return [pack(header(rng, version=bad))], "malformed", None


def _wrong_envelope_types(rng: random.Random) -> Case:
    field, value = rng.choice([("msg_id", 17), ("sender", None), ("seq", -1), ("seq", "1"),
                               ("seq", True), ("ts", "now"), ("body", [1, 2]), ("type", ""),
                               ("type", 5), ("reply_to", 3), ("body", "x")])
    h = header(rng)
    h[field] = value
    if rng.random() < 0.3:
        del h[rng.choice(["version", "type", "msg_id", "sender", "seq", "ts", "body"])]
        return [pack(h)], "malformed", None
    return [pack(h)], "malformed", None


def _not_a_map(rng: random.Random) -> Case:
    return [pack(rng.choice([[1, 2, 3], "hello", 42, None, b"bin"]))], "malformed", None


def _bin_body_key(rng: random.Random) -> Case:
    h = header(rng)
    h["body"] = {b"payload": 1}
    return [pack(h)], "malformed", None


def _unknown_type(rng: random.Random) -> Case:
    h = header(rng, mtype=f"no.such.{rng.getrandbits(16):x}")
    return [pack(h)], "unknown_type", h["msg_id"]


def _not_a_request(rng: random.Random) -> Case:
    """Declared types with valid bodies that are not requests (dispatch stage)."""
    mtype, body = rng.choice([("job.state", {"state": "running"}), ("bus.probe", {"nonce": "n"}),
                              ("ping.reply", {"state": "running"}),
                              ("error", {"code": "x", "message": "y", "node": "z"})])
    h = header(rng, mtype=mtype, body=body, reply_to="r-1" if mtype in ("ping.reply", "error") else None)
    return [pack(h)], "unknown_type", h["msg_id"]


def _invalid_body(rng: random.Random) -> Case:
    mtype, body = rng.choice([("lease.ack", {"lease_ids": 5}), ("lease.ack", {}),
                              ("lease.ack", {"lease_ids": [1, 2]}),
                              ("lease.request", {"credits": "x"}),
                              ("lease.request", {"credits": 1.5}),
                              ("lease.request", {"credits": None})])
    h = header(rng, mtype=mtype, body=body)
    return [pack(h)], "invalid_body", h["msg_id"]


def _bad_ext(rng: random.Random) -> Case:
    payload = rng.choice([
        b"\xc1garbage", pack(["float32", [4], b"\x00" * 15]), pack(["float128", [1], b"\x00" * 16]),
        pack(["int32", [-1], b""]), pack(["int32", "4", b"\x00" * 16]), pack(["int32", [2]]),
        pack([7, [1], b"\x00"]), pack(["int32", [1], 2.5]), pack(["int32", [True], b"\x00" * 4]),
        pack(["int8", [2 ** 63, 2 ** 63], b""]), pack({"dtype": "int8"}),
    ])
    code = rng.choice([1, 2, 1, 1])
    h = header(rng, body={"payload": ext(code, payload)})
    return [pack(h)], "malformed", None


def _unknown_ext(rng: random.Random) -> Case:
    h = header(rng, body={"payload": ext(rng.choice([0, 3, 9, 42, 127]), b"\x00\x01")})
    return [pack(h)], "malformed", None


def _bad_frame_index(rng: random.Random) -> Case:
    n_frames = rng.randint(0, 2)
    index = n_frames + rng.randint(0, 5)  # always past the last buffer frame
    h = header(rng, body={"payload": ext(1, ["uint8", [4], index])})
    return [pack(h), *[b"\x00" * 4] * n_frames], "malformed", None


def _empty_frame(rng: random.Random) -> Case:
    return [b""], "malformed", None


KINDS = [_random_bytes, _truncated, _wrong_version, _wrong_envelope_types, _not_a_map,
         _bin_body_key, _unknown_type, _not_a_request, _invalid_body, _bad_ext, _unknown_ext,
         _bad_frame_index, _empty_frame]


def requests(rng: random.Random, n: int, max_bytes: int, n_oversized: int = 100) -> Iterator[Case]:
    """n malformed requests: every kind above in turn, plus n_oversized messages bigger than
    max_bytes (valid otherwise: the size check comes first)."""
    for i in range(n - n_oversized):
        yield KINDS[i % len(KINDS)](rng)
    for _ in range(n_oversized):
        yield [pack(header(rng, body={"payload": b"\x00" * (max_bytes + 1)}))], "too_large", None


def events(rng: random.Random, n: int) -> Iterator[tuple[list[bytes], str]]:
    """n malformed events on the topic `job.state` (every node subscribes to it): frames
    [topic, header, ...] and the code the node counts them under. None of them is a valid
    job.state event (a valid one could stop the node)."""
    makers = [
        lambda: ([b"job.state"], "malformed"),                                   # no header
        lambda: ([b"job.state", _random_bytes(rng)[0][0]], "malformed"),
        lambda: ([b"job.state", _truncated(rng)[0][0]], "malformed"),
        lambda: ([b"job.state", pack(header(rng, "job.state", {"state": "x"}, version="9.1"))],
                 "bad_version"),
        lambda: ([b"job.state", pack(header(rng, "job.state", {"state": 5}))], "invalid_body"),
        lambda: ([b"job.state", pack(header(rng, "job.state", {}))], "invalid_body"),
        lambda: ([b"job.state", pack(header(rng, "node.heartbeat", {}))], "malformed"),  # topic
        lambda: ([b"job.state.bogus", pack(header(rng, "job.state.bogus", {}))], "unknown_type"),
        lambda: ([b"job.state", pack(header(rng, "job.state",
                                            {"state": ext(1, b"\xc1")}))], "malformed"),
    ]
    for i in range(n):
        yield makers[i % len(makers)]()
