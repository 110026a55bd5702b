"""Rebuild the golden vectors and proto/README.md's generated tables from examples.json.

    python proto/vectors/generate.py            # rewrite messages/, accept/, malformed/, README tables
    python proto/vectors/generate.py --check    # change nothing; exit 1 naming what is stale

Why this file does not import `nexrl`: it writes the msgpack bytes itself, following the
rules of proto/README.md (minimal ints, float64, str vs bin, fixext sizes, out-of-band
frames), using only the standard library. tests/test_proto.py then checks that the `nexrl`
codec produces and accepts exactly these bytes, so the vectors pin the Python codec to the
written contract instead of merely recording whatever it happens to emit.

Output (one pair of files per vector; see proto/README.md, "Golden vectors"):

    messages/<type>/<variant>.json        decoded value: envelope + body, in value notation
    messages/<type>/<variant>.frames.hex  the exact frames: one lowercase hex line per frame
    accept/<name>.json, .frames.hex       non-canonical frames a receiver must accept
    malformed/<name>.json, .frames.hex    frames a receiver must refuse, with the error code
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROTO = HERE.parent
ENVELOPE_KEYS = ("version", "type", "msg_id", "reply_to", "sender", "seq", "ts", "body")
EXT_CODES = {"$ndarray": 1, "$tensor": 2}
#: dtype -> (struct format of one element, bytes per element)
DTYPES = {
    "bool": ("?", 1), "int8": ("b", 1), "int16": ("h", 2), "int32": ("i", 4), "int64": ("q", 8),
    "uint8": ("B", 1), "uint16": ("H", 2), "uint32": ("I", 4), "uint64": ("Q", 8),
    "float16": ("e", 2), "float32": ("f", 4), "float64": ("d", 8),
    "complex64": ("ff", 8), "complex128": ("dd", 16), "bfloat16": ("", 2),
}
README_MARKERS = {
    "messages": ("<!-- BEGIN GENERATED: messages (python proto/vectors/generate.py) -->",
                 "<!-- END GENERATED: messages -->"),
    "errors": ("<!-- BEGIN GENERATED: errors (python proto/vectors/generate.py) -->",
               "<!-- END GENERATED: errors -->"),
}


class VectorError(ValueError):
    """examples.json asks for something the contract does not allow; the text names it."""


# --------------------------------------------------------------------------- msgpack writer


@dataclass(frozen=True)
class Ext:
    code: int
    payload: bytes


@dataclass(frozen=True)
class Raw:
    """Bytes spliced into the output as they are (only for accept/ and malformed/ vectors)."""
    data: bytes


@dataclass(frozen=True)
class Float32:
    value: float


def _head(n: int, fix_base: int | None, fix_max: int, codes: tuple[int, int, int],
          sizes: tuple[int, int, int] = (0xFF, 0xFFFF, 0xFFFFFFFF)) -> bytes:
    """Header of a str/bin/array/map/ext of length n: fix form if it fits, else 8/16/32-bit."""
    if fix_base is not None and n <= fix_max:
        return bytes([fix_base | n])
    for code, limit, fmt in zip(codes, sizes, (">B", ">H", ">I")):
        if code and n <= limit:
            return bytes([code]) + struct.pack(fmt, n)
    raise VectorError(f"length {n} does not fit in msgpack")


def pack(v: Any) -> bytes:
    """Canonical msgpack bytes of v, by the rules in proto/README.md."""
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 0x80:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack(">b", v)
        if v >= 0:
            for code, fmt, limit in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF),
                                     (0xCE, ">I", 0xFFFFFFFF), (0xCF, ">Q", 2**64 - 1)):
                if v <= limit:
                    return bytes([code]) + struct.pack(fmt, v)
        for code, fmt, limit in ((0xD0, ">b", 2**7), (0xD1, ">h", 2**15), (0xD2, ">i", 2**31),
                                 (0xD3, ">q", 2**63)):
            if v >= -limit:
                return bytes([code]) + struct.pack(fmt, v)
        raise VectorError(f"int {v} does not fit in 64 bits")
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, Float32):
        return b"\xca" + struct.pack(">f", v.value)
    if isinstance(v, str):
        b = v.encode("utf-8")
        return _head(len(b), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + b
    if isinstance(v, (bytes, bytearray)):
        return _head(len(v), None, 0, (0xC4, 0xC5, 0xC6)) + bytes(v)
    if isinstance(v, list):
        return _head(len(v), 0x90, 15, (0, 0xDC, 0xDD)) + b"".join(pack(x) for x in v)
    if isinstance(v, dict):
        return _head(len(v), 0x80, 15, (0, 0xDE, 0xDF)) + b"".join(
            pack(k) + pack(x) for k, x in v.items())
    if isinstance(v, Ext):
        n = len(v.payload)
        fixext = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        head = bytes([fixext[n]]) if n in fixext else _head(n, None, 0, (0xC7, 0xC8, 0xC9))
        return head + struct.pack(">b", v.code) + v.payload
    if isinstance(v, Raw):
        return v.data
    raise VectorError(f"cannot pack a {type(v).__name__}")


# --------------------------------------------------------------------------- value notation


def array_bytes(dtype: str, values: list) -> bytes:
    """Little-endian C-order bytes of a flat list of element values."""
    fmt, _ = DTYPES[dtype]
    out = bytearray()
    for x in values:
        if dtype == "bfloat16":  # the top 16 bits of the float32 pattern; must be exact
            bits = struct.unpack("<I", struct.pack("<f", x))[0]
            if bits & 0xFFFF:
                raise VectorError(f"{x} is not exactly representable in bfloat16")
            out += struct.pack("<H", bits >> 16)
        elif fmt in ("ff", "dd"):
            out += struct.pack("<" + fmt, *x)
        else:
            out += struct.pack("<" + fmt, x)
    return bytes(out)


def _array(tag: str, spec: dict, oob: list, threshold: int, strict: bool) -> tuple[Ext, dict]:
    dtype, shape = spec["dtype"], spec["shape"]
    data = (bytes.fromhex(spec["data_hex"]) if "data_hex" in spec
            else array_bytes(dtype, spec["values"]))
    if strict:
        if dtype not in DTYPES:
            raise VectorError(f"dtype {dtype!r} is not a wire dtype")
        if len(data) != math.prod(shape) * DTYPES[dtype][1]:
            raise VectorError(f"{dtype}{shape} needs {math.prod(shape) * DTYPES[dtype][1]} "
                              f"bytes, got {len(data)}")
    where: Any
    if len(data) >= threshold:
        oob.append(data)
        where = len(oob) - 1
    else:
        where = data
    canon = {tag: {"dtype": dtype, "shape": list(shape), "data_hex": data.hex(),
                   "oob": where if isinstance(where, int) else None}}
    return Ext(EXT_CODES[tag], pack([dtype, list(shape), where])), canon


def to_wire(v: Any, oob: list, threshold: int, strict: bool) -> tuple[Any, Any]:
    """(value for `pack`, canonical value notation) of a value in examples.json notation."""
    if isinstance(v, dict) and len(v) == 1:
        (tag, spec), = v.items()
        if tag in EXT_CODES:
            return _array(tag, spec, oob, threshold, strict)
        if tag == "$bytes":
            return bytes.fromhex(spec), v
        if tag in ("$float32", "$ext", "$raw"):
            if strict:
                raise VectorError(f"{tag} may appear only in accept/ and malformed/ vectors")
            if tag == "$float32":
                return Float32(spec), spec
            if tag == "$ext":
                return Ext(spec["type"], bytes.fromhex(spec["payload_hex"])), v
            return Raw(bytes.fromhex(spec)), v
    if isinstance(v, dict):
        pairs = [(k, to_wire(x, oob, threshold, strict)) for k, x in v.items()]
        return {k: w for k, (w, _) in pairs}, {k: c for k, (_, c) in pairs}
    if isinstance(v, list):
        pairs = [to_wire(x, oob, threshold, strict) for x in v]
        return [w for w, _ in pairs], [c for _, c in pairs]
    if strict and isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        raise VectorError(f"float {v!r} is integral: JavaScript (and other dynamic languages) "
                          f"would re-encode it as an int; pick a non-integral value")
    if strict and isinstance(v, float) and v == 0.0 and math.copysign(1, v) < 0:
        raise VectorError("-0.0 re-encodes as int 0 in JavaScript")
    return v, v


# --------------------------------------------------------------------------- vectors


def _id(name: str, salt: str = "") -> str:
    return hashlib.sha256((name + salt).encode()).hexdigest()[:8] + "-1"


def _frames_text(frames: list[bytes]) -> str:
    return "".join(f.hex() + "\n" for f in frames)


def _json(obj: Any, indent: str = "") -> str:
    """JSON with containers on one line when they fit in ~96 columns (readable diffs)."""
    flat = json.dumps(obj, ensure_ascii=False)
    if not isinstance(obj, (dict, list)) or len(flat) + len(indent) <= 96:
        return flat
    inner = indent + "  "
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_json(v, inner)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + _json(v, inner) for v in obj) + "\n" + indent + "]"


def _dump(obj: Any) -> str:
    return _json(obj) + "\n"


def message_vector(ex: dict, defaults: dict, schema: dict) -> tuple[str, dict, list[bytes]]:
    name = ex["name"]
    mtype, _, variant = name.partition("/")
    if mtype not in schema["messages"] or not variant:
        raise VectorError(f"vector {name!r}: name must be '<type>/<variant>' with a type of "
                          f"proto/schema.json")
    kind = schema["messages"][mtype]["kind"]
    env = {
        "version": defaults["version"], "type": mtype, "msg_id": _id(name),
        "reply_to": _id(name, "/request") if kind == "reply" else None,
        "sender": defaults["sender"][kind], "seq": defaults["seq"][kind], "ts": defaults["ts"],
        "body": ex["body"],
    }
    for k, x in ex.get("envelope", {}).items():
        if k not in env or k in ("type", "body"):
            raise VectorError(f"vector {name!r}: cannot override envelope field {k!r}")
        env[k] = x
    threshold = ex.get("oob_threshold", defaults["oob_threshold"])
    oob: list[bytes] = []
    wire, canon = to_wire(env, oob, threshold, strict=True)
    topic = None
    if kind == "event":
        topic = mtype + (f"/{ex['topic_key']}" if "topic_key" in ex else "")
    doc = {"name": name, "type": mtype, "kind": kind, "doc": ex["doc"], "topic": topic,
           "oob_threshold": threshold, "frames": 1 + len(oob), "message": canon}
    return f"messages/{mtype}/{variant}", doc, [pack(wire), *oob]


def accept_vector(ex: dict, defaults: dict) -> tuple[str, dict, list[bytes]]:
    threshold = ex.get("oob_threshold", defaults["oob_threshold"])
    oob: list[bytes] = []
    wire, _ = to_wire(ex["header"], oob, threshold, strict=False)
    expected: list[bytes] = []
    _, canon = to_wire(ex["message"], expected, threshold, strict=False)
    if expected != oob:
        raise VectorError(f"accept vector {ex['name']!r}: message and header disagree on buffers")
    doc = {"name": f"accept/{ex['name']}", "doc": ex["doc"], "frames": 1 + len(oob),
           "message": canon}
    return f"accept/{ex['name']}", doc, [pack(wire), *oob]


def malformed_vector(ex: dict) -> tuple[str, dict, list[bytes]]:
    if "frames_hex" in ex:
        frames = [bytes.fromhex(h) for h in ex["frames_hex"]]
    else:
        oob: list[bytes] = []
        wire, _ = to_wire(ex["header"], oob, 2**62, strict=False)
        head = pack(wire)
        if ex.get("truncate"):
            head = head[:-ex["truncate"]]
        head += bytes.fromhex(ex.get("append_hex", ""))
        frames = [head, *oob, *(bytes.fromhex(h) for h in ex.get("extra_frames_hex", []))]
    doc = {"name": f"malformed/{ex['name']}", "doc": ex["doc"], "frames": len(frames),
           "expect": {"code": ex["code"], "stage": ex["stage"]}}
    return f"malformed/{ex['name']}", doc, frames


def build_vectors(examples: dict, schema: dict) -> dict[str, str]:
    """{relative path: file text} of every vector file."""
    files: dict[str, str] = {}
    d = examples["defaults"]
    built = ([message_vector(ex, d, schema) for ex in examples["messages"]]
             + [accept_vector(ex, d) for ex in examples["accept"]]
             + [malformed_vector(ex) for ex in examples["malformed"]])
    for stem, doc, frames in built:
        if f"{stem}.json" in files:
            raise VectorError(f"two vectors are named {stem!r}")
        files[f"{stem}.json"] = _dump(doc)
        files[f"{stem}.frames.hex"] = _frames_text(frames)
    return files


# --------------------------------------------------------------------------- README tables


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell (no pipes, newlines or HTML-looking tags)."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def readme_messages(schema: dict, examples: dict) -> str:
    """Markdown: a summary table of every message type, then one field table per type."""
    vectors: dict[str, list[str]] = {}
    for ex in examples["messages"]:
        mtype, _, variant = ex["name"].partition("/")
        vectors.setdefault(mtype, []).append(
            f"[{variant}](vectors/messages/{mtype}/{variant}.json)")
    lines = ["| message | kind | pattern | from -> to | reply | meaning | vectors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in schema["messages"].items():
        reply = f"`{m['reply']}`" if m.get("reply") else ""
        lines.append(f"| [`{name}`](#msg-{name.replace('.', '-')}) | {m['kind']} | "
                     f"{_cell(m['pattern'])} | {_cell(m['from'])} -> {_cell(m['to'])} | {reply} | "
                     f"{_cell(m['doc'])} | {', '.join(vectors.get(name, []))} |")
    for name, m in schema["messages"].items():
        lines += ["", f"<a id=\"msg-{name.replace('.', '-')}\"></a>",
                  f"#### `{name}` ({m['kind']}, {_cell(m['pattern'])})", "", _cell(m["doc"]), ""]
        fields = m.get("fields", {})
        if not fields:
            lines.append("No fields: the body is an empty map.")
            continue
        lines += ["| field | type | required | nullable | meaning |",
                  "| --- | --- | --- | --- | --- |"]
        for fname, f in fields.items():
            lines.append(f"| `{fname}` | `{f['type']}` | {'yes' if f.get('required') else 'no'} | "
                         f"{'yes' if f.get('nullable') else 'no'} | {_cell(f['doc'])} |")
    return "\n".join(lines)


def readme_errors(schema: dict) -> str:
    lines = ["| code | meaning |", "| --- | --- |"]
    lines += [f"| `{code}` | {_cell(doc)} |" for code, doc in schema["errors"]["codes"].items()]
    return "\n".join(lines)


def render_readme(text: str, schema: dict, examples: dict) -> str:
    """README text with every generated section replaced by its current content."""
    sections = {"messages": readme_messages(schema, examples), "errors": readme_errors(schema)}
    for key, (begin, end) in README_MARKERS.items():
        i, j = text.find(begin), text.find(end)
        if i < 0 or j < i:
            raise VectorError(f"proto/README.md lacks the markers {begin!r} ... {end!r}")
        text = text[:i + len(begin)] + "\n" + sections[key] + "\n" + text[j:]
    return text


# --------------------------------------------------------------------------- main


def load_inputs() -> tuple[dict, dict]:
    examples = json.loads((HERE / "examples.json").read_text(encoding="utf-8"))
    schema = json.loads((PROTO / "schema.json").read_text(encoding="utf-8"))
    return examples, schema


def expected_files() -> dict[Path, str]:
    """Every file this script owns, with the content it should have now."""
    examples, schema = load_inputs()
    out = {HERE / rel: text for rel, text in build_vectors(examples, schema).items()}
    readme = PROTO / "README.md"
    out[readme] = render_readme(readme.read_text(encoding="utf-8"), schema, examples)
    return out


def stale_files() -> list[str]:
    """Paths that differ from what the generator would write, plus stray vector files."""
    want = expected_files()
    stale = [str(p.relative_to(PROTO.parent)) for p, text in want.items()
             if not p.exists() or p.read_text(encoding="utf-8") != text]
    for sub in ("messages", "accept", "malformed"):
        for p in sorted((HERE / sub).rglob("*")):
            if p.is_file() and p not in want:
                stale.append(f"{p.relative_to(PROTO.parent)} (not made from examples.json)")
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report stale files, change nothing")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        for s in stale:
            print(f"stale: {s}", file=sys.stderr)
        if stale:
            print("run: python proto/vectors/generate.py", file=sys.stderr)
        return 1 if stale else 0
    want = expected_files()
    for sub in ("messages", "accept", "malformed"):  # drop vectors no longer in examples.json
        for p in sorted((HERE / sub).rglob("*"), reverse=True):
            if p.is_file() and p not in want:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    for p, text in want.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            p.write_text(text, encoding="utf-8")
    print(f"wrote {len(want) - 1} vector files under {HERE.relative_to(PROTO.parent)} "
          f"and the generated tables of proto/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
