// The page: images in, progress and results out. All model work happens in the worker
// (web/worker.js), so the page never freezes. State a test (or a curious person) can read is kept
// in `window.visii`.
const $ = (id) => document.getElementById(id);
const state = {
  model: null, instruction: null, instructionInfo: null, result: null, images: {}, losses: [], busy: null,
  // Live previews: the steps each run showed (`apply` / `learn`), the last one's pixels.
  previewSteps: { apply: [], learn: [] }, previewHashes: { apply: [], learn: [] }, previewSums: { apply: [], learn: [] }, lastPreview: null,
  // Results kept with their settings (the gallery), the images waiting in a batch, the words read.
  gallery: [], batch: [], words: null, imageNames: {}, timing: {},
};
window.visii = state;
let nextId = 1;

// ---------------------------------------------------------------- errors
const HINTS = {
  GpuError: 'The GPU stopped or ran out of memory. Close other tabs that use the GPU, lower the sizes or steps, and reload the page.',
  ForeignModelError: 'Load the model named above (section 1), then apply the instruction again.',
  InstructionError: 'Choose a .visii.safetensors file made by this app.',
  ImageError: 'Use a PNG, JPEG, WebP, GIF or BMP image.',
  QuotaError: 'Nothing was lost: stored models stay, and the download resumes when there is room.',
  NetworkError: 'Nothing was lost: run the download again to resume it.',
  VerifyError: 'The damaged file was discarded; run the download again.',
  ModelError: 'Check that the model files are complete and in the expected layout.',
};
const TITLES = {
  GpuError: 'The GPU failed', ForeignModelError: 'This instruction belongs to another model', InstructionError: 'Not an instruction file',
  ImageError: 'Not an image', QuotaError: 'Not enough storage for this model', NetworkError: 'Download interrupted',
  VerifyError: 'A downloaded file is damaged', ModelError: 'The model could not be loaded', OptionsError: 'Check the settings',
  StorageError: 'Storage unavailable',
};
function showError(title, text, hint = '', kind = '') {
  $('error-title').textContent = title;
  $('error-text').textContent = text;
  $('error-hint').textContent = hint;
  $('error-panel').dataset.kind = kind;
  $('error-panel').hidden = false;
}
function showWorkerError(e) {
  if (e.name === 'CancelledError' || e.name === 'AbortError') return;
  const hint = e.restarted
    ? 'The GPU engine was restarted and the model is loading again; your images and instruction are still here. If it happens again, lower the sizes or steps.'
    : HINTS[e.name] || '';
  showError(TITLES[e.name] || 'Something went wrong', e.message, hint, e.name);
}
$('error-close').onclick = () => { $('error-panel').hidden = true; };

// ---------------------------------------------------------------- WebGPU check
const NEEDED = { maxStorageBufferBindingSize: 128 << 20, maxComputeInvocationsPerWorkgroup: 256, maxComputeWorkgroupStorageSize: 16384 };
async function describeAdapter() {
  if (!('gpu' in navigator)) {
    $('gpu-adapter').textContent = 'not available';
    showError('This browser has no WebGPU',
      'visii runs its networks on your GPU through WebGPU. Use a recent Chrome, Edge or another browser with WebGPU enabled (on Linux, Chrome may need chrome://flags/#enable-unsafe-webgpu).', '', 'NoWebGPU');
    return false;
  }
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  if (!adapter) {
    $('gpu-adapter').textContent = 'none';
    showError('No WebGPU adapter', 'WebGPU exists but no GPU adapter was offered. Check that hardware acceleration is enabled in the browser settings.', '', 'NoWebGPU');
    return false;
  }
  const info = adapter.info || {};
  $('gpu-adapter').textContent = [info.vendor, info.architecture, info.description || info.device].filter(Boolean).join(' ') || 'unknown adapter';
  const l = adapter.limits;
  const mib = (b) => `${Math.round(b / 1048576)} MiB`;
  $('gpu-limits').textContent = `maxBufferSize ${mib(l.maxBufferSize)}, maxStorageBufferBindingSize ${mib(l.maxStorageBufferBindingSize)}, shader-f16 ${adapter.features.has('shader-f16') ? 'yes' : 'no'}`;
  // f16 activations where the adapter can (on by default there), f32 everywhere.
  const f16 = adapter.features.has('shader-f16');
  $('model-f16').disabled = !f16;
  $('model-f16').checked = f16;
  $('model-f16-hint').textContent = f16
    ? 'half the memory for activations and faster on most GPUs; norms and softmax stay f32. Applies to the next load.'
    : 'this GPU has no f16 arithmetic (WebGPU shader-f16): the UNet runs in f32.';
  const short = Object.entries(NEEDED).filter(([k, v]) => l[k] < v);
  if (short.length) {
    showError('This GPU adapter lacks limits visii needs',
      `Needed: ${short.map(([k, v]) => `${k} >= ${v} (this adapter: ${l[k]})`).join('; ')}.`, 'Try another browser or GPU.', 'Limits');
    return false;
  }
  return true;
}

// ---------------------------------------------------------------- worker
// A wasm trap or a lost GPU device ends the worker's engine. The page then starts a new worker,
// loads the model that was loaded (from storage: nothing is downloaded again) and keeps everything
// on the page (images, instruction, results): one bad file or one GPU hiccup never needs a reload.
let worker = null;
let initMessage = null;
const restarts = [];
const pending = new Map();
function startWorker() {
  worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
  worker.onmessage = onWorkerMessage;
  worker.onerror = (e) => showError('The GPU worker could not start', e.message || String(e), '', 'Worker');
  if (initMessage) worker.postMessage(initMessage);
}
// After a fatal error: a fresh worker, and the model again. More than three restarts in a minute
// means something is wrong with this GPU or browser: then it stays stopped and says so.
function restartWorker(error) {
  const now = Date.now();
  while (restarts.length && now - restarts[0] > 60000) restarts.shift();
  const old = worker;
  worker = null;
  old.terminate();
  for (const [, p] of pending) p.reject(error);
  pending.clear();
  state.busy = null;
  const reload = state.model && state.model.source;
  state.model = null;
  updateButtons();
  if (restarts.length >= 3) {
    $('gpu-selftest').textContent = 'failed repeatedly: reload the page';
    return false;
  }
  restarts.push(now);
  state.reloadAfterRestart = reload || null;
  document.body.dataset.restarts = Number(document.body.dataset.restarts || 0) + 1;
  $('gpu-selftest').textContent = 'restarting the GPU engine…';
  startWorker();
  return true;
}
function call(msg, onProgress, transfer) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject, onProgress });
    worker.postMessage({ ...msg, id }, transfer || []);
  });
}
function onWorkerMessage({ data }) {
  const p = data.id !== undefined ? pending.get(data.id) : null;
  switch (data.type) {
    case 'ready':
      $('app-version').textContent = `visii ${data.version}`;
      {
        const ok = JSON.stringify(JSON.parse(data.selftest)) === '[19,22,43,50]';
        $('gpu-selftest').textContent = ok ? `WebGPU ready (GPU self-test passed${data.limits === 'spec' ? '; device requested with the spec default limits' : ''})` : `GPU self-test gave ${data.selftest}`;
        document.body.dataset.limits = data.limits;
        $('gpu-selftest').className = ok ? 'ok' : 'bad';
        document.body.dataset.ready = ok ? 'yes' : 'no';
        if (ok && state.reloadAfterRestart) {
          const source = state.reloadAfterRestart;
          state.reloadAfterRestart = null;
          modelJob({ type: 'loadStored', source });
        }
      }
      worker.postMessage({ type: 'sources' });
      return;
    case 'sources': return showSources(data.sources, data.stored);
    case 'download': return showDownload(data);
    case 'convert':
      $('download').hidden = false;
      $('download-bar').value = data.total ? data.done / data.total : 0;
      $('download-text').textContent = `converting to a q8 pack: ${data.done} of ${data.total} tensors, wrote ${data.path} (${bytes(data.bytes)}), ${data.seconds.toFixed(0)} s`;
      return;
    case 'converted':
      document.body.dataset.converted = data.target;
      document.body.dataset.convertedBytes = data.report.bytes;
      // Kept after the progress bar goes: what the conversion made and where it is.
      $('model-report').textContent = `q8 pack stored: ${bytes(data.report.bytes)} in ${data.report.shards} shards (fingerprint ${data.report.fingerprint}); the original files stay stored until you delete them.`;
      $('model-report').hidden = false;
      return;
    case 'model': return modelLoaded(data);
    case 'progress': if (p && p.onProgress) p.onProgress(data); return;
    case 'error':
      if (data.fatal) {
        $('gpu-selftest').textContent = 'failed: reload the page';
        $('gpu-selftest').className = 'bad';
        document.body.dataset.ready = 'no';
        // Nothing can run on a dead engine: no model, buttons off; a fresh one is started (when the
        // engine had started at all: a GPU that cannot start one stays stopped).
        if (p) pending.delete(data.id);
        const restarted = !!initMessage && data.restartable !== false && restartWorker(data);
        const shown = { ...data, restarted };
        if (p) { p.reject(shown); return; }
        showWorkerError(shown);
        return;
      }
      if (p) { pending.delete(data.id); p.reject(data); return; }
      showWorkerError(data);
      return;
    default:
      if (p) { pending.delete(data.id); p.resolve(data); }
  }
}
startWorker();

// ---------------------------------------------------------------- models
let sources = [];
function showSources(list, stored) {
  sources = list;
  const sel = $('model-source');
  const was = sel.value;
  sel.replaceChildren(...list.map((s) => new Option(s.label, s.id)));
  if (was) sel.value = was;
  sel.onchange();
  const body = $('stored').tBodies[0];
  body.replaceChildren(...stored.map((s) => {
    const tr = document.createElement('tr');
    const del = document.createElement('button');
    del.textContent = 'Delete';
    del.className = 'delete';
    // The background timing at model load does not hold these buttons: they stop it first.
    const idle = isIdle();
    del.disabled = !idle;
    del.onclick = async () => {
      await stopEstimate();
      if (state.busy) return;
      await call({ type: 'delete', source: s.source }).catch(showWorkerError);
    };
    const load = document.createElement('button');
    load.textContent = 'Load';
    load.className = 'load';
    load.disabled = !idle;
    load.onclick = () => modelJob({ type: 'loadStored', source: s.source });
    const actions = [load, del];
    if (!s.source.endsWith('-q8') && s.files.some((f) => /\.safetensors$/.test(f.path)) && !s.files.some((f) => f.path === 'ip2p/manifest.json')) {
      // Quantise stored checkpoints into a q8 pack: about half the storage of fp16, same model.
      const conv = document.createElement('button');
      conv.textContent = 'Convert to q8 pack';
      conv.className = 'convert';
      conv.disabled = !idle;
      conv.onclick = () => modelJob({ type: 'convert', source: s.source });
      actions.unshift(conv);
    }
    const act = document.createElement('span');
    act.append(...actions);
    tr.append(cell(s.label), cell(`${s.files.length} files`), cell(bytes(s.bytes)), cell(act));
    tr.dataset.source = s.source;
    return tr;
  }));
  if (!stored.length) body.replaceChildren(Object.assign(document.createElement('tr'), { innerHTML: '<td>nothing stored yet</td>' }));
}
const cell = (x) => { const td = document.createElement('td'); td.append(x); return td; };
const bytes = (b) => (b > 1e9 ? `${(b / 1e9).toFixed(2)} GB` : b > 1e6 ? `${(b / 1e6).toFixed(1)} MB` : `${(b / 1e3).toFixed(0)} kB`);
$('model-source').onchange = () => {
  const s = sources.find((x) => x.id === $('model-source').value);
  $('model-note').textContent = s ? s.note || '' : '';
};
// Downloads and loads (from the network, from storage or from local files): one at a time.
async function modelJob(msg) {
  await stopEstimate();
  if (state.busy) return;
  msg = { ...msg, resident: $('model-int8').checked ? 'q8' : 'f32', activations: $('model-f16').checked ? 'f16' : 'f32' };
  state.busy = 'download';
  updateButtons();
  $('model-stop').hidden = false;
  // Ask the browser to keep stored models (only a page can ask).
  if (navigator.storage && navigator.storage.persist) navigator.storage.persist().catch(() => false);
  try {
    await call(msg);
  } catch (e) {
    showWorkerError(e);
  } finally {
    state.busy = null;
    $('model-stop').hidden = true;
    $('download').hidden = true;
    updateButtons();
    // A model this job loaded is timed now that the job has ended (see autoEstimate).
    if (state.estimatePending) setTimeout(autoEstimate, 0);
  }
}
$('model-load').onclick = () => modelJob({ type: 'prepare', source: $('model-source').value });
$('model-stop').onclick = () => worker.postMessage({ type: 'cancel' });
function showDownload(d) {
  $('download').hidden = false;
  $('download-bar').value = d.totalBytes ? d.doneBytes / d.totalBytes : 0;
  const eta = d.eta != null ? `, about ${Math.ceil(d.eta)} s left` : '';
  $('download-text').textContent = `${d.file}: ${bytes(d.loaded)}${d.total ? ` of ${bytes(d.total)}` : ''} · total ${bytes(d.doneBytes)} of ${bytes(d.totalBytes)} at ${bytes(d.speed)}/s${eta}`;
}
function modelLoaded(d) {
  state.model = d;
  state.timing = {};
  // Timed once the job that loaded it has ended (its `finally` starts the timing: the worker's
  // "loaded" and "done" messages are two tasks, and a timer may run between them); said at once.
  state.estimatePending = params.get('estimate') !== 'off';
  showEstimates();
  setTimeout(autoEstimate, 0);
  const int8Values = (d.info.residentInt8Values || 0) + ((d.clip && d.clip.residentInt8Values) || 0);
  const int8 = int8Values ? `, ${(int8Values / 1e6).toFixed(1)} M weights int8 on the GPU` : '';
  const f16 = d.info.activations === 'f16' ? ', f16 activations' : '';
  $('model-loaded').textContent = `${d.info.name} (fingerprint ${d.info.fingerprint}${int8}${f16})${d.demo ? ' — wiring demo: its images are not meaningful' : ''}`;
  document.body.dataset.residentInt8 = int8Values;
  document.body.dataset.activations = d.info.activations || 'f32';
  document.body.dataset.model = d.info.fingerprint;
  document.body.dataset.largestRead = d.info.largestRead;
  document.body.dataset.gpuBytesInUse = d.info.gpuBytesInUse || 0;
  document.body.dataset.gpuBytesReserved = d.info.gpuBytesReserved || 0;
  document.body.dataset.wasmMemory = d.wasmMemory;
  updateButtons();
  checkInstructionModel();
}
async function filesOf(input) {
  const out = [];
  for (const f of input.files) {
    const rel = (f.webkitRelativePath || f.name).split('/').slice(1).join('/') || f.name;
    out.push({ path: rel, file: f });
  }
  return out;
}
const folderName = (input) => ((input.files[0] && input.files[0].webkitRelativePath) || '').split('/')[0];
function loadLocal(ip2p, clip, ip2pName) {
  if (!ip2p.length || !clip.length) return showError('Pick both folders', 'Choose the InstructPix2Pix folder and the CLIP folder.', '', 'OptionsError');
  if (!ip2p.some((f) => f.path === 'model_index.json')) return showError(TITLES.ModelError, 'The InstructPix2Pix folder has no model_index.json (diffusers layout expected).', HINTS.ModelError, 'ModelError');
  modelJob({ type: 'local', ip2p, clip, ip2pName });
}
$('local-load').onclick = async () => loadLocal(await filesOf($('local-ip2p')), await filesOf($('local-clip')), folderName($('local-ip2p')));
// Dropping the two folders: the one with model_index.json is InstructPix2Pix, the other CLIP.
async function entriesOf(entry, prefix = '') {
  if (entry.isFile) return [{ path: prefix + entry.name, file: await new Promise((ok, bad) => entry.file(ok, bad)) }];
  const reader = entry.createReader();
  const out = [];
  for (;;) {
    const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
    if (!batch.length) break;
    for (const e of batch) out.push(...await entriesOf(e, `${prefix}${entry.name}/`));
  }
  return out;
}
$('local-files').addEventListener('dragover', (e) => e.preventDefault());
$('local-files').addEventListener('drop', async (e) => {
  e.preventDefault();
  e.stopPropagation();
  const dirs = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter((x) => x && x.isDirectory);
  let folders;
  try {
    folders = await Promise.all(dirs.map(async (d) => ({ name: d.name, files: (await entriesOf(d)).map((f) => ({ path: f.path.split('/').slice(1).join('/'), file: f.file })) })));
  } catch (err) {
    // A folder the browser may not read (permissions, a file removed while reading).
    return showError('The dropped folders could not be read', `${err.name || 'Error'}: ${err.message || err}`, 'Pick the folders with the buttons above instead.', 'ModelError');
  }
  const ip2p = folders.find((f) => f.files.some((x) => x.path === 'model_index.json'));
  const clip = folders.find((f) => f !== ip2p);
  loadLocal(ip2p ? ip2p.files : [], clip ? clip.files : [], ip2p && ip2p.name);
});

// ---------------------------------------------------------------- images
// What an input image may be (the engine's own limits, visii_formats::image::LIMITS): checked from
// the file's header before anything decodes it, so a small file claiming a huge image costs nothing.
const IMAGE_LIMITS = { maxSide: 16384, maxPixels: 50e6, maxAspect: 16, minSide: 8, maxBytes: 256 << 20 };
// Width and height from a PNG's IHDR or a JPEG's SOF marker (null: another format, or not found).
function headerSize(b) {
  const u16 = (i) => (b[i] << 8) | b[i + 1];
  const u32 = (i) => ((b[i] << 24) >>> 0) + (b[i + 1] << 16) + (b[i + 2] << 8) + b[i + 3];
  if (b.length >= 24 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) return { w: u32(16), h: u32(20) };
  if (b[0] === 0xff && b[1] === 0xd8) {
    for (let i = 2; i + 9 < b.length;) {
      if (b[i] !== 0xff) return null;
      const m = b[i + 1];
      if (m === 0xff) { i++; continue; }
      if (m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc) return { w: u16(i + 7), h: u16(i + 5) };
      i += 2 + u16(i + 2);
    }
  }
  return null;
}
function checkImage(name, size, dims) {
  const refuse = (why) => { throw Object.assign(new Error(`"${name}" ${why}`), { name: 'ImageError' }); };
  if (size > IMAGE_LIMITS.maxBytes) refuse(`is ${bytes(size)}: too large for an input image (at most ${bytes(IMAGE_LIMITS.maxBytes)}).`);
  if (!dims) return;
  const { w, h } = dims;
  const L = IMAGE_LIMITS;
  if (!w || !h) refuse(`is ${w} x ${h} px: empty.`);
  if (Math.max(w, h) > L.maxSide || w * h > L.maxPixels) refuse(`is ${w} x ${h} px: larger than an input image may be (at most ${L.maxSide} px a side and ${L.maxPixels / 1e6} megapixels).`);
  if (Math.min(w, h) < L.minSide) refuse(`is ${w} x ${h} px: smaller than ${L.minSide} px on a side.`);
  if (Math.max(w, h) > L.maxAspect * Math.min(w, h)) refuse(`is ${w} x ${h} px: more than ${L.maxAspect} times longer than it is wide.`);
}
async function imageBytes(file) {
  const head = new Uint8Array(await file.slice(0, 65536).arrayBuffer());
  const name = file.name || 'the pasted data';
  checkImage(name, file.size, headerSize(head));
  const isPng = head[0] === 0x89 && head[1] === 0x50 && head[2] === 0x4e && head[3] === 0x47;
  if (isPng) return file.arrayBuffer();
  // JPEG (which may carry an EXIF orientation the browser applies) and the other formats the
  // browser decodes (WebP, GIF, BMP, AVIF...): re-encoded losslessly as PNG, as shown.
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    throw Object.assign(new Error(`"${file.name || 'the pasted data'}" is not an image this browser can read.`), { name: 'ImageError' });
  }
  checkImage(name, file.size, { w: bitmap.width, h: bitmap.height });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  canvas.getContext('2d').drawImage(bitmap, 0, 0);
  return (await canvas.convertToBlob({ type: 'image/png' })).arrayBuffer();
}
async function setImage(slot, file) {
  try {
    const buf = await imageBytes(file);
    if (!$(`slot-${slot}`)) return; // its pair was removed meanwhile
    state.images[slot] = buf;
    state.imageNames[slot] = file.name || 'pasted image';
    setSrc($(`slot-${slot}`).querySelector('img'), new Blob([buf]));
    $(`slot-${slot}`).classList.add('filled');
    updateButtons();
  } catch (e) {
    showWorkerError(e);
  }
}
// The image slots in page order: before / after of each pair, then the image to edit.
const slotNames = () => [...document.querySelectorAll('.slot[id^="slot-"]:not(.result)')].map((el) => el.id.slice(5));
function setupSlot(slot) {
  const el = $(`slot-${slot}`);
  const input = el.querySelector('input');
  el.onclick = (e) => { if (e.target !== input) input.click(); };
  el.onkeydown = (e) => { if (e.key === 'Enter' || e.key === ' ') input.click(); };
  // Several images on "Image to edit" make a batch (the first is shown in the box).
  const take = (files) => {
    if (!files.length) return;
    if (slot === 'edit' && files.length > 1) addToBatch(files);
    setImage(slot, files[0]);
  };
  input.onchange = () => take([...input.files]);
  el.ondragover = (e) => { e.preventDefault(); el.classList.add('over'); };
  el.ondragleave = () => el.classList.remove('over');
  el.ondrop = (e) => {
    e.preventDefault();
    e.stopPropagation();
    el.classList.remove('over');
    const files = [...e.dataTransfer.files];
    if (files[0] && /\.safetensors$/i.test(files[0].name)) return loadInstruction(files[0]);
    take(files);
  };
}
for (const slot of ['before', 'after', 'edit']) setupSlot(slot);
// Extra before / after pairs (pair 1 is the fixed one above them).
let pairCount = 1;
$('add-pair').onclick = () => {
  const n = ++pairCount;
  const row = document.createElement('div');
  row.className = 'slots pair';
  row.dataset.pair = n;
  for (const side of ['before', 'after']) {
    const el = document.createElement('div');
    el.className = 'slot';
    el.id = `slot-${side}-${n}`;
    el.tabIndex = 0;
    el.innerHTML = `<span>${side === 'before' ? 'Before' : 'After'} ${n}</span><img alt=""><input type="file" accept="image/*">`;
    row.append(el);
  }
  const remove = Object.assign(document.createElement('button'), { type: 'button', className: 'remove-pair', textContent: `Remove pair ${n}` });
  remove.onclick = () => {
    delete state.images[`before-${n}`];
    delete state.images[`after-${n}`];
    row.remove();
    updateButtons();
  };
  row.append(remove);
  $('pairs').append(row);
  setupSlot(`before-${n}`);
  setupSlot(`after-${n}`);
};
/// The complete pairs in page order; throws (OptionsError) on a pair with only one image.
function learningPairs() {
  const out = [[state.images.before, state.images.after]];
  for (const row of document.querySelectorAll('#pairs .pair')) {
    const n = row.dataset.pair;
    const [b, a] = [state.images[`before-${n}`], state.images[`after-${n}`]];
    if (!b && !a) continue;
    if (!b || !a) throw Object.assign(new Error(`Pair ${n} has ${b ? 'no after' : 'no before'} image: add it, or remove the pair.`), { name: 'OptionsError' });
    out.push([b, a]);
  }
  return out;
}
document.addEventListener('paste', (e) => {
  const f = [...(e.clipboardData || {}).files || []][0];
  if (!f) return;
  const names = slotNames();
  setImage(names.find((s) => document.activeElement === $(`slot-${s}`)) || names.find((s) => !state.images[s]) || 'edit', f);
});

// ---------------------------------------------------------------- learn
function drawLoss() {
  const c = $('loss-curve');
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  const v = state.losses;
  if (v.length < 2) return;
  const max = Math.max(...v), min = Math.min(...v);
  g.strokeStyle = '#38f';
  g.beginPath();
  v.forEach((y, i) => {
    const px = (i / (v.length - 1)) * (c.width - 10) + 5;
    const py = c.height - 5 - ((y - min) / (max - min || 1)) * (c.height - 10);
    i ? g.lineTo(px, py) : g.moveTo(px, py);
  });
  g.stroke();
  g.fillStyle = getComputedStyle(document.body).color;
  g.fillText(`mse ${v[v.length - 1].toFixed(4)} (min ${min.toFixed(4)})`, 8, 14);
}
const num = (id) => Number($(id).value);
$('learn').onclick = async () => {
  await stopEstimate();
  if (state.busy) return;
  state.busy = 'learn';
  state.losses = [];
  updateButtons();
  $('learn-stop').hidden = false;
  const t0 = performance.now();
  let learnStart = null;
  try {
    const options = { steps: num('learn-steps'), size: num('learn-size'), seed: num('learn-seed'), init: $('learn-init').value, captionIterations: num('learn-caption-iterations'), createdAt: new Date().toISOString() };
    const pairs = learningPairs();
    state.previewSteps.learn = [];
    state.previewHashes.learn = [];
    state.previewSums.learn = [];
    const r = await call({ type: 'learn', befores: pairs.map((p) => p[0].slice(0)), afters: pairs.map((p) => p[1].slice(0)), options }, (p) => {
      if (p.phase === 'preview') {
        drawPreview($('learn-preview'), p);
        $('learn-preview-text').textContent = `step ${p.step}: what the instruction makes of the before image`;
        return;
      }
      if (p.phase === 'caption') {
        $('learn-bar').value = p.step / p.total * 0.1;
        $('learn-text').textContent = `finding a caption ${p.step}/${p.total} (similarity ${p.cos.toFixed(3)})`;
        return;
      }
      learnStart = learnStart || performance.now();
      state.losses.push(p.mse);
      const per = (performance.now() - learnStart) / p.step;
      $('learn-bar').value = 0.1 + 0.9 * p.step / p.total;
      $('learn-text').textContent = `step ${p.step}/${p.total} · t ${p.t} · mse ${p.mse.toFixed(4)} · best ${p.best.toFixed(4)} · about ${Math.ceil(per * (p.total - p.step) / 1000)} s left`;
      drawLoss();
    });
    if (learnStart && state.losses.length) {
      const [w, h] = [num('learn-size'), num('learn-size') * 0.75];
      state.timing.learn = { perPixel: (performance.now() - learnStart) / 1000 / state.losses.length / (w * h), from: 'the last learning run; fewer if it stops early' };
      showEstimates();
    }
    $('learn-bar').value = 1;
    $('learn-text').textContent = `done in ${((performance.now() - t0) / 1000).toFixed(1)} s (${r.info.metadata.steps_run} steps, best mse ${Number(r.info.metadata.best_mse).toFixed(4)})`;
    setInstruction(r.bytes, r.info, 'learned.visii.safetensors');
    document.body.dataset.learned = String(Number(document.body.dataset.learned || 0) + 1);
  } catch (e) {
    if (e.name === 'CancelledError') $('learn-text').textContent = 'stopped';
    showWorkerError(e);
  } finally {
    state.busy = null;
    $('learn-stop').hidden = true;
    updateButtons();
  }
};
$('learn-stop').onclick = () => worker.postMessage({ type: 'cancel' });

// ---------------------------------------------------------------- instruction files
function setInstruction(bytesBuf, info, name) {
  state.instruction = bytesBuf;
  state.instructionSerial = (state.instructionSerial || 0) + 1;
  state.instructionInfo = info;
  state.instructionName = name;
  const m = info.metadata;
  $('learn-caption').textContent = m.init_caption || '—';
  const rows = [
    ['File', name], ['Initial caption', m.init_caption], ['Base model', info.baseModel ? `${info.baseModel.name} (${info.baseModel.fingerprint})` : 'unrecorded'],
    ['Steps', m.steps_run], ['Best mse', m.best_mse], ['Final loss', m.final_loss], ['Seed', m.seed], ['Created', m.created_at || m.created_at_unix || '—'],
  ];
  $('instruction-meta').replaceChildren(...rows.flatMap(([k, v]) => [Object.assign(document.createElement('dt'), { textContent: k }), Object.assign(document.createElement('dd'), { textContent: v ?? '—' })]));
  setSrc($('instruction-thumb'), info.thumbnailPng ? new Blob([info.thumbnailPng], { type: 'image/png' }) : null);
  $('instruction-info').hidden = false;
  $('apply-reuse').disabled = !info.reusableNoise;
  checkInstructionModel();
  updateButtons();
}
function checkInstructionModel() {
  const info = state.instructionInfo;
  if (!info || !info.baseModel || !state.model) return;
  if (info.baseModel.fingerprint !== state.model.info.fingerprint) {
    showError(TITLES.ForeignModelError,
      `This instruction was learned on "${info.baseModel.name}" (fingerprint ${info.baseModel.fingerprint}); the loaded model is "${state.model.info.name}" (${state.model.info.fingerprint}).`,
      HINTS.ForeignModelError, 'ForeignModelError');
  }
}
// The engine's own cap (visii_formats::instruction::MAX_BYTES): a larger file is not read at all.
const INSTRUCTION_MAX_BYTES = 16 << 20;
async function loadInstruction(file) {
  try {
    if (file.size > INSTRUCTION_MAX_BYTES) {
      throw Object.assign(new Error(`"${file.name}" is ${bytes(file.size)}: far too large for an instruction file (at most ${bytes(INSTRUCTION_MAX_BYTES)}).`), { name: 'InstructionError' });
    }
    const buf = await file.arrayBuffer();
    const r = await call({ type: 'inspect', bytes: buf.slice(0) });
    setInstruction(buf, r.info, file.name);
  } catch (e) {
    showWorkerError(e.name ? e : { name: 'InstructionError', message: String(e) });
  }
}
$('instruction-file').onchange = (e) => e.target.files[0] && loadInstruction(e.target.files[0]);
document.addEventListener('dragover', (e) => e.preventDefault());
document.addEventListener('drop', (e) => {
  e.preventDefault();
  const f = e.dataTransfer.files[0];
  if (!f) return;
  if (/\.safetensors$/i.test(f.name)) loadInstruction(f);
  else showError(TITLES.InstructionError, `"${f.name}" is not an instruction file. Drop images on the image boxes.`, HINTS.InstructionError, 'InstructionError');
});
function download(buf, name, type) {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([buf], { type }));
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
/// Show a blob in an <img>, releasing the previous object URL.
function setSrc(img, blob) {
  if (img.src.startsWith('blob:')) URL.revokeObjectURL(img.src);
  img.src = blob ? URL.createObjectURL(blob) : '';
}
$('instruction-download').onclick = () => {
  const caption = (state.instructionInfo.metadata.init_caption || 'edit').replace(/[^a-z0-9]+/gi, '-').slice(0, 40);
  download(state.instruction, `${caption || 'edit'}.visii.safetensors`, 'application/octet-stream');
};

// ---------------------------------------------------------------- live previews
/// Draw a preview ({width, height, rgba}: one pixel per latent pixel) into a canvas; the canvas is
/// scaled up by CSS with smoothing.
function drawPreview(canvas, p) {
  canvas.width = p.width;
  canvas.height = p.height;
  canvas.getContext('2d').putImageData(new ImageData(new Uint8ClampedArray(p.rgba), p.width, p.height), 0, 0);
  state.previewSteps[p.of].push(p.step);
  // A checksum per preview (a test reads whether each step changed the image).
  let h = 0;
  for (let i = 0; i < p.rgba.length; i++) h = (Math.imul(h, 31) + p.rgba[i]) | 0;
  (state.previewHashes[p.of] = state.previewHashes[p.of] || []).push(h);
  (state.previewSums[p.of] = state.previewSums[p.of] || []).push(p.latentSum);
  state.lastPreview = { of: p.of, step: p.step, width: p.width, height: p.height };
  document.body.dataset[`${p.of}Previews`] = state.previewSteps[p.of].length;
}

// ---------------------------------------------------------------- compare
/// A compare widget: the after image over the before one, cut where the slider is; a click, Enter,
/// Space or F flips to the before image and back.
function setupCompare(box, slider) {
  const cut = () => box.style.setProperty('--cut', `${slider.value}%`);
  slider.oninput = cut;
  cut();
  const flip = () => {
    box.classList.toggle('flipped');
    box.setAttribute('aria-label', box.classList.contains('flipped') ? 'Showing the image before the edit: press F to flip back' : 'Showing the edit: press F or click to flip to the image before it');
  };
  box.onclick = flip;
  box.onkeydown = (e) => {
    if (e.key === 'f' || e.key === 'F' || e.key === 'Enter' || e.key === ' ') { e.preventDefault(); flip(); }
  };
}
setupCompare($('result-compare'), $('result-slider'));

// ---------------------------------------------------------------- apply
/// The apply settings on the page now.
function applySettings() {
  return {
    steps: num('apply-steps'), guidance: num('apply-guidance'), imageGuidance: num('apply-image-guidance'), seed: num('apply-seed'),
    size: num('apply-size'), prompt: $('apply-prompt').value, extra: $('apply-extra').value,
    reuseNoise: $('apply-reuse').checked && !$('apply-reuse').disabled,
  };
}
/// One apply: `input` image bytes with `settings` and the instruction bytes (or none: the text
/// instruction in the settings). Shows the previews in the result box; resolves to the result.
async function runApply(input, settings, instruction, label) {
  const t0 = performance.now();
  state.previewSteps.apply = [];
  state.previewHashes.apply = [];
  state.previewSums.apply = [];
  $('slot-result').classList.remove('filled');
  $('apply-preview').hidden = false;
  $('result-slider').hidden = true;
  const r = await call({ type: 'apply', image: input.slice(0), options: settings, instruction: instruction ? instruction.slice(0) : undefined }, (p) => {
    if (p.phase === 'preview') return drawPreview($('apply-preview'), p);
    $('apply-bar').value = p.step / p.total;
    const per = p.step ? (performance.now() - t0) / p.step : 0;
    $('apply-text').textContent = `${label ? `${label}: ` : ''}step ${p.step}/${p.total}${p.step ? ` · about ${Math.ceil(per * (p.total - p.step) / 1000)} s left` : ''}`;
  });
  const seconds = (performance.now() - t0) / 1000;
  // Seconds per step and working pixel on this GPU with this model: the next estimates.
  state.timing.apply = { perPixel: seconds / (settings.steps * r.width * r.height), from: 'the last apply' };
  showEstimates();
  return { ...r, seconds };
}
/// "About N s on this GPU" beside Learn and Apply: from the last run of each, else from the steps
/// timed when the model loaded.
function showEstimates() {
  const fmt = (s) => (s < 90 ? `about ${Math.max(1, Math.round(s))} s` : s < 5400 ? `about ${Math.round(s / 60)} min` : `about ${(s / 3600).toFixed(1)} h`);
  const side = (n) => n * n * 0.75; // a 4:3 image of that longer side
  // Seconds for `steps` steps at `size`: a fixed cost per step (kernel launches, small layers)
  // plus a cost per working pixel.
  const time = (t, steps, size) => steps * ((t.fixed || 0) + t.perPixel * side(size));
  const a = state.timing.apply, l = state.timing.learn;
  const measuring = state.busy === 'estimate' || state.estimatePending ? 'timing steps on this GPU…' : '';
  $('apply-estimate').textContent = a ? `${fmt(time(a, num('apply-steps'), num('apply-size')))} on this GPU (from ${a.from})` : measuring;
  $('learn-estimate').textContent = l ? `${fmt(time(l, num('learn-steps'), num('learn-size')))} on this GPU (from ${l.from})` : measuring;
}
// When a model loads, an apply step and a learning step are timed on this GPU (the panel "Measure
// this GPU" made automatic) at a small size (`?estimateSize=`, default 128 px) and at half of it,
// and a fixed cost per step plus a cost per pixel fitted to the two: scaling one small timing by
// pixels alone took the fixed cost for work per pixel (SwiftShader at 32 px said "about 8880 min"
// for a learning run). They stand until a real run replaces them. It runs in the background: the
// buttons stay usable, and starting anything stops it first (between its steps).
let estimateJob = null;
function autoEstimate() {
  // Not while the job that loaded the model still runs: its end starts this again.
  if (state.busy === 'download') return;
  const pending = state.estimatePending;
  state.estimatePending = false;
  if (state.busy || !state.model || !pending) return showEstimates();
  const size = Math.max(16, Math.round((Number(params.get('estimateSize')) || 128) / 8) * 8);
  const half = Math.max(8, Math.round(size / 16) * 8);
  const model = state.model;
  state.busy = 'estimate';
  updateButtons();
  showEstimates();
  estimateJob = (async () => {
    try {
      for (const [what, key, label] of [['sample-step', 'apply', 'an apply step'], ['learn-step', 'learn', 'a learning step']]) {
        const points = [];
        for (const s of [half, size]) {
          const { result: r } = await call({ type: 'measure', what, size: s, runs: 1 });
          points.push([s * s, r.seconds]);
        }
        if (state.model !== model || state.timing[key]) continue;
        state.timing[key] = { ...fitSteps(points), from: `${label} timed at ${half} and ${size} px when the model loaded` };
        showEstimates();
      }
      document.body.dataset.estimated = String(Number(document.body.dataset.estimated || 0) + 1);
    } catch (e) {
      // Stopped by a job the person started, or a failure: no estimate (a failed GPU shows its panel).
      if (e.name !== 'CancelledError' && e.fatal) showWorkerError(e);
    } finally {
      state.busy = null;
      estimateJob = null;
      showEstimates();
      updateButtons();
    }
  })();
}
/// A fixed cost per step plus a cost per pixel through two timings `[[pixels, seconds], ..]`
/// (smaller first); where the larger was not slower (noise), all of it per pixel.
function fitSteps([[p1, t1], [p2, t2]]) {
  const perPixel = (t2 - t1) / (p2 - p1);
  if (!(perPixel > 0)) return { fixed: 0, perPixel: t2 / p2 };
  return { fixed: Math.max(0, t2 - perPixel * p2), perPixel };
}
/// Stop the background timing (if it runs) and wait until it has.
async function stopEstimate() {
  if (state.busy !== 'estimate' || !estimateJob) return;
  worker.postMessage({ type: 'cancel' });
  await estimateJob;
}
for (const id of ['apply-steps', 'apply-size', 'learn-steps', 'learn-size']) $(id).addEventListener('input', showEstimates);
/// Show a result in the result box (compare with its input) and keep it in the gallery.
function showResult(input, r, settings, instruction, name) {
  state.result = r.png;
  setSrc($('result-before'), new Blob([input]));
  setSrc($('result'), new Blob([r.png], { type: 'image/png' }));
  $('apply-preview').hidden = true;
  $('slot-result').classList.add('filled');
  $('result-slider').hidden = false;
  $('result-compare').classList.remove('flipped');
  addToGallery({ input, png: r.png, width: r.width, height: r.height, settings, instruction, instructionName: instruction ? state.instructionName : null, name });
  document.body.dataset.applied = String(Number(document.body.dataset.applied || 0) + 1);
}
/// Run `job` as the page's one running job: buttons off, Stop shown; errors shown (a stop is not one).
async function applyJob(job) {
  await stopEstimate();
  if (state.busy) return;
  state.busy = 'apply';
  updateButtons();
  $('apply-stop').hidden = false;
  try {
    await job();
  } finally {
    state.busy = null;
    $('apply-stop').hidden = true;
    $('apply-preview').hidden = true;
    if (state.result) $('slot-result').classList.add('filled');
    updateButtons();
  }
}
$('apply').onclick = () => applyJob(async () => {
  const settings = applySettings();
  const input = state.images.edit;
  try {
    const r = await runApply(input, settings, state.instruction, '');
    showResult(input, r, settings, state.instruction, state.imageNames.edit || 'image');
    $('apply-text').textContent = `done in ${r.seconds.toFixed(1)} s, ${r.width} x ${r.height}`;
  } catch (e) {
    if (e.name === 'CancelledError') $('apply-text').textContent = 'stopped';
    showWorkerError(e);
  }
});
$('apply-stop').onclick = () => { state.stopBatch = true; worker.postMessage({ type: 'cancel' }); };
$('result-download').onclick = () => download(state.result, 'visii-result.png', 'image/png');

// ---------------------------------------------------------------- batch
/// Add files to the batch (each checked and read now; one that fails is listed as failed).
async function addToBatch(files) {
  for (const f of files) {
    const item = { name: f.name || 'pasted image', buf: null, status: 'waiting' };
    try {
      item.buf = await imageBytes(f);
    } catch (e) {
      item.status = 'failed';
      item.error = e.message;
    }
    state.batch.push(item);
  }
  showBatch();
}
function showBatch() {
  $('batch').hidden = !state.batch.length;
  $('batch-count').textContent = state.batch.length;
  $('batch-list').replaceChildren(...state.batch.map((it) => {
    const li = document.createElement('li');
    const status = Object.assign(document.createElement('span'), { className: `status ${it.status}`, textContent: it.status === 'failed' ? `failed: ${it.error}` : it.status });
    li.append(it.name, status);
    li.dataset.status = it.status;
    return li;
  }));
  updateButtons();
}
$('batch-clear').onclick = () => { state.batch = []; showBatch(); };
// Every waiting image of the batch with the same settings (and seed), one after the other; Stop
// ends the batch after the running image (the rest stay waiting).
$('batch-apply').onclick = () => applyJob(async () => {
  const settings = applySettings();
  const instruction = state.instruction;
  state.stopBatch = false;
  const todo = state.batch.filter((it) => it.status !== 'done' && it.buf);
  let done = 0;
  for (const [k, it] of todo.entries()) {
    if (state.stopBatch) break;
    it.status = 'running';
    showBatch();
    try {
      const r = await runApply(it.buf, settings, instruction, `${k + 1}/${todo.length} ${it.name}`);
      showResult(it.buf, r, settings, instruction, it.name);
      it.status = 'done';
      done++;
    } catch (e) {
      if (e.name === 'CancelledError') { it.status = 'stopped'; state.stopBatch = true; }
      else { it.status = 'failed'; it.error = e.message; }
      // A lost engine ends the batch (the engine restarts itself; run the batch again).
      if (e.restarted) { showWorkerError(e); state.stopBatch = true; }
    }
    showBatch();
  }
  $('apply-text').textContent = `batch: ${done} of ${todo.length} images edited${state.stopBatch ? ' (stopped)' : ''}`;
  document.body.dataset.batches = String(Number(document.body.dataset.batches || 0) + 1);
});

// ---------------------------------------------------------------- gallery
const settingsText = (s, instructionName) => [
  instructionName ? `instruction ${instructionName}` : `"${s.prompt}"`, s.extra ? `+ "${s.extra}"` : '',
  `steps ${s.steps}`, `guidance ${s.guidance}`, `image guidance ${s.imageGuidance}`, `seed ${s.seed}`, `size ${s.size}`, s.reuseNoise ? 'learning noise' : '',
].filter(Boolean).join(' · ');
let galleryId = 0;
function addToGallery(entry) {
  entry.id = ++galleryId;
  state.gallery.push(entry);
  const li = document.createElement('li');
  li.dataset.id = entry.id;
  const fig = document.createElement('figure');
  const box = Object.assign(document.createElement('div'), { className: 'compare', tabIndex: 0 });
  box.setAttribute('role', 'group');
  box.setAttribute('aria-label', `Result ${entry.id} (${entry.name}): press F or click to flip between before and after`);
  const before = Object.assign(document.createElement('img'), { className: 'before', alt: `${entry.name} before the edit` });
  const after = Object.assign(document.createElement('img'), { className: 'after', alt: `${entry.name} edited` });
  before.src = URL.createObjectURL(new Blob([entry.input]));
  after.src = URL.createObjectURL(new Blob([entry.png], { type: 'image/png' }));
  box.append(before, after);
  const slider = Object.assign(document.createElement('input'), { type: 'range', min: 0, max: 100, value: 50, className: 'compare-slider' });
  slider.setAttribute('aria-label', `Compare result ${entry.id}: before on the left, after on the right`);
  setupCompare(box, slider);
  const cap = document.createElement('figcaption');
  const settings = Object.assign(document.createElement('div'), { className: 'settings', textContent: settingsText(entry.settings, entry.instructionName) });
  const actions = Object.assign(document.createElement('div'), { className: 'actions' });
  const button = (text, cls, f) => {
    const b = Object.assign(document.createElement('button'), { type: 'button', textContent: text, className: cls });
    b.onclick = f;
    actions.append(b);
    return b;
  };
  button('Download', 'download', () => download(entry.png, `${fileStem(entry.name)}-visii.png`, 'image/png'));
  // Run again with one setting changed (the instruction the result was made with).
  const again = (change, what) => applyJob(async () => {
    const s = { ...entry.settings, ...change(entry.settings) };
    try {
      const r = await runApply(entry.input, s, entry.instruction, what);
      showResult(entry.input, r, s, entry.instruction, entry.name);
      $('apply-text').textContent = `${what}: done in ${r.seconds.toFixed(1)} s`;
    } catch (e) {
      if (e.name === 'CancelledError') $('apply-text').textContent = 'stopped';
      showWorkerError(e);
    }
  });
  button('Another seed', 'rerun-seed', () => again((s) => ({ seed: s.seed + 1 }), 'another seed'));
  button('Stronger', 'rerun-stronger', () => again((s) => ({ guidance: Math.round(s.guidance * 1.3 * 10) / 10 }), 'stronger'));
  button('Weaker', 'rerun-weaker', () => again((s) => ({ guidance: Math.round(s.guidance / 1.3 * 10) / 10 }), 'weaker'));
  button('Remove', 'remove', () => {
    state.gallery = state.gallery.filter((e) => e !== entry);
    URL.revokeObjectURL(before.src);
    URL.revokeObjectURL(after.src);
    li.remove();
    updateButtons();
  });
  cap.append(Object.assign(document.createElement('strong'), { textContent: `${entry.name} · ${entry.width} x ${entry.height}` }), settings, actions);
  fig.append(box, slider, cap);
  li.append(fig);
  $('gallery').prepend(li);
  updateButtons();
}
const fileStem = (name) => (name || 'image').replace(/\.[^.]*$/, '').replace(/[^\w.-]+/g, '-').slice(0, 60) || 'image';
$('gallery-clear').onclick = () => {
  for (const img of $('gallery').querySelectorAll('img')) URL.revokeObjectURL(img.src);
  state.gallery = [];
  $('gallery').replaceChildren();
  updateButtons();
};
// All results as one zip (stored, not compressed: PNGs are compressed already), made by the wasm
// module in the worker (visii_formats::zip: names checked) and handed back as a Blob.
$('gallery-zip').onclick = async () => {
  const used = new Set();
  const files = state.gallery.map((e, i) => {
    let name = `${String(i + 1).padStart(3, '0')}-${fileStem(e.name)}.png`;
    while (used.has(name)) name = `x${name}`;
    used.add(name);
    return { name, bytes: new Uint8Array(e.png).slice().buffer };
  });
  const settings = state.gallery.map((e, i) => ({ file: files[i].name, input: e.name, instruction: e.instructionName, ...e.settings }));
  files.push({ name: 'settings.json', bytes: new TextEncoder().encode(JSON.stringify(settings, null, 2)).buffer });
  try {
    const { blob } = await call({ type: 'zip', files }, null, files.map((f) => f.bytes));
    state.lastZip = blob;
    download(blob, 'visii-results.zip', 'application/zip');
  } catch (e) {
    showWorkerError(e);
  }
};

// ---------------------------------------------------------------- readable instructions
// The words nearest to the instruction's learned positions, read with the loaded model on request
// (a job like any other: the engine reads them position by position); hidden again when the
// instruction or the model changes.
let wordsFor = null;
const wordsKey = () => (state.instruction && state.model ? `${state.model.info.fingerprint}:${state.instructionSerial}` : null);
$('instruction-read').onclick = async () => {
  await stopEstimate();
  const key = wordsKey();
  if (!key || state.busy) return;
  state.busy = 'words';
  updateButtons();
  $('instruction-reads').textContent = 'reading…';
  $('instruction-words').hidden = false;
  try {
    const r = await call({ type: 'words', bytes: state.instruction.slice(0), k: 3 });
    wordsFor = key;
    state.words = r.words;
    $('instruction-reads').textContent = r.words.map((l) => (l[0] ? l[0].word : '?')).join(' ');
    $('instruction-word-list').replaceChildren(...r.words.map((l) => Object.assign(document.createElement('li'), {
      textContent: l.map((w) => `${w.word} (${w.score.toFixed(2)})`).join(', '),
    })));
    document.body.dataset.words = $('instruction-reads').textContent;
  } catch (e) {
    $('instruction-words').hidden = true;
    showWorkerError(e);
  } finally {
    state.busy = null;
    updateButtons();
  }
};

/// Whether a job may start: nothing runs, or only the background timing at model load (which
/// starting anything stops first).
function isIdle() {
  return !state.busy || state.busy === 'estimate';
}
function updateButtons() {
  const idle = isIdle();
  for (const b of document.querySelectorAll('#stored button')) b.disabled = !idle;
  const model = !!state.model;
  $('model-load').disabled = !idle;
  $('local-load').disabled = !idle;
  $('learn').disabled = !(idle && model && state.images.before && state.images.after);
  $('measure').disabled = !(idle && model);
  $('apply').disabled = !(idle && model && state.images.edit && (state.instruction || $('apply-prompt').value.trim()));
  $('instruction-download').disabled = !state.instruction;
  $('result-download').disabled = !state.result;
  $('batch-apply').disabled = !(idle && model && state.batch.some((it) => it.buf && it.status !== 'done') && (state.instruction || $('apply-prompt').value.trim()));
  $('gallery-zip').disabled = !state.gallery.length;
  $('gallery-clear').disabled = !(idle && state.gallery.length);
  for (const b of document.querySelectorAll('#gallery .actions button:not(.download):not(.remove)')) b.disabled = !(idle && model);
  $('gallery-empty').hidden = !!state.gallery.length;
  $('instruction-read').disabled = !(idle && model && state.instruction);
  // Words read for another instruction or model are not shown.
  if (idle && wordsFor && wordsFor !== wordsKey()) { wordsFor = null; state.words = null; $('instruction-words').hidden = true; }
}
$('apply-prompt').oninput = updateButtons;

// ---------------------------------------------------------------- measure
$('measure').onclick = async () => {
  await stopEstimate();
  if (state.busy) return;
  const what = $('measure-what').value;
  const size = num('measure-size');
  const label = $('measure-what').selectedOptions[0].textContent;
  state.busy = 'measure';
  updateButtons();
  $('measure-text').textContent = `running ${label} at ${size} px…`;
  try {
    const { result: r, wasmMemory } = await call({ type: 'measure', what, size, runs: Number(params.get('measureRuns') || 1) });
    document.body.dataset.wasmMemory = wasmMemory;
    const gpu = (r.gpuBytesHeldPeak ? `; GPU memory held at most: ${bytes(r.gpuBytesHeldPeak)} (at most ${bytes(r.gpuBytesInUsePeak)} in use)` : '')
      + (r.browserGpuBytesPeak ? `; GPU buffers alive in the browser at most: ${bytes(r.browserGpuBytesPeak)}, after: ${bytes(r.browserGpuBytes)}` : '');
    $('measure-text').textContent = `${label} at ${size} px (${size / 8} x ${size / 8} latents): ${r.seconds.toFixed(2)} s (first run, with kernel compilation: ${r.firstSeconds.toFixed(1)} s)${gpu}`;
    document.body.dataset.measured = JSON.stringify(r);
  } catch (e) {
    $('measure-text').textContent = `${label} failed`;
    showWorkerError(e);
  } finally {
    state.busy = null;
    updateButtons();
  }
};

// ---------------------------------------------------------------- start
if ('serviceWorker' in navigator) navigator.serviceWorker.register('sw.js').catch(() => {});
const params = new URLSearchParams(location.search);
const hub = params.get('hub');
// ?gpuLimits=spec asks for a device with WebGPU's default limits (what the least capable adapter grants).
const limits = params.get('gpuLimits') === 'spec' ? 'spec' : 'adapter';
// ?gpuTidyEvery=N&gpuTidyBackwardEvery=M: how often (in layers; 0 = only between steps) the engine
// hands free GPU buffers back in the forward / backward pass; ?gpuExactFit=0: learning steps in the
// allocator's size buckets instead of exact-size buffers (diagnosis).
const tidy = {};
if (params.has('gpuTidyEvery')) tidy.tidyEvery = Number(params.get('gpuTidyEvery'));
if (params.has('gpuTidyBackwardEvery')) tidy.tidyBackwardEvery = Number(params.get('gpuTidyBackwardEvery'));
if (params.has('gpuExactFit')) tidy.exactFit = params.get('gpuExactFit') !== '0';
// ?kernels=burn: burn's own conv / matmul / norm kernels instead of ours (to compare them).
const kernels = params.get('kernels') === 'burn' ? 'burn' : undefined;
// ?gemv=on|off, ?gemvGrad=on|off, ?flash=on|off, ?flashGrad=on|off, ?fusedSteps=on|off, ?epilogue=on|off,
// ?q8=on|off: the skinny GEMM (off in a browser by default for now), its use for a Linear's input
// gradient, the fused attention (on by default), its fused step in learning (on by default; `off`:
// burn's chain, to compare), learning's fused norm and GEGLU steps (on by default; `off`: burn's
// chains), residuals added in the GEMMs' epilogue (on by default; `off`: separate adds) and int8
// weights read in place by our GEMMs (on by default; `off`: a float copy of each layer's weight).
const onOff = (k) => (params.get(k) === 'on' ? true : params.get(k) === 'off' ? false : undefined);
const [gemv, gemvGrad, flash, flashGrad, fusedSteps, epilogue, q8] = ['gemv', 'gemvGrad', 'flash', 'flashGrad', 'fusedSteps', 'epilogue', 'q8'].map(onOff);
describeAdapter().then((ok) => {
  if (ok) {
    initMessage = { type: 'init', hub, limits, tidy, kernels, gemv, gemvGrad, flash, flashGrad, fusedSteps, epilogue, q8 };
    worker.postMessage(initMessage);
  }
  else { $('app-version').textContent = 'visii'; $('gpu-selftest').textContent = 'unavailable'; $('gpu-selftest').className = 'bad'; document.body.dataset.ready = 'no'; }
});
updateButtons();
