// The wasm engine a tab runs, on Dawn (the WebGPU implementation inside Chrome: its Tint shader
// compiler, its robustness checks) driven from Node with npm's `webgpu` package: the speed a tab
// would see, on a machine without a browser (issue 19, "the same measure through Dawn"). It loads
// an InstructPix2Pix folder or weight pack from disk by range, as the worker loads stored files,
// and times the UNet as the page's "Measure this GPU" does (`Engine.measure`). One JSON line per
// measure on stdout, and a last line with everything:
//
//   node tests/fullsize/dawn.mjs --model DIR [--what forward,learn-step@256,sample-step@512] [--size 256]
//     [--runs 1] [--resident f32|q8] [--activations f32|f16] [--limits spec|adapter]
//     [--kernels ours|burn] [--engine JSON] [--dawn FLAG,...] [--compat]
//
// `--what`: what `Engine.measure` times, each at `--size` px or its own `@px`, the model loaded once.
// `--engine`: more options of `createEngine` (crates/visii-web), e.g. '{"gemv":true}' for the skinny GEMM.
// `--dawn`: dawn.node's own flags (`backend=vulkan`, `adapter=NAME`,
// `enable-dawn-features=...`). `--compat`: ask for a compatibility-mode adapter, the only kind
// Dawn offers over OpenGL (Mesa's llvmpipe on a machine without a GPU, where Dawn refuses
// lavapipe): how this script is checked without a GPU (timings there mean nothing).
// The `webgpu` package is found as Node resolves it from here, or `DAWN_NODE=/path/dawn.node`.
// The engine: dist/pkg from `./build.sh wasm`.
import { openSync, readdirSync, readSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, sep } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

function parseArgs(argv) {
  const o = { what: 'forward', size: 256, runs: 1, resident: 'f32', activations: 'f32', limits: 'spec', kernels: 'ours', engine: '{}', dawn: '', compat: false };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, '');
    if (key === 'compat') o.compat = true;
    else if (key in o || key === 'model') {
      if (i + 1 >= argv.length) throw new Error(`--${key} needs a value`);
      o[key] = argv[++i];
    } else throw new Error(`unknown argument ${argv[i]} (see the comment at the top of ${fileURLToPath(import.meta.url)})`);
  }
  if (!o.model) throw new Error('--model DIR is required (an InstructPix2Pix folder or a weight pack)');
  o.size = Number(o.size);
  o.runs = Number(o.runs);
  return o;
}

// A file on disk as a `Blob` the engine reads by range (`BlobSource` in crates/visii-web): its
// `size` and `slice` are what the engine uses, and `FileReaderSync` below reads the bytes.
class FileBlob extends Blob {
  #fd;
  #start;
  #end;
  constructor(fd, start, end) {
    super([]);
    this.#fd = fd;
    this.#start = start;
    this.#end = end;
  }
  get size() {
    return this.#end - this.#start;
  }
  slice(a = 0, b = this.size) {
    const clamp = (v) => Math.min(Math.max(v < 0 ? this.size + v : v, 0), this.size);
    const [s, e] = [clamp(a), clamp(b)];
    return new FileBlob(this.#fd, this.#start + s, this.#start + Math.max(s, e));
  }
  readAll() {
    const out = new Uint8Array(this.size);
    for (let done = 0; done < out.length;) {
      const n = readSync(this.#fd, out, done, out.length - done, this.#start + done);
      if (n === 0) throw new Error(`a file ended ${out.length - done} bytes early (changed while read?)`);
      done += n;
    }
    return out.buffer;
  }
}
// Workers have it; Node does not. Reads what `FileBlob` names (the engine only reads those here).
globalThis.FileReaderSync = class FileReaderSync {
  readAsArrayBuffer(blob) {
    if (!(blob instanceof FileBlob)) throw new TypeError('this FileReaderSync reads only files opened by dawn.mjs');
    return blob.readAll();
  }
};

// Every file under `dir` as path -> FileBlob, relative paths with '/', `skip(path)` left out.
function folder(dir, skip = () => false) {
  const files = new Map();
  const walk = (d) => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      const rel = relative(dir, p).split(sep).join('/');
      if (skip(rel)) continue;
      if (statSync(p).isDirectory()) walk(p);
      else files.set(rel, new FileBlob(openSync(p, 'r'), 0, statSync(p).size));
    }
  };
  walk(dir);
  return files;
}

// Dawn as `navigator.gpu`, found the way wgpu's WebGPU backend looks for it in a worker.
function installDawn(o) {
  let dawn;
  if (process.env.DAWN_NODE) dawn = createRequire(import.meta.url)(process.env.DAWN_NODE);
  else {
    const platform = process.platform === 'darwin' ? 'darwin-universal' : `${process.platform}-${process.arch}`;
    dawn = createRequire(import.meta.url)(join(dirname(createRequire(import.meta.url).resolve('webgpu')), 'dist', platform, 'dawn.node'));
  }
  Object.assign(globalThis, dawn.globals);
  // Dawn's OpenGL backend goes through EGL: without a display, Mesa's needs its surfaceless platform.
  process.env.EGL_PLATFORM ??= 'surfaceless';
  const gpu = dawn.create(o.dawn ? o.dawn.split(',') : []);
  if (o.compat) {
    const request = gpu.requestAdapter.bind(gpu);
    gpu.requestAdapter = (opts) => request({ ...opts, featureLevel: 'compatibility' });
  }
  // (Node 21 and later have a `navigator`; 20 has none.)
  if (!globalThis.navigator) Object.defineProperty(globalThis, 'navigator', { value: {}, configurable: true });
  Object.defineProperty(globalThis.navigator, 'gpu', { value: gpu, configurable: true });
  // wgpu takes `navigator.gpu` from the window or, as here, from a worker's global scope.
  globalThis.WorkerGlobalScope ??= class WorkerGlobalScope {};
  return gpu;
}

const o = parseArgs(process.argv.slice(2));
const gpu = installDawn(o);
const adapter = await gpu.requestAdapter({ powerPreference: 'high-performance' });
if (!adapter) throw new Error(`Dawn offers no WebGPU adapter here (flags: ${o.dawn || 'none'}${o.compat ? ', compatibility mode' : ''})`);
const info = adapter.info || {};
const adapterText = [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(' / ');
const cpuAdapter = !!info.isFallbackAdapter || /swiftshader|llvmpipe|lavapipe/i.test(adapterText);
console.error(`dawn adapter: ${adapterText}; features: ${[...adapter.features].sort().join(' ')}`);

const pkg = join(root, 'dist', 'pkg');
const engineModule = await import(pathToFileURL(join(pkg, 'visii_web.js')).href);
await engineModule.default({ module_or_path: readFileSync(join(pkg, 'visii_web_bg.wasm')) });
const engineOptions = { limits: o.limits, cpuAdapter, kernels: o.kernels, ...JSON.parse(o.engine) };
const engine = await engineModule.createEngine(engineOptions);
// The worker's own check that the GPU computes (a 2 x 2 matmul): [19, 22, 43, 50].
const selftest = JSON.parse(await engineModule.gpuSelftest());
if (JSON.stringify(selftest) !== '[19,22,43,50]') throw new Error(`the GPU self-test computed ${JSON.stringify(selftest)}, not [19,22,43,50]`);

// A weight pack keeps CLIP under clip/ beside the InstructPix2Pix files; measuring needs only the latter.
const t0 = performance.now();
const model = await engine.loadIp2p('model', folder(o.model, (p) => p.startsWith('clip/') || p.startsWith('.')), { resident: o.resident, activations: o.activations });
const loadSeconds = (performance.now() - t0) / 1000;
console.error(`loaded ${model.name} in ${loadSeconds.toFixed(1)} s: UNet ${model.unetParams} parameters, ${(model.gpuBytesInUse / 2 ** 20).toFixed(0)} MiB on the GPU`);

const results = [];
for (const item of o.what.split(',').filter(Boolean)) {
  const [what, size] = item.split('@');
  const r = await engine.measure(what, size ? Number(size) : o.size, o.runs);
  if (!(r.seconds > 0 && r.firstSeconds > 0 && Number.isFinite(r.seconds))) throw new Error(`${item}: no time measured (${JSON.stringify(r)})`);
  const line = { stack: 'dawn', adapter: adapterText, engine: engineOptions, resident: o.resident, activations: o.activations, ...r };
  results.push(line);
  console.log(JSON.stringify(line));
}
console.log(JSON.stringify({ stack: 'dawn', adapter: adapterText, model: o.model, loadSeconds, unetParams: model.unetParams, results }));
// dawn.node keeps the process alive while a device exists.
process.exit(0);
