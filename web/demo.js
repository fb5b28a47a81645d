// The browser demo: every number comes from kvq (Rust, compiled to wasm); this file
// only reads the controls, calls the wasm interface, and draws.
import init, { Sample, quantize, compare_scores } from './pkg/kvq_wasm.js';

const SAMPLE_URL = 'smollm2-kv-sample.kvs';
const SYNTHETIC_DIM = 64;
const MAX_SYNTHETIC_TOKENS = 16384;
const MAX_INT = 2 ** 31 - 1; // keeps usize/u32 arguments from wrapping

const $ = (id) => document.getElementById(id);
const testid = (id) => document.querySelector(`[data-testid="${id}"]`);

// ---------------------------------------------------------------- state

const st = {
  real: null,           // Sample
  realError: null,      // why the real sample is missing
  synthetic: null,      // Sample
  syntheticKey: '',     // "seed/tokens" of `synthetic`
  sampleId: '',         // which sample the selects describe
  remembered: {},       // source -> { layer, head } chosen last time it was shown
  arrays: new Map(),    // cache of exact arrays: "sampleKey/layer/head/kind" -> Float32Array
  shown: null,          // what the page shows now (see state())
  lastMs: null,
};

/** An error of the page itself (a control that is not a number, ...). */
class PageError extends Error {}

// ---------------------------------------------------------------- controls

function intControl(id, label, { min = 0, max = MAX_INT } = {}) {
  const raw = $(id).value.trim();
  if (!/^\d+$/.test(raw)) throw new PageError(`${label}: enter a whole number${raw ? ` (got “${raw}”)` : ''}`);
  const v = Number(raw);
  if (v < min || v > max) throw new PageError(`${label} must be between ${min} and ${max}, got ${raw}`);
  return v;
}

function floatControl(id, label) {
  const raw = $(id).value.trim();
  const v = Number(raw);
  if (raw === '' || !Number.isFinite(v)) throw new PageError(`${label}: enter a number${raw ? ` (got “${raw}”)` : ''}`);
  return v;
}

/** The controls as the page shows them (strings), for state(). */
function rawControls() {
  const ids = ['source', 'seed', 'tokens', 'layer', 'head', 'kind', 'method', 'bits', 'group', 'axis', 'residual', 'outliers', 'query'];
  return Object.fromEntries(ids.map((id) => [id, $(id).value]));
}

/** The controls but layer and head, checked and typed: only what the page itself must check; kvq checks the rest. */
function readControls() {
  const source = $('source').value;
  const c = { source, kind: $('kind').value, method: $('method').value, axis: $('axis').value };
  if (source === 'synthetic') {
    const seed = $('seed').value.trim();
    if (!/^\d+$/.test(seed) || BigInt(seed) >= 2n ** 64n) throw new PageError(`seed: enter a whole number from 0 to 2^64 − 1${seed ? ` (got “${seed}”)` : ''}`);
    c.seed = BigInt(seed);
    c.tokens = intControl('tokens', 'tokens', { max: MAX_SYNTHETIC_TOKENS });
  }
  // A disabled control is not used by the method (or array): a bad value there is no error.
  const read = (id, parse) => {
    try {
      return parse();
    } catch (e) {
      if ($(id).disabled) return 0;
      throw e;
    }
  };
  c.bits = read('bits', () => intControl('bits', 'bits', { max: 255 }));
  c.group = read('group', () => intControl('group', 'group size'));
  c.residual = read('residual', () => intControl('residual', 'residual window'));
  c.outliers = read('outliers', () => floatControl('outliers', 'outlier fraction'));
  c.query = read('query', () => intControl('query', 'query token'));
  return c;
}

/** Which controls the chosen method and source use; the others are disabled. */
function syncEnabled() {
  const m = $('method').value;
  const synthetic = $('source').value === 'synthetic';
  $('seed').disabled = !synthetic;
  $('tokens').disabled = !synthetic;
  $('axis').disabled = m !== 'uniform';
  $('group').disabled = m === 'kvquant';
  $('residual').disabled = !(m === 'per-token' || m === 'kivi');
  $('outliers').disabled = m !== 'kvquant';
  $('query').disabled = $('kind').value !== 'keys';
}

// ---------------------------------------------------------------- samples

function currentSample(c) {
  if (c.source === 'real') {
    if (!st.real) throw new PageError(st.realError ?? 'the real sample is not loaded yet');
    return { sample: st.real, id: 'real' };
  }
  const key = `${c.seed}/${c.tokens}`;
  if (st.syntheticKey !== key) {
    const s = Sample.synthetic(c.tokens, SYNTHETIC_DIM, c.seed); // throws kvq's message on bad input
    if (st.synthetic) st.synthetic.free();
    for (const k of st.arrays.keys()) if (k.startsWith('synthetic/')) st.arrays.delete(k);
    st.synthetic = s;
    st.syntheticKey = key;
  }
  return { sample: st.synthetic, id: `synthetic/${key}` };
}

/** Refills a select; keeps `prefer` (or else the current choice) where the new options have it. */
function setOptions(select, values, label, prefer) {
  const old = select.value;
  select.replaceChildren(...values.map((v) => new Option(label(v), String(v))));
  const has = (v) => v !== undefined && values.map(String).includes(v);
  if (has(prefer)) select.value = prefer;
  else if (has(old)) select.value = old;
}

/** Refills the layer and head selects, and the query's range, when the sample changes. */
function syncSample(sample, id) {
  if (st.sampleId === id) return;
  const oldTokens = st.sampleTokens;
  // Each source remembers its layer and head across a switch to the other.
  const source = (sid) => (sid.startsWith('synthetic') ? 'synthetic' : 'real');
  if (st.sampleId) st.remembered[source(st.sampleId)] = { layer: $('layer').value, head: $('head').value };
  const back = st.remembered[source(id)];
  st.sampleId = id;
  st.sampleTokens = sample.tokens();
  const layers = Array.from(sample.layers());
  const wasEmpty = $('layer').options.length === 0;
  setOptions($('layer'), layers, (l) => `${l}`, back?.layer);
  if (wasEmpty && layers.includes(15)) $('layer').value = '15';
  setOptions($('head'), [...Array(sample.heads()).keys()], (h) => `${h}`, back?.head);
  const q = $('query');
  q.max = String(st.sampleTokens - 1);
  const qv = Number(q.value);
  if (!(qv < st.sampleTokens) || qv === oldTokens - 1) q.value = String(st.sampleTokens - 1);
}

function exactArray(sample, id, layer, head, kind) {
  const key = `${id}/${layer}/${head}/${kind}`;
  let a = st.arrays.get(key);
  if (!a) {
    a = sample.array(layer, head, kind);
    st.arrays.set(key, a);
  }
  return a;
}

// ---------------------------------------------------------------- the update

function update() {
  const t0 = performance.now();
  syncEnabled();
  st.lastControls = JSON.stringify(rawControls());
  try {
    const c = readControls();
    const { sample, id } = currentSample(c);
    syncSample(sample, id);
    // The selects describe the sample now (they are refilled when it changes).
    c.layer = intControl('layer', 'layer');
    c.head = intControl('head', 'head');
    const keys = c.kind === 'keys';
    const tokens = sample.tokens();
    const dim = sample.head_dim();
    const view = quantize(sample, c.layer, c.head, keys, c.method, c.bits, c.group, c.axis, c.residual, c.outliers);
    let r;
    try {
      r = {
        recon: view.reconstruction(),
        bytes: view.bytes(),
        effectiveBits: view.effective_bits(),
        relativeError: view.relative_error(),
        rms: view.channel_rms_error(),
      };
    } finally {
      view.free();
    }
    const data = exactArray(sample, id, c.layer, c.head, keys ? 'keys' : 'values');
    let scores = null;
    if (keys) {
      const s = compare_scores(data, r.recon, dim, c.query);
      try {
        scores = { exact: s.exact(), quantized: s.quantized(), maxAbsError: s.max_abs_error() };
      } finally {
        s.free();
      }
    }
    const header = id === 'real' ? st.realHeader : null;
    draw({ c, tokens, dim, data, r, scores });
    show({ c, tokens, dim, r, scores, header });
  } catch (e) {
    showError(e);
  }
  st.lastMs = performance.now() - t0;
}

// ---------------------------------------------------------------- numbers

/** Up to `digits` significant digits, trailing zeros dropped (parseFloat gives the value back). */
const sig = (x, digits = 10) => String(Number(x.toPrecision(digits)));
const group3 = (n) => n.toLocaleString('en-US');
const kib = (b) => `${(b / 1024).toFixed(b < 10240 ? 2 : 1)} KiB`;

function show({ c, tokens, dim, r, scores, header }) {
  const keys = c.kind === 'keys';
  const f16 = tokens * dim * 2;
  const model = c.source === 'real' ? (header?.model ?? 'SmolLM2') : `synthetic (seed ${c.seed})`;
  testid('tile').textContent = `${model} · layer ${c.layer} · KV head ${c.head} · ${c.kind} · ${tokens} tokens × ${dim} channels`;
  testid('relative-error').textContent = sig(r.relativeError);
  $('relative-error-pct').textContent = `(${(100 * r.relativeError).toFixed(2)} % of ‖x‖)`;
  testid('bytes').textContent = `${r.bytes} bytes`;
  $('bytes-aside').textContent = `(${kib(r.bytes)}; f16: ${group3(f16)} bytes, ${(f16 / r.bytes).toFixed(2)}× smaller)`;
  testid('effective-bits').textContent = `${sig(r.effectiveBits)} bits/value`;
  $('bits-aside').textContent = `(codes: ${c.bits} bits)`;
  if (keys) {
    testid('score-max-abs-error').textContent = sig(scores.maxAbsError, 9);
    const range = Math.max(...scores.exact) - Math.min(...scores.exact);
    $('score-aside').textContent = `(q·k/√d units; query token ${c.query}; exact scores span ${range.toFixed(2)})`;
  } else {
    testid('score-max-abs-error').textContent = 'n/a';
    $('score-aside').textContent = '(values do not enter the scores)';
  }
  const err = testid('error');
  err.hidden = true;
  err.textContent = '';
  testid('status').textContent = `ok — ${c.method}, ${c.bits} bits, ${tokens}×${dim} tile quantized and drawn`;
  document.body.classList.remove('has-error');
  st.shown = {
    relativeError: r.relativeError,
    bytes: r.bytes,
    effectiveBits: r.effectiveBits,
    scoreMaxAbsError: keys ? scores.maxAbsError : null,
    tokens,
    headDim: dim,
    error: null,
  };
}

function showError(e) {
  const message = e instanceof Error ? e.message : String(e);
  const err = testid('error');
  err.textContent = message;
  err.hidden = false;
  testid('status').textContent = `error — ${message}`;
  for (const t of ['relative-error', 'bytes', 'effective-bits', 'score-max-abs-error']) testid(t).textContent = '—';
  for (const a of ['relative-error-pct', 'bytes-aside', 'bits-aside', 'score-aside']) $(a).textContent = '';
  document.body.classList.add('has-error'); // the figures fade: they show the last good setting
  st.shown = { ...(st.shown ?? {}), relativeError: null, bytes: null, effectiveBits: null, scoreMaxAbsError: null, error: message };
}

// ---------------------------------------------------------------- drawing

const FONT = '12px system-ui, sans-serif';
const INK = '#222';
const GRID = '#ddd';
// Plot area of every canvas: left margin for the channel/value axis, 1024 px of tokens.
const PLOT = { left: 62, top: 26, width: 1024 };

/** A 256-colour lookup table (packed RGBA for a little-endian Uint32Array) from colour stops. */
function lut(stops) {
  const out = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (stops.length - 1);
    const k = Math.min(Math.floor(x), stops.length - 2);
    const f = x - k;
    const [a, b] = [stops[k], stops[k + 1]];
    const c = [0, 1, 2].map((j) => Math.round(a[j] + (b[j] - a[j]) * f));
    out[i] = ((255 << 24) | (c[2] << 16) | (c[1] << 8) | c[0]) >>> 0;
  }
  return out;
}
// Diverging blue–white–red (ColorBrewer RdBu) for signed values; "inferno"-like for errors.
const DIVERGING = lut([[5, 48, 97], [33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43], [103, 0, 31]]);
const SEQUENTIAL = lut([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]]);

/** About `n` round tick values covering [lo, hi]. */
function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const p = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * p).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return out;
}

const fmt = (v) => {
  const a = Math.abs(v);
  if (a === 0) return '0';
  if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
  return String(Number(v.toPrecision(3)));
};

function prepare(canvas) {
  const ctx = canvas.getContext('2d');
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = FONT;
  ctx.fillStyle = INK;
  ctx.strokeStyle = INK;
  ctx.lineWidth = 1;
  return ctx;
}

function title(ctx, text) {
  ctx.font = 'bold 13px system-ui, sans-serif';
  ctx.textAlign = 'left';
  ctx.textBaseline = 'alphabetic';
  ctx.fillText(text, PLOT.left, PLOT.top - 9);
  ctx.font = FONT;
}

/** Token axis under a plot of height h at y0. */
function tokenAxis(ctx, tokens, y0, h, label = 'token') {
  const { left, width } = PLOT;
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (const t of ticks(0, tokens - 1, 8)) {
    const x = left + ((t + 0.5) / tokens) * width;
    ctx.fillRect(Math.round(x), y0 + h, 1, 4);
    ctx.fillText(String(t), x, y0 + h + 6);
  }
  ctx.fillText(`${label} (0 … ${tokens - 1})`, left + width / 2, y0 + h + 21);
}

/** Vertical axis label, rotated. */
function yLabel(ctx, text, y0, h) {
  ctx.save();
  ctx.translate(13, y0 + h / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = 'center';
  ctx.textBaseline = 'middle';
  ctx.fillText(text, 0, 0);
  ctx.restore();
}

const scratch = document.createElement('canvas');

/** A 1 × 256 canvas of a colour map, top = 255 (cached on the map). */
function colourBar(map) {
  if (!map.bar) {
    const c = document.createElement('canvas');
    c.width = 1;
    c.height = 256;
    const cctx = c.getContext('2d');
    const img = cctx.createImageData(1, 256);
    const px = new Uint32Array(img.data.buffer);
    for (let i = 0; i < 256; i++) px[i] = map[255 - i];
    cctx.putImageData(img, 0, 0);
    map.bar = c;
  }
  return map.bar;
}

/**
 * A tokens × channels heatmap: one pixel per element in an ImageData (tokens along x,
 * channels along y), scaled onto the plot without smoothing; a colour bar on the right.
 */
function heatmap(canvas, values, tokens, dim, { map, lo, hi, name, unit }) {
  const ctx = prepare(canvas);
  const { left, top, width } = PLOT;
  const height = canvas.height - top - 44;
  scratch.width = tokens;
  scratch.height = dim;
  const sctx = scratch.getContext('2d');
  const img = sctx.createImageData(tokens, dim);
  const px = new Uint32Array(img.data.buffer);
  const k = hi > lo ? 255 / (hi - lo) : 0;
  for (let t = 0; t < tokens; t++) {
    const row = t * dim;
    for (let ch = 0; ch < dim; ch++) {
      let i = ((values[row + ch] - lo) * k) | 0;
      i = i < 0 ? 0 : i > 255 ? 255 : i;
      px[ch * tokens + t] = map[i];
    }
  }
  sctx.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(scratch, left, top, width, height);
  ctx.strokeRect(left - 0.5, top - 0.5, width + 1, height + 1);
  title(ctx, name);
  // Channel axis.
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (const ch of ticks(0, dim - 1, 4)) {
    const y = top + ((ch + 0.5) / dim) * height;
    ctx.fillRect(left - 5, Math.round(y), 4, 1);
    ctx.fillText(String(ch), left - 7, y);
  }
  yLabel(ctx, 'channel', top, height);
  tokenAxis(ctx, tokens, top, height);
  // Colour bar: the 256 colours, high at the top, scaled like the heatmap.
  const bx = left + width + 14;
  const bw = 14;
  ctx.drawImage(colourBar(map), bx, top, bw, height);
  ctx.strokeRect(bx - 0.5, top - 0.5, bw + 1, height + 1);
  ctx.textAlign = 'left';
  ctx.textBaseline = 'middle';
  const vt = hi > lo ? ticks(lo, hi, 4) : [lo];
  for (const v of vt) {
    const y = top + (1 - (hi > lo ? (v - lo) / (hi - lo) : 0)) * (height - 1);
    ctx.fillRect(bx + bw, Math.round(y), 4, 1);
    ctx.fillText(fmt(v), bx + bw + 6, y);
  }
  ctx.textBaseline = 'top';
  ctx.fillText(unit, bx - 4, top + height + 6);
}

function bars(canvas, rms, { name }) {
  const ctx = prepare(canvas);
  const { left, top, width } = PLOT;
  const height = canvas.height - top - 44;
  const dim = rms.length;
  let max = 0;
  for (const v of rms) max = Math.max(max, v);
  const yt = ticks(0, max > 0 ? max : 1, 4);
  const ymax = Math.max(yt[yt.length - 1], max) || 1;
  const y = (v) => top + height - (v / ymax) * height;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (const v of yt) {
    ctx.fillStyle = GRID;
    ctx.fillRect(left, Math.round(y(v)), width, 1);
    ctx.fillStyle = INK;
    ctx.fillText(fmt(v), left - 7, y(v));
  }
  const bw = width / dim;
  ctx.fillStyle = '#c2553a';
  for (let ch = 0; ch < dim; ch++) {
    const h = (rms[ch] / ymax) * height;
    ctx.fillRect(left + ch * bw + 1, top + height - h, Math.max(1, bw - 2), h);
  }
  ctx.fillStyle = INK;
  ctx.strokeRect(left - 0.5, top - 0.5, width + 1, height + 1);
  title(ctx, name);
  yLabel(ctx, 'RMS error', top, height);
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (const ch of ticks(0, dim - 1, 8)) {
    const x = left + (ch + 0.5) * bw;
    ctx.fillRect(Math.round(x), top + height, 1, 4);
    ctx.fillText(String(ch), x, top + height + 6);
  }
  ctx.fillText(`channel (0 … ${dim - 1})`, left + width / 2, top + height + 21);
}

/** Line over tokens: one path, one point per token (or per pixel column when tokens > width). */
function line(ctx, ys, tokens, y, color) {
  const { left, width } = PLOT;
  ctx.strokeStyle = color;
  ctx.beginPath();
  for (let t = 0; t < tokens; t++) {
    const x = left + ((t + 0.5) / tokens) * width;
    if (t === 0) ctx.moveTo(x, y(ys[t]));
    else ctx.lineTo(x, y(ys[t]));
  }
  ctx.stroke();
  ctx.strokeStyle = INK;
}

function range(...arrays) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const a of arrays) for (const v of a) { if (v < lo) lo = v; if (v > hi) hi = v; }
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  return [lo, hi];
}

function scoresChart(canvas, s, tokens, query) {
  const ctx = prepare(canvas);
  const { left, top, width } = PLOT;
  const h1 = 190;
  const gap = 44;
  const top2 = top + h1 + gap;
  const h2 = canvas.height - top2 - 44;
  const diff = new Float32Array(tokens);
  for (let t = 0; t < tokens; t++) diff[t] = s.quantized[t] - s.exact[t];
  const panel = (y0, h, lo, hi, label) => {
    const yt = ticks(lo, hi, 4);
    const y = (v) => y0 + h - ((v - lo) / (hi - lo)) * h;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (const v of yt) {
      ctx.fillStyle = v === 0 ? '#999' : GRID;
      ctx.fillRect(left, Math.round(y(v)), width, 1);
      ctx.fillStyle = INK;
      ctx.fillText(fmt(v), left - 7, y(v));
    }
    ctx.strokeRect(left - 0.5, y0 - 0.5, width + 1, h + 1);
    yLabel(ctx, label, y0, h);
    // The query token.
    const qx = Math.round(left + ((query + 0.5) / tokens) * width) + 0.5;
    ctx.save();
    ctx.setLineDash([3, 3]);
    ctx.strokeStyle = '#888';
    ctx.beginPath();
    ctx.moveTo(qx, y0);
    ctx.lineTo(qx, y0 + h);
    ctx.stroke();
    ctx.restore();
    return y;
  };
  let [lo, hi] = range(s.exact, s.quantized);
  const y1 = panel(top, h1, lo, hi, 'score q·k/√d');
  line(ctx, s.exact, tokens, y1, '#1f5fa8');
  line(ctx, s.quantized, tokens, y1, 'rgba(226, 112, 20, 0.85)');
  title(ctx, `Attention scores of query token ${query}`);
  // Legend.
  ctx.textAlign = 'left';
  ctx.textBaseline = 'middle';
  const lx = left + width - 250;
  for (const [i, [label, color]] of [['exact keys', '#1f5fa8'], ['quantized keys', '#e27014']].entries()) {
    ctx.fillStyle = color;
    ctx.fillRect(lx + i * 125, top - 15, 18, 3);
    ctx.fillStyle = INK;
    ctx.fillText(label, lx + i * 125 + 24, top - 14);
  }
  const m = Math.max(Math.abs(Math.min(...diff)), Math.abs(Math.max(...diff))) || 1;
  [lo, hi] = [-m, m];
  const y2 = panel(top2, h2, lo, hi, 'difference');
  line(ctx, diff, tokens, y2, '#8a2be2');
  ctx.font = 'bold 13px system-ui, sans-serif';
  ctx.textAlign = 'left';
  ctx.textBaseline = 'alphabetic';
  ctx.fillText('quantized − exact', left, top2 - 9);
  ctx.font = FONT;
  tokenAxis(ctx, tokens, top2, h2, 'key token');
}

function draw({ c, tokens, dim, data, r, scores }) {
  const keys = c.kind === 'keys';
  let amax = 0;
  for (const v of data) { const a = Math.abs(v); if (a > amax) amax = a; }
  heatmap($('original'), data, tokens, dim, {
    map: DIVERGING, lo: -amax, hi: amax, unit: 'value',
    name: `Original ${c.kind} (|x| ≤ ${fmt(amax)})`,
  });
  const err = new Float32Array(tokens * dim);
  let emax = 0;
  for (let i = 0; i < err.length; i++) {
    const e = Math.abs(r.recon[i] - data[i]);
    err[i] = e;
    if (e > emax) emax = e;
  }
  heatmap($('error'), err, tokens, dim, {
    map: SEQUENTIAL, lo: 0, hi: emax, unit: '|error|',
    name: `Absolute error |x̂ − x| (max ${fmt(emax)})`,
  });
  bars($('rms'), r.rms, { name: 'RMS error per channel' });
  $('scores').hidden = !keys;
  $('scores-caption').hidden = !keys;
  $('scores-hidden').hidden = keys;
  if (keys) scoresChart($('scores'), scores, tokens, c.query);
}

// ---------------------------------------------------------------- the API for tests and scripts

const ORDER = ['source', 'seed', 'tokens', 'layer', 'head', 'kind', 'method', 'bits', 'group', 'axis', 'residual', 'outliers', 'query'];

/** Sets controls ({bits: 3, method: 'kivi', ...}) and re-quantizes; returns state(). */
function set(controls) {
  const first = ['source', 'seed', 'tokens'];
  for (const k of Object.keys(controls)) if (!ORDER.includes(k)) throw new PageError(`unknown control “${k}”; known: ${ORDER.join(', ')}`);
  for (const k of first) if (k in controls) $(k).value = String(controls[k]);
  if (first.some((k) => k in controls)) update(); // refills the layer and head selects
  for (const k of ORDER) if (!first.includes(k) && k in controls) $(k).value = String(controls[k]);
  update();
  return state();
}

function state() {
  return {
    controls: rawControls(),
    ...(st.shown ?? {}),
    status: testid('status').textContent,
    lastMs: st.lastMs,
  };
}

/** Re-quantizes and redraws the current tile n times; the median milliseconds per redraw. */
function benchmark(n = 30) {
  update(); // warm-up (and the exact arrays are cached)
  const times = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    update();
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  const mid = times.length >> 1;
  return times.length % 2 ? times[mid] : (times[mid - 1] + times[mid]) / 2;
}

// ---------------------------------------------------------------- start

async function start() {
  try {
    await init();
  } catch (e) {
    showError(new Error(`could not load the WebAssembly module (pkg/kvq_wasm_bg.wasm): ${e.message ?? e}`));
    throw e;
  }
  try {
    const res = await fetch(SAMPLE_URL);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    st.real = new Sample(new Uint8Array(await res.arrayBuffer()));
    st.realHeader = JSON.parse(st.real.header_json());
  } catch (e) {
    st.realError = `could not load the real sample (${SAMPLE_URL}): ${e.message ?? e}`;
    $('source').value = 'synthetic';
  }
  const form = $('controls');
  // Every input event re-quantizes; a change event only when it was not already seen
  // as an input (selects fire both).
  form.addEventListener('input', update);
  form.addEventListener('change', () => {
    if (JSON.stringify(rawControls()) !== st.lastControls) update();
  });
  update();
  if (st.realError) showError(new Error(`${st.realError}; showing the synthetic sample`));
}

const ready = start();
window.kvqDemo = { ready, set, state, benchmark };
