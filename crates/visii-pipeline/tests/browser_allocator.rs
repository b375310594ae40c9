//! burn's device allocator as a browser has it (a buffer per allocation, from size buckets),
//! natively on wgpu: the model's weights sit in buffers of exactly their size, and handing free
//! buffers back inside a learning step (every layer of the forward pass; of the backward pass
//! too) holds less in the engine's account than handing them back only between steps (what the
//! browser engine does: inside a step the handed-back buffers keep their memory in the browser
//! until the queued step has run, see `visii_models::memory`); f16 activations make the step's
//! own tensors smaller; a step in buffers of exactly the size asked for (the default,
//! `memory::exact_fit`) holds less than in the size buckets and little more than it uses. Its own process: the allocator is chosen when the wgpu runtime starts.

use std::path::PathBuf;

use visii_models::memory;
use visii_models::Ip2pFolder;
use visii_pipeline::probe::UnetProbe;
use visii_pipeline::{block_on, Ip2p};

/// The probe's latent side (8 px per latent).
const LATENT: usize = 16;

#[test]
fn weights_exact_and_steps_tidied() {
    let dev = visii_models::gpu::browser_allocator_device().expect("a wgpu device");
    memory::as_in_browser(true);
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let usage = || dev.memory_pool_usage().expect("wgpu reports its memory");

    for resident in [false, true] {
        let folder = Ip2pFolder::open(fixtures.join("tiny-ip2p")).unwrap().with_resident_q8(resident);
        let model = Ip2p::from_folder(&folder, &dev).unwrap();
        visii_pipeline::release_free_memory(&dev);
        let u = usage();
        // Without the exact-size buffers, each small tensor held a 32 KiB page at least.
        assert_eq!(u.bytes_reserved, u.bytes_in_use, "resident {resident}: held {} for {} of weights", u.bytes_reserved, u.bytes_in_use);
        assert!(u.bytes_in_use > 1 << 20, "the tiny model's weights are on the device: {}", u.bytes_in_use);
        if !resident {
            continue;
        }

        let [_, _, hidden] = model.encode_text("a photo").unwrap().dims();
        let mut unet = model.unet.clone();
        let mut probe = block_on(UnetProbe::new(&unet, hidden, LATENT, &dev)).unwrap();
        let mut step = |every: usize, unet: &visii_models::UNet2DConditionModel| {
            memory::tidy_every(every);
            memory::take_peak();
            block_on(probe.learn_step(unet)).unwrap();
            memory::take_peak()
        };
        memory::watch(true);
        // The allocator's size buckets first (what a step ran in before `memory::exact_fit`).
        memory::exact_fit_steps(false);
        step(0, &unet); // kernels compiled, optimizer state made
        let between_steps = step(0, &unet);
        let every_layer = step(1, &unet);
        eprintln!(
            "learning step, {LATENT} x {LATENT}: free buffers handed back between steps {between_steps:?}, every layer {every_layer:?}; weights {}",
            u.bytes_in_use
        );
        for p in [between_steps, every_layer] {
            assert!(p.in_use > u.bytes_in_use && p.held >= p.in_use, "the step's own tensors were counted: {p:?}");
        }
        assert!(every_layer.held < between_steps.held, "handing free buffers back every layer holds less: {every_layer:?} vs {between_steps:?}");
        assert!(2 * every_layer.held <= 3 * every_layer.in_use, "held at most 1.5x what was in use: {every_layer:?}");
        // In the backward pass too (off by default: it crashed Chromium's GPU process, see
        // `memory::TIDY_BACKWARD_EVERY`): holds less again.
        memory::tidy_backward_every(1);
        let backward_too = step(1, &unet);
        memory::tidy_backward_every(memory::TIDY_BACKWARD_EVERY);
        eprintln!("every layer of the backward pass too: {backward_too:?}");
        assert!(backward_too.held < every_layer.held, "{backward_too:?} vs {every_layer:?}");

        // f16 activations (where the device has f16): the step's own tensors take less (measured on
        // lavapipe: 24% less; not half, norms and softmax keep what their backward needs in f32).
        if unet.set_f16_activations(true, &dev).is_ok() {
            step(1, &unet);
            let half = step(1, &unet);
            eprintln!("the same with f16 activations: {half:?}");
            let (own, own_half) = (every_layer.in_use - u.bytes_in_use, half.in_use.saturating_sub(u.bytes_in_use));
            assert!((own_half as f64) < 0.85 * own as f64, "f16 activations: {own_half} B of the step's own vs {own} B in f32");
        }
        unet.set_f16_activations(false, &dev).unwrap();

        // The default: the step in buffers of exactly the size asked for, nothing handed back
        // inside it. Holds less than the buckets with the same hand-back (measured: 32.6 vs 37.5
        // MB for 26.3 MB in use at most), as little as the buckets handing back at every layer.
        memory::exact_fit_steps(true);
        step(0, &unet);
        let exact = step(0, &unet);
        eprintln!("exact-size buffers, handed back between steps: {exact:?}");
        assert_eq!(exact.in_use, between_steps.in_use, "the same tensors either way");
        assert!(exact.held < between_steps.held, "exact sizes hold less: {exact:?} vs {between_steps:?}");
        assert!(2 * exact.held <= 3 * exact.in_use, "held at most 1.5x what was in use: {exact:?}");
        memory::exact_fit_steps(memory::EXACT_FIT);
        memory::tidy_every(memory::TIDY_EVERY);
        memory::watch(false);
    }
}
