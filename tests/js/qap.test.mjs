// Unit tests of the demo's QAP client (demo/www/qap.js), run with Node's built-in test runner
// (tests/test_js_client.py runs them as part of pytest). The byte literals are written from
// Rserve's src/Rsrv.h and qap_encode.c, not produced by the code under test; the live tests in
// live.test.mjs check the same code against a real Rserve.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  CMD,
  RValue,
  RserveError,
  connect,
  decodeHeader,
  decodeMessage,
  decodeSEXP,
  encodeEval,
  encodeHeader,
  encodeOCcall,
  encodeOOBReply,
  encodeSEXP,
  isHeartbeat,
  toR,
} from "../../demo/www/qap.js";

const bytes = (...xs) => Uint8Array.from(xs);
const u32 = (n) => [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff];
const cat = (...parts) => Uint8Array.from(parts.flatMap((p) => Array.from(p)));
const header = (cmd, len, id = 0, hi = 0) => bytes(...u32(cmd), ...u32(len), ...u32(id), ...u32(hi));
// An OCref as Rserve sends it: XT_ARRAY_STR|XT_HAS_ATTR, attributes list(class = "OCref").
const OCREF = bytes(
  0xa2, 0x24, 0, 0, // ARRAY_STR|HAS_ATTR, 36 bytes
  0x15, 0x18, 0, 0, //   LIST_TAG, 24 bytes
  0x22, 0x08, 0, 0, ...Buffer.from("OCref\0\x01\x01"), // ARRAY_STR "OCref"
  0x13, 0x08, 0, 0, ...Buffer.from("class\0\0\0"), //     SYMNAME class
  ...Buffer.from("key1\0\x01\x01\x01"), // the key
);

describe("encoding", () => {
  test("header: little-endian words, 64-bit length split into low and high", () => {
    assert.deepEqual(encodeHeader(CMD.OC_CALL, 20, 7), header(0x0f, 20, 7));
    assert.deepEqual(encodeHeader(CMD.OC_CALL, 2 ** 32 + 5, 1), header(0x0f, 5, 1, 1));
  });

  test("strings: NUL-terminated, padded with 0x01 to 4 bytes; NA is 0xff", () => {
    assert.deepEqual(encodeSEXP("ab"), bytes(0x22, 4, 0, 0, 0x61, 0x62, 0, 1));
    assert.deepEqual(encodeSEXP(["a", null]), bytes(0x22, 4, 0, 0, 0x61, 0, 0xff, 0));
    assert.deepEqual(encodeSEXP("é"), bytes(0x22, 4, 0, 0, 0xc3, 0xa9, 0, 1));
  });

  test("numbers are doubles; null in a vector is NA_real_", () => {
    assert.deepEqual(encodeSEXP(1), bytes(0x21, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f));
    const na = encodeSEXP(new RValue("double", [null]));
    assert.deepEqual(na, bytes(0x21, 8, 0, 0, 0xa2, 0x07, 0, 0, 0, 0, 0xf0, 0x7f));
  });

  test("logicals: a count, then one byte each (2 = NA), padded with 0xff", () => {
    assert.deepEqual(encodeSEXP([true, false, null]), bytes(0x24, 8, 0, 0, 3, 0, 0, 0, 1, 0, 2, 0xff));
  });

  test("NULL, raw, integers", () => {
    assert.deepEqual(encodeSEXP(null), bytes(0, 0, 0, 0));
    assert.deepEqual(encodeSEXP(bytes(9)), bytes(0x25, 8, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0));
    assert.deepEqual(encodeSEXP(new RValue("integer", [1, null])), bytes(0x20, 8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x80));
  });

  test("an object is a named list: the names are a tagged attribute list", () => {
    const got = decodeSEXP(encodeSEXP({ a: 1, b: "x" }));
    assert.equal(got.type, "list");
    assert.deepEqual(got.names, ["a", "b"]);
    assert.deepEqual(got.get("a").value, [1]);
    assert.deepEqual(got.get("b").value, ["x"]);
  });

  test("OCcall: DT_SEXP holding a call whose function is the capability", () => {
    const ocap = decodeSEXP(OCREF);
    const msg = encodeOCcall(ocap, ["u"], 3);
    const call = cat(bytes(0x16, OCREF.length + 8, 0, 0), OCREF, bytes(0x22, 4, 0, 0, 0x75, 0, 1, 1));
    const payload = cat(bytes(0x0a, call.length, 0, 0), call);
    assert.deepEqual(msg, cat(header(0x0f, payload.length, 3), payload));
  });

  test("OCcall refuses anything that is not a capability", () => {
    assert.throws(() => encodeOCcall(toR("key1"), []), /capability/);
  });

  test("eval (classic mode) sends a DT_STRING", () => {
    assert.deepEqual(encodeEval("1+1", 2), cat(header(3, 8, 2), bytes(4, 4, 0, 0, 0x31, 0x2b, 0x31, 0)));
  });

  test("an OOB reply is the command it answers plus RESP_OK (or RESP_ERR), same message id", () => {
    const msg = encodeOOBReply(CMD.OOB_MSG | 2, "ok", 9);
    assert.deepEqual(msg, cat(header(0x32003, 12, 9), bytes(0x0a, 8, 0, 0, 0x22, 4, 0, 0, 0x6f, 0x6b, 0, 1)));
    assert.deepEqual(encodeOOBReply(CMD.OOB_MSG | 2, "x", 9, false).subarray(0, 4), bytes(...u32(0x32002)));
  });

  test("values over 0xfffff0 bytes use the large (8-byte) type header", () => {
    const big = new Uint8Array(0x1000000);
    const enc = encodeSEXP(big);
    // XT_RAW|XT_LARGE, low 24 bits of 0x1000004, then the rest.
    assert.deepEqual(enc.subarray(0, 8), bytes(0x65, 4, 0, 0, 1, 0, 0, 0));
    assert.equal(decodeSEXP(enc).value.length, 0x1000000);
  });
});

describe("decoding", () => {
  test("header", () => {
    assert.deepEqual(decodeHeader(header(0x10001, 8, 4, 2)), { cmd: 0x10001, length: 2 * 2 ** 32 + 8, msgId: 4 });
    assert.throws(() => decodeHeader(bytes(1, 2, 3)), /16 header bytes/);
  });

  test("a capability keeps its class and encodes back to the same bytes", () => {
    const ocap = decodeSEXP(OCREF);
    assert.deepEqual(ocap.value, ["key1"]);
    assert.deepEqual(ocap.classes, ["OCref"]);
    assert.deepEqual(encodeSEXP(ocap), OCREF);
  });

  test("doubles: NA_real_ is null, other NaNs stay NaN", () => {
    const v = decodeSEXP(bytes(0x21, 24, 0, 0,
      0, 0, 0, 0, 0, 0, 0, 0x40, // 2
      0xa2, 0x07, 0, 0, 0, 0, 0xf8, 0x7f, // NA after arithmetic (quiet bit set)
      0, 0, 0, 0, 0, 0, 0xf8, 0x7f)); // NaN
    assert.equal(v.type, "double");
    assert.equal(v.value[0], 2);
    assert.equal(v.value[1], null);
    assert.ok(Number.isNaN(v.value[2]));
  });

  test("strings: NA, a doubled leading 0xff, UTF-8, padding", () => {
    const v = decodeSEXP(bytes(0x22, 12, 0, 0, 0xff, 0, 0xff, 0xff, 0x41, 0, 0xc3, 0xa9, 0, 1, 1, 1));
    assert.deepEqual(v.value, [null, "\ufffdA", "é"]);
  });

  test("integers with NA, logicals with NA", () => {
    assert.deepEqual(decodeSEXP(bytes(0x20, 8, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0x80)).value, [5, null]);
    assert.deepEqual(decodeSEXP(bytes(0x24, 8, 0, 0, 3, 0, 0, 0, 1, 0, 2, 0xff)).value, [true, false, null]);
  });

  test("a list with names: its elements and names attribute", () => {
    const x = decodeSEXP(encodeSEXP({ a: [1, 2], b: [true] }));
    assert.deepEqual(x.get("a").value, [1, 2]);
    assert.deepEqual(x.get("b").value, [true]);
    assert.equal(x.get("zz"), undefined);
  });

  test("a tagged pairlist gets its tags as names", () => {
    const tagged = bytes(0x15, 16, 0, 0, 0x22, 4, 0, 0, 0x78, 0, 1, 1, 0x13, 4, 0, 0, 0x6e, 0, 0, 0);
    const x = decodeSEXP(tagged);
    assert.equal(x.type, "pairlist");
    assert.deepEqual(x.names, ["n"]);
    assert.deepEqual(x.get("n").value, ["x"]);
  });

  test("types it does not know stay readable instead of failing", () => {
    assert.deepEqual(decodeSEXP(bytes(0x30, 4, 0, 0, 4, 0, 0, 0)), new RValue("unknown", 4));
  });

  test("malformed values are errors, not garbage", () => {
    assert.throws(() => decodeSEXP(bytes(0x22, 8, 0, 0, 0x41, 0)), /past the end/);
    assert.throws(() => decodeSEXP(bytes(0x22, 0, 0, 0, 1)), /stray/);
    assert.throws(() => decodeSEXP(bytes(0x22, 0)), /truncated/);
    assert.throws(() => decodeSEXP(bytes(0x25, 0, 0, 0)), /too short/);
    // HAS_ATTR followed by something that is not a tagged list
    assert.throws(() => decodeSEXP(bytes(0xa2, 8, 0, 0, 0x22, 0, 0, 0, 0x41, 0, 1, 1)), /tagged/);
  });
});

describe("messages", () => {
  const sexpMsg = (cmd, rexp, id = 0) => cat(header(cmd, rexp.length + 4, id), bytes(0x0a, rexp.length, 0, 0), rexp);

  test("the OCAP greeting carries the capabilities", () => {
    const m = decodeMessage(sexpMsg(CMD.OC_INIT, OCREF));
    assert.equal(m.kind, "greeting");
    assert.deepEqual(m.value.classes, ["OCref"]);
  });

  test("responses, errors and their status codes", () => {
    assert.deepEqual(decodeMessage(sexpMsg(CMD.RESP_OK, encodeSEXP(2), 4)), { kind: "response", msgId: 4, value: toR(2) });
    // forward's answer when R is gone: RESP_ERR with ERR_conn_broken (0x42) in the top byte.
    const broken = decodeMessage(header(0x42010002, 0, 6));
    assert.deepEqual(broken, { kind: "error", msgId: 6, status: 0x42 });
    assert.match(new RserveError(0x42).message, /broken/);
  });

  test("OOB sends and messages, with the application code in the low 12 bits", () => {
    const send = decodeMessage(sexpMsg(CMD.OOB_SEND | 3, encodeSEXP(["console.out", "hi"])));
    assert.deepEqual(send, { kind: "oob-send", code: 3, value: toR(["console.out", "hi"]) });
    const msg = decodeMessage(sexpMsg(CMD.OOB_MSG | 1, encodeSEXP("?"), 8));
    assert.equal(msg.kind, "oob-msg");
    assert.equal(msg.code, 1);
    assert.equal(msg.msgId, 8);
    // forward's shutdown notice: a bare OOB_SEND header.
    assert.deepEqual(decodeMessage(header(CMD.OOB_SEND, 0)), { kind: "oob-send", code: 0, value: null });
  });

  test("forward's idle heartbeat is recognised as such", () => {
    // The exact bytes of the idle heartbeat forward sends (forward/qap.py: IDLE_MESSAGE).
    const idle = cat(header(CMD.OOB_SEND, 20), bytes(...u32(10 | (16 << 8)), ...u32(16 | (12 << 8)), ...u32(34 | (8 << 8))), Buffer.from("idle\0\x01\x01\x01"));
    assert.ok(isHeartbeat(decodeMessage(idle)));
    assert.ok(!isHeartbeat(decodeMessage(sexpMsg(CMD.OOB_SEND, encodeSEXP([["idle"], "x"])))));
  });

  test("a length that does not match the message is an error", () => {
    assert.throws(() => decodeMessage(header(CMD.RESP_OK, 4)), /header says 4/);
  });
});

// A stand-in WebSocket that records what is sent and lets the test play R's part.
class FakeSocket {
  static last = null;
  constructor(url) {
    this.url = url;
    this.sent = [];
    FakeSocket.last = this;
  }
  send(data) {
    this.sent.push(data);
  }
  close(code, reason) {
    this.onclose?.({ code, reason });
  }
  deliver(data) {
    this.onmessage({ data: data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) });
  }
}

describe("session", () => {
  const sexpMsg = (cmd, rexp, id = 0) => cat(header(cmd, rexp.length + 4, id), bytes(0x0a, rexp.length, 0, 0), rexp);

  test("greeting, queued calls, OOB in between, answers in order", async () => {
    const oob = [];
    const pending = connect("ws://x/", { WebSocket: FakeSocket, onOOB: (v, code) => oob.push([v.value, code]) });
    const ws = FakeSocket.last;
    assert.equal(ws.binaryType, "arraybuffer");
    ws.deliver(sexpMsg(CMD.OC_INIT, OCREF));
    const session = await pending;
    assert.equal(session.mode, "ocap");

    const first = session.call(session.capabilities, "a");
    const second = session.call(session.capabilities, "b");
    await new Promise(setImmediate);
    assert.equal(ws.sent.length, 1, "the second call waits for the first answer");
    ws.deliver(sexpMsg(CMD.OOB_SEND, encodeSEXP("out")));
    ws.deliver(sexpMsg(CMD.RESP_OK, encodeSEXP(1), 1));
    assert.deepEqual((await first).value, [1]);
    await new Promise(setImmediate);
    assert.equal(ws.sent.length, 2);
    ws.deliver(header(0x42010002, 0, 2));
    await assert.rejects(second, (e) => e instanceof RserveError && e.status === 0x42);
    assert.deepEqual(oob, [[["out"], 0]]);
  });

  test("an OOB message is answered at once with the handler's value", async () => {
    const pending = connect("ws://x/", { WebSocket: FakeSocket, onOOBMessage: async (v) => `re: ${v.value[0]}` });
    const ws = FakeSocket.last;
    ws.deliver(sexpMsg(CMD.OC_INIT, OCREF));
    const session = await pending;
    const call = session.call(session.capabilities);
    await new Promise(setImmediate);
    ws.deliver(sexpMsg(CMD.OOB_MSG | 2, encodeSEXP("q"), 77));
    await new Promise(setImmediate);
    assert.deepEqual(new Uint8Array(ws.sent[1]), encodeOOBReply(CMD.OOB_MSG | 2, "re: q", 77));
    assert.equal(decodeHeader(ws.sent[1]).cmd, 0x32003);
    ws.deliver(sexpMsg(CMD.RESP_OK, encodeSEXP(null), 1));
    assert.equal((await call).type, "NULL");
  });

  test("classic mode: the text greeting, then eval", async () => {
    const pending = connect("ws://x/", { WebSocket: FakeSocket });
    const ws = FakeSocket.last;
    ws.onmessage({ data: "Rsrv0103QAP1\r\n\r\n--------------\r\n" });
    const session = await pending;
    assert.equal(session.mode, "qap");
    const answer = session.eval("1");
    await new Promise(setImmediate);
    assert.deepEqual(new Uint8Array(ws.sent[0]), encodeEval("1", 1));
    ws.deliver(sexpMsg(CMD.RESP_OK, encodeSEXP(1), 1));
    assert.deepEqual((await answer).value, [1]);
  });

  test("a close rejects the pending call and later ones", async () => {
    const closes = [];
    const pending = connect("ws://x/", { WebSocket: FakeSocket, onClose: (e) => closes.push(e.code) });
    const ws = FakeSocket.last;
    ws.deliver(sexpMsg(CMD.OC_INIT, OCREF));
    const session = await pending;
    const call = session.call(session.capabilities);
    await new Promise(setImmediate);
    ws.close(1011, "Rserve is not running");
    await assert.rejects(call, /1011: Rserve is not running/);
    await assert.rejects(session.call(session.capabilities), /closed/);
    assert.deepEqual(closes, [1011]);
  });

  test("a close before the greeting rejects connect", async () => {
    const pending = connect("ws://x/", { WebSocket: FakeSocket });
    FakeSocket.last.close(1006, "");
    await assert.rejects(pending, /closed \(1006\)/);
  });

  test("an unreadable message fails the pending call and closes with 1002", async () => {
    const pending = connect("ws://x/", { WebSocket: FakeSocket });
    const ws = FakeSocket.last;
    ws.deliver(sexpMsg(CMD.OC_INIT, OCREF));
    const session = await pending;
    const call = session.call(session.capabilities);
    await new Promise(setImmediate);
    ws.deliver(header(CMD.RESP_OK, 99));
    await assert.rejects(call, /header says 99/);
    assert.equal(session.closed, true);
  });
});
