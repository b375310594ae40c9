// The worker owns the wasm module and the GPU.
import init, { version, gpu_selftest } from '../dist/pkg/visii_web.js';

const ready = init();

self.onmessage = async ({ data }) => {
  try {
    await ready;
    self.postMessage({ type: 'version', version: version() });
    if (data.type === 'selftest') {
      const result = JSON.parse(await gpu_selftest());
      self.postMessage({ type: 'selftest', result });
    }
  } catch (e) {
    self.postMessage({ type: 'error', title: 'WebGPU initialisation failed', message: String(e && e.message || e) });
  }
};
