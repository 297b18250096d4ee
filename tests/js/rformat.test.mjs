// Unit tests of demo/www/rformat.js. The expected strings are what R 4.x's print() shows for the
// same values (the browser test compares the page with R's own print output as well).

import assert from "node:assert/strict";
import { test } from "node:test";

import { RValue, toR } from "../../demo/www/qap.js";
import { errorMessage, formatR } from "../../demo/www/rformat.js";

const ints = (...v) => new RValue("integer", v);

test("scalars and short vectors", () => {
  assert.equal(formatR(toR(2)), "[1] 2");
  assert.equal(formatR(toR([1, 2.5])), "[1] 1.0 2.5");
  assert.equal(formatR(toR([1 / 3])), "[1] 0.3333333");
  assert.equal(formatR(toR(["a", "bbb", null])), '[1] "a"   "bbb" NA   ');
  assert.equal(formatR(toR([true, null])), "[1] TRUE   NA");
  assert.equal(formatR(toR([null, NaN, Infinity])), "[1]  NA NaN Inf");
  assert.equal(formatR(toR('say "hi"\n')), '[1] "say \\"hi\\"\\n"');
});

test("long vectors wrap at 80 columns with right-aligned index labels", () => {
  const x = ints(...Array.from({ length: 30 }, (_, i) => i + 1));
  assert.equal(
    formatR(x),
    " [1]  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25\n" +
      "[26] 26 27 28 29 30",
  );
});

test("named vectors put names over values", () => {
  const x = new RValue("double", [1.5, 2], { names: toR(["a", "long"]) });
  assert.equal(formatR(x), "   a long \n 1.5  2.0 ");
});

test("empty vectors and NULL", () => {
  assert.equal(formatR(new RValue("double", [])), "numeric(0)");
  assert.equal(formatR(new RValue("character", [])), "character(0)");
  assert.equal(formatR(toR(null)), "NULL");
});

test("factors show their levels", () => {
  const f = new RValue("integer", [1, 2, 1], { levels: toR(["lo", "hi"]), class: toR("factor") });
  assert.equal(formatR(f), "[1] lo hi lo\nLevels: lo hi");
});

test("lists, nested and named", () => {
  const x = toR({ a: 1, b: { c: "x" } });
  assert.equal(formatR(x), '$a\n[1] 1\n\n$b\n$b$c\n[1] "x"\n\n');
  assert.equal(formatR(toR([1, "x", [true, false]].map(toR))), '[[1]]\n[1] 1\n\n[[2]]\n[1] "x"\n\n[[3]]\n[1]  TRUE FALSE\n');
});

test("error conditions", () => {
  const e = new RValue("list", [toR("boom"), toR(null)], {
    names: toR(["message", "call"]),
    class: toR(["simpleError", "error", "condition"]),
  });
  assert.equal(errorMessage(e), "boom");
  assert.equal(errorMessage(toR("boom")), null);
});

test("large and small numbers switch to scientific notation", () => {
  assert.equal(formatR(toR([1e20])), "[1] 1e+20");
  assert.equal(formatR(toR([123456789])), "[1] 123456789");
  assert.equal(formatR(toR([1e-20])), "[1] 1e-20");
  assert.equal(formatR(toR([0.00001, 1])), "[1] 1e-05 1e+00");
  assert.equal(formatR(toR([1e15])), "[1] 1e+15");
  assert.equal(formatR(toR([100000])), "[1] 1e+05");
  assert.equal(formatR(toR([1e5 + 0.1])), "[1] 100000.1");
  assert.equal(formatR(toR([-1.5, 10])), "[1] -1.5 10.0");
});

test("like R, no more than max.print (99999) entries are shown", () => {
  const x = ints(...Array.from({ length: 100005 }, (_, i) => i % 10));
  const lines = formatR(x).split("\n");
  assert.equal(lines.at(-1), ' [ reached getOption("max.print") -- omitted 6 entries ]');
  assert.ok(lines[0].startsWith("    [1] 0 1 2"));
  assert.equal(lines.length, 2779); // as R's print(rep(0:9, length.out = 100005))
});
