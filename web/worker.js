// The worker owns the wasm module and the GPU: model storage and loading, learning, applying.
// The page talks to it with messages (see PROTOCOL below) and never freezes.
//
// PROTOCOL (page -> worker): {type: 'init', hub?, limits?: 'adapter' | 'spec', tidy?: {tidyEvery?, tidyBackwardEvery?, exactFit?}, kernels?: 'ours' | 'burn', gemv?: bool, gemvGrad?: bool, flash?: bool, flashGrad?: bool, fusedSteps?: bool, epilogue?: bool, q8?: bool} | {type: 'sources'} | {type: 'prepare', source}
//   | {type: 'local', ip2p: [{path, file}], clip: [{path, file}]} | {type: 'delete', source}
//   | {type: 'learn', id, befores, afters, options} | {type: 'apply', id, image, options, instruction?}
//   | {type: 'inspect', id, bytes} | {type: 'zip', id, files: [{name, bytes}]} | {type: 'words', id, bytes, k} | {type: 'measure', id, what, size, runs} | {type: 'cancel'} | {type: 'loadStored', source} | {type: 'convert', source}
//   (prepare, local, loadStored and convert take resident?: 'f32' | 'q8', how the weights live on the GPU,
//   and activations?: 'f32' | 'f16', the UNet's activations: f16 needs the adapter's shader-f16)
// (worker -> page): {type: 'ready', version, selftest, limits} | {type: 'sources', sources, stored}
//   | {type: 'download', ...progress} | {type: 'convert', source, done, total, path} | {type: 'model', info, source} | {type: 'progress', id, ...}
//   | {type: 'learned', id, bytes, info} | {type: 'applied', id, png, width, height}
//   | {type: 'inspected', id, info} | {type: 'zipped', id, blob} | {type: 'words', id, words} | {type: 'measured', id, result, wasmMemory} | {type: 'error', id?, name, message}
//   (progress of learn / apply includes {phase: 'preview', of, step, total, width, height, rgba}: the step's predicted image)
//   (measured.result also has browserGpuBytes / browserGpuBytesPeak: GPU buffers alive as the browser counts them)
import init, { version, createEngine, inspectInstruction, gpuSelftest, convertPack, neededFiles, makeZip } from '../dist/pkg/visii_web.js';
import { ensureSource, readComponent, listStored, deleteSource, SourceWriter, storedLabel } from './store.js';

// What this worker's GPU buffers hold as the browser counts them: bytes of buffers created and
// neither destroyed nor garbage-collected (`live`), and the most since `reset` (`peak`). The engine's
// allocator counts what it holds; a buffer it gives back still holds GPU memory until it is
// destroyed (or, if only dropped, collected), so this is the figure a GPU's memory must hold.
const gpuBuffers = { live: 0, peak: 0, reset() { this.peak = this.live; } };
if (self.GPUDevice && self.GPUBuffer) {
  const records = new WeakMap();
  const collected = new FinalizationRegistry((r) => { if (!r.freed) gpuBuffers.live -= r.size; });
  const createBuffer = GPUDevice.prototype.createBuffer;
  GPUDevice.prototype.createBuffer = function (desc) {
    const buffer = createBuffer.call(this, desc);
    const r = { size: Number(desc.size) || 0, freed: false };
    records.set(buffer, r);
    collected.register(buffer, r);
    gpuBuffers.live += r.size;
    gpuBuffers.peak = Math.max(gpuBuffers.peak, gpuBuffers.live);
    return buffer;
  };
  const destroy = GPUBuffer.prototype.destroy;
  GPUBuffer.prototype.destroy = function () {
    const r = records.get(this);
    if (r && !r.freed) { r.freed = true; gpuBuffers.live -= r.size; }
    return destroy.call(this);
  };
}

let engine = null;
let wasm = null;
let hub = null;
let sources = null;
let downloadAbort = null;
const post = (m, transfer) => self.postMessage(m, transfer || []);
const postSources = async () => post({ type: 'sources', sources: await loadSources(), stored: await listStored() });
const fail = (e, id, type) => {
  const message = String((e && e.message) || e);
  let name = (e && e.name) || 'Error';
  if (name === 'QuotaExceededError') name = 'QuotaError';
  // A wasm trap after a GPU failure, or a lost device (the engine reports GpuError when a read
  // from the GPU fails): neither the module nor the device can continue, the page starts over.
  if (name === 'GpuError' || name === 'RuntimeError' || /unreachable|out of memory|device lost|DeviceLost/i.test(message)) {
    name = 'GpuError';
    engine = null;
  }
  // Fatal: the engine is gone (or never started); a bad file while no engine exists (inspect) is not.
  // A failure to start at all is not retried (`restartable: false`): it would fail the same way.
  post({ type: 'error', id, name, message, fatal: !engine && (name === 'GpuError' || type === 'init'), restartable: type !== 'init' });
};

async function loadSources() {
  if (!sources) {
    const res = await fetch(new URL('../dist/models.json', import.meta.url), { cache: 'no-cache' });
    sources = (await res.json()).sources;
  }
  return sources;
}

async function loadInto(sourceId, label, ip2pFiles, clipFiles, manifest, opts) {
  const resident = opts.resident || 'f32';
  const ip2p = await readComponent(sourceId, 'ip2p', ip2pFiles);
  const clip = await readComponent(sourceId, 'clip', clipFiles);
  if (!ip2p || !clip) throw Object.assign(new Error(`the stored files of "${label}" are incomplete: download them again`), { name: 'ModelError' });
  // A weight pack's manifest covers its clip/ files too: the engine checks them against it.
  if (ip2p.has('manifest.json') && !clip.has('manifest.json')) clip.set('manifest.json', ip2p.get('manifest.json'));
  // CLIP first: if it fails, the model shown as loaded stays the one that is.
  const clipInfo = engine.loadClip(manifest ? manifest.clip.name : 'clip', clip, { resident });
  const info = await engine.loadIp2p(manifest ? manifest.ip2p.name : label, ip2p, { resident, activations: opts.activations || 'f32' });
  post({ type: 'model', source: sourceId, label, info, clip: clipInfo, demo: !!(manifest && manifest.demo), wasmMemory: wasm.memory.buffer.byteLength });
}

// Whether WebGPU runs on SwiftShader (or another fallback adapter) here: our GEMM kernels then use
// their small shapes (the large ones make SwiftShader's shader JIT take gigabytes).
async function cpuAdapter() {
  try {
    const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
    const info = adapter.info || {};
    return !!(adapter.isFallbackAdapter || info.isFallbackAdapter) || /swiftshader/i.test([info.vendor, info.architecture, info.description].join(' '));
  } catch {
    return false;
  }
}

const handlers = {
  async init(msg) {
    hub = msg.hub || null;
    wasm = await init();
    engine = await createEngine({ limits: msg.limits || 'adapter', ...msg.tidy, cpuAdapter: await cpuAdapter(), ...(msg.kernels ? { kernels: msg.kernels } : {}),
      ...(msg.gemv != null ? { gemv: msg.gemv } : {}), ...(msg.gemvGrad != null ? { gemvGrad: msg.gemvGrad } : {}),
      ...(msg.flash != null ? { flash: msg.flash } : {}), ...(msg.flashGrad != null ? { flashGrad: msg.flashGrad } : {}),
      ...(msg.fusedSteps != null ? { fusedSteps: msg.fusedSteps } : {}),
      ...(msg.epilogue != null ? { epilogue: msg.epilogue } : {}),
      ...(msg.q8 != null ? { q8: msg.q8 } : {}) });
    post({ type: 'ready', version: version(), selftest: await gpuSelftest(), limits: msg.limits || 'adapter' });
  },
  async sources() {
    await postSources();
  },
  async prepare(msg) {
    const src = (await loadSources()).find((s) => s.id === msg.source);
    if (!src) throw new Error(`unknown model source ${msg.source}`);
    downloadAbort = new AbortController();
    try {
      await ensureSource(src, { hub, signal: downloadAbort.signal, onProgress: (p) => post({ type: 'download', source: src.id, ...p }) });
    } finally {
      downloadAbort = null;
    }
    await postSources();
    await loadInto(src.id, src.label, src.ip2p.files, src.clip.files, src, msg);
  },
  async local(msg) {
    // Files picked from this computer: stored like a download, so the page works offline later.
    const id = 'local';
    await deleteSource(id).catch(() => {});
    const out = new SourceWriter(id, `Files from this computer (${msg.ip2pName || 'model'})`);
    try {
      // Only what loading reads (the loader's own choice): not the single-file checkpoint, other
      // formats or .git beside it.
      const needed = (kind, list) => {
        const keep = new Set(neededFiles(kind, new Map(list.map((f) => [f.path, f.file]))));
        return list.filter((f) => keep.has(f.path));
      };
      for (const [component, list] of [['ip2p', needed('ip2p', msg.ip2p)], ['clip', needed('clip', msg.clip)]]) {
        for (const { path, file } of list) await out.put(`${component}/${path}`, file);
      }
      await out.commit();
    } catch (e) {
      await out.discard();
      throw e;
    }
    await postSources();
    await loadInto(id, msg.ip2pName || 'Files from this computer', null, null, null, msg);
  },
  async loadStored(msg) {
    const label = await storedLabel(msg.source);
    if (!label) throw Object.assign(new Error(`nothing is stored as ${msg.source}`), { name: 'ModelError' });
    const src = (await loadSources()).find((s) => s.id === msg.source);
    await loadInto(msg.source, label, src ? src.ip2p.files : null, src ? src.clip.files : null, src || null, msg);
  },
  async convert(msg) {
    // The stored checkpoints -> a q8 pack (about half of fp16), stored as its own source. The
    // worker reads the originals by range and writes one shard at a time.
    const stored = await storedLabel(msg.source);
    const ip2p = await readComponent(msg.source, 'ip2p', null);
    const clip = await readComponent(msg.source, 'clip', null);
    if (!stored || !ip2p || !clip) throw Object.assign(new Error('the stored files of this model are incomplete: download them again'), { name: 'ModelError' });
    const target = `${msg.source}-q8`;
    const label = `${stored.replace(/ \(.*$/, '')} (q8 pack)`;
    await deleteSource(target).catch(() => {});
    const t0 = performance.now();
    const out = new SourceWriter(target, label);
    let report;
    try {
      report = await convertPack(ip2p, clip, { quant: 'q8' }, async (path, bytes, done, total) => {
        await out.put(path.startsWith('clip/') ? path : `ip2p/${path}`, bytes);
        post({ type: 'convert', source: msg.source, path, done, total, bytes: bytes.byteLength, seconds: (performance.now() - t0) / 1000 });
      });
      await out.commit();
    } catch (e) {
      await out.discard();
      throw e;
    }
    await postSources();
    post({ type: 'converted', source: msg.source, target, report });
    await loadInto(target, label, null, null, null, msg);
  },
  async delete(msg) {
    if (downloadAbort) throw Object.assign(new Error('a download is running: stop it before deleting stored models'), { name: 'OptionsError' });
    await deleteSource(msg.source);
    await postSources();
  },
  async learn(msg) {
    const befores = msg.befores.map((b) => new Uint8Array(b));
    const afters = msg.afters.map((b) => new Uint8Array(b));
    const bytes = await engine.learn(befores, afters, msg.options, (p) => { post({ type: 'progress', id: msg.id, ...p }); return true; });
    post({ type: 'learned', id: msg.id, bytes, info: inspectInstruction(bytes) }, [bytes.buffer]);
  },
  async apply(msg) {
    const instruction = msg.instruction ? new Uint8Array(msg.instruction) : undefined;
    const r = await engine.apply(new Uint8Array(msg.image), msg.options, instruction, (p) => { post({ type: 'progress', id: msg.id, ...p }); return true; });
    post({ type: 'applied', id: msg.id, png: r.png, width: r.width, height: r.height }, [r.png.buffer]);
  },
  async measure(msg) {
    gpuBuffers.reset();
    const result = await engine.measure(msg.what, msg.size, msg.runs);
    Object.assign(result, { browserGpuBytes: gpuBuffers.live, browserGpuBytesPeak: gpuBuffers.peak });
    post({ type: 'measured', id: msg.id, result, wasmMemory: wasm.memory.buffer.byteLength });
  },
  async words(msg) {
    post({ type: 'words', id: msg.id, words: await engine.instructionWords(new Uint8Array(msg.bytes), msg.k || 3) });
  },
  async zip(msg) {
    // Made by the wasm module (names checked there), handed back as a Blob.
    post({ type: 'zipped', id: msg.id, blob: makeZip(msg.files.map((f) => f.name), msg.files.map((f) => new Uint8Array(f.bytes))) });
  },
  async inspect(msg) {
    post({ type: 'inspected', id: msg.id, info: inspectInstruction(new Uint8Array(msg.bytes)) });
  },
  async cancel() {
    if (engine) engine.cancel();
    if (downloadAbort) downloadAbort.abort();
  },
};

self.onmessage = async ({ data }) => {
  const h = handlers[data.type];
  if (!h) return fail(new Error(`unknown request ${data.type}`), data.id);
  try {
    const noEngine = ['init', 'sources', 'delete', 'inspect', 'zip'];
    if (!noEngine.includes(data.type) && !engine) {
      throw Object.assign(new Error('the GPU engine is not ready'), { name: 'GpuError' });
    }
    if ((data.type === 'inspect' || data.type === 'zip') && !engine) await init();
    await h(data);
    if (['prepare', 'local', 'delete', 'loadStored', 'convert'].includes(data.type)) post({ type: 'done', id: data.id });
  } catch (e) {
    fail(e, data.id, data.type);
  }
};
