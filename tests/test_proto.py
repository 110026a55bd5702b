"""The wire contract (proto/) against the Python codec, the Python senders, and Node.js.

    python -m pytest tests/test_proto.py -q

What is proven here:
- the golden vectors are exactly what proto/vectors/generate.py makes from examples.json
  (a generator that writes msgpack by hand, without `nexrl`), and proto/README.md's message
  tables are exactly what it makes from proto/schema.json;
- the `nexrl` codec encodes every vector's decoded value to exactly its frames, decodes its
  frames to exactly its value, accepts every accept/ vector and refuses every malformed/ one
  with the documented error code;
- every message type in the schema has a vector, and every message type the Python code
  sends is in the schema: refused at encode time (Client / Publisher / check_outgoing), and
  a static scan of nexrl/, nodes/ and launch/ finds no literal type the schema lacks;
- a Node.js program (tests/node/conformance.mjs, npm packages zeromq + @msgpack/msgpack)
  re-encodes every vector byte-identically, talks to a real Python node over TCP, and serves
  as a node that a Python client and subscriber use. Skipped only when `node` or
  tests/node/node_modules is missing (`cd tests/node && npm ci` installs them).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import zmq

from helpers.procs import free_ports
from nexrl.bus import codec, schema
from nexrl.bus.codec import DecodeError, Message
from nexrl.bus.events import Publisher, Subscriber, topic_of
from nexrl.bus.reqrep import Client, RemoteError
from nexrl.bus.schema import SchemaError

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "proto" / "vectors"
NODE_DIR = ROOT / "tests" / "node"
SCHEMA = json.loads((ROOT / "proto" / "schema.json").read_text(encoding="utf-8"))


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("proto_vectors_generate", VECTORS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


# --------------------------------------------------------------------------- value notation


def to_py(v: Any) -> Any:
    """Vector JSON notation -> the Python values a sender would pass to the codec."""
    if isinstance(v, dict) and len(v) == 1:
        (tag, spec), = v.items()
        if tag == "$bytes":
            return bytes.fromhex(spec)
        if tag in ("$ndarray", "$tensor"):
            data, dtype, shape = bytes.fromhex(spec["data_hex"]), spec["dtype"], spec["shape"]
            if tag == "$ndarray":
                return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
            import torch

            wire = "int16" if dtype == "bfloat16" else dtype
            t = torch.from_numpy(np.frombuffer(data, dtype=np.dtype(wire).newbyteorder("<")).copy())
            return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).reshape(shape)
    if isinstance(v, dict):
        return {k: to_py(x) for k, x in v.items()}
    if isinstance(v, list):
        return [to_py(x) for x in v]
    return v


def to_notation(v: Any) -> Any:
    """A decoded value -> vector JSON notation without placement ("oob" is checked by the
    encode test: a decoded array does not remember which frame it came from)."""
    if isinstance(v, np.ndarray):
        return {"$ndarray": {"dtype": v.dtype.name, "shape": list(v.shape), "data_hex": v.tobytes().hex()}}
    if type(v).__name__ == "Tensor":
        import torch

        flat = v.reshape(-1)
        raw = flat.view(torch.int16) if v.dtype == torch.bfloat16 else flat
        return {"$tensor": {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                            "data_hex": raw.numpy().tobytes().hex()}}
    if isinstance(v, bytes):
        return {"$bytes": v.hex()}
    if isinstance(v, dict):
        return {k: to_notation(x) for k, x in v.items()}
    if isinstance(v, list):
        return [to_notation(x) for x in v]
    return v


def strip_placement(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: strip_placement(x) for k, x in v.items() if k != "oob"}
    if isinstance(v, list):
        return [strip_placement(x) for x in v]
    return v


def read_frames(stem: Path) -> list[bytes]:
    return [bytes.fromhex(line) for line in stem.with_suffix(".frames.hex").read_text().split("\n")[:-1]]


def vector_stems(section: str) -> list[Path]:
    return sorted(p.with_suffix("") for p in (VECTORS / section).rglob("*.json"))


def _ids(stems: list[Path]) -> list[str]:
    return [str(s.relative_to(VECTORS)) for s in stems]


def message_of(m: dict) -> Message:
    return Message(m["type"], to_py(m["body"]), sender=m["sender"], msg_id=m["msg_id"],
                   reply_to=m["reply_to"], seq=m["seq"], ts=m["ts"], version=m["version"])


def decoded_notation(msg: Message) -> dict:
    return {"version": msg.version, "type": msg.type, "msg_id": msg.msg_id, "reply_to": msg.reply_to,
            "sender": msg.sender, "seq": msg.seq, "ts": msg.ts, "body": to_notation(msg.body)}


MESSAGE_STEMS = vector_stems("messages")
ACCEPT_STEMS = vector_stems("accept")
MALFORMED_STEMS = vector_stems("malformed")


# --------------------------------------------------------------------------- vector files


def test_vectors_and_readme_tables_are_up_to_date() -> None:
    stale = generate.stale_files()
    assert not stale, f"run `python proto/vectors/generate.py`; stale: {stale}"


def test_every_schema_message_type_has_a_vector() -> None:
    covered = {json.loads(s.with_suffix(".json").read_text())["type"] for s in MESSAGE_STEMS}
    missing = sorted(set(SCHEMA["messages"]) - covered)
    assert not missing, f"add examples for {missing} to proto/vectors/examples.json"
    assert len(MALFORMED_STEMS) >= 10 and len(ACCEPT_STEMS) >= 5


def test_readme_documents_every_message_type_and_error_code() -> None:
    readme = (ROOT / "proto" / "README.md").read_text(encoding="utf-8")
    for mtype in SCHEMA["messages"]:
        assert f"#### `{mtype}` (" in readme, mtype
    for code in SCHEMA["errors"]["codes"]:
        assert f"| `{code}` |" in readme, code


def msgpack_forms(buf: bytes, i: int, out: set[str]) -> int:
    """Record the msgpack format family of the value at buf[i] (and of everything inside it,
    ext-1/2 payloads included); return the index after it."""
    b = buf[i]

    def length(n: int) -> int:
        return int.from_bytes(buf[i + 1:i + 1 + n], "big")

    def items(count: int, start: int) -> int:
        for _ in range(count):
            start = msgpack_forms(buf, start, out)
        return start

    def ext(size: int, start: int, name: str) -> int:
        out.add(name)
        if buf[start] in (1, 2):
            assert msgpack_forms(buf, start + 1, out) == start + 1 + size
        return start + 1 + size

    if b <= 0x7F or b >= 0xE0:
        out.add("positive fixint" if b <= 0x7F else "negative fixint")
        return i + 1
    if 0x80 <= b <= 0x8F:
        out.add("fixmap")
        return items(2 * (b & 0x0F), i + 1)
    if 0x90 <= b <= 0x9F:
        out.add("fixarray")
        return items(b & 0x0F, i + 1)
    if 0xA0 <= b <= 0xBF:
        out.add("fixstr")
        return i + 1 + (b & 0x1F)
    simple = {0xC0: ("nil", 0), 0xC2: ("false", 0), 0xC3: ("true", 0), 0xCA: ("float32", 4),
              0xCB: ("float64", 8), 0xCC: ("uint8", 1), 0xCD: ("uint16", 2), 0xCE: ("uint32", 4),
              0xCF: ("uint64", 8), 0xD0: ("int8", 1), 0xD1: ("int16", 2), 0xD2: ("int32", 4),
              0xD3: ("int64", 8)}
    if b in simple:
        out.add(simple[b][0])
        return i + 1 + simple[b][1]
    sized = {0xC4: ("bin8", 1), 0xC5: ("bin16", 2), 0xC6: ("bin32", 4), 0xD9: ("str8", 1),
             0xDA: ("str16", 2), 0xDB: ("str32", 4)}
    if b in sized:
        name, n = sized[b]
        out.add(name)
        return i + 1 + n + length(n)
    if b in (0xC7, 0xC8, 0xC9):
        n = {0xC7: 1, 0xC8: 2, 0xC9: 4}[b]
        return ext(length(n), i + 1 + n, f"ext{8 * n}")
    if 0xD4 <= b <= 0xD8:
        size = 1 << (b - 0xD4)
        return ext(size, i + 1, f"fixext{size}")
    if b in (0xDC, 0xDD, 0xDE, 0xDF):
        n = 2 if b in (0xDC, 0xDE) else 4
        out.add({0xDC: "array16", 0xDD: "array32", 0xDE: "map16", 0xDF: "map32"}[b])
        return items(length(n) * (2 if b >= 0xDE else 1), i + 1 + n)
    raise AssertionError(f"byte {b:#x} at {i} is not a msgpack lead byte")


def test_vectors_cover_every_encoding_form_the_readme_promises() -> None:
    used: set[str] = set()
    for stem in MESSAGE_STEMS:
        head = read_frames(stem)[0]
        assert msgpack_forms(head, 0, used) == len(head), stem
    promised = {"positive fixint", "uint8", "uint16", "uint32", "uint64", "negative fixint", "int8",
                "int16", "int32", "int64", "float64", "nil", "true", "false", "fixstr", "str8",
                "bin8", "bin16", "fixarray", "array16", "fixmap", "map16", "fixext16", "ext8", "ext16"}
    assert promised <= used, f"no vector uses {sorted(promised - used)}"
    assert "float32" not in used  # canonical floats are float64


def test_codec_speaks_the_schema_version() -> None:
    assert codec.PROTOCOL_VERSION == SCHEMA["version"]
    assert [str(codec.EXT_NDARRAY), str(codec.EXT_TENSOR)] == [k for k in SCHEMA["ext_types"] if k.isdigit()]
    assert list(codec.WIRE_DTYPES) == SCHEMA["ext_types"]["dtypes"]


def test_generator_refuses_values_javascript_would_reencode_differently() -> None:
    with pytest.raises(generate.VectorError, match="integral"):
        generate.to_wire({"x": 2.0}, [], 64, strict=True)
    with pytest.raises(generate.VectorError, match="needs 16 bytes"):
        generate.to_wire({"$ndarray": {"dtype": "float32", "shape": [4], "data_hex": "00"}}, [], 64, True)


# --------------------------------------------------------------------------- Python codec


@pytest.mark.parametrize("stem", MESSAGE_STEMS, ids=_ids(MESSAGE_STEMS))
def test_codec_encodes_vector_exactly(stem: Path) -> None:
    vec = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    frames = [bytes(f) for f in codec.encode(message_of(vec["message"]), vec["oob_threshold"])]
    want = read_frames(stem)
    assert len(frames) == len(want) == vec["frames"]
    for i, (got, exp) in enumerate(zip(frames, want)):
        assert got.hex() == exp.hex(), f"frame {i} differs"


@pytest.mark.parametrize("stem", MESSAGE_STEMS, ids=_ids(MESSAGE_STEMS))
def test_codec_decodes_vector_exactly(stem: Path) -> None:
    vec = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    msg = codec.decode(read_frames(stem))
    assert decoded_notation(msg) == strip_placement(vec["message"])
    spec = schema.check_outgoing(msg.type, msg.body)  # strict: no undeclared field either
    assert spec.kind == vec["kind"]
    assert (msg.reply_to is not None) == (spec.kind == "reply") or msg.type == "error"
    if spec.kind == "event":
        key = vec["topic"].partition("/")[2] or None
        assert topic_of(msg.type, key).decode() == vec["topic"]
    else:
        assert vec["topic"] is None


@pytest.mark.parametrize("stem", ACCEPT_STEMS, ids=_ids(ACCEPT_STEMS))
def test_codec_accepts_noncanonical_vector(stem: Path) -> None:
    vec = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    msg = codec.decode(read_frames(stem))
    assert decoded_notation(msg) == strip_placement(vec["message"])
    schema.check_incoming(msg.type, msg.body)


@pytest.mark.parametrize("stem", MALFORMED_STEMS, ids=_ids(MALFORMED_STEMS))
def test_codec_refuses_malformed_vector_with_its_code(stem: Path) -> None:
    vec = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    code, stage = vec["expect"]["code"], vec["expect"]["stage"]
    frames = read_frames(stem)
    if stage == "decode":
        with pytest.raises(DecodeError) as err:
            codec.decode(frames)
    else:
        msg = codec.decode(frames)
        with pytest.raises(SchemaError) as err:
            schema.check_incoming(msg.type, msg.body)
    assert err.value.code == code, str(err.value)


def test_python_senders_put_buffers_out_of_band_from_64_kib() -> None:
    """The threshold proto/README.md documents for Python senders (receivers accept any)."""
    for n, frames in ((codec.OOB_THRESHOLD - 1, 1), (codec.OOB_THRESHOLD, 2)):
        out = codec.encode(Message("ping", {"payload": np.zeros(n, np.uint8)}, msg_id="m"))
        assert len(out) == frames
        assert codec.decode([bytes(f) for f in out]).body["payload"].shape == (n,)
    assert codec.OOB_THRESHOLD == 65536


# --------------------------------------------------------------------------- no undocumented traffic


def test_encode_time_enforcement_refuses_undeclared_types_and_fields() -> None:
    ctx = zmq.Context()
    try:
        pub = Publisher(ctx, "tcp://127.0.0.1:1", sender="t", linger_ms=0)
        client = Client(ctx, "tcp://127.0.0.1:1", sender="t", timeout=0.1, retries=0, linger_ms=0)
        try:
            with pytest.raises(SchemaError) as e:
                pub.publish("no.such.event", {})
            assert e.value.code == "unknown_type"
            with pytest.raises(SchemaError, match="not declared") as e:
                pub.publish("node.lifecycle", dict(role="r", name="n", state="ready", previous="starting",
                                                   undeclared=1))
            assert e.value.code == "invalid_body"
            with pytest.raises(SchemaError, match="not an event"):
                pub.publish("ping", {})
            with pytest.raises(SchemaError) as e:
                client.send("no.such.request", {})
            assert e.value.code == "unknown_type"
            with pytest.raises(SchemaError, match="not declared"):
                client.send("ping", {"payload": 1, "extra": 2})
            with pytest.raises(SchemaError, match="not a request"):
                client.send("bus.probe", {"nonce": "n"})
            assert pub.published == 0 and client._seq == 0  # nothing reached a socket
        finally:
            pub.close()
            client.close()
    finally:
        ctx.destroy(0)
    with pytest.raises(SchemaError, match="not declared"):  # the check Node._send_reply runs
        schema.check_outgoing("ping.reply", {"state": "running", "extra": 1})
    with pytest.raises(SchemaError, match="required field 'state'"):
        schema.check_outgoing("ping.reply", {})


# (callee name, positional index of the message type, keyword name, kinds it may be)
_SENDERS = {
    "publish": (0, "mtype", {"event"}),
    "topic_of": (0, "mtype", {"event"}),
    "request": (0, "mtype", {"request"}),
    "send": (0, "mtype", {"request"}),
    "reply": (2, "mtype", {"reply"}),
    "_send_reply": (2, "mtype", {"reply"}),
    "Message": (0, "type", {"request", "reply", "event"}),
    "check_outgoing": (0, "mtype", {"request", "reply", "event"}),
    "handles": (0, "mtype", {"request", "event"}),
}
_HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


def scan_message_types(source: str, filename: str = "<src>") -> list[tuple[str, int, str, str, set]]:
    """(file, line, callee, literal type, allowed kinds) for every call that names a message
    type with a string literal: publish/request/send/reply/Message/check_outgoing/handles."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name not in _SENDERS:
            continue
        pos, kw, kinds = _SENDERS[name]
        arg = node.args[pos] if len(node.args) > pos else next(
            (k.value for k in node.keywords if k.arg == kw), None)
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value not in _HTTP_METHODS:
            found.append((filename, node.lineno, name, arg.value, kinds))
    return found


def test_static_scan_finds_no_undeclared_message_type() -> None:
    found = []
    for top in ("nexrl", "nodes", "launch", "tests/helpers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            found += scan_message_types(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    bad = [f"{f}:{line}: {callee}({t!r}) " + ("is not in proto/schema.json" if t not in SCHEMA["messages"]
                                             else f"is a {SCHEMA['messages'][t]['kind']}, not {sorted(kinds)}")
           for f, line, callee, t, kinds in found
           if t not in SCHEMA["messages"] or SCHEMA["messages"][t]["kind"] not in kinds]
    assert not bad, "undocumented traffic:\n" + "\n".join(bad)
    seen = {t for *_, t, _ in found}
    assert {"node.heartbeat", "node.lifecycle", "node.error", "bus.probe", "error", "ping",
            "node.status", "node.drain", "job.state"} <= seen, f"the scan lost known senders: {seen}"


def test_static_scan_catches_an_undeclared_type() -> None:
    src = ("self.publish('weights.secret', {})\nclient.request(mtype='lease.request')\n"
           "http.request('GET', url)\n@handles('ping.reply')\ndef f(): pass\n")
    got = [(callee, t) for _, _, callee, t, _ in scan_message_types(src)]
    assert got == [("publish", "weights.secret"), ("request", "lease.request"), ("handles", "ping.reply")]


# --------------------------------------------------------------------------- Node.js

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "zeromq").is_dir()
    or not (NODE_DIR / "node_modules" / "@msgpack" / "msgpack").is_dir(),
    reason="needs `node` and tests/node/node_modules (run `cd tests/node && npm ci`)")


class Proc:
    """A child process whose output a thread collects; `wait_for` blocks until a line holds
    a marker (or the deadline passes, or the process dies)."""

    def __init__(self, cmd: list[str], name: str):
        self.name, self.lines = name, []
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._seen = threading.Condition()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def output(self) -> str:
        return f"--- {self.name} output:\n" + "\n".join(self.lines)

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(marker in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self._t.is_alive()):
                    raise AssertionError(f"{self.name} did not print {marker!r} in {timeout}s\n{self.output()}")
                self._seen.wait(min(left, 0.2))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._t.join(5)


@pytest.fixture
def bus() -> Iterator[dict]:
    """An event proxy (`nexrl-bus proxy`) on free loopback ports; stopped however the test ends."""
    p1, p2 = free_ports(2)
    ep = {"pub": f"tcp://127.0.0.1:{p1}", "sub": f"tcp://127.0.0.1:{p2}"}
    procs: list[Proc] = []
    proxy = Proc([sys.executable, "-m", "nexrl.cli.bus", "proxy", "--pub", ep["pub"], "--sub", ep["sub"]], "proxy")
    procs.append(proxy)
    try:
        proxy.wait_for("event proxy:", 15)
        yield {**ep, "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()


def run_node(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, str(NODE_DIR / "conformance.mjs"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@needs_node
def test_nodejs_reencodes_every_vector_byte_identically() -> None:
    r = run_node(["vectors"], 30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    counts = json.loads(r.stdout.split("vectors: ", 1)[1].splitlines()[0])
    assert counts == {"messages": len(MESSAGE_STEMS), "accept": len(ACCEPT_STEMS),
                      "malformed": len(MALFORMED_STEMS)}


@needs_node
def test_nodejs_client_talks_to_a_python_node(bus: dict) -> None:
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    node = Proc([sys.executable, "-m", "nexrl.cli.node", "tests/helpers/echo_node.py:EchoNode", "--name", "echo0",
                 "node.start=now", f"node.endpoint={endpoint}", f"node.bus.events_pub={bus['pub']}",
                 f"node.bus.events_sub={bus['sub']}", "node.bus.heartbeat_interval_s=0.2"], "echo0")
    bus["procs"].append(node)
    node.wait_for("bus is live", 20)
    r = run_node(["live", "--endpoint", endpoint, "--pub", bus["pub"], "--sub", bus["sub"], "--node", "echo0"], 30)
    assert r.returncode == 0, r.stdout + r.stderr + node.output()
    assert "FAIL" not in r.stdout
    assert node.p.wait(10) == 0, node.output()  # node.drain from Node.js ended it cleanly


@needs_node
def test_python_client_and_subscriber_use_a_nodejs_node(bus: dict) -> None:
    import torch

    from nexrl.bus.liveness import Liveness

    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ctx = zmq.Context()
    sub = Subscriber(ctx, bus["sub"], ("node.heartbeat", "node.lifecycle"))
    js = Proc([NODE, str(NODE_DIR / "conformance.mjs"), "serve", "--endpoint", endpoint, "--pub", bus["pub"],
               "--sub", bus["sub"], "--name", "js0"], "js0")
    bus["procs"].append(js)
    client = Client(ctx, endpoint, sender="pytest", service="js0", timeout=5.0, retries=0, linger_ms=0)
    try:
        js.wait_for('"ready"', 20)
        payload = {"f32": np.arange(5, dtype=np.float32) + 0.5, "big": np.arange(20000, dtype=np.float64),
                   "i64": np.array(7, dtype=np.int64), "bf16": torch.tensor([1.0, -2.5], dtype=torch.bfloat16),
                   "text": "héllo ✓", "blob": b"\x00\xff", "nested": {"none": None, "list": [1, 2.5, 2**40]}}
        reply = client.request("ping", {"payload": payload})
        assert reply.type == "ping.reply" and reply.sender == "js0" and reply.body["state"] == "running"
        back = reply.body["payload"]
        assert to_notation(back) == to_notation(payload)
        assert isinstance(back["bf16"], torch.Tensor) and back["bf16"].dtype == torch.bfloat16

        msg_id = client.send("ping", {"payload": 1})
        first = client.recv_reply(5.0)
        client.send("ping", {"payload": 1}, msg_id=msg_id)  # a retry: the same msg_id
        second = client.recv_reply(5.0)
        assert first.reply_to == second.reply_to == msg_id and first.msg_id == second.msg_id

        status = client.request("node.status")  # Client.request checks the reply against the schema
        assert status.body["name"] == "js0" and status.body["stats"]["handled"] >= 3
        assert status.body["stats"]["duplicates"] == 1
        with pytest.raises(RemoteError) as e:
            client.request("lease.request", {"credits": 1})
        assert e.value.code == "unknown_type" and e.value.node == "js0"
        raw = ctx.socket(zmq.DEALER)  # every malformed vector, as raw frames
        raw.linger = 0
        raw.connect(endpoint)
        try:
            for stem in MALFORMED_STEMS:
                vec = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
                frames = read_frames(stem)
                raw.send_multipart(frames)
                assert raw.poll(5000), f"no reply to {vec['name']}"
                err = codec.decode(raw.recv_multipart())
                want_reply_to = None if vec["expect"]["stage"] == "decode" else codec.decode(frames).msg_id
                assert (err.type, err.body["code"], err.reply_to) == ("error", vec["expect"]["code"], want_reply_to), \
                    (vec["name"], err.body)
                schema.check_outgoing("error", err.body)
        finally:
            raw.close()

        live = Liveness(3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not live.is_alive("js0"):
            got = sub.recv(0.5)
            if got and got[1].type == "node.heartbeat" and got[1].sender == "js0":
                schema.check_outgoing("node.heartbeat", got[1].body)
                live.beat("js0", got[1].body)
        assert live.is_alive("js0"), "no node.heartbeat from the Node.js node"

        assert client.request("node.drain", {"reason": "test done"}).body["state"] == "draining"
        states = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "stopped" not in states:
            got = sub.recv(0.5)
            if got and got[1].type == "node.lifecycle" and got[1].sender == "js0":
                states.append(got[1].body["state"])
        assert states[-2:] == ["draining", "stopped"], states
        assert js.p.wait(10) == 0, js.output()
    finally:
        client.close()
        sub.close()
        ctx.destroy(0)
