// The full-size model in a browser tab (slow: not part of `./build.sh test`; `./build.sh fullsize`).
// Headless Chromium, WebGPU on SwiftShader with the device requested at the spec default limits
// (128 MiB bindings, 256 MiB buffers). Picks a weight pack of the real architecture (random
// weights, tests/fullsize/make_fullsize.py + `visii convert`) with the "files from this computer"
// pickers, so it is copied into OPFS and loaded from there by range, one tensor at a time
// (VISII_FULLSIZE_RESIDENT=q8: the weights stay int8 on the GPU); then, with "Measure this GPU",
// one UNet forward and one UNet learning step (three rows, backward, update) at
// VISII_FULLSIZE_PX / 8 latents on random inputs; with VISII_FULLSIZE_PIPELINE=1 also the whole
// pipeline: one learning step (VAE, CLIP ViT-L/14, UNet) and one apply step.
// Prints load time, step times, the wasm heap and the largest single read, and writes them to
// tests/output/fullsize.json.
//
//   VISII_FULLSIZE_PACK=/path/to/pack [VISII_FULLSIZE_PX=64] [VISII_FULLSIZE_RESIDENT=q8]
//     [VISII_FULLSIZE_MEASURE=forward,learn-step,sample-step] [VISII_FULLSIZE_PIPELINE=1] node tests/browser/fullsize.mjs
import { mkdirSync, writeFileSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { serve } from './server.mjs';
import { launch } from './chromium.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const out = join(root, 'tests', 'output');
const fx = join(root, 'tests', 'fixtures');
mkdirSync(out, { recursive: true });
const pack = process.env.VISII_FULLSIZE_PACK;
if (!pack) throw new Error('set VISII_FULLSIZE_PACK to a pack folder (see tests/fullsize/README.md)');
const px = Number(process.env.VISII_FULLSIZE_PX || 64);
const resident = process.env.VISII_FULLSIZE_RESIDENT || 'f32';
const pipeline = process.env.VISII_FULLSIZE_PIPELINE === '1';
// Empty: load only.
const measures = (process.env.VISII_FULLSIZE_MEASURE ?? 'forward,learn-step').split(',').filter(Boolean);
const hours = 3600e3;
// Chromium's GPU process holds SwiftShader's buffers: its peak resident memory (VmHWM) is the GPU memory.
const gpuProcessPeak = () => {
  let peak = 0;
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('--type=gpu-process')) continue;
      const kb = Number((readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmHWM:\s+(\d+)/) || [])[1] || 0);
      peak = Math.max(peak, kb * 1024);
    } catch {}
  }
  return peak;
};
const dirBytes = (d) => readdirSync(d).reduce((a, f) => { const p = join(d, f); const s = statSync(p); return a + (s.isDirectory() ? dirBytes(p) : s.size); }, 0);

const { server, port } = await serve({ root });
const results = { pack, packBytes: dirBytes(pack), px, resident };
let browser;
let ticker;
try {
  browser = await launch({ viewport: { width: 1200, height: 1800 } });
  const page = browser.pages()[0] || await browser.newPage();
  page.on('console', (m) => console.log(`[page ${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => console.log(`[pageerror] ${e.message}`));
  // Progress lines every minute (a full-size step on SwiftShader takes tens of minutes).
  ticker = setInterval(async () => {
    try { console.log(`  ${new Date().toISOString().slice(11, 19)} measure: ${await page.textContent('#measure-text')} | learn: ${await page.textContent('#learn-text')} | apply: ${await page.textContent('#apply-text')}`); } catch {}
  }, 60000);
  const waitData = async (key, value) => {
    await page.waitForFunction(([k, v]) => document.body.dataset[k] === v || !document.getElementById('error-panel').hidden, [key, value], { timeout: 6 * hours, polling: 1000 });
    if (await page.evaluate(([k, v]) => document.body.dataset[k] !== v, [key, value])) {
      throw new Error(`expected ${key}=${value}, got: ${await page.textContent('#error-title')}: ${await page.textContent('#error-text')}`);
    }
  };
  // One run per measurement (?measureRuns=0): the first, kernel compilation included.
  // VISII_FULLSIZE_QUERY: more page parameters, e.g. "gpuTidyEvery=0".
  const query = process.env.VISII_FULLSIZE_QUERY ? `&${process.env.VISII_FULLSIZE_QUERY}` : '';
  await page.goto(`http://127.0.0.1:${port}/index.html?gpuLimits=spec&measureRuns=0${query}`);
  await page.waitForFunction(() => document.body.dataset.ready, null, { timeout: 600000 });
  console.log(`engine: ${await page.textContent('#gpu-selftest')} (${await page.textContent('#gpu-adapter')})`);

  let t = Date.now();
  if (resident === 'q8') await page.check('#model-int8');
  await page.click('#local-files summary');
  await page.setInputFiles('#local-ip2p', pack);
  await page.setInputFiles('#local-clip', join(pack, 'clip'));
  await page.click('#local-load');
  await page.waitForFunction(() => document.body.dataset.model || !document.getElementById('error-panel').hidden, null, { timeout: 6 * hours, polling: 1000 });
  if (!(await page.evaluate(() => document.body.dataset.model))) throw new Error(`load failed: ${await page.textContent('#error-text')}`);
  results.loadSeconds = (Date.now() - t) / 1000;
  Object.assign(results, await page.evaluate(() => ({ largestRead: Number(document.body.dataset.largestRead), wasmMemory: Number(document.body.dataset.wasmMemory), residentInt8: Number(document.body.dataset.residentInt8), gpuBytesInUse: Number(document.body.dataset.gpuBytesInUse), gpuBytesReserved: Number(document.body.dataset.gpuBytesReserved), model: document.getElementById('model-loaded').textContent })));
  results.gpuProcessPeakAfterLoad = gpuProcessPeak();
  console.log(`loaded in ${results.loadSeconds.toFixed(1)} s (copy into OPFS + load): ${results.model}; largest read ${(results.largestRead / 1e6).toFixed(1)} MB; wasm memory ${(results.wasmMemory / 1e6).toFixed(0)} MB; GPU memory in use ${(results.gpuBytesInUse / 1e9).toFixed(2)} GB, held ${(results.gpuBytesReserved / 1e9).toFixed(2)} GB; GPU process peak ${(results.gpuProcessPeakAfterLoad / 1e9).toFixed(2)} GB`);
  await page.screenshot({ path: join(out, 'fullsize-loaded.png'), fullPage: true });

  // The UNet alone on random inputs ("Measure this GPU"): one forward, one learning step.
  await page.click('#measure-panel summary');
  await page.fill('#measure-size', String(px));
  for (const what of measures) {
    await page.selectOption('#measure-what', what);
    await page.evaluate(() => { delete document.body.dataset.measured; });
    t = Date.now();
    await page.click('#measure');
    await page.waitForFunction(() => document.body.dataset.measured || !document.getElementById('error-panel').hidden, null, { timeout: 6 * hours, polling: 1000 });
    const m = await page.evaluate(() => document.body.dataset.measured);
    if (!m) throw new Error(`measuring ${what} failed: ${await page.textContent('#error-text')}`);
    const r = JSON.parse(m);
    results[what] = r;
    results[`gpuProcessPeakAfter_${what}`] = gpuProcessPeak();
    console.log(`UNet ${what} at ${px} px (${px / 8} x ${px / 8} latents), kernel compilation included: ${r.firstSeconds.toFixed(1)} s; GPU memory held by the engine at most ${(r.gpuBytesHeldPeak / 1e9).toFixed(2)} GB (at most ${(r.gpuBytesInUsePeak / 1e9).toFixed(2)} GB in use; after it: held ${(r.gpuBytesReserved / 1e9).toFixed(2)} GB, in use ${(r.gpuBytesInUse / 1e9).toFixed(2)} GB); GPU process peak ${(gpuProcessPeak() / 1e9).toFixed(2)} GB`);
  }
  results.wasmMemoryAfterMeasure = await page.evaluate(() => Number(document.body.dataset.wasmMemory));
  await page.screenshot({ path: join(out, 'fullsize-measured.png'), fullPage: true });

  if (pipeline) {
    // One learning step (caption given: no search), then one apply step.
    await page.setInputFiles('#slot-before input', join(fx, 'images', 'before.png'));
    await page.setInputFiles('#slot-after input', join(fx, 'images', 'after.png'));
    await page.fill('#learn-steps', '1');
    await page.fill('#learn-size', String(px));
    await page.fill('#learn-init', 'a photo of a cat');
    t = Date.now();
    await page.click('#learn');
    await waitData('learned', '1');
    results.learnStepSeconds = (Date.now() - t) / 1000;
    console.log(`one learning step at ${px} px (${px / 8} x ${px / 8} latents) incl. encoding: ${results.learnStepSeconds.toFixed(1)} s`);

    await page.setInputFiles('#slot-edit input', join(fx, 'images', 'tall.png'));
    await page.fill('#apply-steps', '1');
    await page.fill('#apply-size', String(px));
    t = Date.now();
    await page.click('#apply');
    await waitData('applied', '1');
    results.applyStepSeconds = (Date.now() - t) / 1000;
    console.log(`one apply step at ${px} px (3 UNet rows) incl. VAE: ${results.applyStepSeconds.toFixed(1)} s`);
    await page.screenshot({ path: join(out, 'fullsize-applied.png'), fullPage: true });
  }
} finally {
  clearInterval(ticker);
  writeFileSync(join(out, 'fullsize.json'), JSON.stringify(results, null, 2));
  console.log(JSON.stringify(results));
  if (browser) await browser.close();
  server.close();
}
