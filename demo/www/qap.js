// qap.js — a small, dependency-free client for Rserve's QAP1 protocol over a WebSocket.
//
// It speaks to Rserve through forward (or any relay that keeps QAP messages intact):
//
//   const session = await connect("wss://example.org/", { onOOB: (value, code) => ... });
//   const login = await session.call(session.capabilities, "mike", "mypwd");  // OCAP mode
//   const parseEval = login.get("parseEval");
//   const answer = await session.call(parseEval, "1+1");                       // RValue
//
// What the wire looks like (Rserve's src/Rsrv.h is the reference):
// - Every QAP message is a 16-byte header (cmd, length low 32 bits, message id, length high
//   32 bits; all little-endian) followed by the payload. forward sends each message from R as
//   exactly one binary WebSocket message, so this client never has to reassemble.
// - The WebSocket is a ResumableSocket (resume.js) unless told otherwise: when forward offers
//   session resume (docs/resume.md), a broken connection is resumed underneath and the session
//   goes on, R's messages restored whole; with resume off it is a plain WebSocket.
// - OCAP mode: R speaks first with an ordinary message whose cmd spells "RsOC"; its payload is
//   the value oc.init() returned — the capabilities. The only request is CMD_OCcall, whose
//   payload is an R call (a "language" object) with a capability in the function's place.
// - Classic mode: R speaks first with a 32-byte text ID string ("Rsrv0103QAP1..."), which forward
//   sends as a text WebSocket message; requests are then CMD_eval with a string.
// - A payload is a list of parameters, each a 4-byte header (type | length << 8) and a body.
//   Results come as one DT_SEXP parameter holding an encoded R value (an "REXP").
// - While R evaluates a call it may send out-of-band (OOB) messages before the answer:
//   OOB_SEND is one-way (e.g. printed output), OOB_MSG wants an answer (self.oobMessage in R).
// QAP is strictly request/response, so calls are queued and sent one at a time.

import { ResumableSocket } from "./resume.js";

// ---- constants -----------------------------------------------------------------------------

export const CMD = Object.freeze({
  EVAL: 0x003,
  OC_CALL: 0x00f,
  RESP_OK: 0x10001,
  RESP_ERR: 0x10002,
  OOB_SEND: 0x21000,
  OOB_MSG: 0x22000,
  OC_INIT: 0x434f7352, // "RsOC" read as a little-endian number
});
const CMD_RESP = 0x10000;
const CMD_OOB = 0x20000;

// Parameter types (DT_*) and R value types (XT_*).
export const DT = Object.freeze({ INT: 1, STRING: 4, BYTESTREAM: 5, SEXP: 10, LARGE: 64 });
export const XT = Object.freeze({
  NULL: 0, STR: 3, S4: 7, VECTOR: 16, CLOS: 18, SYMNAME: 19, LIST_NOTAG: 20, LIST_TAG: 21,
  LANG_NOTAG: 22, LANG_TAG: 23, VECTOR_EXP: 26, ARRAY_INT: 32, ARRAY_DOUBLE: 33,
  ARRAY_STR: 34, ARRAY_BOOL: 36, RAW: 37, ARRAY_CPLX: 38, UNKNOWN: 48,
  LARGE: 64, HAS_ATTR: 128, // flags
});

// The status code in the top byte of an error response.
export const ERRORS = Object.freeze({
  0x41: "authentication failed",
  0x42: "the connection to R is broken",
  0x43: "invalid command",
  0x44: "invalid parameter",
  0x45: "R error",
  0x46: "I/O error",
  0x48: "access denied",
  0x49: "unsupported command",
  0x4a: "unknown command",
  0x4b: "message too big for R",
  0x4c: "answer too big",
  0x4d: "R ran out of memory",
  0x50: "session busy",
  0x61: "feature disabled",
  0x62: "feature unavailable",
});

const NA_INT = -2147483648;
const NA_REAL_LOW_WORD = 1954; // R's NA_real_ is a NaN whose low 32 bits are 1954
const NA_STRING_BYTE = 0xff; // a string that is just 0xff is NA_character_
const HEADER_SIZE = 16;
const TWO_24 = 2 ** 24;
const TWO_32 = 2 ** 32;
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

// ---- R values ------------------------------------------------------------------------------

/**
 * An R value as it came from R (or as it is to be sent): `type` is R's typeof() name
 * ("double", "character", "list", ...), `value` the contents (an array for vectors, with null for
 * NA; an array of RValues for lists), `attributes` a plain object of RValues or null.
 */
export class RValue {
  constructor(type, value, attributes = null) {
    this.type = type;
    this.value = value;
    this.attributes = attributes;
  }

  attr(name) {
    return this.attributes?.[name] ?? null;
  }

  /** names(x) as an array of strings, or null. */
  get names() {
    return this.attr("names")?.value ?? null;
  }

  /** class(x) as far as it is set explicitly (an empty array when it is not). */
  get classes() {
    return this.attr("class")?.value ?? [];
  }

  inherits(cls) {
    return this.classes.includes(cls);
  }

  /** x[[name]] for a named list or vector, or undefined. */
  get(name) {
    const i = (this.names ?? []).indexOf(name);
    if (i < 0) return undefined;
    const item = this.value[i];
    return item instanceof RValue ? item : new RValue(this.type, [item]);
  }

  get length() {
    return this.value == null ? 0 : this.value.length;
  }
}

/** A capability (what ocap() made in R): a string key with class "OCref". */
export function isOCref(x) {
  return x instanceof RValue && x.type === "character" && x.inherits("OCref");
}

// ---- encoding ------------------------------------------------------------------------------

/** The 16-byte message header. Lengths above 4 GiB use the high word. */
export function encodeHeader(cmd, length, msgId = 0) {
  const out = new Uint8Array(HEADER_SIZE);
  const view = new DataView(out.buffer);
  view.setUint32(0, cmd >>> 0, true);
  view.setUint32(4, length % TWO_32, true);
  view.setUint32(8, msgId >>> 0, true);
  view.setUint32(12, Math.floor(length / TWO_32), true);
  return out;
}

// A parameter or REXP header: type and a 24-bit length in 4 bytes, or with the LARGE flag a
// 56-bit length in 8 bytes (Rserve switches at 0xfffff0 and reads both).
function typeHeader(type, length, largeFlag) {
  if (length <= 0xfffff0) {
    return u32s((type | ((length & 0xffffff) << 8)) >>> 0);
  }
  return u32s(
    (type | largeFlag | ((length % TWO_24) * 256)) >>> 0,
    Math.floor(length / TWO_24),
  );
}

function u32s(...words) {
  const out = new Uint8Array(words.length * 4);
  const view = new DataView(out.buffer);
  words.forEach((w, i) => view.setUint32(i * 4, w, true));
  return out;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

function padTo4(bytes, fill) {
  const extra = (4 - (bytes.length % 4)) % 4;
  if (!extra) return bytes;
  const out = new Uint8Array(bytes.length + extra).fill(fill);
  out.set(bytes);
  return out;
}

/**
 * A JavaScript value as an RValue: strings become character vectors, numbers doubles,
 * booleans logicals, null NULL, Uint8Array raw; an array of one kind a vector of that kind
 * (null is NA), any other array a list, a plain object a named list. RValues pass unchanged.
 */
export function toR(x) {
  if (x instanceof RValue) return x;
  if (x === null || x === undefined) return new RValue("NULL", null);
  if (typeof x === "string") return new RValue("character", [x]);
  if (typeof x === "number") return new RValue("double", [x]);
  if (typeof x === "boolean") return new RValue("logical", [x]);
  if (x instanceof Uint8Array) return new RValue("raw", x);
  if (Array.isArray(x)) {
    const kinds = new Set(x.filter((v) => v !== null).map((v) => typeof v));
    if (kinds.size === 1 && x.length) {
      const [kind] = kinds;
      const type = { string: "character", number: "double", boolean: "logical" }[kind];
      if (type) return new RValue(type, x);
    }
    return new RValue("list", x.map(toR));
  }
  if (typeof x === "object") {
    const names = Object.keys(x);
    return new RValue("list", names.map((k) => toR(x[k])), {
      names: new RValue("character", names),
    });
  }
  throw new TypeError(`cannot send a ${typeof x} to R`);
}

const XT_OF_TYPE = {
  NULL: XT.NULL, integer: XT.ARRAY_INT, double: XT.ARRAY_DOUBLE, character: XT.ARRAY_STR,
  logical: XT.ARRAY_BOOL, raw: XT.RAW, list: XT.VECTOR, symbol: XT.SYMNAME,
  language: XT.LANG_NOTAG, pairlist: XT.LIST_NOTAG,
};

/** An R value (an RValue or anything toR takes) in QAP's REXP encoding. */
export function encodeSEXP(x) {
  const r = toR(x);
  const xt = XT_OF_TYPE[r.type];
  if (xt === undefined) throw new TypeError(`cannot send an R value of type ${r.type}`);
  const parts = [];
  const attrNames = r.attributes ? Object.keys(r.attributes) : [];
  if (attrNames.length) {
    // Attributes are a tagged pairlist: value, then tag, for each.
    const pairs = attrNames.flatMap((k) => [
      encodeSEXP(r.attributes[k]),
      encodeSEXP(new RValue("symbol", k)),
    ]);
    const body = concat(pairs);
    parts.push(typeHeader(XT.LIST_TAG, body.length, XT.LARGE), body);
  }
  parts.push(encodeBody(r.type, r.value));
  const body = concat(parts);
  return concat([typeHeader(xt | (attrNames.length ? XT.HAS_ATTR : 0), body.length, XT.LARGE), body]);
}

function encodeBody(type, value) {
  switch (type) {
    case "NULL":
      return new Uint8Array(0);
    case "integer": {
      const out = new DataView(new ArrayBuffer(value.length * 4));
      value.forEach((v, i) => out.setInt32(i * 4, v === null ? NA_INT : v, true));
      return new Uint8Array(out.buffer);
    }
    case "double": {
      const out = new DataView(new ArrayBuffer(value.length * 8));
      value.forEach((v, i) => {
        if (v === null) {
          out.setUint32(i * 8, NA_REAL_LOW_WORD, true);
          out.setUint32(i * 8 + 4, 0x7ff00000, true);
        } else {
          out.setFloat64(i * 8, v, true);
        }
      });
      return new Uint8Array(out.buffer);
    }
    case "character": {
      // Each string NUL-terminated; the end padded with 0x01 (which never starts a string).
      const strings = value.map((s) =>
        s === null ? Uint8Array.of(NA_STRING_BYTE, 0) : concat([utf8.encode(s), Uint8Array.of(0)]),
      );
      return padTo4(concat(strings), 1);
    }
    case "logical": {
      const flags = value.map((v) => (v === null ? 2 : v ? 1 : 0));
      return concat([u32s(flags.length), padTo4(Uint8Array.from(flags), 0xff)]);
    }
    case "raw":
      return concat([u32s(value.length), padTo4(value, 0)]);
    case "symbol":
      return padTo4(concat([utf8.encode(value), Uint8Array.of(0)]), 0);
    default: // list, language, pairlist: the elements one after another
      return concat(value.map((v) => encodeSEXP(v)));
  }
}

/** The payload parameter holding one R value. */
export function sexpParam(x) {
  const rexp = encodeSEXP(x);
  return concat([typeHeader(DT.SEXP, rexp.length, DT.LARGE), rexp]);
}

/** A DT_STRING parameter: UTF-8, NUL-terminated, padded to 4 bytes. */
export function stringParam(text) {
  const body = padTo4(concat([utf8.encode(text), Uint8Array.of(0)]), 0);
  return concat([typeHeader(DT.STRING, body.length, DT.LARGE), body]);
}

/** A whole CMD_OCcall message: call the capability `ocap` with `args` (any toR values). */
export function encodeOCcall(ocap, args = [], msgId = 0) {
  if (!isOCref(ocap)) throw new TypeError("the first argument of an OCAP call must be a capability");
  const payload = sexpParam(new RValue("language", [ocap, ...args.map(toR)]));
  return concat([encodeHeader(CMD.OC_CALL, payload.length, msgId), payload]);
}

/** A whole CMD_eval message (classic mode). */
export function encodeEval(text, msgId = 0) {
  const payload = stringParam(text);
  return concat([encodeHeader(CMD.EVAL, payload.length, msgId), payload]);
}

/**
 * The answer to an OOB_MSG: its command with RESP_OK added (RESP_ERR when the app failed to
 * produce one), its message id, and the value. Rserve hands the value to self.oobMessage()
 * either way; the RESP bit tells forward that this is a reply, not a new request.
 */
export function encodeOOBReply(cmd, value, msgId, ok = true) {
  const payload = sexpParam(value);
  const status = ok ? CMD.RESP_OK : CMD.RESP_ERR;
  return concat([encodeHeader((cmd | status) >>> 0, payload.length, msgId), payload]);
}

// ---- decoding ------------------------------------------------------------------------------

export class QAPError extends Error {}

/** An error answer from R (or from forward, when R is gone); `status` is the QAP error code. */
export class RserveError extends Error {
  constructor(status) {
    super(ERRORS[status] ?? `Rserve error 0x${status.toString(16)}`);
    this.name = "RserveError";
    this.status = status;
  }
}

function bytesOf(data) {
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return new Uint8Array(data);
}

function viewOf(bytes) {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

export function decodeHeader(data) {
  const bytes = bytesOf(data);
  if (bytes.length < HEADER_SIZE) throw new QAPError(`a QAP message needs 16 header bytes, got ${bytes.length}`);
  const view = viewOf(bytes);
  return {
    cmd: view.getUint32(0, true),
    length: view.getUint32(4, true) + view.getUint32(12, true) * TWO_32,
    msgId: view.getUint32(8, true),
  };
}

// Reads a parameter or REXP header at `pos`: [type without the LARGE flag, length, body start].
function readTypeHeader(view, pos, largeFlag) {
  if (pos + 4 > view.byteLength) throw new QAPError("truncated type header");
  const word = view.getUint32(pos, true);
  let type = word & 0xff;
  let length = word >>> 8;
  pos += 4;
  if (type & largeFlag) {
    if (pos + 4 > view.byteLength) throw new QAPError("truncated large type header");
    length += view.getUint32(pos, true) * TWO_24;
    type &= ~largeFlag;
    pos += 4;
  }
  return [type, length, pos];
}

/** The parameters of a payload: [{type, body (Uint8Array)}]. */
export function decodeParams(data) {
  const bytes = bytesOf(data);
  const view = viewOf(bytes);
  const out = [];
  let pos = 0;
  while (pos < bytes.length) {
    const [type, length, start] = readTypeHeader(view, pos, DT.LARGE);
    if (start + length > bytes.length) throw new QAPError("parameter runs past the end of the message");
    out.push({ type, body: bytes.subarray(start, start + length) });
    pos = start + length;
  }
  return out;
}

/** One encoded R value (REXP) as an RValue. */
export function decodeSEXP(data) {
  const bytes = bytesOf(data);
  const [value, end] = decodeAt(bytes, 0);
  if (end !== bytes.length) throw new QAPError(`${bytes.length - end} stray bytes after an R value`);
  return value;
}

function decodeAt(bytes, pos) {
  const view = viewOf(bytes);
  let [xt, length, start] = readTypeHeader(view, pos, XT.LARGE);
  const end = start + length;
  if (end > bytes.length) throw new QAPError("R value runs past the end of its container");
  let attributes = null;
  if (xt & XT.HAS_ATTR) {
    xt &= ~XT.HAS_ATTR;
    const [attrs, next] = decodeAt(bytes, start);
    if (!attrs.names) throw new QAPError("attributes are not a tagged list");
    attributes = Object.fromEntries(attrs.names.map((name, i) => [name, attrs.value[i]]));
    start = next;
  }
  const [type, value, tags] = decodeBody(xt, bytes.subarray(start, end));
  if (tags) attributes = { ...attributes, names: new RValue("character", tags) };
  return [new RValue(type, value, attributes), end];
}

function decodeList(body) {
  const items = [];
  let pos = 0;
  while (pos < body.length) {
    const [item, next] = decodeAt(body, pos);
    items.push(item);
    pos = next;
  }
  return items;
}

function cString(body) {
  const nul = body.indexOf(0);
  return fromUtf8.decode(nul < 0 ? body : body.subarray(0, nul));
}

function decodeBody(xt, body) {
  const view = viewOf(body);
  const counted = [XT.ARRAY_BOOL, XT.RAW, XT.UNKNOWN].includes(xt);
  if (counted && body.length < 4) throw new QAPError("R value too short for its type");
  switch (xt) {
    case XT.NULL:
      return ["NULL", null];
    case XT.ARRAY_INT: {
      const out = [];
      for (let i = 0; i + 4 <= body.length; i += 4) {
        const v = view.getInt32(i, true);
        out.push(v === NA_INT ? null : v);
      }
      return ["integer", out];
    }
    case XT.ARRAY_DOUBLE: {
      const out = [];
      for (let i = 0; i + 8 <= body.length; i += 8) {
        const v = view.getFloat64(i, true);
        out.push(Number.isNaN(v) && view.getUint32(i, true) === NA_REAL_LOW_WORD ? null : v);
      }
      return ["double", out];
    }
    case XT.ARRAY_CPLX: {
      const out = [];
      for (let i = 0; i + 16 <= body.length; i += 16) {
        out.push({ re: view.getFloat64(i, true), im: view.getFloat64(i + 8, true) });
      }
      return ["complex", out];
    }
    case XT.ARRAY_STR: {
      const out = [];
      let start = 0;
      for (let i = 0; i < body.length; i++) {
        if (body[i] !== 0) continue;
        let s = body.subarray(start, i);
        if (s.length === 1 && s[0] === NA_STRING_BYTE) {
          out.push(null);
        } else {
          // A real string starting with 0xff has it doubled, to tell it from NA.
          if (s[0] === NA_STRING_BYTE) s = s.subarray(1);
          out.push(fromUtf8.decode(s));
        }
        start = i + 1;
      }
      return ["character", out]; // what follows the last NUL is 0x01 padding
    }
    case XT.ARRAY_BOOL: {
      const n = view.getUint32(0, true);
      return ["logical", Array.from(body.subarray(4, 4 + n), (b) => (b === 0 ? false : b === 1 ? true : null))];
    }
    case XT.RAW: {
      const n = view.getUint32(0, true);
      return ["raw", body.slice(4, 4 + n)];
    }
    case XT.STR:
      return ["char", cString(body)];
    case XT.SYMNAME:
      return ["symbol", cString(body)];
    case XT.VECTOR:
      return ["list", decodeList(body)];
    case XT.VECTOR_EXP:
      return ["expression", decodeList(body)];
    case XT.LIST_NOTAG:
      return ["pairlist", decodeList(body)];
    case XT.LANG_NOTAG:
      return ["language", decodeList(body)];
    case XT.LIST_TAG:
    case XT.LANG_TAG: {
      // value, tag, value, tag...: kept as the values, with the tags as their names.
      const flat = decodeList(body);
      const values = flat.filter((_, i) => i % 2 === 0);
      const tags = flat.filter((_, i) => i % 2 === 1).map((t) => (t.type === "NULL" ? "" : t.value));
      return [xt === XT.LIST_TAG ? "pairlist" : "language", values, tags];
    }
    case XT.CLOS:
      return ["closure", decodeList(body)]; // formals and body
    case XT.S4:
      return ["S4", null];
    case XT.UNKNOWN:
      return ["unknown", view.getInt32(0, true)]; // R's SEXPTYPE number
    default:
      return ["unknown", xt];
  }
}

/** The R value in a message payload, or undefined when there is none. */
export function payloadValue(payload) {
  const sexp = decodeParams(payload).find((p) => p.type === DT.SEXP);
  return sexp ? decodeSEXP(sexp.body) : undefined;
}

/**
 * One message from R, classified:
 *   {kind: "greeting", value}        OCAP greeting (value: the capabilities)
 *   {kind: "response", msgId, value} answer to a request
 *   {kind: "error", msgId, status}   error answer (status: QAP error code)
 *   {kind: "oob-send", code, value}  one-way OOB message (code: the 12 application bits)
 *   {kind: "oob-msg", cmd, msgId, code, value}  OOB message that wants an answer
 * An OOB_SEND without payload is forward's notice that the session is going down: value null.
 */
export function decodeMessage(data) {
  const bytes = bytesOf(data);
  const { cmd, length, msgId } = decodeHeader(bytes);
  if (HEADER_SIZE + length !== bytes.length) {
    throw new QAPError(`header says ${length} payload bytes, message has ${bytes.length - HEADER_SIZE}`);
  }
  const payload = bytes.subarray(HEADER_SIZE);
  const value = () => (length ? payloadValue(payload) ?? null : null);
  if (cmd === CMD.OC_INIT) return { kind: "greeting", value: value() };
  if ((cmd & 0xff0000) === CMD_RESP) {
    if ((cmd & 0xffff) === (CMD.RESP_OK & 0xffff)) return { kind: "response", msgId, value: value() };
    return { kind: "error", msgId, status: (cmd >>> 24) & 0x7f };
  }
  if ((cmd & 0xff0000) === CMD_OOB) {
    const code = cmd & 0xfff;
    if ((cmd & 0xfffff000) === CMD.OOB_MSG) return { kind: "oob-msg", cmd, msgId, code, value: value() };
    return { kind: "oob-send", code, value: value() };
  }
  throw new QAPError(`unexpected QAP command 0x${cmd.toString(16)}`);
}

/** forward's heartbeat (an OOB send of list("idle") on quiet sessions) is not meant for apps. */
export function isHeartbeat(message) {
  const v = message.value;
  return (
    message.kind === "oob-send" && v instanceof RValue && v.type === "list" && v.length === 1 &&
    v.value[0].type === "character" && v.value[0].value.length === 1 && v.value[0].value[0] === "idle"
  );
}

// ---- a session -----------------------------------------------------------------------------

/**
 * Opens a WebSocket to `url` and waits for R's greeting.
 * Options: onOOB(value, code) for OOB sends; onOOBMessage(value, code) for OOB messages, whose
 * (possibly async) return value is the answer R gets; onClose({code, reason}) when the session
 * has ended; onReconnecting({code}) when the connection broke and is being resumed, and
 * onReconnected() when it has been (pending calls carry on); resume (default true: the
 * WebSocket is a ResumableSocket; false: the global WebSocket); WebSocket (an implementation to
 * use instead, as is: a WebSocket, or a ResumableSocket class over a stand-in).
 */
export function connect(url, options = {}) {
  const WS = options.WebSocket ?? (options.resume === false ? globalThis.WebSocket : ResumableSocket);
  return new Promise((resolve, reject) => {
    const ws = new WS(url);
    ws.binaryType = "arraybuffer";
    const session = new Session(ws, options);
    session._onGreeting = (err) => (err ? reject(err) : resolve(session));
    ws.onmessage = (event) => session._receive(event.data);
    ws.onclose = (event) => session._closed(event.code, event.reason);
    ws.onerror = () => {}; // followed by a close event, which carries the detail
    ws.onreconnecting = (event) => {
      session.reconnecting = true;
      options.onReconnecting?.({ code: event.code, reason: event.reason });
    };
    ws.onreconnected = () => {
      session.reconnecting = false;
      options.onReconnected?.();
    };
  });
}

export class Session {
  constructor(ws, options) {
    this.ws = ws;
    this.options = options;
    this.mode = null; // "ocap" or "qap", from the greeting
    this.capabilities = null; // OCAP mode: what oc.init() returned
    this.idString = null; // classic mode: the 32-byte ID string
    this.closed = false;
    this.reconnecting = false; // the connection broke and is being resumed
    this._pending = null; // {resolve, reject} of the request waiting for its answer
    this._queue = Promise.resolve();
    this._nextId = 1;
  }

  /** OCAP mode: calls capability `ocap` with `args`; resolves with the RValue R returned. */
  call(ocap, ...args) {
    return this._request((msgId) => encodeOCcall(ocap, args, msgId));
  }

  /** Classic mode: evaluates `text` in R. */
  eval(text) {
    return this._request((msgId) => encodeEval(text, msgId));
  }

  close(code = 1000, reason = "") {
    this.ws.close(code, reason);
  }

  _request(encode) {
    // One request on the wire at a time: the next waits until this one has its answer.
    const result = this._queue.then(
      () =>
        new Promise((resolve, reject) => {
          if (this.closed) throw new Error("the session is closed");
          this._pending = { resolve, reject };
          this.ws.send(encode(this._nextId++));
        }),
    );
    this._queue = result.catch(() => {});
    return result;
  }

  _receive(data) {
    try {
      if (typeof data === "string") {
        this.mode = "qap";
        this.idString = data;
        this._greeted();
        return;
      }
      const message = decodeMessage(data);
      switch (message.kind) {
        case "greeting":
          this.mode = "ocap";
          this.capabilities = message.value;
          this._greeted();
          break;
        case "response":
          this._settle((p) => p.resolve(message.value));
          break;
        case "error":
          this._settle((p) => p.reject(new RserveError(message.status)));
          break;
        case "oob-send":
          if (!isHeartbeat(message)) this.options.onOOB?.(message.value, message.code);
          break;
        case "oob-msg":
          this._answerOOB(message);
          break;
      }
    } catch (err) {
      // A message this client cannot read: nothing after it can be trusted either.
      this._fail(err);
      this.close(1002, "unreadable QAP message");
    }
  }

  async _answerOOB(message) {
    let answer = null;
    let ok = true;
    try {
      const handler = this.options.onOOBMessage;
      answer = handler ? await handler(message.value, message.code) : null;
    } catch (err) {
      answer = `error: ${err.message ?? err}`;
      ok = false;
    }
    // Sent at once, not queued: R is waiting for it inside the call that is still pending.
    if (!this.closed) this.ws.send(encodeOOBReply(message.cmd, answer, message.msgId, ok));
  }

  _greeted() {
    this._onGreeting?.(null);
    this._onGreeting = null;
  }

  _settle(fn) {
    const pending = this._pending;
    this._pending = null;
    if (pending) fn(pending);
  }

  _fail(err) {
    this._onGreeting?.(err);
    this._onGreeting = null;
    this._settle((p) => p.reject(err));
  }

  _closed(code, reason) {
    this.closed = true;
    const why = reason ? `${code}: ${reason}` : `${code}`;
    this._fail(new Error(`the connection closed (${why})`));
    this.options.onClose?.({ code, reason });
  }
}
