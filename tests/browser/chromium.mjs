// Headless Debian Chromium for the browser tests (`npx playwright install` cannot work here):
// WebGPU on SwiftShader, or no GPU at all, each in a fresh profile.
import { chromium } from 'playwright-core';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const QUIET = ['--headless=new', '--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];
const WEBGPU = ['--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader'];
const NO_GPU = ['--disable-gpu', '--disable-features=WebGPU'];

/// A persistent context in a new profile folder; `webgpu: false` for a browser without WebGPU.
/// Other options go to playwright's launchPersistentContext.
export function launch({ webgpu = true, ...options } = {}) {
  return chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), 'visii-chrome-')), {
    executablePath: process.env.VISII_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // VISII_CHROMIUM_ARGS: extra switches for a diagnosis, e.g. "--enable-logging=stderr --v=0" (with DEBUG=pw:browser).
    args: [...QUIET, ...(webgpu ? WEBGPU : NO_GPU), ...(process.env.VISII_CHROMIUM_ARGS || '').split(' ').filter(Boolean)],
    ...options,
  });
}
