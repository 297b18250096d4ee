// resume.js — ResumableSocket: a WebSocket whose Rserve session survives a broken connection.
//
// A drop-in replacement for the browser's WebSocket (same constructor, binaryType, onopen /
// onmessage / onclose / onerror, addEventListener, send, close, readyState, bufferedAmount,
// protocol, url) that speaks forward's session resume protocol, v1 (docs/resume.md):
//
//   import { ResumableSocket } from "./resume.js";
//   const ws = new ResumableSocket("wss://example.org/");   // instead of new WebSocket(...)
//
// A QAP client given one instead of a WebSocket (qap.js does so itself; for rserve.js, set
// `window.WebSocket = ResumableSocket` before Rserve.create) sees exactly the messages a plain
// WebSocket would have delivered — one QAP message per message, the classic greeting as text —
// while underneath:
//
// - it offers the subprotocol "rserve-resume.v1" next to the app's own; when the server does not
//   choose it (resume off, an older forward, another server), it is a plain WebSocket;
// - on a resumable connection, binary messages are a byte stream in each direction, and text
//   messages are control ({"t": "open" | "resumed" | "ack", ...}). It counts the bytes both ways,
//   acknowledges R's (every quarter window, or within 250 ms), keeps its own sends until forward
//   acknowledges them, and restores QAP messages from R's stream (16-byte headers; a classic
//   greeting is the stream's first 32 bytes);
// - when the connection breaks without one of the codes that end a session, it reconnects with
//   backoff (250 ms, doubling, jittered, capped) until the grace forward announced has passed,
//   presenting its ticket as the subprotocol "rserve-ticket.TICKET.RECEIVED". Meanwhile
//   readyState stays OPEN, sends are kept, and events "reconnecting" / "reconnected" fire. After
//   a resume, forward replays what the client missed and the client resends what forward missed:
//   every byte arrives exactly once, in order.
//
// The ticket is kept in this object only: never in the URL, never in storage.

export const RESUME_PROTOCOL = "rserve-resume.v1";
export const TICKET_PREFIX = "rserve-ticket.";

// Close codes from forward that end a session: never resume after them.
export const CLOSE = Object.freeze({ RESUME: 4100, GONE: 4101, REFUSED: 4102, RETIRED: 4103 });
const ENDS_SESSION = new Set([1000, CLOSE.GONE, CLOSE.REFUSED, CLOSE.RETIRED]);

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

const HEADER_SIZE = 16; // a QAP message header
const GREETING_SIZE = 32; // a classic Rserve's ID string
const TWO_32 = 2 ** 32;
// A ticket goes into a subprotocol token, separated by dots: token characters, no dot.
const TICKET_CHARS = /^[A-Za-z0-9!#$%&'*+^_`|~-]+$/;

const DEFAULTS = Object.freeze({
  minDelay: 250, // ms before the first reconnect
  maxDelay: 8000, // ms between reconnects at most
  connectTimeout: 10000, // ms an attempt may take to open and be resumed
  ackDelay: 250, // ms after data arrives at most before it is acknowledged (docs/resume.md)
  random: Math.random,
});

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/** A copy of what send() accepts, as bytes (strings as UTF-8); null for a Blob. */
function bytesOf(data) {
  if (typeof data === "string") return utf8.encode(data);
  if (data instanceof ArrayBuffer) return new Uint8Array(data.slice(0));
  if (ArrayBuffer.isView(data)) {
    return new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
  }
  if (typeof Blob === "function" && data instanceof Blob) return null;
  return utf8.encode(String(data)); // what WebSocket.send does with other values
}

/** What a WebSocket message's data is, as a Uint8Array (ArrayBuffer, view, or Node's Buffer). */
function viewOf(data) {
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return new Uint8Array(data);
}

function makeEvent(type, props = {}) {
  let event;
  if (type === "message" && typeof MessageEvent === "function") {
    event = new MessageEvent("message", props);
  } else if (type === "close" && typeof CloseEvent === "function") {
    event = new CloseEvent("close", props);
  } else {
    event = new Event(type);
    for (const [key, value] of Object.entries(props)) {
      Object.defineProperty(event, key, { value, enumerable: true });
    }
  }
  return event;
}

function domError(message, name) {
  return typeof DOMException === "function" ? new DOMException(message, name) : new Error(message);
}

export class ResumableSocket extends EventTarget {
  /** The WebSocket implementation underneath: the global one as it was when this module loaded
   * (so that `window.WebSocket = ResumableSocket` works), or a stand-in for tests. */
  static WebSocket = globalThis.WebSocket;

  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSING = CLOSING;
  static CLOSED = CLOSED;

  #url;
  #protocols; // the app's own subprotocols
  #opts;
  #WS;
  #binaryType = "blob";
  #state = CONNECTING; // what the app sees
  #mode = "probe"; // "probe" (first connection, undecided), "plain", or "resume"
  #ws = null; // the current underlying WebSocket (null while reconnecting)
  #protocol = "";

  // Resume state.
  #ticket = null;
  #window = 0;
  #grace = 0; // seconds
  #rx = 0; // bytes of R's stream received
  #rxAcked = 0; // the count in our last ack (or the RECEIVED forward got at a resume)
  #ackTimer = null;
  #tx = 0; // bytes of our stream so far
  #txAcked = 0; // forward has every byte of our stream before this count
  #txChunks = []; // our stream from #txAcked to #tx, as Uint8Arrays
  #unsent = 0; // bytes of #txChunks not written to any connection yet (sent while reconnecting)
  #blobs = null; // a promise chain while Blob sends are being read
  #outage = null; // {start, attempts, timer, attempt, connectTimer}

  // R's stream, restored into messages.
  #phase = "start"; // "start" (first 4 bytes decide), "greeting" (classic), "header"
  #head = new Uint8Array(GREETING_SIZE);
  #headLen = 0;
  #msg = null; // the QAP message being filled
  #msgLen = 0;

  constructor(url, protocols = [], options = {}) {
    super();
    this.#opts = { ...DEFAULTS, ...options };
    this.#WS = options.WebSocket ?? new.target.WebSocket ?? ResumableSocket.WebSocket;
    if (!this.#WS || this.#WS === ResumableSocket || this.#WS.prototype instanceof ResumableSocket) {
      throw new TypeError("ResumableSocket needs a WebSocket implementation underneath");
    }
    this.#url = url;
    this.#protocols = typeof protocols === "string" ? [protocols] : [...(protocols ?? [])];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this.onreconnecting = this.onreconnected = null;
    for (const type of ["open", "message", "close", "error", "reconnecting", "reconnected"]) {
      this.addEventListener(type, (event) => this[`on${type}`]?.call(this, event));
    }
    // The app's protocols first: a server that answers with the first one offered (forward
    // before resume, the C forward) then answers with the app's, as without this wrapper.
    const ws = new this.#WS(url, [...this.#protocols, RESUME_PROTOCOL]);
    ws.binaryType = "arraybuffer";
    this.#attach(ws);
  }

  // ---- the WebSocket interface ------------------------------------------------------------

  get url() {
    return this.#ws?.url ?? String(this.#url);
  }

  get readyState() {
    return this.#mode === "plain" && this.#ws ? this.#ws.readyState : this.#state;
  }

  get protocol() {
    // When the server chose "rserve-resume.v1", it did so in the app's stead; without resume,
    // forward answers with the first protocol offered, which is what the app sees here too.
    return this.#protocol === RESUME_PROTOCOL ? (this.#protocols[0] ?? "") : this.#protocol;
  }

  get extensions() {
    return this.#ws?.extensions ?? "";
  }

  get binaryType() {
    return this.#binaryType;
  }

  set binaryType(value) {
    if (value === "blob" || value === "arraybuffer") this.#binaryType = value;
  }

  /** Bytes handed to send() that have not been written to the network yet. */
  get bufferedAmount() {
    const live = this.#ws && this.#ws.readyState === OPEN ? this.#ws.bufferedAmount ?? 0 : 0;
    return live + this.#unsent;
  }

  /** Whether this connection uses resume (false until the server's first message says so). */
  get resumable() {
    return this.#mode === "resume";
  }

  /** Whether the connection is broken and being resumed. */
  get reconnecting() {
    return this.#outage !== null;
  }

  send(data) {
    if (this.readyState === CONNECTING) {
      throw domError("the WebSocket is not open yet", "InvalidStateError");
    }
    if (this.#mode === "plain") {
      this.#ws?.send(data);
      return;
    }
    if (this.#state !== OPEN) return; // as WebSocket: data after close() is dropped
    const bytes = bytesOf(data);
    if (bytes === null || this.#blobs) {
      // A Blob is read asynchronously; it and everything after it keep their order.
      const chain = (this.#blobs ?? Promise.resolve())
        .then(async () => (bytes ?? new Uint8Array(await data.arrayBuffer())))
        .then((b) => this.#state === OPEN && this.#write(b));
      this.#blobs = chain;
      chain.finally(() => this.#blobs === chain && (this.#blobs = null));
      return;
    }
    this.#write(bytes);
  }

  close(code, reason) {
    if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw domError(`close code ${code} is neither 1000 nor in 3000-4999`, "InvalidAccessError");
    }
    if (reason !== undefined && utf8.encode(reason).length > 123) {
      throw domError("the close reason is longer than 123 bytes", "SyntaxError");
    }
    if (this.readyState === CLOSING || this.readyState === CLOSED) return;
    this.#state = CLOSING;
    if (this.#outage) {
      // Nothing to send a close frame on: end here (the close event comes later, as from a
      // WebSocket), and ask forward to end the parked session.
      this.#farewell();
      setTimeout(() => this.#finish(code ?? 1005, reason ?? "", { wasClean: false, error: false }), 0);
      return;
    }
    this.#ws.close(code, reason);
  }

  // ---- sending ------------------------------------------------------------------------------

  #write(bytes) {
    if (!bytes.length) return;
    this.#tx += bytes.length;
    if (this.#mode !== "plain") this.#txChunks.push(bytes);
    if (this.#ws && this.#ws.readyState === OPEN) {
      this.#ws.send(bytes);
    } else {
      this.#unsent += bytes.length;
    }
  }

  /** forward has our stream up to `received`: forget what is before it. */
  #txAck(received) {
    if (!Number.isSafeInteger(received) || received < this.#txAcked || received > this.#tx) {
      return false;
    }
    let drop = received - this.#txAcked;
    while (drop > 0) {
      const first = this.#txChunks[0];
      if (first.length <= drop) {
        this.#txChunks.shift();
        drop -= first.length;
      } else {
        this.#txChunks[0] = first.subarray(drop);
        drop = 0;
      }
    }
    this.#txAcked = received;
    return true;
  }

  // ---- the underlying connection ----------------------------------------------------------

  #attach(ws) {
    this.#ws = ws;
    ws.onopen = () => this.#onOpen(ws);
    ws.onmessage = (event) => this.#onMessage(ws, event.data);
    ws.onclose = (event) => this.#onClose(ws, event);
    ws.onerror = () => this.#onError(ws);
  }

  #onOpen(ws) {
    if (ws !== this.#ws) return;
    this.#protocol = ws.protocol ?? "";
    if (this.#protocol !== RESUME_PROTOCOL) this.#mode = "plain";
    if (this.#state === CONNECTING) this.#state = OPEN;
    this.#fire("open");
  }

  #onError(ws) {
    // In resume mode a broken connection is not the app's business (yet); its close follows.
    if (ws === this.#ws && this.#mode !== "resume") this.#fire("error");
  }

  #onMessage(ws, data) {
    if (ws !== this.#ws) return;
    if (this.#mode === "probe") {
      // forward's first message on a resumable connection is `open`. Anything else comes from
      // a server that echoed the offer without knowing it: a plain connection after all.
      const control = typeof data === "string" ? parseControl(data) : null;
      if (control?.t === "open") {
        this.#mode = "resume";
        this.#txAck(0);
        this.#opened(control);
        return;
      }
      this.#mode = "plain";
      this.#txChunks = [];
    }
    if (this.#mode === "plain") {
      if (this.readyState !== OPEN) return;
      this.#fire("message", { data: typeof data === "string" ? data : this.#asBinaryType(viewOf(data)), origin: this.#origin() });
      return;
    }
    if (typeof data === "string") {
      this.#onControl(parseControl(data));
    } else {
      this.#onData(viewOf(data));
    }
  }

  #onClose(ws, event) {
    if (ws !== this.#ws) return;
    const code = event.code ?? 1006;
    const reason = event.reason ?? "";
    this.#detach(ws);
    if (this.#mode !== "resume" || this.#state === CLOSING || ENDS_SESSION.has(code) || !this.#ticket) {
      // A plain connection's error event was passed on already; a resumable one's was held.
      const error = this.#mode === "resume" && this.#state === OPEN && !ENDS_SESSION.has(code);
      this.#finish(code, reason, { wasClean: event.wasClean ?? code !== 1006, error });
      return;
    }
    this.#startOutage(code, reason);
  }

  #detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (ws === this.#ws) this.#ws = null;
    this.#clearAckTimer();
  }

  // ---- resume: control and data -----------------------------------------------------------

  #opened(control) {
    // A ticket that cannot travel as a subprotocol token is no ticket: the session then ends
    // with its connection, as without resume.
    const ticket = typeof control.ticket === "string" && TICKET_CHARS.test(control.ticket) ? control.ticket : null;
    this.#ticket = ticket;
    if (Number.isSafeInteger(control.window) && control.window > 0) this.#window = control.window;
    if (typeof control.grace === "number" && control.grace >= 0) this.#grace = control.grace;
  }

  #onControl(control) {
    if (control?.t === "ack") {
      if (!this.#txAck(control.received)) {
        this.#protocolError(`ack of ${control.received} outside ${this.#txAcked}..${this.#tx}`);
      }
    }
    // `open` and `resumed` belong at the start of a connection; unknown kinds are ignored.
  }

  #onData(bytes) {
    if (!bytes.length) return;
    this.#rx += bytes.length;
    this.#reassemble(bytes);
    if (this.#state !== OPEN || !this.#ws) return;
    const quarter = Math.max(1, Math.floor(this.#window / 4));
    if (this.#rx - this.#rxAcked >= quarter) {
      this.#sendAck();
    } else if (this.#ackTimer === null) {
      this.#ackTimer = setTimeout(() => {
        this.#ackTimer = null;
        this.#sendAck();
      }, this.#opts.ackDelay);
    }
  }

  #sendAck() {
    this.#clearAckTimer();
    if (this.#ws?.readyState !== OPEN) return;
    this.#ws.send(JSON.stringify({ t: "ack", received: this.#rx }));
    this.#rxAcked = this.#rx;
  }

  #clearAckTimer() {
    if (this.#ackTimer !== null) clearTimeout(this.#ackTimer);
    this.#ackTimer = null;
  }

  /** R's stream in, QAP messages out: each delivered exactly as forward would have sent it. */
  #reassemble(bytes) {
    let pos = 0;
    while (pos < bytes.length) {
      if (this.#msg) {
        const n = Math.min(this.#msg.length - this.#msgLen, bytes.length - pos);
        this.#msg.set(bytes.subarray(pos, pos + n), this.#msgLen);
        this.#msgLen += n;
        pos += n;
        if (this.#msgLen === this.#msg.length) {
          const msg = this.#msg;
          this.#msg = null;
          this.#deliver(this.#asBinaryType(msg));
        }
        continue;
      }
      const need = this.#phase === "start" ? 4 : this.#phase === "greeting" ? GREETING_SIZE : HEADER_SIZE;
      const n = Math.min(need - this.#headLen, bytes.length - pos);
      this.#head.set(bytes.subarray(pos, pos + n), this.#headLen);
      this.#headLen += n;
      pos += n;
      if (this.#headLen < need) break;
      const head = this.#head;
      if (this.#phase === "start") {
        // A classic Rserve says "Rsrv0103QAP1..." (32 bytes, which forward sends as text); an
        // OCAP one starts with an ordinary QAP message whose command spells "RsOC".
        const classic = head[0] === 0x52 && head[1] === 0x73 && head[2] === 0x72 && head[3] === 0x76;
        this.#phase = classic ? "greeting" : "header";
      } else if (this.#phase === "greeting") {
        this.#headLen = 0;
        this.#phase = "header";
        this.#deliver(fromUtf8.decode(head.subarray(0, GREETING_SIZE)));
      } else {
        const view = new DataView(head.buffer, 0, HEADER_SIZE);
        const length = view.getUint32(4, true) + view.getUint32(12, true) * TWO_32;
        this.#headLen = 0;
        let msg;
        try {
          msg = new Uint8Array(HEADER_SIZE + length);
        } catch {
          // Not a QAP header (or more than this browser can hold): the stream cannot be read.
          this.#protocolError(`cannot hold a QAP message of ${length} bytes`);
          return;
        }
        msg.set(head.subarray(0, HEADER_SIZE));
        if (length === 0) {
          this.#deliver(this.#asBinaryType(msg));
        } else {
          this.#msg = msg;
          this.#msgLen = HEADER_SIZE;
        }
      }
    }
  }

  #deliver(data) {
    if (this.#state === OPEN) this.#fire("message", { data, origin: this.#origin() });
  }

  #asBinaryType(bytes) {
    const exact =
      bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength
        ? bytes.buffer
        : bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    if (this.#binaryType === "blob" && typeof Blob === "function") return new Blob([exact]);
    return exact;
  }

  #origin() {
    try {
      return new URL(this.url).origin;
    } catch {
      return "";
    }
  }

  #protocolError(why) {
    const ws = this.#ws;
    if (ws) {
      this.#detach(ws);
      ws.close(1002, "resume protocol error");
    }
    this.#cancelOutage();
    this.#finish(1002, why, { wasClean: false });
  }

  // ---- resume: reconnecting -----------------------------------------------------------------

  #startOutage(code, reason) {
    this.#outage = { start: Date.now(), attempts: 0, timer: null, attempt: null, connectTimer: null };
    this.#fire("reconnecting", { code, reason });
    this.#schedule(code === CLOSE.RESUME ? 0 : null);
  }

  #schedule(delay = null) {
    const outage = this.#outage;
    const remaining = this.#grace * 1000 - (Date.now() - outage.start);
    if (remaining <= 0) {
      this.#giveUp();
      return;
    }
    if (delay === null) {
      const { minDelay, maxDelay, random } = this.#opts;
      const base = Math.min(maxDelay, minDelay * 2 ** outage.attempts);
      delay = base * (0.5 + 0.5 * random()); // jitter: between half and all of it
    }
    outage.timer = setTimeout(() => this.#attempt(), Math.min(delay, remaining));
  }

  #ticketToken() {
    return `${TICKET_PREFIX}${this.#ticket}.${this.#rx}`;
  }

  #attempt() {
    const outage = this.#outage;
    outage.timer = null;
    outage.attempts += 1;
    let ws;
    try {
      ws = new this.#WS(this.#url, [...this.#protocols, RESUME_PROTOCOL, this.#ticketToken()]);
    } catch {
      this.#schedule();
      return;
    }
    ws.binaryType = "arraybuffer";
    outage.attempt = ws;
    const presented = this.#rx;
    const failed = () => {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      clearTimeout(outage.connectTimer);
      outage.attempt = null;
    };
    outage.connectTimer = setTimeout(() => {
      // Try again. A connection still opening is dropped (no close frame goes out); an open one
      // is only abandoned, since a close frame from us would end the session: the next attempt
      // takes the session over and forward retires this one.
      failed();
      if (ws.readyState === CONNECTING) ws.close();
      this.#schedule();
    }, this.#opts.connectTimeout);
    ws.onopen = () => {
      if (ws.protocol !== RESUME_PROTOCOL) {
        // The server no longer offers resume: this connection is a new session, not ours.
        failed();
        ws.close(1000);
        this.#cancelOutage();
        this.#finish(CLOSE.GONE, "the server no longer offers session resume", { wasClean: false });
      }
    };
    ws.onmessage = (event) => {
      const control = typeof event.data === "string" ? parseControl(event.data) : null;
      if (control?.t === "resumed") {
        failed();
        this.#resumed(ws, control, presented);
      } else if (control === null) {
        failed();
        ws.close(1002, "resume protocol error");
        this.#cancelOutage();
        this.#finish(1002, "the server did not resume the session", { wasClean: false });
      }
    };
    ws.onerror = () => {};
    ws.onclose = (event) => {
      failed();
      const code = event.code ?? 1006;
      if (ENDS_SESSION.has(code)) {
        this.#cancelOutage();
        this.#finish(code, event.reason ?? "", { wasClean: true });
      } else {
        this.#schedule();
      }
    };
  }

  #resumed(ws, control, presented) {
    const received = control.received;
    if (!Number.isSafeInteger(received) || received < this.#txAcked || received > this.#tx) {
      this.#ws = ws;
      this.#protocolError(`resumed at ${received}, outside ${this.#txAcked}..${this.#tx}`);
      return;
    }
    const outage = this.#outage;
    this.#outage = null;
    this.#opened(control);
    this.#txAck(received);
    this.#attach(ws);
    this.#rxAcked = presented; // forward takes the RECEIVED we presented as acknowledged
    // Our stream from where forward's count stands: the part it missed and what was sent since.
    const resent = this.#tx - received;
    for (const chunk of this.#txChunks) ws.send(chunk);
    this.#unsent = 0;
    // An ack at once tells forward we hold the new ticket, which withdraws the old one.
    this.#sendAck();
    this.#fire("reconnected", { attempts: outage.attempts, resent });
  }

  #giveUp() {
    const outage = this.#outage;
    this.#cancelOutage();
    this.#finish(1006, `could not resume the session within ${this.#grace} s (${outage.attempts} attempts)`, {
      wasClean: false,
    });
  }

  #cancelOutage() {
    const outage = this.#outage;
    if (!outage) return;
    this.#outage = null;
    clearTimeout(outage.timer);
    clearTimeout(outage.connectTimer);
    const ws = outage.attempt;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      ws.close(); // still connecting (no close frame), or open and not resumed yet
    }
  }

  /** The app closed while reconnecting: resume once more only to end the parked session. */
  #farewell() {
    const token = this.#ticket && this.#ticketToken();
    this.#cancelOutage();
    if (!token) return;
    let ws;
    try {
      ws = new this.#WS(this.#url, [...this.#protocols, RESUME_PROTOCOL, token]);
    } catch {
      return;
    }
    const timer = setTimeout(() => ws.close(), this.#opts.connectTimeout);
    ws.onopen = () => ws.close(1000);
    ws.onclose = () => clearTimeout(timer);
    ws.onerror = ws.onmessage = () => {};
  }

  #finish(code, reason, { wasClean, error = !wasClean }) {
    if (this.#state === CLOSED) return;
    this.#state = CLOSED;
    this.#ticket = null;
    this.#txChunks = [];
    this.#unsent = 0;
    this.#msg = null;
    this.#clearAckTimer();
    if (this.#ws) this.#detach(this.#ws);
    if (error) this.#fire("error");
    this.#fire("close", { code, reason, wasClean });
  }

  #fire(type, props) {
    this.dispatchEvent(makeEvent(type, props));
  }
}

/** A control message as an object with a string `t`, or null when it is not one. */
function parseControl(text) {
  try {
    const value = JSON.parse(text);
    return value !== null && typeof value === "object" && typeof value.t === "string" ? value : null;
  } catch {
    return null;
  }
}

globalThis.ResumableSocket ??= ResumableSocket;
