// Service worker: keeps the app shell (page, scripts, wasm) so the app opens with the network off.
// Models live in OPFS (web/store.js), not here. Network first (so updates arrive), cache as the
// fallback; every successful shell fetch refreshes the cache.
const CACHE = 'visii-shell-v1';
const SHELL = ['./', 'index.html', 'web/main.js', 'web/worker.js', 'web/store.js', 'web/style.css', 'dist/models.json',
  'dist/pkg/visii_web.js', 'dist/pkg/visii_web_bg.wasm'];

self.addEventListener('install', (e) => {
  e.waitUntil(caches.open(CACHE).then((c) => c.addAll(SHELL)).then(() => self.skipWaiting()));
});
self.addEventListener('activate', (e) => {
  e.waitUntil(caches.keys().then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});
self.addEventListener('fetch', (e) => {
  const url = new URL(e.request.url);
  if (e.request.method !== 'GET' || url.origin !== self.location.origin || e.request.headers.has('range')) return;
  // Model files are stored by the worker in OPFS; do not duplicate them here.
  if (url.pathname.includes('/models/')) return;
  e.respondWith(
    fetch(e.request).then((res) => {
      if (res.ok) {
        const copy = res.clone();
        caches.open(CACHE).then((c) => c.put(e.request, copy));
      }
      return res;
    }).catch(() => caches.match(e.request, { ignoreSearch: true }).then((hit) => hit || Response.error())),
  );
});
