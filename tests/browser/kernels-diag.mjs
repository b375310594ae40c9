// Diagnosis (not part of the test suite): the tiny model in headless Chromium (SwiftShader) with the
// skinny GEMM and / or the fused attention switched on (`?gemv=on`, `?flash=on`), then a learning
// step, an apply step and one UNet pass timed through "Measure this GPU". Prints what each did.
//   node tests/browser/kernels-diag.mjs "gemv=on" "flash=on" "gemv=on&flash=on"
// DIAG_INT8=1: the weights int8 on the GPU ("Keep weights as int8"; with `q8=off` each layer's weight
// is copied to floats first instead of read in place). DIAG_WHAT, DIAG_SIZE: what to time, at what size.
import { launch } from './chromium.mjs';
import { serve } from './server.mjs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const { server, port } = await serve({ root, hubRoot: join(root, 'tests', 'fixtures') });
const base = `http://127.0.0.1:${port}`;
const size = Number(process.env.DIAG_SIZE || 64);
for (const variant of process.argv.slice(2)) {
  const browser = await launch();
  const page = browser.pages()[0] || await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
  try {
    await page.goto(`${base}/index.html?estimate=off&measureRuns=1&${variant}`);
    await page.waitForFunction(() => document.body.dataset.ready, null, { timeout: 300000 });
    await page.selectOption('#model-source', 'tiny');
    if (process.env.DIAG_INT8 === '1') await page.check('#model-int8');
    await page.click('#model-load');
    await page.waitForFunction(() => document.body.dataset.model, null, { timeout: 300000 });
    await page.click('#measure-panel summary');
    for (const what of (process.env.DIAG_WHAT || 'forward,sample-step,learn-step').split(',')) {
      await page.evaluate(() => { delete document.body.dataset.measured; });
      await page.fill('#measure-size', String(size));
      await page.selectOption('#measure-what', what);
      const t0 = Date.now();
      await page.click('#measure');
      await page.waitForFunction(() => document.body.dataset.measured || !document.getElementById('error-panel').hidden, null, { timeout: 600000 });
      const failed = await page.evaluate(() => !document.getElementById('error-panel').hidden);
      console.log(`${variant} ${what} ${size}px: ${failed ? `FAILED: ${await page.textContent('#error-title')}: ${await page.textContent('#error-text')}` : await page.textContent('#measure-text')} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
      if (failed) break;
    }
  } catch (e) {
    console.log(`${variant}: ${e.message}`);
  }
  console.log(logs.filter((l) => /error|warn|lost|poison/i.test(l)).slice(0, 20).join('\n'));
  await browser.close();
}
server.close();
