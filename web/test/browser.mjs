// The browser demo's end-to-end test: serves web/ itself, opens the page in Debian's
// Chromium (playwright-core, no browser download), applies every golden setting through
// the real controls, compares the numbers shown with the native ones (golden.json, from
// `cargo run -p kvq-wasm --example golden`), checks bad settings show kvq's error, that
// nothing was logged as an error, takes a screenshot, and times re-quantize + redraw.
//
//   node web/test/browser.mjs            (scripts/web.sh builds everything first)
//
// Environment: KVQ_WEB_BENCH=path.md writes the timing table there; CHROMIUM overrides
// /usr/bin/chromium; KVQ_GOLDEN overrides web/test/golden.json.

import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const GOLDEN = process.env.KVQ_GOLDEN ?? path.join(WEB, 'test', 'golden.json');
const ARTIFACTS = path.join(WEB, 'test', 'artifacts');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
// The page shows numbers the wasm build of kvq computed; they must equal the native
// golden values (synthetic samples are even checked bit for bit, see below).
const REL_TOL = 1e-6;
const BENCH_RUNS = 30;

const failures = [];
const fail = (msg) => {
  failures.push(msg);
  console.log(`  FAIL ${msg}`);
};

function die(msg) {
  console.error(`browser test: ${msg}`);
  process.exit(2);
}

// ------------------------------------------------------------------ preflight

for (const [file, how] of [
  ['pkg/kvq_wasm.js', 'wasm-bindgen --target web --out-dir web/pkg target/wasm32-unknown-unknown/release/kvq_wasm.wasm'],
  ['pkg/kvq_wasm_bg.wasm', 'wasm-bindgen (see scripts/web.sh)'],
  ['smollm2-kv-sample.kvs', 'cp data/smollm2-kv-sample.kvs web/'],
]) {
  if (!fs.existsSync(path.join(WEB, file))) die(`web/${file} is missing: run scripts/web.sh (or: ${how})`);
}
if (!fs.existsSync(GOLDEN)) die(`${GOLDEN} is missing: run cargo run -p kvq-wasm --example golden --release -- web/test/golden.json`);
if (!fs.existsSync(CHROMIUM)) die(`${CHROMIUM} is missing: apt-get install -y chromium (or set CHROMIUM)`);
const golden = JSON.parse(fs.readFileSync(GOLDEN, 'utf8'));

// ------------------------------------------------------------------ static server

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json',
  '.wasm': 'application/wasm',
  '.kvs': 'application/octet-stream',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ts': 'text/plain; charset=utf-8',
  '.md': 'text/markdown; charset=utf-8',
};

const served = [];
const server = http.createServer((req, res) => {
  let rel;
  try {
    rel = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  } catch {
    res.writeHead(400).end('bad request');
    return;
  }
  let file = path.join(WEB, path.normalize(rel));
  if (!file.startsWith(WEB + path.sep) && file !== WEB) {
    res.writeHead(403).end('forbidden');
    return;
  }
  if (fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, 'index.html');
  fs.readFile(file, (err, body) => {
    if (err) {
      served.push({ url: req.url, status: 404 });
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found');
      return;
    }
    const type = MIME[path.extname(file)] ?? 'application/octet-stream';
    served.push({ url: req.url, status: 200, type });
    res.writeHead(200, { 'content-type': type, 'content-length': body.length, 'cache-control': 'no-store' }).end(body);
  });
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const base = `http://127.0.0.1:${server.address().port}/`;

// ------------------------------------------------------------------ browser

const watchdog = setTimeout(() => {
  console.error('browser test: FAIL: still running after 10 minutes');
  process.exit(1);
}, 600_000);
watchdog.unref();

let browser;
try {
  browser = await chromium.launch({ executablePath: CHROMIUM });
} catch (e) {
  die(`could not start ${CHROMIUM}: ${e.message.split('\n')[0]}`);
}
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const consoleProblems = [];
const warnings = [];
page.on('console', (m) => {
  if (m.type() === 'error') consoleProblems.push(`console error: ${m.text()}`);
  else if (m.type() === 'warning') warnings.push(m.text());
});
page.on('pageerror', (e) => consoleProblems.push(`page error: ${e.message}`));
page.on('requestfailed', (r) => consoleProblems.push(`request failed: ${r.url()} (${r.failure()?.errorText})`));

const byId = (id) => page.getByTestId(id);
const text = async (id) => ((await byId(id).textContent()) ?? '').trim();

/** Applies one setting through the real controls, as a user would. */
async function applyControls(c) {
  await page.selectOption('#source', c.source);
  if (c.source === 'synthetic') {
    await page.fill('#seed', String(c.seed));
    await page.fill('#tokens', String(c.tokens));
  }
  await page.selectOption('#layer', String(c.layer));
  await page.selectOption('#head', String(c.head));
  await page.selectOption('#kind', c.kind);
  await page.selectOption('#method', c.method);
  const skipped = [];
  for (const id of ['bits', 'group', 'axis', 'residual', 'outliers', 'query']) {
    const el = page.locator(`#${id}`);
    if (await el.isDisabled()) {
      skipped.push(id); // the method (or array) does not use it
      continue;
    }
    if (id === 'axis') await page.selectOption('#axis', c.axis);
    else await el.fill(String(c[id]));
  }
  return skipped;
}

const close = (a, b, tol = REL_TOL) => Math.abs(a - b) <= tol * Math.max(Math.abs(b), 1e-30);

/** Fingerprints (FNV-1a over f32 bits, as golden.rs computes them) of a synthetic sample built in the page. */
async function browserFingerprints(seed, tokens, dim) {
  return page.evaluate(async ([seed, tokens, dim]) => {
    const { Sample } = await import(new URL('pkg/kvq_wasm.js', location.href).href); // the page's instance
    const s = Sample.synthetic(tokens, dim, BigInt(seed));
    try {
      const out = {};
      for (const k of ['keys_pre_rope', 'keys', 'values']) {
        const bits = new Uint32Array(s.array(0, 0, k).buffer);
        let h = 0x811c9dc5;
        for (let i = 0; i < bits.length; i++) h = Math.imul(h ^ bits[i], 0x01000193) >>> 0;
        out[k] = h.toString(16).padStart(8, '0');
      }
      return out;
    } finally {
      s.free();
    }
  }, [seed, tokens, dim]);
}

/** Arrays ("seed/tokens/kind") the browser builds differently from the native code. */
const differing = new Set();

/** Compares what the page shows with one golden case. */
async function checkShown(name, expect, keys, tol = REL_TOL) {
  if ('error_contains' in expect) {
    const visible = await byId('error').isVisible();
    const msg = await text('error');
    if (!visible) fail(`${name}: no visible error (expected one containing “${expect.error_contains}”)`);
    else if (!msg.includes(expect.error_contains)) fail(`${name}: the error shown is “${msg}”, expected it to contain “${expect.error_contains}”`);
    const status = await text('status');
    if (!status.startsWith('error')) fail(`${name}: status is “${status}”, expected an error`);
    if ((await text('relative-error')) !== '—') fail(`${name}: a relative error is still shown next to the error`);
    return `error “${msg}”`;
  }
  if (await byId('error').isVisible()) {
    fail(`${name}: unexpected error “${await text('error')}”`);
    return 'error';
  }
  const status = await text('status');
  if (!status.startsWith('ok')) fail(`${name}: status is “${status}”`);
  const got = {
    relative_error: parseFloat(await text('relative-error')),
    effective_bits: parseFloat(await text('effective-bits')),
  };
  const bytesText = await text('bytes');
  if (!/^\d+ bytes$/.test(bytesText)) fail(`${name}: bytes shown as “${bytesText}”`);
  got.bytes = parseInt(bytesText, 10);
  if (got.bytes !== expect.bytes) fail(`${name}: bytes ${got.bytes}, golden ${expect.bytes}`);
  for (const k of ['relative_error', 'effective_bits']) {
    if (!close(got[k], expect[k], tol)) fail(`${name}: ${k} ${got[k]}, golden ${expect[k]} (relative tolerance ${tol})`);
  }
  const scoreText = await text('score-max-abs-error');
  if (keys) {
    got.score = parseFloat(scoreText);
    if (!close(got.score, expect.score_max_abs_error, tol)) fail(`${name}: max |score error| ${scoreText}, golden ${expect.score_max_abs_error} (relative tolerance ${tol})`);
  } else if (scoreText !== 'n/a') {
    fail(`${name}: max |score error| shown as “${scoreText}” for values (expected n/a)`);
  }
  return `rel ${got.relative_error}, ${got.bytes} B, ${got.effective_bits} bits${keys ? `, score err ${got.score}` : ''}`;
}

let chromiumVersion = '?';
const bench = [];
try {
  chromiumVersion = browser.version();
  console.log(`Chromium ${chromiumVersion} (${CHROMIUM}), page ${base}`);
  await page.goto(base);
  await page.waitForFunction(() => window.kvqDemo, null, { timeout: 30_000 });
  await page.evaluate(() => window.kvqDemo.ready);
  const first = await page.evaluate(() => window.kvqDemo.state());
  if (first.error) fail(`the page starts with an error: ${first.error}`);
  if (first.tokens !== golden.real_sample.tokens || first.headDim !== golden.real_sample.head_dim) {
    fail(`the page starts on a ${first.tokens}×${first.headDim} tile, expected the real sample (${golden.real_sample.tokens}×${golden.real_sample.head_dim})`);
  }
  const wasm = served.find((s) => s.url.endsWith('.wasm'));
  if (!wasm || wasm.type !== 'application/wasm') fail(`the .wasm was not served as application/wasm: ${JSON.stringify(wasm)}`);

  console.log('\n== synthetic samples: built in the browser vs natively');
  for (const { seed, tokens, fingerprints } of golden.synthetic_samples) {
    const got = await browserFingerprints(seed, tokens, golden.synthetic_head_dim);
    for (const [kind, want] of Object.entries(fingerprints)) {
      const same = got[kind] === want;
      if (!same) differing.add(`${seed}/${tokens}/${kind}`);
      console.log(`  seed ${seed}, ${tokens} tokens, ${kind}: ${same ? 'bit-identical' : `differs (fingerprint ${got[kind]} vs native ${want})`}`);
    }
    for (const kind of Object.keys(fingerprints)) {
      if (differing.has(`${seed}/${tokens}/${kind}`)) fail(`synthetic ${kind} (seed ${seed}, ${tokens} tokens) differ between the browser and the native code`);
    }
  }

  console.log(`\n== ${golden.cases.length} golden settings through the page's controls`);
  for (const g of golden.cases) {
    const keys = g.controls.kind === 'keys';
    const skipped = await applyControls(g.controls);
    const shown = await checkShown(`[controls] ${g.name}`, g.expect, keys, REL_TOL);
    console.log(`  ${g.name}: ${shown}${skipped.length ? ` (unused: ${skipped.join(', ')})` : ''}`);
  }

  console.log('\n== the same settings through window.kvqDemo.set (every control, used or not)');
  for (const g of golden.cases) {
    await page.evaluate((c) => window.kvqDemo.set(c), g.controls);
    await checkShown(`[set] ${g.name}`, g.expect, g.controls.kind === 'keys', REL_TOL);
  }
  console.log(`  ${golden.cases.length} settings checked`);

  console.log('\n== page-level checks');
  const good = golden.cases.find((g) => !('error_contains' in g.expect));
  await applyControls(good.controls);
  await checkShown(`[recovers after errors] ${good.name}`, good.expect, good.controls.kind === 'keys');
  for (const [id, value, part] of [
    ['bits', '2.5', 'bits: enter a whole number'],
    ['query', '99999', 'query token 99999 is out of range'],
  ]) {
    await applyControls({ ...good.controls, method: 'kivi', kind: 'keys' });
    await page.fill(`#${id}`, value);
    const msg = (await byId('error').isVisible()) ? await text('error') : '(none)';
    if (!msg.includes(part)) fail(`${id} = ${value}: error shown “${msg}”, expected “${part}”`);
    else console.log(`  ${id} = ${value}: “${msg}”`);
  }
  await page.evaluate(() => window.kvqDemo.set({ source: 'real', layer: 15, head: 0, kind: 'keys', method: 'kivi', bits: 2, group: 32, residual: 128, query: 511 }));
  if (await byId('error').isVisible()) fail(`the default setting shows an error: ${await text('error')}`);

  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const shot = path.join(ARTIFACTS, 'demo.png');
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`  screenshot: ${path.relative(process.cwd(), shot)}`);

  console.log(`\n== benchmark: re-quantize + redraw, median of ${BENCH_RUNS}`);
  const tiles = [
    { tile: 'synthetic, seed 1', controls: { source: 'synthetic', seed: 1, tokens: 1024, layer: 0, head: 0, query: 1023 } },
    { tile: 'SmolLM2 layer 15, head 0', controls: { source: 'real', layer: 15, head: 0, query: 511 } },
  ];
  const methods = [
    { method: 'uniform', axis: 'per-channel', bits: 2, group: 32, residual: 0, label: 'uniform per-channel, g32' },
    { method: 'per-token', bits: 2, group: 32, residual: 128, label: 'per-token, g32 r128' },
    { method: 'kivi', bits: 2, group: 32, residual: 128, label: 'KIVI, g32 r128' },
    { method: 'kvquant', bits: 2, outliers: 0.01, label: 'KVQuant, 1% outliers' },
  ];
  for (const t of tiles) {
    for (const kind of ['keys', 'values']) {
      for (const { label, ...m } of methods) {
        const s = await page.evaluate((c) => window.kvqDemo.set(c), { ...t.controls, kind, ...m });
        if (s.error) {
          fail(`benchmark ${t.tile} ${kind} ${label}: ${s.error}`);
          continue;
        }
        const ms = await page.evaluate((n) => window.kvqDemo.benchmark(n), BENCH_RUNS);
        if (!(ms > 0)) fail(`benchmark ${t.tile} ${kind} ${label}: ${ms} ms`);
        bench.push({ tile: `${t.tile} (${s.tokens}×${s.headDim})`, kind, method: label, bits: m.bits, ms });
        console.log(`  ${t.tile} (${s.tokens}×${s.headDim}) ${kind} ${label} 2-bit: ${ms.toFixed(2)} ms`);
      }
    }
  }
  const after = await page.evaluate(() => window.kvqDemo.state());
  if (after.error) fail(`error after the benchmark: ${after.error}`);
} catch (e) {
  fail(`the test stopped: ${e.stack ?? e}`);
} finally {
  await browser.close();
  server.close();
}

for (const w of warnings) console.log(`  console warning: ${w}`);
if (warnings.some((w) => /instantiateStreaming|MIME/i.test(w))) fail('the wasm module was not loaded by streaming (MIME type?)');
for (const p of consoleProblems) fail(p);

// ------------------------------------------------------------------ the timing table

if (process.env.KVQ_WEB_BENCH && bench.length) {
  let commit = 'unknown';
  try {
    commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: WEB, encoding: 'utf8' }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--', '.', '../crates'], { cwd: WEB, encoding: 'utf8' }).trim();
    if (dirty) commit += ' (with uncommitted changes)';
  } catch { /* not a git checkout */ }
  const now = new Date().toISOString().replace('T', ' ').slice(0, 16);
  const cpus = os.cpus();
  const lines = [
    '# Browser demo: re-quantize + redraw',
    '',
    `- date: ${now} UTC`,
    `- browser: Chromium ${chromiumVersion} (headless, driven by playwright-core)`,
    `- machine: ${cpus[0]?.model?.trim() ?? 'unknown CPU'}, ${cpus.length} threads, ${os.platform()} ${os.release()}`,
    `- commit: ${commit}`,
    `- command: \`KVQ_WEB_BENCH=${process.env.KVQ_WEB_BENCH} node web/test/browser.mjs\` (after \`scripts/web.sh\` built the page)`,
    '',
    `\`kvqDemo.benchmark(${BENCH_RUNS})\`: the median over ${BENCH_RUNS} redraws of one head's tile — quantize in wasm`,
    '(kvq-wasm, release), read back the reconstruction, metrics and scores, and redraw both heatmaps, the',
    'per-channel bars and the score chart (JavaScript time; the compositor paints afterwards). 2-bit codes.',
    'Chromium rounds performance.now() to 0.1 ms on a page that is not cross-origin isolated.',
    '',
    '| tile | array | method | median ms per redraw |',
    '|---|---|---|---:|',
    ...bench.map((b) => `| ${b.tile} | ${b.kind} | ${b.method} | ${b.ms.toFixed(2)} |`),
    '',
  ];
  fs.mkdirSync(path.dirname(path.resolve(process.env.KVQ_WEB_BENCH)), { recursive: true });
  fs.writeFileSync(process.env.KVQ_WEB_BENCH, lines.join('\n'));
  console.log(`\ntiming written to ${process.env.KVQ_WEB_BENCH}`);
}

if (failures.length) {
  console.error(`\nbrowser test: FAIL (${failures.length} problem${failures.length > 1 ? 's' : ''}):`);
  for (const f of failures) console.error(`  - ${f}`);
  process.exit(1);
}
console.log(`\nbrowser test: PASS (${golden.cases.length} golden settings through the controls and through kvqDemo.set, no console errors)`);
