// The demo's QAP client against a real Rserve, through a real forward. tests/test_js_client.py
// starts both and passes the WebSocket URLs: FORWARD_OCAP_URL (Rserve in OCAP mode with Rserve's
// OCAP example, whose parseEval answers with the value) and FORWARD_QAP_URL (classic mode).
//
// The browser's WebSocket is global in Node 22, and in Node 20 with --experimental-websocket;
// Debian 12's Node 18 has none, so there the `ws` package (Debian: node-ws) stands in.

import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";

import { RserveError, connect } from "../../demo/www/qap.js";

const OCAP_URL = process.env.FORWARD_OCAP_URL;
const QAP_URL = process.env.FORWARD_QAP_URL;
const need = (url) => (url ? {} : { skip: "run through tests/test_js_client.py" });
const WebSocket = globalThis.WebSocket ?? nodeWs();

function nodeWs() {
  const require = createRequire(import.meta.url);
  try {
    return require("ws"); // Debian's node looks in /usr/share/nodejs itself
  } catch {
    return require("/usr/share/nodejs/ws");
  }
}

test("OCAP: greeting, auth, parseEval, values of every common type", need(OCAP_URL), async () => {
  const oob = [];
  const session = await connect(OCAP_URL, {
    WebSocket,
    onOOB: (v) => oob.push(v.value.map((x) => x.value[0])),
  });
  try {
    assert.equal(session.mode, "ocap");
    assert.deepEqual(session.capabilities.classes, ["OCref"]);

    const refused = await session.call(session.capabilities, "mike", "wrong");
    assert.deepEqual(refused.value, ["sorry, unauthorized!"]);

    const caps = await session.call(session.capabilities, "mike", "mypwd");
    const parseEval = caps.get("parseEval");
    const run = (text) => session.call(parseEval, text);

    assert.deepEqual((await run("1+1")).value, [2]);
    assert.deepEqual((await run("c(1L, NA, 3L)")).value, [1, null, 3]);
    assert.deepEqual((await run("c(TRUE, NA, FALSE)")).value, [true, null, false]);
    assert.deepEqual((await run('c("é", NA, "\\u00ff")')).value, ["é", null, "ÿ"]);
    assert.deepEqual((await run("c(1.5, NA, NaN)")).value.slice(0, 2), [1.5, null]);
    assert.equal((await run("NULL")).type, "NULL");
    assert.deepEqual(Array.from((await run("as.raw(c(1, 255))")).value), [1, 255]);

    const list = await run('list(a = 1:2, b = list(c = "x"), 3)');
    assert.deepEqual(list.names, ["a", "b", ""]);
    assert.deepEqual(list.get("b").get("c").value, ["x"]);
    assert.deepEqual(list.value[0].value, [1, 2]);

    // A string argument is passed as a character vector, not evaluated on the way.
    assert.deepEqual((await run('nchar("a\\"b")')).value, [3]);

    const error = await run('stop("no such thing")');
    assert.ok(error.inherits("error"));
    assert.deepEqual(error.get("message").value, ["no such thing"]);

    // What R sends out-of-band while it works arrives first.
    oob.length = 0;
    assert.deepEqual((await run('self.oobSend(list("console.out", "hi")); 5')).value, [5]);
    assert.deepEqual(oob, [["console.out", "hi"]]);

    // Calls made at once are queued and answered in order.
    const answers = await Promise.all([run("1"), run("2"), run("3")]);
    assert.deepEqual(answers.map((a) => a.value[0]), [1, 2, 3]);
  } finally {
    session.close();
  }
});

test("OCAP: an OOB message is answered by the client and R gets the answer", need(OCAP_URL), async () => {
  const session = await connect(OCAP_URL, {
    WebSocket,
    onOOBMessage: (value, code) => {
      if (value.value[0] === "fail") throw new Error("no answer");
      return `${value.value[0]} back (code ${code})`;
    },
  });
  try {
    const caps = await session.call(session.capabilities, "mike", "mypwd");
    const run = (text) => session.call(caps.get("parseEval"), text);
    assert.deepEqual((await run('self.oobMessage("ping", 3L)')).value, ["ping back (code 3)"]);
    // A handler that fails still answers (R must not wait forever), with RESP_ERR and the reason.
    assert.deepEqual((await run('self.oobMessage("fail")')).value, ["error: no answer"]);
    assert.deepEqual((await run("1")).value, [1]);
  } finally {
    session.close();
  }
});

test("OCAP: when R goes away the pending call fails", need(OCAP_URL), async () => {
  const session = await connect(OCAP_URL, { WebSocket });
  const caps = await session.call(session.capabilities, "mike", "mypwd");
  // quit() ends this session's R process; forward answers for it (ERR_conn_broken) or the
  // session closes — either way the call must not hang or resolve.
  await assert.rejects(session.call(caps.get("parseEval"), "quit(save = 'no')"), (err) =>
    err instanceof RserveError ? err.status === 0x42 : /closed/.test(err.message),
  );
  session.close();
});

test("classic mode: the text greeting and eval", need(QAP_URL), async () => {
  const session = await connect(QAP_URL, { WebSocket });
  try {
    assert.equal(session.mode, "qap");
    assert.match(session.idString, /^Rsrv0103QAP1/);
    assert.deepEqual((await session.eval("paste('a', 1:2)")).value, ["a 1", "a 2"]);
    await assert.rejects(session.eval("stop('x')"), (err) => err instanceof RserveError && err.status === 127);
  } finally {
    session.close();
  }
});
