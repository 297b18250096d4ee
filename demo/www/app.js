// app.js — the demo page: connect to R through forward, log in with the `auth` capability,
// then evaluate what the user types with the `parseEval` capability auth returned, showing the
// output R sends out-of-band while it works and then the answer.
//
// The WebSocket goes to the server the page came from (wss: when the page is https:); add
// ?ws=URL to the page's address to use another one.
//
// When forward offers session resume, a broken connection does not end the session: the status
// line says "reconnecting…", then "reconnected", and the transcript and R's state stay as they
// were (a call that was running gets its answer). qap.js does this with resume.js.

import { connect, RValue, RserveError } from "./qap.js";
import { errorMessage, formatR } from "./rformat.js";

const $ = (id) => document.getElementById(id);

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

function pre(className, text) {
  const el = document.createElement("pre");
  el.className = className;
  el.textContent = text;
  return el;
}

function newEntry(input) {
  const entry = document.createElement("div");
  entry.className = "entry busy";
  entry.dataset.state = "busy";
  if (input !== null) entry.append(pre("input", input));
  entry.append(pre("result", ""));
  $("transcript").append(entry);
  return entry;
}

// OOB sends from demo/init.R (and from Rserve's console.oob option) are list(stream, text).
// One without a value is forward's notice that it is closing the session.
function showOOB(value) {
  if (value === null) {
    setState("closed", "forward is closing the session.");
    return;
  }
  const isConsole =
    value instanceof RValue && value.type === "list" && value.length === 2 &&
    value.value[0].type === "character" && value.value[1].type === "character";
  const stream = isConsole ? value.value[0].value[0] : "oob";
  // console.oob output ends with its newline; the <pre> makes the line break already.
  const text = isConsole ? value.value[1].value.join("\n").replace(/\n$/, "") : formatR(value);
  const entry = current ?? newEntry(null);
  entry.querySelector(".result").before(pre(`oob ${stream.replace(/\W/g, "-")}`, text));
  if (!current) finish(entry);
  entry.scrollIntoView({ block: "end" });
}

function finish(entry) {
  entry.classList.remove("busy");
  entry.dataset.state = "done";
}

async function evaluate(text) {
  const entry = newEntry(text);
  current = entry;
  const result = entry.querySelector(".result");
  try {
    const value = await session.call(parseEval, text);
    const error = errorMessage(value);
    if (error !== null) {
      result.className = "error";
      result.textContent = `Error: ${error}`;
    } else {
      result.textContent = formatR(value);
    }
  } catch (err) {
    result.className = "error";
    result.textContent = err instanceof RserveError ? `Rserve: ${err.message}` : String(err.message ?? err);
  } finally {
    current = null;
    finish(entry);
    entry.scrollIntoView({ block: "end" });
  }
}

async function logIn(event) {
  event.preventDefault();
  const button = event.submitter;
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
  button.disabled = true;
  await evaluate(text);
  button.disabled = false;
  $("expr").select();
}

async function main() {
  $("login").addEventListener("submit", logIn);
  $("eval").addEventListener("submit", submitExpression);
  $("expr").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("eval").requestSubmit();
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
