// The NexRL wire contract (proto/README.md) in JavaScript: envelope codec, ext-1/ext-2
// arrays with out-of-band frames, schema checks, and the JSON value notation of the golden
// vectors. Written from proto/README.md and proto/schema.json only, as an implementer in
// another language would; nothing here reads Python.
//
//   decodeMessage(frames)          -> {version, type, msg_id, reply_to, sender, seq, ts, body}
//                                     throws ProtoError(code) for frames a receiver refuses
//   encodeMessage(msg, {threshold}) -> [header, ...out-of-band buffers] (Uint8Array[])
//   checkBody(schema, type, body, {outgoing}) throws ProtoError(unknown_type | invalid_body)
//   toNotation(value) / fromNotation(json)   value <-> vector JSON ({"$ndarray": ...})

import { Decoder, Encoder, ExtData, ExtensionCodec } from "@msgpack/msgpack";

export const PROTOCOL_VERSION = "1.0";
export const PROTOCOL_MAJOR = 1;
export const OOB_THRESHOLD = 65536;
export const EXT_CODES = { $ndarray: 1, $tensor: 2 };
const EXT_TAGS = { 1: "$ndarray", 2: "$tensor" };
export const ITEMSIZE = {
  bool: 1, int8: 1, int16: 2, int32: 4, int64: 8, uint8: 1, uint16: 2, uint32: 4, uint64: 8,
  float16: 2, float32: 4, float64: 8, complex64: 8, complex128: 16, bfloat16: 2,
};
const VERSION_RE = /^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$/;

/** A frame a receiver refuses (code: an errors.codes entry of proto/schema.json). */
export class ProtoError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** An array on the wire. data: raw little-endian C-order bytes. placement: "inline" or
 * "oob" as it arrived (or as it must be sent); null lets the sender's threshold decide.
 * oob: the buffer index it travelled at (decoded arrays only). */
export class NdArray {
  constructor(ext, dtype, shape, data, placement = null, oob = null) {
    Object.assign(this, { ext, dtype, shape, data, placement, oob });
  }
}

// ------------------------------------------------------------------------- ext types

const plain = { encoder: new Encoder(), decoder: new Decoder({ useBigInt64: false }) };

function encodeArrayPayload(arr, ctx) {
  const toOob = arr.placement === "oob" ||
    (arr.placement === null && arr.data.byteLength >= ctx.threshold);
  let data = arr.data;
  if (toOob) {
    ctx.oob.push(arr.data);
    data = ctx.oob.length - 1;
  }
  return plain.encoder.encode([arr.dtype, arr.shape, data]);
}

function decodeArrayPayload(ext, payload, ctx) {
  let parts;
  try {
    parts = plain.decoder.decode(payload);
  } catch (e) {
    throw new ProtoError("malformed", `ext ${ext} payload is not msgpack: ${e.message}`);
  }
  if (!Array.isArray(parts) || parts.length !== 3) {
    throw new ProtoError("malformed", `ext ${ext} payload must be [dtype, shape, data]`);
  }
  const [dtype, shape, data] = parts;
  if (typeof dtype !== "string" || !(dtype in ITEMSIZE)) {
    throw new ProtoError("malformed", `unknown array dtype ${JSON.stringify(dtype)}`);
  }
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new ProtoError("malformed", `bad array shape ${JSON.stringify(shape)}`);
  }
  let bytes, placement, oob = null;
  if (data instanceof Uint8Array) {
    [bytes, placement] = [data, "inline"];
  } else if (Number.isSafeInteger(data) && data >= 0) {
    if (data + 1 >= ctx.frames.length) {
      throw new ProtoError("malformed", `array refers to out-of-band frame ${data}, but the ` +
        `message has ${ctx.frames.length - 1}`);
    }
    [bytes, placement, oob] = [ctx.frames[data + 1], "oob", data];
  } else {
    throw new ProtoError("malformed", `ext ${ext} data must be bin or a buffer index`);
  }
  const need = shape.reduce((a, b) => a * b, 1) * ITEMSIZE[dtype];
  if (bytes.byteLength !== need) {
    throw new ProtoError("malformed", `array ${dtype}[${shape}] needs ${need} bytes, ` +
      `got ${bytes.byteLength}`);
  }
  return new NdArray(ext, dtype, shape, bytes, placement, oob);
}

const extensionCodec = new ExtensionCodec();
for (const ext of [1, 2]) {
  extensionCodec.register({
    type: ext,
    encode: (obj, ctx) => (obj instanceof NdArray && obj.ext === ext ? encodeArrayPayload(obj, ctx) : null),
    decode: (payload, type, ctx) => decodeArrayPayload(type, payload, ctx),
  });
}
extensionCodec.register({ // the msgpack timestamp is not part of the NexRL wire
  type: -1,
  encode: () => null,
  decode: () => { throw new ProtoError("malformed", "ext -1 (msgpack timestamp) is not used by NexRL"); },
});

// @msgpack/msgpack does not validate UTF-8 (it substitutes U+FFFD); the contract says a str
// whose bytes are not UTF-8 is malformed, so check every str with a fatal TextDecoder first.
// (decodeUtf8String is an internal of @msgpack/msgpack 3.1.x, pinned in package.json.)
const fatalUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
class StrictDecoder extends Decoder {
  decodeUtf8String(byteLength, headerOffset) {
    const start = this.pos + headerOffset;
    if (this.bytes.byteLength >= start + byteLength) {
      try {
        fatalUtf8.decode(this.bytes.subarray(start, start + byteLength));
      } catch {
        throw new ProtoError("malformed", `a str of ${byteLength} bytes is not valid UTF-8`);
      }
    }
    return super.decodeUtf8String(byteLength, headerOffset);
  }
}

function strictKey(key) {
  if (typeof key !== "string") {
    throw new ProtoError("malformed", `map keys must be strings, got ${typeof key}`);
  }
  return key;
}

// ------------------------------------------------------------------------- envelope

/** Replace 64-bit ints (bigint) by numbers where exact; refuse unknown ext types. */
function settle(v) {
  if (typeof v === "bigint") {
    const n = Number(v);
    if (!Number.isSafeInteger(n)) {
      throw new ProtoError("malformed", `integer ${v} is beyond 2^53 (unsupported by this implementation)`);
    }
    return n;
  }
  if (v instanceof ExtData) throw new ProtoError("malformed", `unknown msgpack ext type ${v.type}`);
  if (Array.isArray(v)) return v.map(settle);
  if (v !== null && typeof v === "object" && !(v instanceof Uint8Array) && !(v instanceof NdArray)) {
    for (const k of Object.keys(v)) v[k] = settle(v[k]);
  }
  return v;
}

export function isMap(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v) &&
    !(v instanceof Uint8Array) && !(v instanceof NdArray);
}

/** Frames (header, ...buffers) -> message; throws ProtoError saying what is wrong. */
export function decodeMessage(frames) {
  if (frames.length === 0) throw new ProtoError("malformed", "no frames");
  const ctx = { frames };
  let head;
  try {
    head = new StrictDecoder({ extensionCodec, context: ctx, useBigInt64: true, mapKeyConverter: strictKey })
      .decode(frames[0]);
    head = settle(head);
  } catch (e) {
    if (e instanceof ProtoError) throw e;
    throw new ProtoError("malformed", `header frame is not valid msgpack: ${e.message}`);
  }
  if (!isMap(head)) throw new ProtoError("malformed", "header must be a map");
  const { version, type, msg_id, sender, seq, ts, body } = head;
  const reply_to = head.reply_to ?? null;
  if (typeof version !== "string" || !VERSION_RE.test(version)) {
    throw new ProtoError("malformed", `version must be 'MAJOR.MINOR', got ${JSON.stringify(version)}`);
  }
  if (Number(version.split(".")[0]) !== PROTOCOL_MAJOR) {
    throw new ProtoError("bad_version", `protocol version ${version} is incompatible with ${PROTOCOL_VERSION}`);
  }
  const bad = (field, want) => new ProtoError("malformed", `envelope field '${field}' must be ${want}`);
  if (typeof type !== "string" || type === "") throw bad("type", "a non-empty string");
  if (typeof msg_id !== "string") throw bad("msg_id", "a string");
  if (reply_to !== null && typeof reply_to !== "string") throw bad("reply_to", "a string or nil");
  if (typeof sender !== "string") throw bad("sender", "a string");
  if (!Number.isSafeInteger(seq) || seq < 0) throw bad("seq", "a non-negative integer");
  if (typeof ts !== "number") throw bad("ts", "a number");
  if (!isMap(body)) throw bad("body", "a map");
  return { version, type, msg_id, reply_to, sender, seq, ts, body };
}

/** Message -> frames. Envelope keys in the canonical order; arrays with placement null go
 * out-of-band when they hold >= threshold bytes. */
export function encodeMessage(msg, { threshold = OOB_THRESHOLD } = {}) {
  const ctx = { oob: [], threshold };
  const header = {
    version: msg.version ?? PROTOCOL_VERSION, type: msg.type, msg_id: msg.msg_id,
    reply_to: msg.reply_to ?? null, sender: msg.sender, seq: msg.seq ?? 0, ts: msg.ts, body: msg.body ?? {},
  };
  const head = new Encoder({ extensionCodec, context: ctx }).encode(header);
  return [head, ...ctx.oob];
}

// ------------------------------------------------------------------------- schema

function typeCheck(t) {
  const base = {
    str: (v) => typeof v === "string",
    int: (v) => Number.isSafeInteger(v),
    float: (v) => typeof v === "number",
    bool: (v) => typeof v === "boolean",
    bytes: (v) => v instanceof Uint8Array,
    array: (v) => v instanceof NdArray,
    any: () => true,
    map: isMap,
    list: Array.isArray,
  };
  if (t in base) return base[t];
  const m = /^(list|map)\[(.+)\]$/.exec(t);
  if (!m) throw new Error(`proto/schema.json: unknown field type ${t}`);
  const inner = typeCheck(m[2]);
  return m[1] === "list"
    ? (v) => Array.isArray(v) && v.every(inner)
    : (v) => isMap(v) && Object.values(v).every(inner);
}

/** Check a body against proto/schema.json. Incoming: unknown fields are ignored.
 * Outgoing: undeclared fields are refused (no undocumented traffic). */
export function checkBody(schema, type, body, { outgoing = false } = {}) {
  const spec = schema.messages[type];
  if (!spec) throw new ProtoError("unknown_type", `message type ${type} is not in proto/schema.json`);
  const fields = spec.fields ?? {};
  if (outgoing) {
    const extra = Object.keys(body).filter((k) => !(k in fields));
    if (extra.length) throw new ProtoError("invalid_body", `${type}: undeclared fields ${extra}`);
  }
  for (const [name, f] of Object.entries(fields)) {
    if (!(name in body)) {
      if (f.required) throw new ProtoError("invalid_body", `${type}: required field '${name}' is missing`);
      continue;
    }
    const v = body[name];
    if (v === null) {
      if (!f.nullable) throw new ProtoError("invalid_body", `${type}: field '${name}' must not be nil`);
      continue;
    }
    if (!typeCheck(f.type)(v)) throw new ProtoError("invalid_body", `${type}: field '${name}' must be ${f.type}`);
  }
  return spec;
}

// ------------------------------------------------------------------------- JSON notation

export const toHex = (b) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString("hex");
export const fromHex = (h) => new Uint8Array(Buffer.from(h, "hex"));

/** A decoded value in the vectors' JSON notation. withPlacement=false drops "oob" (for
 * comparing values that may have travelled differently). */
export function toNotation(v, withPlacement = true) {
  if (v instanceof NdArray) {
    const spec = { dtype: v.dtype, shape: v.shape, data_hex: toHex(v.data) };
    if (withPlacement) spec.oob = v.oob;
    return { [EXT_TAGS[v.ext]]: spec };
  }
  if (v instanceof Uint8Array) return { $bytes: toHex(v) };
  if (Array.isArray(v)) return v.map((x) => toNotation(x, withPlacement));
  if (isMap(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toNotation(x, withPlacement)]));
  return v;
}

/** The vectors' JSON notation -> a value ready for encodeMessage (arrays keep the placement
 * the vector records). */
export function fromNotation(v) {
  if (isMap(v) && Object.keys(v).length === 1) {
    const [tag] = Object.keys(v);
    const spec = v[tag];
    if (tag in EXT_CODES) {
      return new NdArray(EXT_CODES[tag], spec.dtype, spec.shape, fromHex(spec.data_hex),
        spec.oob === null || spec.oob === undefined ? "inline" : "oob", spec.oob ?? null);
    }
    if (tag === "$bytes") return fromHex(spec);
  }
  if (Array.isArray(v)) return v.map(fromNotation);
  if (isMap(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, fromNotation(x)]));
  return v;
}

export function bytesEqual(a, b) {
  return a.byteLength === b.byteLength && Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;
}
