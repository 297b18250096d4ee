// Unit tests of ResumableSocket (demo/www/resume.js), the resume protocol's client side
// (docs/resume.md), against a stand-in WebSocket that lets each test play forward's part:
// choose the subprotocol, send control and data messages, cut the connection.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { CMD, RValue, connect, encodeSEXP } from "../../demo/www/qap.js";
import { CLOSE, RESUME_PROTOCOL, ResumableSocket } from "../../demo/www/resume.js";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const u32 = (n) => [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff];
const cat = (...parts) => Uint8Array.from(parts.flatMap((p) => Array.from(p)));
const header = (cmd, len, id = 0, hi = 0) => Uint8Array.from([...u32(cmd), ...u32(len), ...u32(id), ...u32(hi)]);
const qapMessage = (cmd, payload, id = 0) => cat(header(cmd, payload.length, id), payload);
const fill = (n, seed) => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);
const GREETING = "Rsrv0103QAP1\r\n\r\n--------------\r\n";
const TICKET1 = "a".repeat(16) + "1".repeat(32);
const TICKET2 = "b".repeat(16) + "2".repeat(32);

/** A WebSocket stand-in; every test gets its own class, whose `all` lists its sockets. */
function fakeSocketClass() {
  return class FakeWebSocket {
    static all = [];
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.protocol = "";
      this.extensions = "";
      this.bufferedAmount = 0;
      this.binaryType = "blob";
      this.sent = [];
      this.closedWith = null;
      FakeWebSocket.all.push(this);
    }
    send(data) {
      if (this.readyState !== 1) throw new Error(`send on a socket in state ${this.readyState}`);
      this.sent.push(data);
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      if (this.readyState >= 2) return;
      const wasOpen = this.readyState === 1;
      this.readyState = 2;
      queueMicrotask(() => {
        this.readyState = 3;
        if (!wasOpen) this.onerror?.({});
        this.onclose?.({ code: wasOpen ? (code ?? 1005) : 1006, reason: reason ?? "", wasClean: wasOpen });
      });
    }
    // forward's side
    accept(protocol = RESUME_PROTOCOL) {
      this.protocol = protocol;
      this.readyState = 1;
      this.onopen?.({});
    }
    text(value) {
      this.onmessage?.({ data: typeof value === "string" ? value : JSON.stringify(value) });
    }
    binary(bytes) {
      this.onmessage?.({ data: Uint8Array.from(bytes).buffer });
    }
    cut(code = 1006, reason = "") {
      this.readyState = 3;
      if (code === 1006) this.onerror?.({});
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }
    /** What the client wrote on this connection: its data bytes and its control messages. */
    get data() {
      return cat(...this.sent.filter((m) => typeof m !== "string").map((m) => new Uint8Array(m)));
    }
    get controls() {
      return this.sent.filter((m) => typeof m === "string").map((m) => JSON.parse(m));
    }
  };
}

/** A ResumableSocket over a fresh fake, with short timers; its events are recorded. */
function open(options = {}, protocols = undefined) {
  const WS = fakeSocketClass();
  const ws = new ResumableSocket("wss://r.example/", protocols, {
    WebSocket: WS,
    minDelay: 2,
    maxDelay: 20,
    connectTimeout: 300,
    random: () => 1,
    ...options,
  });
  ws.binaryType = "arraybuffer";
  const events = [];
  ws.onopen = () => events.push(["open"]);
  ws.onmessage = (e) => events.push(["message", e.data]);
  ws.onerror = () => events.push(["error"]);
  ws.onclose = (e) => events.push(["close", e.code, e.reason]);
  ws.onreconnecting = () => events.push(["reconnecting"]);
  ws.onreconnected = () => events.push(["reconnected"]);
  const messages = () => events.filter((e) => e[0] === "message").map((e) => e[1]);
  return { ws, WS, events, messages, server: () => WS.all.at(-1) };
}

/** The first connection, resumable: forward chose rserve-resume.v1 and said `open`. */
function openResumable(options = {}, { window = 1 << 20, grace = 5 } = {}) {
  const t = open(options);
  t.server().accept();
  t.server().text({ t: "open", ticket: TICKET1, window, grace });
  return t;
}

async function waitFor(predicate, what, ms = 2000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(1);
  }
}

/** Cuts the connection and waits for the client's next attempt (resolved with its socket). */
async function cutAndAwaitAttempt(t, code = 1006) {
  const before = t.WS.all.length;
  t.server().cut(code);
  await waitFor(() => t.WS.all.length > before, "a reconnect attempt");
  return t.server();
}

const asBytes = (messages) => messages.map((m) => (typeof m === "string" ? m : Array.from(new Uint8Array(m))));

// R's stream in the two modes, and the messages a plain WebSocket would have delivered for it.
const OCAP_MESSAGES = [
  qapMessage(CMD.OC_INIT, fill(24, 1)),
  qapMessage(CMD.OOB_SEND, fill(7, 2)),
  qapMessage(CMD.RESP_OK, new Uint8Array(0), 1),
  qapMessage(CMD.RESP_OK, fill(40, 3), 2),
];
const CLASSIC_MESSAGES = [GREETING, qapMessage(CMD.RESP_OK, fill(12, 4), 1), qapMessage(0x42010002, new Uint8Array(0), 2)];
const streamOf = (messages) => cat(...messages.map((m) => (typeof m === "string" ? new TextEncoder().encode(m) : m)));

// The delays are read from the timers the socket asks for, not from the clock: a loaded
// machine stretches every timer, and the test must not depend on how much.
function recordDelays() {
  const real = globalThis.setTimeout;
  const delays = [];
  globalThis.setTimeout = (fn, ms, ...args) => {
    delays.push(ms ?? 0);
    return real(fn, ms, ...args);
  };
  return { delays, restore() { globalThis.setTimeout = real; } };
}


describe("pass-through", () => {
  test("the server does not choose resume: a plain WebSocket, messages as they come", async () => {
    const t = open({}, ["app.v1"]);
    assert.deepEqual(t.server().protocols, ["app.v1", RESUME_PROTOCOL]);
    assert.equal(t.ws.readyState, ResumableSocket.CONNECTING);
    assert.throws(() => t.ws.send(new Uint8Array(1)), /not open/);
    t.server().accept("app.v1");
    assert.equal(t.ws.readyState, ResumableSocket.OPEN);
    assert.equal(t.ws.protocol, "app.v1");
    assert.equal(t.ws.resumable, false);
    // Not reassembled, not interpreted: a half message stays half, JSON text stays text.
    t.server().binary([1, 2, 3]);
    t.server().text('{"t":"open","ticket":"x"}');
    const buffer = new ArrayBuffer(4);
    t.ws.send(buffer);
    t.ws.send("text");
    assert.equal(t.server().sent[0], buffer, "sent as given");
    assert.equal(t.server().sent[1], "text");
    t.server().cut(1011, "Rserve is not running");
    await sleep(10);
    assert.deepEqual(asBytes(t.messages()), [[1, 2, 3], '{"t":"open","ticket":"x"}']);
    assert.deepEqual(t.events.at(-1), ["close", 1011, "Rserve is not running"]);
    assert.equal(t.WS.all.length, 1, "no reconnect");
    assert.equal(t.ws.readyState, ResumableSocket.CLOSED);
  });

  test("a server that echoes the offer without knowing it (first message not `open`): plain", () => {
    for (const first of ["ocap", "classic"]) {
      const t = open();
      t.server().accept(RESUME_PROTOCOL); // forward before resume answers the first protocol offered
      if (first === "ocap") t.server().binary(OCAP_MESSAGES[0]);
      else t.server().text(GREETING);
      t.server().binary([9, 9]);
      assert.equal(t.ws.resumable, false);
      const expected = first === "ocap" ? Array.from(OCAP_MESSAGES[0]) : GREETING;
      assert.deepEqual(asBytes(t.messages()), [expected, [9, 9]]);
    }
  });

  test("close() is passed on with its code", async () => {
    const t = open();
    t.server().accept("");
    t.ws.close(4000, "bye");
    assert.equal(t.ws.readyState, ResumableSocket.CLOSING);
    assert.deepEqual(t.server().closedWith, { code: 4000, reason: "bye" });
    await sleep(1);
    assert.deepEqual(t.events.at(-1), ["close", 4000, "bye"]);
    assert.throws(() => t.ws.close(1001), /1001/, "as WebSocket: 1001 is not the app's to send");
  });
});

describe("restoring QAP messages", () => {
  for (const [mode, messages] of [["OCAP", OCAP_MESSAGES], ["classic", CLASSIC_MESSAGES]]) {
    const stream = streamOf(messages);
    const expected = asBytes(messages);

    test(`${mode}: split in two at every offset, the same messages as without resume`, () => {
      for (let i = 0; i <= stream.length; i++) {
        const t = openResumable();
        t.server().binary(stream.subarray(0, i));
        t.server().binary(stream.subarray(i));
        assert.deepEqual(asBytes(t.messages()), expected, `split at ${i}`);
      }
    });

    test(`${mode}: one byte per WebSocket message`, () => {
      const t = openResumable();
      for (const b of stream) t.server().binary([b]);
      assert.deepEqual(asBytes(t.messages()), expected);
      for (const m of t.messages().slice(mode === "classic" ? 1 : 0)) {
        assert.ok(m instanceof ArrayBuffer, "binary messages are ArrayBuffers of their own size");
      }
    });

    test(`${mode}: cut at every offset, resumed, every message exactly once`, async () => {
      for (let i = 0; i <= stream.length; i++) {
        const t = openResumable();
        t.server().binary(stream.subarray(0, i));
        const attempt = await cutAndAwaitAttempt(t);
        assert.equal(attempt.protocols.at(-1), `rserve-ticket.${TICKET1}.${i}`, "RECEIVED is what arrived");
        attempt.accept();
        attempt.text({ t: "resumed", ticket: TICKET2, window: 1 << 20, grace: 5, received: 0 });
        attempt.binary(stream.subarray(i)); // forward replays from RECEIVED
        assert.deepEqual(asBytes(t.messages()), expected, `cut at ${i}`);
        t.ws.close();
      }
    });
  }

  test("the classic greeting is text; an OCAP greeting is a binary QAP message", () => {
    const classic = openResumable();
    classic.server().binary(streamOf(CLASSIC_MESSAGES));
    assert.equal(typeof classic.messages()[0], "string");
    assert.equal(classic.messages()[0], GREETING);
    const ocap = openResumable();
    ocap.server().binary(streamOf(OCAP_MESSAGES));
    assert.ok(ocap.messages()[0] instanceof ArrayBuffer);
    assert.equal(new TextDecoder().decode(new Uint8Array(ocap.messages()[0], 0, 4)), "RsOC");
  });

  test("binaryType blob delivers Blobs with the same bytes", async () => {
    const t = openResumable();
    t.ws.binaryType = "blob";
    t.server().binary(OCAP_MESSAGES[0]);
    const [blob] = t.messages();
    assert.ok(blob instanceof Blob);
    assert.deepEqual(new Uint8Array(await blob.arrayBuffer()), OCAP_MESSAGES[0]);
  });

  test("many messages, random sizes, random splits, several cuts: all exactly once", async () => {
    let seed = 42;
    const random = (n) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) % n);
    const messages = Array.from({ length: 60 }, (_, i) => qapMessage(CMD.RESP_OK, fill(random(3000), i), i));
    const stream = streamOf(messages);
    const t = openResumable();
    let pos = 0;
    while (pos < stream.length) {
      const n = 1 + random(2000);
      t.server().binary(stream.subarray(pos, pos + n));
      pos = Math.min(stream.length, pos + n);
      if (random(4) === 0 && pos < stream.length) {
        const attempt = await cutAndAwaitAttempt(t);
        assert.equal(attempt.protocols.at(-1).split(".").at(-1), String(pos));
        attempt.accept();
        attempt.text({ t: "resumed", ticket: TICKET1, window: 1 << 20, grace: 5, received: 0 });
      }
    }
    assert.deepEqual(asBytes(t.messages()), asBytes(messages));
    t.ws.close();
  });
});

describe("acknowledgements", () => {
  test("an ack as soon as a quarter of the window has arrived", () => {
    const t = openResumable({ ackDelay: 10_000 }, { window: 64 });
    const stream = qapMessage(CMD.RESP_OK, fill(100, 0));
    t.server().binary(stream.subarray(0, 10));
    assert.deepEqual(t.server().controls, []);
    t.server().binary(stream.subarray(10, 16));
    assert.deepEqual(t.server().controls, [{ t: "ack", received: 16 }]);
    t.server().binary(stream.subarray(16, 31));
    assert.equal(t.server().controls.length, 1);
    t.server().binary(stream.subarray(31, 56));
    assert.deepEqual(t.server().controls, [{ t: "ack", received: 16 }, { t: "ack", received: 56 }]);
    t.ws.close();
  });

  test("otherwise within 250 ms of receiving data, once", async () => {
    const t = openResumable({}, { window: 1 << 20 });
    const rec = recordDelays();
    const stream = qapMessage(CMD.RESP_OK, fill(100, 0));
    try {
      t.server().binary(stream.subarray(0, 5));
      await sleep(100);
      t.server().binary(stream.subarray(5, 8));
      assert.deepEqual(t.server().controls, []);
      await waitFor(() => t.server().controls.length > 0, "an ack");
    } finally {
      rec.restore();
    }
    // One ack timer of 250 ms, armed by the first data (read from the timer, not the clock).
    assert.equal(rec.delays.filter((d) => d === 250).length, 1, `delays ${rec.delays}`);
    await sleep(300);
    assert.deepEqual(t.server().controls, [{ t: "ack", received: 8 }], "no ack without new data");
    t.ws.close();
  });

  test("forward's acks free the client's kept sends", () => {
    const t = openResumable();
    t.ws.send(fill(10, 1));
    t.ws.send(fill(10, 2));
    t.server().text({ t: "ack", received: 15 });
    t.server().text({ t: "unknown-kind", x: 1 }); // ignored
    assert.equal(t.ws.readyState, ResumableSocket.OPEN);
    t.server().text({ t: "ack", received: 99 }); // more than was sent: the stream is broken
    assert.deepEqual(t.events.slice(-2).map((e) => e[0]), ["error", "close"]);
    assert.equal(t.events.at(-1)[1], 1002);
    assert.equal(t.server().closedWith.code, 1002);
  });
});

describe("resuming", () => {
  test("sends are kept, queued while reconnecting, and resent from forward's count", async () => {
    const t = openResumable({}, { window: 1 << 20, grace: 5 });
    const ours = cat(fill(10, 1), fill(10, 2), fill(10, 3));
    t.ws.send(ours.slice(0, 10).buffer); // an ArrayBuffer, as rserve.js sends
    t.ws.send(ours.subarray(10, 20)); // a view, as qap.js sends
    assert.deepEqual(t.server().data, ours.subarray(0, 20));
    t.server().text({ t: "ack", received: 5 });
    const attempt = await cutAndAwaitAttempt(t);
    assert.equal(t.ws.readyState, ResumableSocket.OPEN, "still open for the app");
    assert.equal(t.ws.reconnecting, true);
    t.ws.send(ours.slice(20)); // while reconnecting: kept for the new connection
    assert.equal(t.ws.bufferedAmount, 10);
    attempt.accept();
    assert.deepEqual(attempt.sent, [], "nothing before `resumed`");
    attempt.text({ t: "resumed", ticket: TICKET2, window: 1 << 20, grace: 5, received: 12 });
    assert.deepEqual(attempt.data, ours.subarray(12), "from forward's count on, once");
    assert.deepEqual(attempt.controls, [{ t: "ack", received: 0 }], "an ack at once settles the new ticket");
    assert.equal(t.ws.bufferedAmount, 0);
    assert.deepEqual(
      t.events.map((e) => e[0]),
      ["open", "reconnecting", "reconnected"],
    );
    // A second cut before forward acknowledged more: resent again from its new count.
    const again = await cutAndAwaitAttempt(t);
    assert.equal(again.protocols.at(-1), `rserve-ticket.${TICKET2}.0`, "the new ticket");
    again.accept();
    again.text({ t: "resumed", ticket: TICKET1, window: 1 << 20, grace: 5, received: 25 });
    assert.deepEqual(again.data, ours.subarray(25));
    t.ws.close();
  });

  test("a message half-sent when the connection broke continues where it stopped", async () => {
    const t = openResumable();
    const request = qapMessage(CMD.OC_CALL, fill(100, 5), 1);
    t.ws.send(request);
    const attempt = await cutAndAwaitAttempt(t);
    attempt.accept();
    attempt.text({ t: "resumed", ticket: TICKET2, window: 1 << 20, grace: 5, received: 37 });
    assert.deepEqual(cat(t.WS.all[0].data.subarray(0, 37), attempt.data), request);
    t.ws.close();
  });

  test("the ticket travels only as a subprotocol, after the app's and the resume offer", async () => {
    const WS = fakeSocketClass();
    const ws = new ResumableSocket("wss://r.example/path?x=1", "app.v1", { WebSocket: WS, minDelay: 1, random: () => 1, connectTimeout: 300 });
    ws.onclose = () => {};
    WS.all[0].accept();
    WS.all[0].text({ t: "open", ticket: TICKET1, window: 4096, grace: 5 });
    assert.equal(ws.resumable, true);
    assert.equal(ws.protocol, "app.v1", "the app's protocol, as forward would answer without resume");
    WS.all[0].binary(qapMessage(CMD.RESP_OK, fill(20, 0)).subarray(0, 7));
    WS.all[0].cut();
    await waitFor(() => WS.all.length === 2, "an attempt");
    assert.equal(WS.all[1].url, "wss://r.example/path?x=1");
    assert.deepEqual(WS.all[1].protocols, ["app.v1", RESUME_PROTOCOL, `rserve-ticket.${TICKET1}.7`]);
    assert.match(WS.all[1].protocols[2], /^rserve-ticket\.[0-9a-f]{48}\.\d+$/);
    assert.ok(!JSON.stringify(Object.entries(ws)).includes(TICKET1), "not in a visible property");
    ws.close();
  });

  test("4100: reconnect at once", async () => {
    const t = openResumable({ minDelay: 1000 });
    const attempt = await cutAndAwaitAttempt(t, CLOSE.RESUME);
    assert.equal(t.WS.all.length, 2);
    attempt.accept();
    attempt.text({ t: "resumed", ticket: TICKET2, window: 1 << 20, grace: 5, received: 0 });
    assert.equal(t.ws.reconnecting, false);
    t.ws.close();
  });

  for (const code of [CLOSE.GONE, CLOSE.REFUSED, CLOSE.RETIRED, 1000]) {
    test(`${code} ends the session: no retry, the app sees ${code}`, async () => {
      const t = openResumable();
      t.server().cut(code, "reason");
      await sleep(30);
      assert.equal(t.WS.all.length, 1);
      assert.deepEqual(t.events.map((e) => e[0]), ["open", "close"]);
      assert.deepEqual(t.events.at(-1), ["close", code, "reason"]);
      assert.equal(t.ws.readyState, ResumableSocket.CLOSED);
    });
  }

  for (const code of [CLOSE.GONE, CLOSE.REFUSED, CLOSE.RETIRED]) {
    test(`${code} on a reconnect attempt: the ticket is dropped, never retried`, async () => {
      const t = openResumable();
      const attempt = await cutAndAwaitAttempt(t);
      attempt.cut(code, "no");
      await sleep(50);
      assert.equal(t.WS.all.length, 2);
      assert.deepEqual(t.events.at(-1), ["close", code, "no"]);
    });
  }

  test("backoff doubles, and stops when the grace has passed", async () => {
    const t = openResumable({ minDelay: 10, maxDelay: 40, random: () => 1 }, { grace: 0.3 });
    const rec = recordDelays();
    try {
      t.server().cut();
      const served = new Set([t.WS.all[0]]);
      await waitFor(() => {
        for (const ws of t.WS.all) {
          if (!served.has(ws)) {
            served.add(ws);
            ws.cut(); // every attempt fails: the network is still down
          }
        }
        return t.ws.readyState === ResumableSocket.CLOSED;
      }, "giving up");
    } finally {
      rec.restore();
    }
    // 10, 20, 40, 40... ms; the last one shortened to end at the grace.
    const backoff = rec.delays.filter((d) => d > 1 && d <= 40); // 1: the test's own polling
    assert.deepEqual(backoff.slice(0, 3), [10, 20, 40], `delays ${backoff}`);
    assert.ok(backoff.slice(3, -1).every((d) => d === 40), `delays ${backoff}`);
    assert.ok(t.WS.all.length >= 3, `${t.WS.all.length} connections`);
    assert.deepEqual(t.events.map((e) => e[0]), ["open", "reconnecting", "error", "close"]);
    assert.equal(t.events.at(-1)[1], 1006);
    const attempts = t.WS.all.length;
    await sleep(100);
    assert.equal(t.WS.all.length, attempts, "no attempt after giving up");
  });

  test("jitter: delays between half and all of the doubled delay", async () => {
    for (const [r, expected] of [[0, 50], [1, 100]]) {
      const t = openResumable({ minDelay: 100, maxDelay: 1000, random: () => r });
      const rec = recordDelays();
      try {
        await cutAndAwaitAttempt(t);
      } finally {
        rec.restore();
      }
      const first = rec.delays.find((d) => d >= 10 && d <= 1000 && d !== 250);
      assert.equal(first, expected, `random ${r}: delays ${rec.delays}`);
      t.ws.close();
    }
  });

  test("an attempt that hangs is given up after connectTimeout; an opened one without `resumed` is left, not closed", async () => {
    const t = openResumable({ connectTimeout: 30 });
    const hanging = await cutAndAwaitAttempt(t); // never opens
    await waitFor(() => t.WS.all.length === 3, "a second attempt");
    assert.deepEqual(hanging.closedWith, { code: undefined, reason: undefined }, "dropped while connecting");
    const silent = t.server();
    silent.accept(); // opens, then says nothing
    await waitFor(() => t.WS.all.length === 4, "a third attempt");
    assert.equal(silent.closedWith, null, "a close frame would end the session: forward retires it instead");
    const good = t.server();
    good.accept();
    good.text({ t: "resumed", ticket: TICKET2, window: 1 << 20, grace: 5, received: 0 });
    assert.equal(t.ws.reconnecting, false);
    t.ws.close();
  });

  test("the first connection failing is a plain failure: error, then close 1006", async () => {
    const t = open();
    t.server().cut(1006);
    await sleep(10);
    assert.deepEqual(t.events.map((e) => e[0]), ["error", "close"]);
    assert.equal(t.WS.all.length, 1);
  });

  test("a connection lost before `open` arrived cannot be resumed", async () => {
    const t = open();
    t.server().accept();
    t.server().cut(1006);
    await sleep(10);
    assert.deepEqual(t.events.map((e) => e[0]), ["open", "error", "close"]);
    assert.equal(t.WS.all.length, 1);
  });

  test("a server that no longer offers resume: the session is gone", async () => {
    const t = openResumable();
    const attempt = await cutAndAwaitAttempt(t);
    attempt.accept(""); // a new, plain session: not ours
    assert.equal(attempt.closedWith.code, 1000);
    await sleep(10);
    assert.equal(t.events.at(-1)[0], "close");
    assert.equal(t.events.at(-1)[1], CLOSE.GONE);
    assert.equal(t.WS.all.length, 2);
  });

  test("close() while reconnecting: closed for the app, and the parked session is ended", async () => {
    const t = openResumable({ minDelay: 5000 });
    t.server().cut();
    await sleep(5);
    t.ws.close();
    assert.equal(t.ws.readyState, ResumableSocket.CLOSING);
    await sleep(5);
    assert.deepEqual(t.events.at(-1), ["close", 1005, ""]);
    const farewell = t.server();
    assert.equal(t.WS.all.length, 2);
    assert.equal(farewell.protocols.at(-1), `rserve-ticket.${TICKET1}.0`);
    farewell.accept();
    assert.equal(farewell.closedWith.code, 1000, "a close frame ends the session on forward");
  });

  test("a close frame from the app ends the session (no resume)", async () => {
    const t = openResumable();
    t.ws.close(1000);
    await sleep(5);
    assert.deepEqual(t.events.at(-1), ["close", 1000, ""]);
    assert.equal(t.WS.all.length, 1);
  });

  test("addEventListener works alongside the on-properties", async () => {
    const t = openResumable();
    const seen = [];
    t.ws.addEventListener("reconnecting", () => seen.push("reconnecting"));
    t.ws.addEventListener("reconnected", (e) => seen.push(`reconnected after ${e.attempts}`));
    const attempt = await cutAndAwaitAttempt(t);
    attempt.accept();
    attempt.text({ t: "resumed", ticket: TICKET2, window: 1 << 20, grace: 5, received: 0 });
    assert.deepEqual(seen, ["reconnecting", "reconnected after 1"]);
    t.ws.close();
  });
});

describe("with qap.js", () => {
  test("a call whose answer is cut in half still resolves, once", async () => {
    const WS = fakeSocketClass();
    class Socket extends ResumableSocket {
      static WebSocket = WS;
    }
    const events = [];
    const pending = connect("wss://r.example/", {
      WebSocket: Socket,
      onReconnecting: () => events.push("reconnecting"),
      onReconnected: () => events.push("reconnected"),
    });
    const server = WS.all[0];
    server.accept();
    server.text({ t: "open", ticket: TICKET1, window: 1 << 20, grace: 5 });
    // The greeting: capabilities list("key") (an ARRAY_STR) in one DT_SEXP parameter.
    const sexp = (value) => {
      const rexp = encodeSEXP(value);
      return cat(Uint8Array.of(0x0a, rexp.length, 0, 0), rexp);
    };
    server.binary(qapMessage(CMD.OC_INIT, sexp("cap")));
    const session = await pending;
    assert.equal(session.mode, "ocap");
    const cap = new RValue("character", ["cap"], { class: new RValue("character", ["OCref"]) });
    const call = session.call(cap, 1);
    await sleep(1);
    const request = server.data; // the OCcall, all the client sent
    assert.ok(request.length > 16);
    const answer = qapMessage(CMD.RESP_OK, sexp([1, 2, 3]), 1);
    server.binary(answer.subarray(0, 20));
    await sleep(1);
    server.cut();
    await waitFor(() => WS.all.length === 2, "an attempt");
    const attempt = WS.all[1];
    attempt.accept();
    attempt.text({ t: "resumed", ticket: TICKET2, window: 1 << 20, grace: 5, received: request.length });
    attempt.binary(answer.subarray(20));
    assert.deepEqual((await call).value, [1, 2, 3]);
    assert.deepEqual(events, ["reconnecting", "reconnected"]);
    session.close();
  });
});
