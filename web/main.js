// The page: shows status and errors. All GPU work happens in the worker (web/worker.js), so the
// page never freezes.
const $ = (id) => document.getElementById(id);

function showError(title, text) {
  $('error-title').textContent = title;
  $('error-text').textContent = text;
  $('error-panel').hidden = false;
}

async function describeAdapter() {
  if (!('gpu' in navigator)) {
    $('gpu-adapter').textContent = 'not available';
    showError('This browser has no WebGPU',
      'visii runs its networks on your GPU through WebGPU. Use a recent Chrome, Edge or another browser with WebGPU enabled (on Linux, Chrome may need chrome://flags/#enable-unsafe-webgpu).');
    return false;
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) {
    $('gpu-adapter').textContent = 'none';
    showError('No WebGPU adapter', 'WebGPU exists but no GPU adapter was offered. Check that hardware acceleration is enabled in the browser settings.');
    return false;
  }
  const info = adapter.info || {};
  $('gpu-adapter').textContent = [info.vendor, info.architecture, info.description || info.device].filter(Boolean).join(' ') || 'unknown adapter';
  const l = adapter.limits;
  const mib = (b) => `${Math.round(b / 1048576)} MiB`;
  $('gpu-limits').textContent = `maxBufferSize ${mib(l.maxBufferSize)}, maxStorageBufferBindingSize ${mib(l.maxStorageBufferBindingSize)}, shader-f16 ${adapter.features.has('shader-f16') ? 'yes' : 'no'}`;
  return true;
}

const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
worker.onmessage = ({ data }) => {
  if (data.type === 'version') $('app-version').textContent = data.version;
  if (data.type === 'selftest') {
    const ok = JSON.stringify(data.result) === JSON.stringify([19, 22, 43, 50]);
    $('gpu-selftest').textContent = ok ? 'WebGPU initialised; matmul on the GPU correct' : `unexpected result ${JSON.stringify(data.result)}`;
    $('gpu-selftest').className = ok ? 'ok' : 'bad';
    document.body.dataset.ready = ok ? 'yes' : 'no';
  }
  if (data.type === 'error') {
    $('gpu-selftest').textContent = 'failed';
    $('gpu-selftest').className = 'bad';
    document.body.dataset.ready = 'no';
    showError(data.title || 'The GPU worker failed', data.message);
  }
};
worker.onerror = (e) => showError('The GPU worker could not start', e.message || String(e));

describeAdapter().then((ok) => worker.postMessage({ type: ok ? 'selftest' : 'version' }));
