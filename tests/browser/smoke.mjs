// Browser smoke test: serve the app, open it in headless Chromium with WebGPU on SwiftShader, and
// check that the worker loaded the wasm module and ran a matmul on the GPU with the right values.
// Screenshots go to tests/output/.
import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const out = join(root, 'tests', 'output');
mkdirSync(out, { recursive: true });
const port = 18000 + Math.floor(Math.random() * 1000);

const server = spawn('python3', ['-m', 'http.server', '--bind', '127.0.0.1', String(port)], { cwd: root, stdio: 'ignore' });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fail = (msg) => { console.error(`FAIL: ${msg}`); process.exitCode = 1; };

const flags = ['--headless=new', '--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader', '--no-sandbox',
  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

let browser;
try {
  await sleep(800);
  browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), 'visii-chrome-')), {
    executablePath: '/usr/bin/chromium', headless: true, args: flags,
  });
  const page = browser.pages()[0] || await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
  await page.goto(`http://127.0.0.1:${port}/index.html`);
  await page.waitForFunction(() => document.body.dataset.ready, null, { timeout: 240000 });
  await page.screenshot({ path: join(out, 'smoke-ready.png'), fullPage: true });
  const ready = await page.evaluate(() => document.body.dataset.ready);
  const version = await page.textContent('#app-version');
  const adapter = await page.textContent('#gpu-adapter');
  const selftest = await page.textContent('#gpu-selftest');
  console.log(`version ${version}; adapter ${adapter}; self-test: ${selftest}`);
  if (ready !== 'yes') fail(`GPU self-test did not pass: ${selftest}\n${logs.join('\n')}`);
  if (!/^\d+\.\d+\.\d+/.test(version)) fail(`version not shown: ${version}`);

  // Without WebGPU the page says so clearly.
  const noGpu = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), 'visii-chrome-')), {
    executablePath: '/usr/bin/chromium', headless: true,
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-features=WebGPU', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const p2 = noGpu.pages()[0] || await noGpu.newPage();
  await p2.goto(`http://127.0.0.1:${port}/index.html`);
  await p2.waitForSelector('#error-panel:not([hidden])', { timeout: 60000 });
  const title = await p2.textContent('#error-title');
  await p2.screenshot({ path: join(out, 'smoke-no-webgpu.png'), fullPage: true });
  console.log(`without WebGPU: "${title}"`);
  if (!/WebGPU/.test(title)) fail(`no-WebGPU message missing: ${title}`);
  await noGpu.close();
} catch (e) {
  fail(e.stack || String(e));
} finally {
  if (browser) await browser.close();
  server.kill();
}
if (!process.exitCode) console.log('browser smoke test passed');
