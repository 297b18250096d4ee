// app.js — the demo page: R's console in the browser. Connect to R through forward, log in with
// the `auth` capability, then evaluate what the user types with the `parseEval` capability auth
// returned. R does all the printing (demo/init.R): the page shows R's output, messages, warnings
// and plots as they arrive out-of-band while R works, then the error, if there was one.
//
// The WebSocket goes to the server the page came from (wss: when the page is https:); add
// ?ws=URL to the page's address to use another one.
//
// When forward offers session resume, a broken connection does not end the session: the status
// line says "reconnecting…", then "reconnected", and the transcript and R's state stay as they
// were (a call that was running gets its answer). qap.js does this with resume.js.

import { connect, RValue, RserveError } from "./qap.js";

const $ = (id) => document.getElementById(id);

const HISTORY_KEY = "forward-demo-history";
const HISTORY_SIZE = 200;

let session = null;
let sessionURL = "";
let parseEval = null;
let current = null; // the transcript entry that OOB output belongs to

function websocketURL() {
  const override = new URLSearchParams(location.search).get("ws");
  if (override) return override;
  const url = new URL("/", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function setState(state, text) {
  document.body.dataset.state = state;
  delete document.body.dataset.link;
  $("status").textContent = text;
}

// The connection's ups and downs while the session lives on: shown in the status line without
// changing the page's state (login, ready), so that what the user was doing carries on.
function setLink(link, text) {
  document.body.dataset.link = link;
  $("status").textContent = text;
}

function reconnecting() {
  setLink("reconnecting", "Connection to R lost; reconnecting…");
}

function reconnected() {
  setLink("reconnected", `Connection to R lost, then reconnected over ${sessionURL}; the session is as it was.`);
}

// ---- the transcript ----------------------------------------------------------------------

function newEntry(input) {
  const entry = document.createElement("div");
  entry.className = "entry";
  entry.dataset.state = "busy";
  if (input !== null) {
    const pre = document.createElement("pre");
    pre.className = "input";
    pre.textContent = input;
    entry.append(pre);
  }
  const output = document.createElement("div");
  output.className = "output";
  entry.append(output);
  $("transcript").append(entry);
  return entry;
}

// Text goes into the output's last <pre> (a new one after a plot), one <span> per piece, so
// that the output's text is exactly the bytes R wrote, in the order it wrote them.
function appendText(entry, className, text) {
  const output = entry.querySelector(".output");
  let pre = output.lastElementChild;
  if (pre?.tagName !== "PRE") {
    pre = document.createElement("pre");
    output.append(pre);
  }
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  pre.append(span);
}

// A plot page: PNG bytes drawn by R at the page's width times the screen's pixel ratio, shown
// at the width in CSS pixels R was asked for (and narrower when the page is).
function appendPlot(entry, png, size) {
  const img = document.createElement("img");
  img.className = "plot";
  img.alt = "a plot drawn by R";
  const [width, height] = size?.value ?? [];
  if (width && height) {
    img.width = width;
    img.height = height;
  }
  const url = URL.createObjectURL(new Blob([png], { type: "image/png" }));
  img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
  img.addEventListener("error", () => URL.revokeObjectURL(url), { once: true });
  img.src = url;
  entry.querySelector(".output").append(img);
}

// OOB sends from demo/init.R (and from Rserve's console.oob option) are list(stream, text), a
// plot list("console.plot", png, c(width, height)). One without a value is forward's notice
// that it is closing the session.
function showOOB(value) {
  if (value === null) {
    setState("closed", "forward is closing the session.");
    return;
  }
  const entry = current ?? newEntry(null);
  const parts = value instanceof RValue && value.type === "list" ? value.value : [];
  const stream = parts[0]?.type === "character" ? parts[0].value[0] : null;
  if (stream === "console.plot" && parts[1]?.type === "raw") {
    appendPlot(entry, parts[1].value, parts[2]);
  } else if (stream !== null && parts[1]?.type === "character") {
    appendText(entry, stream.replace(/\W/g, "-"), parts[1].value.join("\n"));
  } else {
    appendText(entry, "oob", `(a message from R of type ${value?.type ?? "unknown"})\n`);
  }
  if (!current) finish(entry);
  entry.scrollIntoView({ block: "end" });
}

function finish(entry) {
  entry.dataset.state = "done";
}

// ---- busy --------------------------------------------------------------------------------

let busyTimer = null;

function formatElapsed(ms) {
  const s = ms / 1000;
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
}

function busy(on) {
  const button = $("eval").querySelector("button");
  button.disabled = on || session.closed;
  clearInterval(busyTimer);
  if (!on) {
    delete document.body.dataset.busy;
    $("busy").hidden = true;
    return;
  }
  document.body.dataset.busy = "";
  const started = performance.now();
  const tick = () => {
    $("elapsed").textContent = formatElapsed(performance.now() - started);
  };
  tick();
  $("busy").hidden = false;
  busyTimer = setInterval(tick, 100);
}

// The plot size R is asked for: the transcript's width (at most 720 CSS pixels) and the
// screen's pixel ratio, so that plots are sharp on high-DPI screens.
function displaySize() {
  const width = Math.min(720, Math.max(240, $("transcript").clientWidth - 40));
  return { width: Math.round(width), ratio: Math.min(3, window.devicePixelRatio || 1) };
}

async function evaluate(text) {
  const entry = newEntry(text);
  current = entry;
  const started = performance.now();
  try {
    const answer = await session.call(parseEval, text, displaySize());
    const status = answer?.get?.("status")?.value?.[0];
    if (status === "error") {
      appendText(entry, "error", answer.get("error").value.join("\n"));
    } else if (status !== "ok") {
      appendText(entry, "error", "R gave an answer this page does not know.\n");
    }
  } catch (err) {
    const text = err instanceof RserveError ? `Rserve: ${err.message}` : String(err.message ?? err);
    appendText(entry, "error", `${text}\n`);
  } finally {
    current = null;
    entry.dataset.elapsed = formatElapsed(performance.now() - started);
    finish(entry);
    entry.scrollIntoView({ block: "end" });
  }
}

// ---- history -----------------------------------------------------------------------------

const history = {
  items: [],
  position: 0, // items.length: the draft being typed
  draft: "",

  load() {
    try {
      this.items = JSON.parse(localStorage.getItem(HISTORY_KEY) ?? "[]").filter((x) => typeof x === "string");
    } catch {
      this.items = [];
    }
    this.position = this.items.length;
  },

  add(text) {
    if (this.items.at(-1) !== text) this.items.push(text);
    this.items = this.items.slice(-HISTORY_SIZE);
    this.position = this.items.length;
    this.draft = "";
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(this.items));
    } catch {
      // private browsing or storage full: the history lasts as long as the page
    }
  },

  // step -1 (up) or +1 (down); the text to show, or null at either end.
  move(step, currentText) {
    const next = this.position + step;
    if (next < 0 || next > this.items.length) return null;
    if (this.position === this.items.length) this.draft = currentText;
    this.position = next;
    return next === this.items.length ? this.draft : this.items[next];
  },
};

// Up on the first line and down on the last move through the history, as in R's console; in
// the middle of a multi-line expression they move the caret.
function historyKey(event) {
  const expr = $("expr");
  const before = expr.value.slice(0, expr.selectionStart);
  const after = expr.value.slice(expr.selectionEnd);
  const up = event.key === "ArrowUp" && !before.includes("\n");
  const down = event.key === "ArrowDown" && !after.includes("\n");
  if (!up && !down) return;
  const text = history.move(up ? -1 : 1, expr.value);
  if (text === null) return;
  event.preventDefault();
  expr.value = text;
  const end = up ? (text.includes("\n") ? text.indexOf("\n") : text.length) : text.length;
  expr.setSelectionRange(end, end);
}

// ---- log in and evaluate -----------------------------------------------------------------

async function logIn(event) {
  event.preventDefault();
  const button = event.submitter ?? $("login").querySelector("button");
  button.disabled = true;
  $("login-error").hidden = true;
  try {
    const answer = await session.call(session.capabilities, $("user").value, $("password").value);
    if (answer.type === "character") throw new Error(answer.value[0]); // "sorry, unauthorized!"
    parseEval = answer.get("parseEval");
    $("login").hidden = true;
    $("console").hidden = false;
    setState("ready", `Logged in as ${$("user").value} over ${sessionURL}; R is ready.`);
    $("expr").focus();
  } catch (err) {
    $("login-error").textContent = err.message;
    $("login-error").hidden = false;
  } finally {
    button.disabled = false;
  }
}

async function submitExpression(event) {
  event.preventDefault();
  const text = $("expr").value.trim();
  const button = $("eval").querySelector("button");
  // One evaluation at a time, so that OOB output lands under the expression that caused it
  // (Enter reaches here even while the button is disabled).
  if (!text || button.disabled) return;
  history.add(text);
  $("expr").value = "";
  busy(true);
  try {
    await evaluate(text);
  } finally {
    busy(false);
    $("expr").focus();
  }
}

async function main() {
  history.load();
  $("login").addEventListener("submit", logIn);
  $("eval").addEventListener("submit", submitExpression);
  $("expr").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("eval").requestSubmit();
    } else if (event.key === "ArrowUp" || event.key === "ArrowDown") {
      historyKey(event);
    }
  });
  const url = websocketURL();
  sessionURL = url;
  try {
    session = await connect(url, {
      onOOB: showOOB,
      onReconnecting: reconnecting,
      onReconnected: reconnected,
      onClose: ({ code, reason }) => {
        setState("closed", `Disconnected from R (${code}${reason ? `: ${reason}` : ""}). Reload to reconnect.`);
        for (const b of document.querySelectorAll("button")) b.disabled = true;
      },
    });
  } catch (err) {
    setState("closed", `Could not reach R at ${url}: ${err.message}`);
    return;
  }
  if (session.mode !== "ocap") {
    setState("closed", "This R server is in classic mode; the demo needs Rserve in OCAP mode.");
    session.close();
    return;
  }
  setState("login", `Connected to R at ${url}.`);
  $("login").hidden = false;
  $("user").focus();
}

main();
