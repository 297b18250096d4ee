// rformat.js — R values (RValues from qap.js) as text, the way R's print() shows them.
//
// Covers what a demo needs and says so when it meets something else: atomic vectors (with
// names, NA, index prefixes, wrapping at 80 columns), factors, lists, NULL, functions and error
// conditions. Pure functions, no DOM, so it is unit-tested in Node.

import { RValue } from "./qap.js";

const WIDTH = 80;
const MAX_PRINT = 99999; // R's getOption("max.print"): a million numbers would freeze the page

/** The text R would print for `x`. */
export function formatR(x) {
  return lines(x, "").join("\n");
}

/** An error condition (what tryCatch(..., error = function(e) e) returns), or null. */
export function errorMessage(x) {
  if (!(x instanceof RValue) || !x.inherits("error")) return null;
  const message = x.get("message");
  return message?.type === "character" ? message.value[0] : "unknown error";
}

function lines(x, prefix) {
  if (!(x instanceof RValue)) return [String(x)];
  const error = errorMessage(x);
  if (error !== null) return [`<simpleError: ${error}>`];
  if (x.inherits("factor")) return factorLines(x);
  switch (x.type) {
    case "NULL":
      return ["NULL"];
    case "integer":
    case "double":
    case "character":
    case "logical":
    case "complex":
    case "raw":
      return x.length ? atomicLines(x) : [`${emptyName(x.type)}(0)`];
    case "list":
    case "pairlist":
      return listLines(x, prefix);
    case "closure":
      return ["<function>"];
    case "symbol":
      return [x.value];
    default:
      return [`<an R object of type ${x.type}>`];
  }
}

function atomicLines(x) {
  if (x.length <= MAX_PRINT) return vectorLines(cells(x), x.names, alignOf(x.type));
  const shown = new RValue(x.type, x.value.slice(0, MAX_PRINT));
  const out = vectorLines(cells(shown), x.names?.slice(0, MAX_PRINT) ?? null, alignOf(x.type));
  out.push(` [ reached getOption("max.print") -- omitted ${x.length - MAX_PRINT} entries ]`);
  return out;
}

function emptyName(type) {
  return type === "double" ? "numeric" : type;
}

function alignOf(type) {
  return type === "character" ? "left" : "right";
}

// Each element as R shows it; numbers share one number of decimals, as print() does.
export function cells(x) {
  switch (x.type) {
    case "character":
      return x.value.map((s) => (s === null ? "NA" : quote(s)));
    case "logical":
      return x.value.map((v) => (v === null ? "NA" : v ? "TRUE" : "FALSE"));
    case "integer":
      return x.value.map((v) => (v === null ? "NA" : String(v)));
    case "double":
      return formatDoubles(x.value);
    case "raw":
      return Array.from(x.value, (b) => b.toString(16).padStart(2, "0"));
    case "complex":
      return x.value.map(({ re, im }) => `${formatDoubles([re])[0]}${im < 0 ? "-" : "+"}${formatDoubles([Math.abs(im)])[0]}i`);
    default:
      return x.value.map(String);
  }
}

function quote(s) {
  const escaped = s.replace(/[\\"\n\t\r]/g, (c) => ({ "\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r" })[c]);
  return `"${escaped}"`;
}

// R's print(): at most 7 significant digits, every element with the same number of decimals,
// and scientific notation when that is narrower than fixed notation (R's formatReal).
export function formatDoubles(values) {
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  let neg = 0, left = 1, right = 0, sig = 1, bigExponent = false;
  for (const v of finite) {
    const [mantissa, e] = Math.abs(v).toExponential(6).split("e");
    const digits = v === 0 ? 1 : mantissa.replace(/\.?0+$/, "").replace(".", "").length;
    const exponent = v === 0 ? 0 : Number(e);
    if (v < 0) neg = 1;
    left = Math.max(left, exponent + 1);
    right = Math.max(right, digits - 1 - exponent);
    sig = Math.max(sig, digits);
    if (Math.abs(exponent) >= 100) bigExponent = true;
  }
  const fixedWidth = neg + left + (right ? right + 1 : 0);
  const sciWidth = neg + (sig > 1 ? sig + 1 : 1) + (bigExponent ? 5 : 4);
  const sci = finite.length > 0 && fixedWidth > sciWidth;
  return values.map((v) => {
    if (v === null) return "NA";
    if (Number.isNaN(v)) return "NaN";
    if (v === Infinity) return "Inf";
    if (v === -Infinity) return "-Inf";
    if (!sci) return v.toFixed(right);
    // JavaScript writes 1e+5; R pads the exponent to two digits: 1e+05.
    const [m, e] = v.toExponential(sig - 1).split("e");
    return `${m}e${e[0]}${e.slice(1).padStart(2, "0")}`;
  });
}

function pad(s, width, align) {
  return align === "left" ? s.padEnd(width) : s.padStart(width);
}

// Unnamed vectors: "[1] 1 2 3" with index prefixes, wrapped at 80 columns. Named vectors: a
// line of names over a line of values, each column as wide as its widest entry.
export function vectorLines(items, names = null, align = "right") {
  if (names) {
    const width = Math.max(...items.map((s, i) => Math.max(s.length, (names[i] ?? "<NA>").length)));
    // R ends every column, the last one too, with a space.
    const perLine = Math.max(1, Math.floor(WIDTH / (width + 1)));
    const out = [];
    for (let i = 0; i < items.length; i += perLine) {
      const slice = items.slice(i, i + perLine);
      out.push(slice.map((_, j) => `${(names[i + j] ?? "<NA>").padStart(width)} `).join(""));
      out.push(slice.map((s) => `${pad(s, width, align)} `).join(""));
    }
    return out;
  }
  const width = Math.max(...items.map((s) => s.length));
  const labelWidth = `[${items.length}]`.length;
  const perLine = Math.max(1, Math.floor((WIDTH - labelWidth) / (width + 1)));
  const out = [];
  for (let i = 0; i < items.length; i += perLine) {
    const label = `[${i + 1}]`.padStart(labelWidth);
    const row = items.slice(i, i + perLine).map((s) => pad(s, width, align));
    out.push(`${label} ${row.join(" ")}`);
  }
  return out;
}

function factorLines(x) {
  const levels = x.attr("levels")?.value ?? [];
  const items = x.value.map((code) => (code === null ? "<NA>" : levels[code - 1]));
  return [
    ...(items.length ? vectorLines(items, x.names, "left") : ["factor(0)"]),
    `Levels: ${levels.join(" ")}`,
  ];
}

// A list: each element under its name ($a, or [[1]] when it has none), then a blank line.
function listLines(x, prefix) {
  if (!x.length) return ["list()"];
  const names = x.names;
  const out = [];
  x.value.forEach((item, i) => {
    const name = names?.[i];
    const tag = name ? `${prefix}$${/^[A-Za-z.][A-Za-z0-9._]*$/.test(name) ? name : `\`${name}\``}` : `${prefix}[[${i + 1}]]`;
    out.push(tag, ...lines(item, tag), "");
  });
  return out;
}
