//! What burn's allocator holds on the device, and handing its free buffers back.
//!
//! Natively cubecl carves allocations out of shared pages. In a browser (WebGPU cannot bind parts
//! of one buffer read-only and read-write at once) it gives every allocation a buffer of its own,
//! taken from 24 size buckets: a page is up to ~1.6x the size asked for, a free page of a larger
//! bucket serves any smaller request, and free pages go back to the driver only after thousands
//! of allocations. So in the browser the free pages are handed back after every learning /
//! sampling step ([`release`]), once the step's values have been read back (the GPU has run all
//! of it), and weights and the per-layer dequantised int8 weights get buffers of exactly their
//! size (`crate::weights::persistent`); so do the tensors of each learning step ([`exact_fit`]):
//! a free one is reused only for its very size, which the next layers of the same shapes ask
//! for, instead of bucket pages that hold ~1.6x and pile up. Forward-only passes (sampling, the
//! VAE) stay in the buckets: they keep few tensors alive, and exact sizes held more there.
//!
//! Not inside a step, by default ([`TIDY_EVERY`], [`TIDY_BACKWARD_EVERY`]: 0). In a browser the
//! wasm side queues a whole step before the GPU has run much of it (natively cubecl waits for the
//! GPU every 512 launches; WebGPU gives wasm no way to wait), so a buffer handed back inside a step
//! still holds its memory until the queued work that used it has run, while the allocator creates
//! new buffers for the layers after it: the browser then holds about everything the step ever
//! allocated, however little the engine's own account says it holds. Measured in a tab (full-size
//! UNet learning step at 256 px, int8 weights, SwiftShader): handing back at every layer (the
//! engine's account, measured natively: at most ~2.9 GB), Chromium's GPU process grew to 15.4 GB
//! in 45 s and died; handing back only between steps, it stayed at 7.23 GB (SwiftShader's own
//! ~1.6 GB included) and the step ran (the engine's account: at most 5.60 GB). [`tidy`] still
//! hands back every [`tidy_every`] layers where asked, for measuring (natively there is no such
//! pile-up). Numbers: BENCHMARKS.md, "The real sizes".
//!
//! Natively the same behaviour can be asked for ([`as_in_browser`], `visii --gpu-memory browser`)
//! with a device made by [`crate::gpu::browser_allocator_device`]: that is how the numbers above
//! are measured without a browser.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use burn::tensor::Device;

static BROWSER: AtomicBool = AtomicBool::new(cfg!(target_family = "wasm"));
static HELD_PEAK: AtomicU64 = AtomicU64::new(0);
static IN_USE_PEAK: AtomicU64 = AtomicU64::new(0);
static LAYERS: AtomicUsize = AtomicUsize::new(0);
static EVERY: AtomicUsize = AtomicUsize::new(TIDY_EVERY);
static WATCH: AtomicBool = AtomicBool::new(false);
static BACKWARD_EVERY: AtomicUsize = AtomicUsize::new(TIDY_BACKWARD_EVERY);
#[cfg_attr(not(feature = "frozen"), allow(dead_code))] // used by the backward of frozen int8 layers
static BACKWARD_LAYERS: AtomicUsize = AtomicUsize::new(0);
static EXACT: AtomicBool = AtomicBool::new(EXACT_FIT);

/// Layers run between two hand-backs inside a step's forward pass: 0, none (see the module's
/// text: in a browser a buffer handed back inside a step keeps its memory until the queued step
/// has run, and new ones are made meanwhile).
pub const TIDY_EVERY: usize = 0;

/// Layers run between two hand-backs inside the backward pass through int8 weights: 0, none.
/// Handing buffers back there (every layer, or every 8) made Chromium's GPU process die on
/// SwiftShader during the full-size learning step at 8 x 8 latents (device lost, "A valid external
/// Instance reference no longer exists"; 4 runs of 4): the pile-up the module's text describes.
pub const TIDY_BACKWARD_EVERY: usize = 0;

/// Whether a learning step's forward and backward pass run in buffers of exactly the size asked for in the
/// browser ([`exact_fit`]): yes.
pub const EXACT_FIT: bool = true;

/// Run steps in exact-size buffers ([`exact_fit`]) or in the allocator's size buckets: for
/// measuring what the exact sizes save.
pub fn exact_fit_steps(on: bool) {
    EXACT.store(on, Ordering::Relaxed);
}

/// Whether steps run in exact-size buffers ([`exact_fit_steps`]).
pub fn exact_fit_in_force() -> bool {
    EXACT.load(Ordering::Relaxed)
}

/// Natively, hand free pages back as in a browser (see the module's text).
pub fn as_in_browser(on: bool) {
    BROWSER.store(on, Ordering::Relaxed);
}

/// Whether free pages are handed back as in a browser.
pub fn in_browser() -> bool {
    BROWSER.load(Ordering::Relaxed)
}

/// Hand the allocator's free pages back every `layers` layers inside a step (0: only between
/// steps). For measuring what the frequency costs and saves.
pub fn tidy_every(layers: usize) {
    EVERY.store(layers, Ordering::Relaxed);
}

/// Hand free pages back every `layers` layers of the backward pass through int8 weights (0:
/// never inside it).
pub fn tidy_backward_every(layers: usize) {
    BACKWARD_EVERY.store(layers, Ordering::Relaxed);
}

/// The hand-back frequencies in force: ([`tidy_every`], [`tidy_backward_every`]).
pub fn tidy_settings() -> (usize, usize) {
    (EVERY.load(Ordering::Relaxed), BACKWARD_EVERY.load(Ordering::Relaxed))
}

/// Note what the allocator holds at every layer too, not only when free pages go back (each
/// reading waits for the queued work to be submitted): for measuring [`take_peak`].
pub fn watch(on: bool) {
    WATCH.store(on, Ordering::Relaxed);
}

/// `work(input)` with what it allocates on the device in buffers of exactly the size asked for
/// (cubecl's persistent pool: a free buffer is reused only by a request of its very size), in the
/// browser ([`in_browser`], unless [`exact_fit_steps`] turned it off); natively as it is. For a
/// learning step's forward and backward pass: the bucket pools serve a request from any free page
/// of a larger bucket and make a new page when none is free, so with nothing handed back inside a
/// step (see the module's text) they held ~2.7x what was in use at once; exact-size buffers come
/// back to the same shapes layer after layer. Measured natively (full-size UNet learning step at
/// 32 x 32 latents, int8 weights, browser allocator, spec limits): held at most 2.78 GiB instead
/// of 4.54 GiB for 1.66 GiB in use; in a tab the whole step 3.69 GB instead of 5.60 GB. Not for
/// forward-only passes, which keep few tensors alive, so freed buffers of sizes not asked for
/// again add up (sampling step at 64 x 64: 2.71 GiB exact, 2.10 GiB in buckets; VAE decode at 256
/// px: 0.49 / 0.43 GiB). What such a window leaves free goes back at the next [`release`].
pub fn exact_fit<I: Send, O: Send>(device: &Device, input: I, work: impl Fn(I) -> O + Send) -> O {
    if in_browser() && exact_fit_in_force() {
        device.memory_persistent_allocations(input, work)
    } else {
        work(input)
    }
}

/// Hand the allocator's free pages back (in the browser; see the module's text), noting what it
/// held just before for [`take_peak`]. Pages still used by queued GPU work are kept until a later
/// call.
pub fn release(device: &Device) {
    release_with(|| device.memory_pool_usage().map(|u| (u.bytes_reserved, u.bytes_in_use)), || device.memory_cleanup());
}

fn note(usage: impl FnOnce() -> Option<(u64, u64)>) {
    if let Some((held, in_use)) = usage() {
        HELD_PEAK.fetch_max(held, Ordering::Relaxed);
        IN_USE_PEAK.fetch_max(in_use, Ordering::Relaxed);
    }
}

fn release_with(usage: impl FnOnce() -> Option<(u64, u64)>, cleanup: impl FnOnce()) {
    if in_browser() {
        note(usage);
        cleanup();
    }
}

/// Called by every Linear / Conv2d as it runs (forward, and backward through int8 weights): every
/// [`TIDY_EVERY`]-th call [`release`]s.
pub(crate) fn tidy(device: &Device) {
    tidy_with(|| device.memory_pool_usage().map(|u| (u.bytes_reserved, u.bytes_in_use)), || device.memory_cleanup());
}

/// [`tidy`] for a device known only to a backend; `usage`: bytes (reserved, in use).
pub(crate) fn tidy_with(usage: impl FnOnce() -> Option<(u64, u64)>, cleanup: impl FnOnce()) {
    tidy_counted(&LAYERS, EVERY.load(Ordering::Relaxed), usage, cleanup)
}

/// [`tidy_with`] in the backward pass (every [`tidy_backward_every`] layers).
#[cfg_attr(not(feature = "frozen"), allow(dead_code))]
pub(crate) fn tidy_backward_with(usage: impl FnOnce() -> Option<(u64, u64)>, cleanup: impl FnOnce()) {
    tidy_counted(&BACKWARD_LAYERS, BACKWARD_EVERY.load(Ordering::Relaxed), usage, cleanup)
}

fn tidy_counted(layers: &AtomicUsize, every: usize, usage: impl FnOnce() -> Option<(u64, u64)>, cleanup: impl FnOnce()) {
    if in_browser() {
        if every > 0 && layers.fetch_add(1, Ordering::Relaxed) % every == every - 1 {
            release_with(usage, cleanup);
        } else if WATCH.load(Ordering::Relaxed) {
            note(usage);
        }
    }
}

/// What the allocator held at most, and what of it was in use at most, as noted since the last
/// [`take_peak`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peak {
    /// Device bytes the allocator held (its pages).
    pub held: u64,
    /// Device bytes in live tensors.
    pub in_use: u64,
}

/// The most device memory the allocator held, and the most in use, just before a [`release`] (and
/// at every layer while [`watch`]ing) since the last call, which starts a new measurement; zeros
/// where nothing was noted.
pub fn take_peak() -> Peak {
    Peak { held: HELD_PEAK.swap(0, Ordering::Relaxed), in_use: IN_USE_PEAK.swap(0, Ordering::Relaxed) }
}
