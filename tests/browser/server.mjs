// A static file server for the browser tests: the app from the repository root with the right MIME
// types and HTTP range requests, plus a local "hub" (`/hub/...` -> a folder laid out like
// huggingface.co/<repo>/resolve/<revision>/<file>) that can cut one download short once, to test
// resuming. It records every request so tests can assert on them.
import { createServer } from 'node:http';
import { createReadStream, statSync } from 'node:fs';
import { join, normalize, extname } from 'node:path';

const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.json': 'application/json',
  '.wasm': 'application/wasm', '.css': 'text/css', '.png': 'image/png', '.txt': 'text/plain', '.safetensors': 'application/octet-stream' };

export function serve({ root, hubRoot, cutOnce = [] }) {
  const log = [];
  const cut = new Set(cutOnce);
  const server = createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    let path = decodeURIComponent(url.pathname);
    let base = root;
    if (path.startsWith('/hub/')) { base = hubRoot; path = path.slice(4); }
    const file = normalize(join(base, path.endsWith('/') ? `${path}index.html` : path));
    log.push({ path: url.pathname, range: req.headers.range || null });
    if (!file.startsWith(base)) { res.writeHead(403).end(); return; }
    let st;
    try { st = statSync(file); } catch { res.writeHead(404).end('not found'); return; }
    if (!st.isFile()) { res.writeHead(404).end('not found'); return; }
    const type = TYPES[extname(file)] || 'application/octet-stream';
    const headers = { 'Content-Type': type, 'Accept-Ranges': 'bytes', 'Cache-Control': 'no-cache' };
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range || '');
    if (m) {
      const start = Number(m[1]);
      const end = Math.min(m[2] ? Number(m[2]) : st.size - 1, st.size - 1);
      if (start >= st.size) { res.writeHead(416, { 'Content-Range': `bytes */${st.size}` }).end(); return; }
      res.writeHead(206, { ...headers, 'Content-Range': `bytes ${start}-${end}/${st.size}`, 'Content-Length': end - start + 1 });
      createReadStream(file, { start, end }).pipe(res);
      return;
    }
    res.writeHead(200, { ...headers, 'Content-Length': st.size });
    if (cut.has(url.pathname)) {
      // Send the first half, then drop the connection (an interrupted download).
      cut.delete(url.pathname);
      const s = createReadStream(file, { start: 0, end: Math.floor(st.size / 2) - 1 });
      s.on('end', () => setTimeout(() => res.socket.destroy(), 50));
      s.pipe(res, { end: false });
      return;
    }
    createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, port: server.address().port, log })));
}
