// Conformance of a Node.js implementation (wire.mjs) with the NexRL wire contract.
//
//   node tests/node/conformance.mjs vectors [--dir proto/vectors]
//       every golden vector: decode -> same value as its JSON; re-encode -> the same bytes;
//       JSON -> encode -> the same bytes; accept/ decodes; malformed/ is refused with its code
//   node tests/node/conformance.mjs live --endpoint EP --pub EP --sub EP --node NAME
//       talk to a running node: ping (arrays inline and out-of-band), a retried ping, node.status,
//       malformed frames, events through the proxy (bus.probe handshake, node.heartbeat),
//       then node.drain
//   node tests/node/conformance.mjs serve --endpoint EP --pub EP --sub EP --name NAME
//       be a node: answer ping / node.status / node.drain, refuse everything else with an
//       error reply, publish node.lifecycle and node.heartbeat; exits after node.drain
//
// Prints one line per check and exits 1 if any failed. tests/test_proto.py runs all three.

import { readFileSync, readdirSync } from "node:fs";
import { hostname } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { isDeepStrictEqual, parseArgs } from "node:util";
import { randomBytes } from "node:crypto";
import * as zmq from "zeromq";
import {
  NdArray, ProtoError, bytesEqual, checkBody, decodeMessage, encodeMessage, fromHex, fromNotation,
  toHex, toNotation,
} from "./wire.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const PROTO = resolve(HERE, "..", "..", "proto");
const schema = JSON.parse(readFileSync(join(PROTO, "schema.json"), "utf8"));
let failures = 0;

function check(ok, what, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}${!ok && detail ? `\n     ${detail}` : ""}`);
  if (!ok) failures += 1;
  return ok;
}

function attempt(what, fn) {
  try {
    return fn();
  } catch (e) {
    check(false, what, `${e.constructor.name}: ${e.message}`);
    return undefined;
  }
}

// ------------------------------------------------------------------------- vectors

const readFrames = (path) => readFileSync(path, "utf8").split("\n").slice(0, -1).map(fromHex);
const readJson = (path) => JSON.parse(readFileSync(path, "utf8"));
const stems = (dir) => readdirSync(dir, { recursive: true })
  .filter((f) => f.endsWith(".json")).sort().map((f) => join(dir, f.slice(0, -".json".length)));

function framesEqual(a, b) {
  return a.length === b.length && a.every((f, i) => bytesEqual(f, b[i]));
}

function showFrames(frames) {
  return frames.map((f) => toHex(f)).join(" | ");
}

function messageVector(stem) {
  const vec = readJson(`${stem}.json`);
  const want = readFrames(`${stem}.frames.hex`);
  const name = vec.name;
  const msg = attempt(`${name}: decode`, () => decodeMessage(want));
  if (!msg) return;
  check(isDeepStrictEqual(toNotation(msg), vec.message), `${name}: decoded value equals the JSON`,
    `got ${JSON.stringify(toNotation(msg))}`);
  attempt(`${name}: schema`, () => checkBody(schema, msg.type, msg.body, { outgoing: true }));
  check(schema.messages[msg.type].kind === vec.kind, `${name}: kind ${vec.kind}`);
  const again = attempt(`${name}: re-encode`, () => encodeMessage(msg));
  if (again) {
    check(framesEqual(again, want), `${name}: re-encoded frames are byte-identical`,
      `got  ${showFrames(again)}\n     want ${showFrames(want)}`);
  }
  const fresh = attempt(`${name}: encode from JSON`, () => encodeMessage(fromNotation(vec.message)));
  if (fresh) check(framesEqual(fresh, want), `${name}: frames encoded from the JSON are byte-identical`);
  if (vec.topic !== null) {
    check(vec.topic === msg.type || vec.topic.startsWith(`${msg.type}/`), `${name}: topic ${vec.topic}`);
  }
}

function acceptVector(stem) {
  const vec = readJson(`${stem}.json`);
  const msg = attempt(`${vec.name}: decode`, () => decodeMessage(readFrames(`${stem}.frames.hex`)));
  if (!msg) return;
  check(isDeepStrictEqual(toNotation(msg), vec.message), `${vec.name}: decoded value equals the JSON`,
    `got ${JSON.stringify(toNotation(msg))}`);
  attempt(`${vec.name}: schema (incoming)`, () => checkBody(schema, msg.type, msg.body));
}

function malformedVector(stem) {
  const vec = readJson(`${stem}.json`);
  const { code, stage } = vec.expect;
  try {
    const msg = decodeMessage(readFrames(`${stem}.frames.hex`));
    checkBody(schema, msg.type, msg.body);
    check(false, `${vec.name}: refused with ${code}`, "it was accepted");
  } catch (e) {
    const gotStage = e instanceof ProtoError && ["unknown_type", "invalid_body"].includes(e.code) ? "schema" : "decode";
    check(e instanceof ProtoError && e.code === code && gotStage === stage,
      `${vec.name}: refused with ${code} at ${stage}`, `got ${e.code ?? e.constructor.name}: ${e.message}`);
  }
}

function runVectors(dir) {
  const sections = { messages: messageVector, accept: acceptVector, malformed: malformedVector };
  const counts = {};
  for (const [sub, fn] of Object.entries(sections)) {
    const found = stems(join(dir, sub));
    counts[sub] = found.length;
    found.forEach(fn);
  }
  const covered = new Set(stems(join(dir, "messages")).map((s) => readJson(`${s}.json`).type));
  for (const type of Object.keys(schema.messages)) check(covered.has(type), `schema type ${type} has a vector`);
  console.log(`vectors: ${JSON.stringify(counts)}`);
}

// ------------------------------------------------------------------------- a DEALER client

const withTimeout = (promise, ms, what) => Promise.race([promise, new Promise((_, reject) =>
  setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms).unref())]);

class Client {
  constructor(endpoint, sender) {
    this.sock = new zmq.Dealer({ linger: 0, receiveTimeout: 5000 });
    this.sock.connect(endpoint);
    Object.assign(this, { sender, seq: 0, n: 0, prefix: randomBytes(4).toString("hex") });
  }

  newId() {
    this.n += 1;
    return `${this.prefix}-${this.n.toString(16)}`;
  }

  async sendRaw(frames) {
    await this.sock.send(frames);
  }

  async send(type, body, { msgId = this.newId(), version = "1.0" } = {}) {
    this.seq += 1;
    const frames = encodeMessage({ version, type, msg_id: msgId, sender: this.sender, seq: this.seq,
      ts: Date.now() / 1000, body });
    await this.sock.send(frames);
    return msgId;
  }

  /** The next reply: {msg, frames}. */
  async recv() {
    const frames = await this.sock.receive();
    return { msg: decodeMessage(frames), frames };
  }

  async request(type, body, opts) {
    const msgId = await this.send(type, body, opts);
    const got = await this.recv();
    return { ...got, msgId };
  }

  close() {
    this.sock.close();
  }
}

// ------------------------------------------------------------------------- events

async function handshake(pub, sub, sender) {
  const nonce = randomBytes(6).toString("hex");
  const topic = `bus.probe/${nonce}`;
  sub.subscribe(topic);
  let seq = 0;
  const deadline = Date.now() + 10000;
  sub.receiveTimeout = 100;
  try {
    while (Date.now() < deadline) {
      seq += 1;
      await pub.send([topic, ...encodeMessage({ type: "bus.probe", msg_id: `${nonce}-${seq}`, sender, seq,
        ts: Date.now() / 1000, body: { nonce } })]);
      try {
        const [t, ...frames] = await sub.receive();
        const msg = decodeMessage(frames);
        if (t.toString() === topic && msg.body.nonce === nonce) return seq;
      } catch (e) {
        if (e.code !== "EAGAIN") throw e;
      }
    }
    throw new Error("no bus.probe came back through the proxy in 10 s");
  } finally {
    sub.unsubscribe(topic);
    sub.receiveTimeout = -1;
  }
}

async function nextEvent(sub, type, from, ms) {
  const deadline = Date.now() + ms;
  sub.receiveTimeout = 200;
  try {
    while (Date.now() < deadline) {
      try {
        const [topic, ...frames] = await sub.receive();
        const msg = decodeMessage(frames);
        if (msg.type === type && msg.sender === from) return { topic: topic.toString(), msg };
      } catch (e) {
        if (e.code !== "EAGAIN") throw e;
      }
    }
    throw new Error(`no ${type} from ${from} within ${ms} ms`);
  } finally {
    sub.receiveTimeout = -1;
  }
}

// ------------------------------------------------------------------------- live client

function f32(values, placement = null) {
  const data = new Uint8Array(new Float32Array(values).buffer);
  return new NdArray(1, "float32", [values.length], data, placement);
}

async function errorReply(client, what, frames, code, replyTo) {
  await client.sendRaw(frames);
  const { msg } = await withTimeout(client.recv(), 6000, `the error reply to ${what}`);
  check(msg.type === "error" && msg.body.code === code, `${what}: error reply with code ${code}`,
    `got ${msg.type} ${JSON.stringify(toNotation(msg.body))}`);
  check(msg.reply_to === replyTo, `${what}: reply_to is ${replyTo}`, `got ${msg.reply_to}`);
  attempt(`${what}: error body matches the schema`, () => checkBody(schema, "error", msg.body, { outgoing: true }));
}

async function runLive({ endpoint, pub: pubEp, sub: subEp, node }) {
  const client = new Client(endpoint, "node-conformance");
  const pub = new zmq.Publisher({ linger: 0 });
  const sub = new zmq.Subscriber({ linger: 0 });
  try {
    // 1. ping with arrays inline and out-of-band; the payload must come back unchanged
    const big = f32(Array.from({ length: 25000 }, (_, i) => i + 0.5)); // 100 kB: out-of-band
    const payload = {
      inline: f32([0.5, -1.5, 2.25]),
      forced_oob: new NdArray(1, "int64", [2, 2], new Uint8Array(32).fill(7), "oob"),
      big,
      empty: new NdArray(1, "uint8", [0], new Uint8Array(0)),
      nested: { text: "héllo ✓", blob: new Uint8Array([0, 255, 16]), none: null, list: [1, 2.5, -3, 4294967296] },
    };
    const sentFrames = encodeMessage({ type: "ping", msg_id: "x", sender: "s", seq: 1, ts: 1.5, body: { payload } });
    check(sentFrames.length === 3, "ping request carries 2 out-of-band frames (forced + 100 kB)");
    const ping = await withTimeout(client.request("ping", { payload }, {}), 10000, "ping.reply");
    check(ping.msg.type === "ping.reply", "ping -> ping.reply", `got ${ping.msg.type}`);
    check(ping.msg.reply_to === ping.msgId, "ping.reply answers our msg_id");
    check(ping.msg.sender === node, `ping.reply comes from ${node}`);
    attempt("ping.reply matches the schema", () => checkBody(schema, "ping.reply", ping.msg.body, { outgoing: true }));
    check(isDeepStrictEqual(toNotation(ping.msg.body.payload, false), toNotation(payload, false)),
      "ping payload (arrays, bytes, unicode, nil, ints, floats) comes back unchanged");
    check(ping.frames.length === 2 && ping.msg.body.payload.big.placement === "oob",
      "the 100 kB array comes back out-of-band (frame 1), the small ones inline", `${ping.frames.length} frames`);

    // 2. a retry (same msg_id) gets the cached reply, byte for byte: servers deduplicate
    const retry = await client.request("ping", { payload: 1 }, { msgId: ping.msgId });
    check(retry.msg.msg_id === ping.msg.msg_id && framesEqual(retry.frames, ping.frames),
      "a retried request (same msg_id) gets the identical cached reply");

    // 3. node.status
    const status = await client.request("node.status", {});
    check(status.msg.type === "node.status.reply" && status.msg.reply_to === status.msgId, "node.status -> node.status.reply");
    attempt("node.status.reply matches the schema", () => checkBody(schema, "node.status.reply", status.msg.body, { outgoing: true }));
    check(status.msg.body.name === node && status.msg.body.stats.handled >= 2, "node.status.reply names the node and counts requests",
      JSON.stringify(status.msg.body));

    // 4. every malformed vector: an error reply with the vector's code, and the node lives on
    for (const stem of stems(join(PROTO, "vectors", "malformed"))) {
      const { name, expect } = readJson(`${stem}.json`);
      const frames = readFrames(`${stem}.frames.hex`);
      const replyTo = expect.stage === "decode" ? null : decodeMessage(frames).msg_id;
      await errorReply(client, name, frames, expect.code, replyTo);
    }
    const alive = await client.request("ping", {});
    check(alive.msg.type === "ping.reply", "the node still answers after the malformed frames");

    // 5. events through the proxy: our readiness handshake, then the node's heartbeat
    pub.connect(pubEp);
    sub.connect(subEp);
    sub.subscribe("node.heartbeat");
    await withTimeout(handshake(pub, sub, "node-conformance"), 12000, "bus.probe");
    check(true, "bus.probe handshake through the proxy");
    const hb = await nextEvent(sub, "node.heartbeat", node, 5000);
    check(hb.topic === "node.heartbeat", "heartbeat arrives on topic node.heartbeat");
    attempt("node.heartbeat matches the schema", () => checkBody(schema, "node.heartbeat", hb.msg.body, { outgoing: true }));
    check(hb.msg.seq >= 1 && hb.msg.body.endpoint === endpoint, "heartbeat carries a seq and the node's endpoint",
      JSON.stringify(hb.msg.body));

    // 6. node.drain: the node acknowledges and then exits (the test checks the exit code)
    const drain = await client.request("node.drain", { reason: "conformance done" });
    check(drain.msg.type === "node.drain.reply" && drain.msg.body.state === "draining", "node.drain -> draining",
      JSON.stringify(drain.msg.body));
  } finally {
    client.close();
    pub.close();
    sub.close();
  }
}

// ------------------------------------------------------------------------- serve (be a node)

async function runServe({ endpoint, pub: pubEp, sub: subEp, name }) {
  const started = Date.now();
  const stats = { handled: 0, errors: 0, malformed: 0, duplicates: 0 };
  const router = new zmq.Router({ mandatory: true, linger: 1000 });
  await router.bind(endpoint);
  const pub = new zmq.Publisher({ linger: 1000 });
  const sub = new zmq.Subscriber({ linger: 0 });
  pub.connect(pubEp);
  sub.connect(subEp);
  await handshake(pub, sub, name);
  sub.close();
  const topicSeq = new Map();
  let state = "starting", msgN = 0;
  const newId = () => `js-${process.pid}-${(msgN += 1).toString(16)}`;
  const publish = async (type, body) => {
    checkBody(schema, type, body, { outgoing: true });
    const seq = (topicSeq.get(type) ?? 0) + 1;
    topicSeq.set(type, seq);
    await pub.send([type, ...encodeMessage({ type, msg_id: newId(), sender: name, seq, ts: Date.now() / 1000, body })]);
  };
  const setState = async (next, reason) => {
    const body = { role: "js-echo", name, state: next, previous: state };
    if (reason) body.reason = reason;
    state = next;
    await publish("node.lifecycle", body);
  };
  const heartbeat = () => publish("node.heartbeat", { role: "js-echo", name, host: hostname(), pid: process.pid, state,
    uptime_s: (Date.now() - started) / 1000, interval_s: 0.2, loop_lag_s: 0.001, endpoint, dropped_events: 0 });
  await setState("ready");
  await setState("running");
  const timer = setInterval(() => heartbeat().catch((e) => console.error(`heartbeat failed: ${e.message}`)), 200);
  console.log(JSON.stringify({ ready: endpoint }));

  const cache = new Map(); // (sender, msg_id) -> reply frames: retries get the same reply
  const reply = async (peer, frames) => router.send([peer, ...frames]);
  const error = (replyTo, code, message, requestType) => encodeMessage({ type: "error", msg_id: newId(), reply_to: replyTo,
    sender: name, seq: 0, ts: Date.now() / 1000, body: { code, message, node: name, request_type: requestType } });
  const handlers = {
    ping: (body) => ("payload" in body ? { payload: body.payload, state } : { state }),
    "node.status": () => ({ role: "js-echo", name, host: hostname(), pid: process.pid, state,
      uptime_s: (Date.now() - started) / 1000, stats }),
    "node.drain": () => ({ state: "draining" }),
  };
  for await (const [peer, ...frames] of router) {
    let msg;
    try {
      msg = decodeMessage(frames);
    } catch (e) {
      stats.malformed += 1;
      await reply(peer, error(null, e.code ?? "malformed", e.message, null));
      continue;
    }
    const key = `${msg.sender}\u0000${msg.msg_id}`;
    if (cache.has(key)) {
      stats.duplicates += 1;
      await reply(peer, cache.get(key));
      continue;
    }
    let out, drain = false;
    try {
      const spec = checkBody(schema, msg.type, msg.body);
      if (spec.kind !== "request" || !(msg.type in handlers)) {
        throw new ProtoError("unknown_type", `${msg.type} is not handled here (js-echo ${name})`);
      }
      stats.handled += 1;
      const body = handlers[msg.type](msg.body);
      checkBody(schema, spec.reply, body, { outgoing: true });
      out = encodeMessage({ type: spec.reply, msg_id: newId(), reply_to: msg.msg_id, sender: name, seq: 0,
        ts: Date.now() / 1000, body });
      drain = msg.type === "node.drain";
    } catch (e) {
      stats.errors += 1;
      out = error(msg.msg_id, e.code ?? "handler_error", e.message, msg.type);
    }
    cache.set(key, out);
    await reply(peer, out);
    if (drain && state === "running") {
      await setState("draining", msg.body.reason);
      // Leaving the loop closes the socket: give the I/O thread a moment to put the reply on
      // the wire first (a reply only queued can be lost with the socket, even with linger).
      await new Promise((resolve) => setTimeout(resolve, 200));
      break;
    }
  }
  clearInterval(timer);
  await setState("stopped", "node.drain");
  await heartbeat();
  router.close();
  pub.close(); // linger 1 s delivers the last events
}

// ------------------------------------------------------------------------- main

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    dir: { type: "string", default: join(PROTO, "vectors") },
    endpoint: { type: "string" }, pub: { type: "string" }, sub: { type: "string" },
    node: { type: "string", default: "echo0" }, name: { type: "string", default: "js0" },
  },
});
const mode = positionals[0];
const needs = (...keys) => keys.forEach((k) => {
  if (!values[k]) throw new Error(`conformance.mjs ${mode}: --${k} is required`);
});
try {
  if (mode === "vectors") runVectors(values.dir);
  else if (mode === "live") needs("endpoint", "pub", "sub"), await runLive(values);
  else if (mode === "serve") needs("endpoint", "pub", "sub"), await runServe(values);
  else throw new Error("usage: conformance.mjs vectors | live | serve [options] (see the header)");
} catch (e) {
  check(false, `${mode} aborted`, e.stack);
}
console.log(failures ? `${failures} check(s) FAILED` : "all checks passed");
process.exit(failures ? 1 : 0);
