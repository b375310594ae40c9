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
const SHELL_URLS = new Set(SHELL.map((p) => new URL(p, self.registration.scope).href));
self.addEventListener('fetch', (e) => {
  const url = new URL(e.request.url);
  url.search = '';
  // Only the shell: model files live in OPFS (web/store.js), range requests pass through.
  if (e.request.method !== 'GET' || !SHELL_URLS.has(url.href) || e.request.headers.has('range')) return;
  e.respondWith((async () => {
    try {
      const res = await fetch(e.request);
      if (res.ok && res.status === 200) {
        const copy = res.clone();
        e.waitUntil(caches.open(CACHE).then((c) => c.put(url.href, copy)));
      }
      return res;
    } catch {
      return (await caches.match(url.href)) || Response.error();
    }
  })());
});
