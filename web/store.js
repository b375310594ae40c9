// Model storage for the worker: downloads model files (with progress, speed and ETA), verifies
// them (size, and sha256 where the manifest knows it), resumes interrupted downloads with HTTP
// range requests, and keeps them in the origin-private file system (OPFS) so later visits (and
// offline ones) load from disk. A safetensors file with a `select` list is fetched partially: its
// header first, then only the tensors whose names start with one of the prefixes, written locally
// as a smaller safetensors file (e.g. only CLIP's vision tower and projections).
//
// Layout: OPFS /visii/<source id>/<component>/<relative path>, and /visii/<source id>/state.json
// recording each complete file ({size, sha256?, partial?}).

import { Sha256 } from '../dist/pkg/visii_web.js';

const enc = new TextEncoder();
const dec = new TextDecoder();

export class StoreError extends Error {
  constructor(name, message) { super(message); this.name = name; }
}

async function top() {
  if (!navigator.storage || !navigator.storage.getDirectory) {
    throw new StoreError('StorageError', 'This browser does not offer the origin-private file system (OPFS) needed to keep models.');
  }
  const root = await navigator.storage.getDirectory();
  return root.getDirectoryHandle('visii', { create: true });
}

async function dirOf(base, parts, create) {
  let d = base;
  for (const p of parts) d = await d.getDirectoryHandle(p, { create });
  return d;
}

async function fileHandle(sourceId, rel, create) {
  const parts = rel.split('/').filter(Boolean);
  const name = parts.pop();
  const d = await dirOf(await top(), [sourceId, ...parts], create);
  return d.getFileHandle(name, { create });
}

async function readState(sourceId) {
  try {
    const f = await (await fileHandle(sourceId, 'state.json', false)).getFile();
    return JSON.parse(await f.text());
  } catch { return { files: {} }; }
}

async function writeState(sourceId, state) {
  const w = await (await fileHandle(sourceId, 'state.json', true)).createWritable();
  await w.write(JSON.stringify(state));
  await w.close();
}

/// sha256 of a Blob in 16 MB slices (WebCrypto only digests whole buffers: a 3.4 GB file would
/// not fit in memory), with the wasm module's hasher.
async function sha256Hex(blob) {
  const h = new Sha256();
  for (let a = 0; a < blob.size; a += 16 << 20) h.update(new Uint8Array(await blob.slice(a, a + (16 << 20)).arrayBuffer()));
  return h.finish();
}

function quotaMessage(need, free) {
  const gb = (b) => `${(b / 1e9).toFixed(2)} GB`;
  return `This download needs about ${gb(need)} of browser storage but only ${gb(free)} is available to this site. ` +
    'Free space on the disk, remove stored models you no longer need (below), or allow this site more storage in the browser settings.';
}

function fullMessage(rel, done, total) {
  const mb = (b) => `${(b / 1e6).toFixed(1)} MB`;
  return `The browser refused to store ${rel} after ${mb(done)}${total ? ` of ${mb(total)}` : ''}: this site's storage is full. ` +
    'Free space on the disk, remove stored models you no longer need (below), or allow this site more storage in the browser settings.';
}

/// Everything stored, per source: [{source, files: [{path, size}], bytes}].
export async function listStored() {
  const out = [];
  let root;
  try { root = await top(); } catch { return out; }
  for await (const [name, handle] of root.entries()) {
    if (handle.kind !== 'directory') continue;
    const state = await readState(name);
    const files = Object.entries(state.files).filter(([, v]) => v.complete).map(([path, v]) => ({ path, size: v.size }));
    out.push({ source: name, label: state.label || name, files, bytes: files.reduce((a, f) => a + f.size, 0) });
  }
  return out;
}

export async function deleteSource(sourceId) {
  await (await top()).removeEntry(sourceId, { recursive: true });
}

/// The label a stored source was saved under (its state.json), or null.
export async function storedLabel(sourceId) {
  const st = await readState(sourceId);
  return Object.keys(st.files).length ? (st.label || sourceId) : null;
}

/// Writes files of one source and records them in its state.json once, on `commit()` (a picked
/// folder or a conversion writes ~20 files; a missing state entry just means "not stored yet").
export class SourceWriter {
  constructor(sourceId, label) {
    this.sourceId = sourceId;
    this.label = label;
    this.files = {};
  }

  /// Write `data` (a Blob / File, written by the browser without passing through this heap, or
  /// bytes) as the complete file `rel`.
  async put(rel, data) {
    const size = data.size ?? data.byteLength;
    try {
      const w = await (await fileHandle(this.sourceId, rel, true)).createWritable();
      await closeAfter(w, () => w.write(data));
    } catch (e) {
      if (e.name !== 'QuotaExceededError') throw e;
      throw new StoreError('QuotaError', fullMessage(rel, Object.values(this.files).reduce((a, f) => a + f.size, 0), 0));
    }
    this.files[rel] = { size, complete: true };
  }

  /// Forget everything written so far (after a failure: half a model is of no use).
  async discard() {
    await deleteSource(this.sourceId).catch(() => {});
  }

  async commit() {
    const state = await readState(this.sourceId);
    state.label = this.label || state.label;
    Object.assign(state.files, this.files);
    await writeState(this.sourceId, state);
  }
}

/// Run `body`, then close the writable `w` (which commits what was written). When `body` failed,
/// a failing close does not hide its error (a full disk fails both).
async function closeAfter(w, body) {
  let result;
  try {
    result = await body();
  } catch (e) {
    await w.close().catch(() => {});
    throw e;
  }
  await w.close();
  return result;
}

/// The stored files of one component as a Map(relative path -> File), or null if incomplete. The
/// engine reads the Files by range (FileReaderSync in this worker): never whole into memory.
export async function readComponent(sourceId, component, manifestFiles) {
  const state = await readState(sourceId);
  const map = new Map();
  const wanted = manifestFiles ? manifestFiles.map((f) => `${component}/${f.path}`)
    : Object.keys(state.files).filter((k) => k.startsWith(`${component}/`));
  for (const rel of wanted) {
    if (!state.files[rel] || !state.files[rel].complete) return null;
    let f;
    try {
      f = await (await fileHandle(sourceId, rel, false)).getFile();
    } catch {
      // Recorded but gone (deleted meanwhile): forget it, so the next download fetches it again.
      delete state.files[rel];
      await writeState(sourceId, state);
      return null;
    }
    map.set(rel.slice(component.length + 1), f);
  }
  return map.size ? map : null;
}

function resolveUrl(base, path, hub) {
  const b = base.replace('{hub}', hub || 'https://huggingface.co/');
  return new URL(path, new URL(b, self.location.href)).href;
}

/// Download (or resume) every file of a source that is not stored yet. `onProgress({file, loaded,
/// total, doneBytes, totalBytes, speed, eta})`. `signal.aborted` stops between chunks.
export async function ensureSource(source, { hub, onProgress, signal } = {}) {
  const state = await readState(source.id);
  state.label = source.label;
  const jobs = [];
  for (const component of ['ip2p', 'clip']) {
    const c = source[component];
    if (!c) continue;
    for (const f of c.files) {
      const rel = `${component}/${f.path}`;
      if (state.files[rel] && state.files[rel].complete) continue;
      jobs.push({ rel, url: resolveUrl(c.base, f.path, hub), file: f });
    }
  }
  if (!jobs.length) return;
  const totalBytes = jobs.reduce((a, j) => a + (j.file.fetchSize || j.file.size || 0), 0);
  if (navigator.storage && navigator.storage.estimate) {
    const { quota = Infinity, usage = 0 } = await navigator.storage.estimate();
    if (totalBytes > quota - usage) throw new StoreError('QuotaError', quotaMessage(totalBytes, quota - usage));
  }
  const t0 = performance.now();
  let doneBytes = 0;
  const tick = (file, loaded, total) => {
    const secs = (performance.now() - t0) / 1000;
    const speed = secs > 0 ? doneBytes / secs : 0;
    const eta = speed > 0 && totalBytes ? Math.max(0, (totalBytes - doneBytes) / speed) : null;
    onProgress && onProgress({ file, loaded, total, doneBytes, totalBytes, speed, eta });
  };
  for (const job of jobs) {
    if (signal && signal.aborted) throw new StoreError('AbortError', 'download stopped');
    try {
      const handle = await fileHandle(source.id, job.rel, true);
      const written = job.file.select
        ? await fetchSelected(job, handle, (n, loaded, total) => { doneBytes += n; tick(job.rel, loaded, total); }, signal)
        : await fetchWhole(job, handle, (n, loaded, total) => { doneBytes += n; tick(job.rel, loaded, total); }, signal);
      state.files[job.rel] = { size: written, complete: true };
      await writeState(source.id, state);
    } catch (e) {
      // The estimate said there was room, but the browser refused a write (a full disk, or a
      // quota that shrank): what arrived stays and the download resumes later.
      if (e.name === 'QuotaExceededError') throw new StoreError('QuotaError', fullMessage(job.rel, doneBytes, totalBytes));
      throw e;
    }
  }
}

const COMMIT_BYTES = 64 << 20;

async function fetchOk(url, init, what, allow416 = false) {
  let res;
  try {
    res = await fetch(url, init);
  } catch (e) {
    throw new StoreError('NetworkError', `could not download ${what}: the network request failed (${e.message}). Check the connection; the download resumes where it stopped.`);
  }
  if (allow416 && res.status === 416) return res;
  if (!res.ok) throw new StoreError('NetworkError', `could not download ${what}: the server answered ${res.status} ${res.statusText}`);
  return res;
}

async function fetchWhole(job, handle, onBytes, signal) {
  let have = 0;
  try { have = (await handle.getFile()).size; } catch { have = 0; }
  const expect = job.file.size;
  if (expect && have > expect) have = 0;
  if (expect && have === expect) {
    // Fully written before the state was recorded (e.g. the tab closed): verify below.
    onBytes(have, have, expect);
    return verifyWhole(job, handle, have);
  }
  const headers = have > 0 ? { Range: `bytes=${have}-` } : {};
  let res = await fetchOk(job.url, { headers, cache: 'no-store' }, job.rel, have > 0);
  if (res.status === 416) res = await fetchOk(job.url, { cache: 'no-store' }, job.rel); // stale partial file: redo
  const resumed = res.status === 206 && have > 0;
  if (!resumed) have = 0;
  const total = expect || (Number(res.headers.get('content-length')) + have) || null;
  let w = await handle.createWritable({ keepExistingData: resumed });
  if (resumed) { await w.seek(have); onBytes(have, have, total); }
  const reader = res.body.getReader();
  let loaded = have;
  let sinceCommit = 0;
  const pump = async () => {
    for (;;) {
      if (signal && signal.aborted) throw new StoreError('AbortError', 'download stopped');
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        throw new StoreError('NetworkError', `the download of ${job.rel} was interrupted after ${loaded} bytes (${e.message}); run it again to resume`);
      }
      const { done, value } = chunk;
      if (done) return;
      await w.write(value);
      loaded += value.byteLength;
      sinceCommit += value.byteLength;
      onBytes(value.byteLength, loaded, total);
      if (sinceCommit >= COMMIT_BYTES) {
        // A writable's data only lands in the file on close(): commit every 64 MB so a closed tab
        // loses at most that much. Until the next one is open, nothing is left to close.
        const full = w;
        w = null;
        await full.close();
        w = await handle.createWritable({ keepExistingData: true });
        await w.seek(loaded);
        sinceCommit = 0;
      }
    }
  };
  try {
    await pump();
  } catch (e) {
    // Stop the transfer; keep what arrived (the download resumes from it); a failing close must
    // not hide `e`.
    reader.cancel().catch(() => {});
    if (w) await w.close().catch(() => {});
    throw e;
  }
  await w.close();
  return verifyWhole(job, handle, loaded);
}

async function verifyWhole(job, handle, loaded) {
  const expect = job.file.size;
  if (expect && loaded !== expect) {
    throw new StoreError('VerifyError', `${job.rel} arrived with ${loaded} bytes, expected ${expect}: it will be downloaded again`);
  }
  if (job.file.sha256) {
    const digest = await sha256Hex(await handle.getFile());
    if (digest !== job.file.sha256) {
      await (await handle.createWritable()).close(); // truncate: redo from scratch next time
      throw new StoreError('VerifyError', `${job.rel} is corrupt (sha256 ${digest.slice(0, 12)}… instead of ${job.file.sha256.slice(0, 12)}…); retry the download`);
    }
  }
  return loaded;
}

/// Header by range request, then only the selected tensors; written as a compact safetensors file.
async function fetchSelected(job, handle, onBytes, signal) {
  const range = async (from, to) => {
    const res = await fetchOk(job.url, { headers: { Range: `bytes=${from}-${to}` }, cache: 'no-store' }, job.rel);
    if (res.status !== 206) {
      throw new StoreError('NetworkError', `the server of ${job.rel} does not support range requests, which this partial download needs`);
    }
    try {
      return new Uint8Array(await res.arrayBuffer());
    } catch (e) {
      throw new StoreError('NetworkError', `the download of ${job.rel} was interrupted (${e.message}); run it again`);
    }
  };
  const lenBytes = await range(0, 7);
  const n = Number(new DataView(lenBytes.buffer, lenBytes.byteOffset, 8).getBigUint64(0, true));
  if (!(n > 0 && n < 100e6)) throw new StoreError('VerifyError', `${job.rel} is not a safetensors file`);
  const header = JSON.parse(dec.decode(await range(8, 8 + n - 1)));
  const keep = Object.entries(header).filter(([k]) => k !== '__metadata__' && job.file.select.some((p) => k.startsWith(p)))
    .sort((a, b) => a[1].data_offsets[0] - b[1].data_offsets[0]);
  if (!keep.length) throw new StoreError('VerifyError', `${job.rel} has none of the tensors this app needs`);
  const total = keep.reduce((a, [, v]) => a + v.data_offsets[1] - v.data_offsets[0], 0);
  const out = {};
  let offset = 0;
  for (const [k, v] of keep) {
    const len = v.data_offsets[1] - v.data_offsets[0];
    out[k] = { dtype: v.dtype, shape: v.shape, data_offsets: [offset, offset + len] };
    offset += len;
  }
  let head = enc.encode(JSON.stringify(out));
  const pad = (8 - (head.length % 8)) % 8;
  head = enc.encode(JSON.stringify(out) + ' '.repeat(pad));
  const w = await handle.createWritable();
  const len = new Uint8Array(8);
  new DataView(len.buffer).setBigUint64(0, BigInt(head.length), true);
  let loaded = 0;
  await closeAfter(w, async () => {
    await w.write(len);
    await w.write(head);
    // Coalesce neighbouring tensors into one request.
    let i = 0;
    while (i < keep.length) {
      if (signal && signal.aborted) throw new StoreError('AbortError', 'download stopped');
      let j = i;
      while (j + 1 < keep.length && keep[j + 1][1].data_offsets[0] === keep[j][1].data_offsets[1]
        && keep[j + 1][1].data_offsets[1] - keep[i][1].data_offsets[0] <= COMMIT_BYTES) j++;
      const from = 8 + n + keep[i][1].data_offsets[0];
      const to = 8 + n + keep[j][1].data_offsets[1] - 1;
      const bytes = await range(from, to);
      if (bytes.byteLength !== to - from + 1) throw new StoreError('VerifyError', `${job.rel}: a tensor range arrived incomplete`);
      await w.write(bytes);
      loaded += bytes.byteLength;
      onBytes(bytes.byteLength, loaded, total);
      i = j + 1;
    }
  });
  return 8 + head.length + loaded;
}
