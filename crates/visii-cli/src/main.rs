//! `visii`: the native command line on the same pipeline as the web app.

#![allow(deprecated)] // Device::ndarray is deprecated in burn 0.22 but is our reference CPU backend.

use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::{Device, DeviceKind, Distribution, Tensor};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use visii_models::{presets, ClipFolder, Ip2pFolder, UNet2DConditionModel, Weights};
use visii_pipeline::caption::CaptionOptions;
use visii_pipeline::instruction::SaveInfo;
use visii_pipeline::learn::{learn, AdamWConfig, LearnOptions};
use visii_pipeline::{ApplyOptions, Ip2p, ModelIdentity, Noise, RgbImage};

#[derive(Parser)]
#[command(name = "visii", version, about = "Learn an image edit from one before/after pair and repeat it (Visual Instruction Inversion)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// GPU buffer limits to request (wgpu): the adapter's own, or WebGPU's defaults (128 MiB
    /// storage bindings, 256 MiB buffers), as the least capable browser would grant.
    #[arg(long, global = true, value_enum, default_value = "adapter")]
    gpu_limits: GpuLimits,
    /// How the networks' weights live on the device: f32, or q8 (the large weights of the UNet, the
    /// VAE and the CLIP layers int8 with a scale per 32 values, dequantised per layer as it runs,
    /// in the backward pass too: about 3.5x less device memory, a little slower).
    #[arg(long, global = true, value_enum, default_value = "f32")]
    resident: Resident,
    /// How wgpu device memory is allocated: as natively (allocations carved from shared pages), or
    /// as in a browser (a buffer per allocation from size buckets), to measure what a tab holds.
    #[arg(long, global = true, value_enum, default_value = "native")]
    gpu_memory: GpuMemory,
    /// With `--gpu-memory browser`: hand the allocator's free buffers back every N layers inside a
    /// step (default 0: only between steps, as the browser does; see `visii_models::memory`).
    #[arg(long, global = true, default_value_t = visii_models::memory::TIDY_EVERY)]
    gpu_tidy_every: usize,
    /// With `--gpu-memory browser`: the same inside the backward pass through int8 weights (default
    /// 0, never: as the browser does; see `visii_models::memory::TIDY_BACKWARD_EVERY`).
    #[arg(long, global = true, default_value_t = visii_models::memory::TIDY_BACKWARD_EVERY)]
    gpu_tidy_backward_every: usize,
    /// With `--gpu-memory browser`: run each learning step in buffers of
    /// exactly the size asked for (default true, as the browser does; false: the allocator's size
    /// buckets; see `visii_models::memory::exact_fit`).
    #[arg(long, global = true, default_value_t = visii_models::memory::EXACT_FIT, action = clap::ArgAction::Set)]
    gpu_exact_fit: bool,
    /// The UNet's activations: f32, or f16 (weights used as f16, norms and softmax in f32; half the
    /// activation memory; wgpu on a GPU with f16 arithmetic only).
    #[arg(long, global = true, value_enum, default_value = "f32")]
    activations: Activations,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum Activations {
    F32,
    F16,
}

static ACTIVATIONS: std::sync::OnceLock<Activations> = std::sync::OnceLock::new();

/// Whether `--activations f16` was given.
fn f16_activations() -> bool {
    ACTIVATIONS.get() == Some(&Activations::F16)
}

/// The InstructPix2Pix networks from `model`, the UNet with the activations `--activations` asks for.
fn load_ip2p(model: &std::path::Path, dev: &Device) -> Result<Ip2p, Box<dyn std::error::Error>> {
    let mut ip2p = Ip2p::from_folder(&open_ip2p(model)?, dev)?;
    ip2p.unet.set_f16_activations(f16_activations(), dev)?;
    Ok(ip2p)
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum GpuMemory {
    Native,
    Browser,
}

static GPU_MEMORY: std::sync::OnceLock<GpuMemory> = std::sync::OnceLock::new();

fn browser_memory() -> bool {
    GPU_MEMORY.get() == Some(&GpuMemory::Browser)
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum Resident {
    F32,
    Q8,
}

static RESIDENT: std::sync::OnceLock<Resident> = std::sync::OnceLock::new();

/// A CLIP folder (or a pack's `clip/`), loading with the residency `--resident` asks for.
fn open_clip(clip: &std::path::Path) -> Result<ClipFolder, Box<dyn std::error::Error>> {
    Ok(ClipFolder::open(clip)?.with_resident_q8(resident_q8()))
}

/// Whether `--resident q8` was given.
fn resident_q8() -> bool {
    RESIDENT.get() == Some(&Resident::Q8)
}

/// An InstructPix2Pix folder (or pack), loading with the residency `--resident` asks for.
fn open_ip2p(model: &std::path::Path) -> Result<Ip2pFolder, visii_models::ModelError> {
    Ok(Ip2pFolder::open(model)?.with_resident_q8(resident_q8()))
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum GpuLimits {
    Adapter,
    Spec,
}

static GPU_LIMITS: std::sync::OnceLock<GpuLimits> = std::sync::OnceLock::new();

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum Backend {
    /// burn's wgpu backend (a GPU, or Mesa lavapipe on the CPU), with our kernels
    Wgpu,
    /// the same with burn's own conv / matmul ops in place of our kernels (to compare them)
    WgpuBurn,
    /// burn's ndarray backend (CPU)
    Ndarray,
}

#[derive(Subcommand)]
enum Command {
    /// Load every component of a model and print its key config values and parameter count, or
    /// print an instruction file's metadata (`visii inspect EDIT.visii.safetensors`), and with
    /// `--model` the words nearest to each of its learned token positions.
    Inspect {
        /// An instruction file to describe.
        file: Option<std::path::PathBuf>,
        /// An InstructPix2Pix folder in the diffusers layout (model_index.json, unet/, vae/, ...);
        /// with an instruction file, the model whose vocabulary reads it.
        #[arg(long, required_unless_present = "file")]
        model: Option<std::path::PathBuf>,
        /// Nearest words shown per learned position (with an instruction file and --model).
        #[arg(long, default_value_t = 3)]
        words: usize,
        /// A transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14).
        #[arg(long)]
        clip: Option<std::path::PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Where to load the weights.
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: Backend,
    },
    /// Time the UNet work of one forward pass, one learning step (rows B+C without a graph, row A
    /// forward + backward, AdamW) or one sampling step (three rows + guidance + Euler-ancestral),
    /// full-size InstructPix2Pix config or the tiny test config (random weights), per backend, each
    /// backend in its own process (clean peak memory), and print the ratios.
    Bench {
        /// Latent side (32 = 256 px images).
        #[arg(long, default_value_t = 32)]
        latent: usize,
        /// What to time.
        #[arg(long, value_enum, default_value = "forward")]
        what: BenchWhat,
        /// Model config.
        #[arg(long, value_enum, default_value = "full")]
        config: BenchConfig,
        /// Backends to measure, in order.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "wgpu,ndarray")]
        backends: Vec<Backend>,
        /// Forward passes after the warm-up one.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// The layer `--what conv|linear|groupnorm` times (see there); by default a UNet resnet
        /// conv at 32 x 32 latents, a GEGLU projection at 32 x 32 latents, the VAE's GroupNorm at
        /// 256 px.
        #[arg(long, value_delimiter = ',')]
        shape: Vec<usize>,
        /// Also time the PyTorch peer (tests/fullsize/torch_bench.py: the same config, random
        /// weights, CPU) with this Python, and print each backend's time ratio to it.
        #[arg(long)]
        torch: Option<String>,
        /// Where the PyTorch peer runs: cpu, or cuda on a machine with an NVIDIA GPU.
        #[arg(long, default_value = "cpu", requires = "torch")]
        torch_device: String,
        /// Also time every kernel with cubecl's profiler (wgpu backends; each kernel waits for the
        /// one before, so the times in the main table are then slower) and print where the time went,
        /// per kernel, for each backend.
        #[arg(long)]
        profile: bool,
    },
    /// Edit an image, or a batch of them, with a learned instruction or one given as text.
    Apply {
        /// An InstructPix2Pix folder in the diffusers layout.
        #[arg(long)]
        model: std::path::PathBuf,
        /// The image(s) to edit (PNG or JPEG): repeat --image, or give folders (their PNG and JPEG
        /// files, not recursively). With more than one image, or a folder, -o is a folder.
        #[arg(long, required = true, num_args = 1..)]
        image: Vec<std::path::PathBuf>,
        /// A plain-text instruction, e.g. "turn it into a watercolor painting".
        #[arg(long = "prompt", alias = "text", required_unless_present = "instruction")]
        text: Option<String>,
        /// A learned instruction file (.visii.safetensors).
        #[arg(long, conflicts_with = "text")]
        instruction: Option<std::path::PathBuf>,
        /// Output PNG; for a batch, a folder (made if missing) that gets one NAME.png per input.
        #[arg(short, long)]
        output: std::path::PathBuf,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 7.5)]
        guidance: f32,
        #[arg(long, default_value_t = 1.5)]
        image_guidance: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Working size: `WxH` (multiples of 8), or one number for the longer side.
        #[arg(long, default_value = "512")]
        size: String,
        /// Extra words for a learned instruction (hybrid: "<learned> + a husky").
        #[arg(long, requires = "instruction")]
        extra: Option<String>,
        /// Explicit sampling noises (safetensors: `init` [1, 4, h, w], `step_noise` [steps, 4, h, w]).
        #[arg(long)]
        noise: Option<std::path::PathBuf>,
        /// Sample with the noises the instruction was learned with (the paper's noise reuse).
        #[arg(long, requires = "instruction", conflicts_with = "noise")]
        reuse_noise: bool,
        /// Apply an instruction even though it was learned on another model.
        #[arg(long)]
        allow_foreign_model: bool,
        #[arg(long, value_enum, default_value = "wgpu")]
        backend: Backend,
    },
    /// Learn an instruction from before/after pairs and write it as NAME.visii.safetensors.
    Learn {
        #[arg(long)]
        model: std::path::PathBuf,
        /// A transformers CLIPModel folder (openai/clip-vit-large-patch14 layout); a pack's own
        /// `clip/` when --model is a pack.
        #[arg(long)]
        clip: Option<std::path::PathBuf>,
        /// Before image(s); pair i is (--before i, --after i).
        #[arg(long, required = true)]
        before: Vec<std::path::PathBuf>,
        #[arg(long, required = true)]
        after: Vec<std::path::PathBuf>,
        #[arg(short, long)]
        output: std::path::PathBuf,
        /// Initial caption of the after image (default: searched automatically with CLIP).
        #[arg(long)]
        init: Option<String>,
        /// Iterations of the automatic caption search (when --init is not given).
        #[arg(long, default_value_t = 150)]
        caption_iterations: usize,
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Working size: `WxH` (multiples of 8), or one number for the longer side.
        #[arg(long, default_value = "256")]
        size: String,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Explicit timesteps and noises (safetensors: `timesteps` [N] int64, `noises` [N, 4, h, w]).
        #[arg(long)]
        schedule: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop after this many steps without a new best MSE (0: never).
        #[arg(long, default_value_t = 100)]
        patience: usize,
        /// Write one JSON line per step here.
        #[arg(long)]
        log: Option<std::path::PathBuf>,
        #[arg(long, value_enum, default_value = "wgpu")]
        backend: Backend,
    },
    /// Convert an InstructPix2Pix folder + a CLIP folder into a weight pack (manifest.json + shards,
    /// int8 / f16): what the web app downloads; `inspect`, `learn` and `apply` accept it as --model.
    Convert {
        #[arg(long)]
        model: std::path::PathBuf,
        #[arg(long)]
        clip: std::path::PathBuf,
        #[arg(short, long)]
        output: std::path::PathBuf,
        /// q8 (int8, scale per output channel), q8-block (int8, scale per 64 values), q4, f16, f32.
        #[arg(long, default_value = "q8")]
        quant: String,
        /// The CLIP vision tower's scheme (it only steers the learning direction): q4 (4-bit, f16
        /// scale per 32 values) by default for int8 packs, else the same as --quant.
        #[arg(long)]
        clip_quant: Option<String>,
        /// Largest shard, in MB.
        #[arg(long, default_value_t = 64)]
        shard_mb: usize,
    },
    /// One backend of `bench` (what `bench` runs in a child process); prints one JSON line.
    #[command(hide = true)]
    BenchOne {
        #[arg(long)]
        latent: usize,
        #[arg(long, value_delimiter = ',')]
        shape: Vec<usize>,
        #[arg(long, value_enum)]
        what: BenchWhat,
        #[arg(long, value_enum)]
        config: BenchConfig,
        #[arg(long, value_enum)]
        backend: Backend,
        #[arg(long)]
        runs: usize,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum BenchWhat {
    /// One UNet forward pass, batch 1.
    Forward,
    /// One learning step.
    LearnStep,
    /// One sampling step.
    SampleStep,
    /// One VAE decode (latent side x 8 pixels).
    VaeDecode,
    /// One VAE encode (latent side x 8 pixels).
    VaeEncode,
    /// One conv2d of `--shape batch,c_in,h,w,c_out,k,stride` (padding k / 2, with bias).
    Conv,
    /// One Linear of `--shape rows,in,out` (with bias).
    Linear,
    /// One GroupNorm + SiLU of `--shape batch,c,h,w,groups`.
    Groupnorm,
    /// One scaled dot-product attention of `--shape batch,queries,keys,heads,head_dim` (the fused
    /// kernel on `wgpu` where it applies; burn's chain on `wgpu-burn`).
    Attention,
    /// The same attention forward and backward (the gradients of `q`, `k` and `v` for the loss
    /// `sum(attention * r)`), as learning runs it: on `wgpu` the fused step with
    /// `VISII_FLASH_GRAD=on` (else burn's chain with our softmax); burn's chain on `wgpu-burn`.
    AttentionGrad,
}

impl BenchWhat {
    /// One layer of `--shape` (timed by `bench_op`), not a network.
    fn is_op(self) -> bool {
        matches!(self, BenchWhat::Conv | BenchWhat::Linear | BenchWhat::Groupnorm | BenchWhat::Attention | BenchWhat::AttentionGrad)
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum BenchConfig {
    /// The real InstructPix2Pix UNet (859.5 M parameters), 77 x 768 text states.
    Full,
    /// The committed tiny test UNet's config.
    Tiny,
}

fn device(b: Backend) -> Device {
    use visii_models::gpu::{capped_device, SPEC_BUFFER, SPEC_STORAGE_BINDING};
    let b = match b {
        Backend::WgpuBurn => {
            visii_models::kernels::set_enabled(false);
            Backend::Wgpu
        }
        b => b,
    };
    match (b, GPU_LIMITS.get()) {
        (Backend::Wgpu, Some(GpuLimits::Spec)) => {
            visii_pipeline::block_on(capped_device(burn::tensor::wgpu::wgpu::Backends::PRIMARY, SPEC_STORAGE_BINDING, SPEC_BUFFER, browser_memory()))
                .unwrap_or_else(|e| panic!("no wgpu device with WebGPU's default limits: {e}"))
        }
        (Backend::Wgpu, _) if browser_memory() => {
            visii_models::gpu::browser_allocator_device().unwrap_or_else(|e| panic!("no wgpu device with the browser's allocator: {e}"))
        }
        (Backend::Wgpu, _) => Device::wgpu(DeviceKind::DefaultDevice),
        (Backend::Ndarray, _) => Device::ndarray(),
        (Backend::WgpuBurn, _) => unreachable!("mapped to wgpu above"),
    }
}

/// `visii inspect --json | head`: when the reader of our output goes away, stop quietly (exit
/// status 141, as a shell reports SIGPIPE) instead of printing a panic about the broken pipe.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload().downcast_ref::<String>().map(String::as_str).or_else(|| info.payload().downcast_ref::<&str>().copied());
        if message.is_some_and(|m| m.contains("failed printing to stdout") && m.contains("Broken pipe")) {
            std::process::exit(141);
        }
        default(info)
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    GPU_LIMITS.set(cli.gpu_limits).expect("set once");
    RESIDENT.set(cli.resident).expect("set once");
    ACTIVATIONS.set(cli.activations).expect("set once");
    GPU_MEMORY.set(cli.gpu_memory).expect("set once");
    visii_models::memory::as_in_browser(browser_memory());
    visii_models::memory::tidy_every(cli.gpu_tidy_every);
    visii_models::memory::tidy_backward_every(cli.gpu_tidy_backward_every);
    visii_models::memory::exact_fit_steps(cli.gpu_exact_fit);
    // With the browser's allocator, learn and apply report the most it held (read at every layer).
    let report_memory = browser_memory() && matches!(cli.command, Command::Learn { .. } | Command::Apply { .. });
    if report_memory {
        visii_models::memory::watch(true);
        visii_models::memory::take_peak();
    }
    let result = match cli.command {
        Command::Inspect { file: Some(f), model, words, json, backend, .. } => inspect_instruction(&f, model.as_deref(), words, json, backend),
        Command::Inspect { file: None, model, clip, json, backend, .. } => {
            inspect(model.as_deref().expect("clap requires --model"), clip.as_deref(), json, device(backend))
        }
        Command::Convert { model, clip, output, quant, clip_quant, shard_mb } => {
            convert(&model, &clip, &output, &quant, clip_quant.as_deref(), shard_mb)
        }
        Command::Bench { latent, what, config, backends, runs, shape, torch, torch_device, profile } => op_shape(what, shape)
            .and_then(|shape| bench(latent, what, config, &backends, runs, &shape, torch.as_deref().map(|py| (py, torch_device.as_str())), profile)),
        Command::BenchOne { latent, shape, what, config, backend, runs } => bench_one(latent, &shape, what, config, backend, runs),
        Command::Apply {
            model,
            image,
            text,
            instruction,
            output,
            steps,
            guidance,
            image_guidance,
            seed,
            size,
            extra,
            noise,
            reuse_noise,
            allow_foreign_model,
            backend,
        } => {
            let opts = ApplyOptions { steps, guidance, image_guidance, seed };
            // Everything that can be refused is refused before any model is loaded.
            check_apply_flags(steps, guidance, image_guidance)
                .and_then(|()| opts.validate().map_err(|e| e.to_string().into()))
                .and_then(|()| batch_jobs(&image, &output, &[instruction.as_deref(), noise.as_deref()], &model).map_err(Into::into))
                .and_then(|jobs| parse_size(&size).map(|s| (jobs, s)))
                .and_then(|(jobs, size)| {
                    let how = ApplyInputs {
                        text: text.as_deref(),
                        instruction: instruction.as_deref(),
                        extra: extra.as_deref(),
                        noise: noise.as_deref(),
                        size,
                        reuse_noise,
                        allow_foreign_model,
                    };
                    apply(&model, &jobs, &how, &opts, device(backend))
                })
        }
        Command::Learn { model, clip, before, after, output, init, caption_iterations, steps, size, lr, schedule, seed, patience, log, backend } => {
            parse_size(&size).and_then(|(side, exact)| {
                let opts = LearnOptions { steps, size: side, exact_size: exact, seed, patience, adam: AdamWConfig { lr, ..AdamWConfig::default() } };
                if !(1..=visii_pipeline::learn::MAX_STEPS).contains(&steps) {
                    return Err(format!("--steps {steps}: expected 1..={}", visii_pipeline::learn::MAX_STEPS).into());
                }
                if !(lr.is_finite() && (0.0..=10.0).contains(&lr)) {
                    return Err(format!("--lr {lr}: expected a finite learning rate in 0..=10").into());
                }
                opts.validate()?;
                if caption_iterations > MAX_CAPTION_ITERATIONS {
                    return Err(format!("--caption-iterations {caption_iterations}: at most {MAX_CAPTION_ITERATIONS}").into());
                }
                let mut inputs: Vec<&std::path::Path> = before.iter().chain(&after).map(|p| p.as_path()).collect();
                inputs.extend(schedule.as_deref());
                let dirs: Vec<&std::path::Path> = [Some(model.as_path()), clip.as_deref()].into_iter().flatten().collect();
                check_output(&output, &inputs, &dirs)?;
                if let Some(l) = log.as_deref() {
                    inputs.push(&output);
                    check_output(l, &inputs, &dirs).map_err(|e| format!("--log: {e}"))?;
                }
                let init = match init {
                    Some(t) => Init::Text(t),
                    None => Init::Search(CaptionOptions { iterations: caption_iterations, seed, ..CaptionOptions::default() }),
                };
                match clip.or_else(|| visii_models::pack::is_pack(&model).then(|| model.join("clip"))) {
                    Some(clip) => {
                        learn_cmd(&model, &clip, &before, &after, &output, &init, &opts, schedule.as_deref(), log.as_deref(), device(backend))
                    }
                    None => Err("give --clip CLIP_DIR (a CLIP model folder), or a pack as --model".into()),
                }
            })
        }
    };
    if report_memory && result.is_ok() {
        let peak = visii_models::memory::take_peak();
        let size = |b: u64| match b as f64 / (1u64 << 20) as f64 {
            mib if mib >= 1024.0 => format!("{:.2} GiB", mib / 1024.0),
            mib => format!("{mib:.1} MiB"),
        };
        eprintln!(
            "GPU memory (browser allocator): held at most {}, at most {} in use; host peak RSS {}",
            size(peak.held),
            size(peak.in_use),
            peak_rss().map_or("unknown".into(), size)
        );
    }
    if std::env::var_os("VISII_PEAK_RSS").is_some() {
        eprintln!("peak RSS: {} bytes", peak_rss().unwrap_or(0));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Messages quote file names and contents: escaped, so nothing reaches the terminal raw.
            eprintln!("error: {}", visii_formats::text::printable(&e.to_string()));
            ExitCode::from(2)
        }
    }
}

fn inspect(model: &std::path::Path, clip: Option<&std::path::Path>, as_json: bool, dev: Device) -> Result<(), Box<dyn std::error::Error>> {
    let folder = open_ip2p(model)?;
    // The configs that are not part of a network are checked too (a model that inspects cleanly runs).
    visii_pipeline::SchedulerConfig::from_json(&folder.scheduler_config()?)?;
    // Load time, bytes in use on the device and the largest single read, per component.
    let mut clock = Instant::now();
    let memory = |t: &mut Instant| {
        let (_, largest) = visii_models::READ_STATS.get();
        visii_models::READ_STATS.reset();
        let pool = dev.memory_pool_usage();
        let v = json!({"load_s": t.elapsed().as_secs_f64(), "device_bytes_in_use": pool.as_ref().map(|u| u.bytes_in_use),
                       "device_bytes_reserved": pool.map(|u| u.bytes_reserved), "largest_read_bytes": largest});
        *t = Instant::now();
        v
    };
    visii_models::READ_STATS.reset();
    let unet = folder.unet(&dev)?;
    let u = &unet.config;
    let mut report = serde_json::Map::new();
    report.insert(
        "unet".into(),
        json!({"params": unet.params, "in_channels": u.in_channels, "out_channels": u.out_channels,
               "block_out_channels": u.block_out_channels, "layers_per_block": u.layers_per_block,
               "cross_attention_dim": u.cross_attention_dim, "attention_heads": (0..u.block_out_channels.len()).map(|i| u.heads(i)).collect::<Vec<_>>(),
               "use_linear_projection": u.use_linear_projection, "norm_num_groups": u.norm_num_groups, "memory": memory(&mut clock),
               "resident_int8_values": unet.resident_values}),
    );
    drop(unet);
    // What the next component's figures should not include (in the browser's allocator).
    visii_models::memory::release(&dev);
    let vae = folder.vae(&dev)?;
    let v = &vae.config;
    report.insert(
        "vae".into(),
        json!({"params": vae.params, "block_out_channels": v.block_out_channels, "layers_per_block": v.layers_per_block,
               "latent_channels": v.latent_channels, "scaling_factor": v.scaling_factor, "downscale": v.downscale(), "memory": memory(&mut clock),
               "resident_int8_values": vae.resident_values}),
    );
    drop(vae);
    visii_models::memory::release(&dev);
    let te = folder.text_encoder(&dev)?;
    let t = &te.config;
    let tok = folder.tokenizer()?;
    report.insert(
        "text_encoder".into(),
        json!({"params": te.params, "hidden_size": t.hidden_size, "layers": t.num_hidden_layers, "heads": t.num_attention_heads,
               "max_positions": t.max_position_embeddings, "vocab_size": t.vocab_size, "hidden_act": t.hidden_act,
               "tokenizer_vocab": tok.vocab_size(), "pad_id": tok.pad_id, "memory": memory(&mut clock),
               "resident_int8_values": te.resident_values}),
    );
    drop(te);
    visii_models::memory::release(&dev);
    if let Some(c) = clip {
        let cf = open_clip(c)?;
        cf.preprocess_config()?;
        let parts = cf.vision(&dev)?;
        let vc = &parts.config.vision_config;
        report.insert(
            "clip_vision".into(),
            json!({"params": parts.model.vision_params, "hidden_size": vc.hidden_size, "layers": vc.num_hidden_layers,
                   "heads": vc.num_attention_heads, "patch_size": vc.patch_size, "image_size": vc.image_size,
                   "projection_dim": parts.config.projection_dim.unwrap_or(vc.projection_dim),
                   "text_projection_params": parts.model.text_projection_params, "memory": memory(&mut clock),
                   "resident_int8_values": parts.resident_values}),
        );
    }
    report.insert("peak_rss_bytes".into(), json!(peak_rss()));
    if as_json {
        println!("{}", serde_json::to_string_pretty(&serde_json::Value::Object(report))?);
    } else {
        println!("{:<14} {:>14}  config", "component", "parameters");
        for (k, v) in &report {
            let Some(rest) = v.as_object() else {
                println!("{k:<14} {v}");
                continue;
            };
            let mut rest = rest.clone();
            let p = rest.remove("params").and_then(|p| p.as_u64()).unwrap_or(0);
            println!("{:<14} {:>14}  {}", k, group_digits(p), serde_json::Value::Object(rest));
        }
    }
    Ok(())
}

fn read_image(p: &std::path::Path) -> Result<RgbImage, Box<dyn std::error::Error>> {
    let bytes = read_input(p, MAX_IMAGE_FILE)?;
    Ok(RgbImage::decode(&bytes).map_err(|e| format!("{}: {e}", shown(p)))?)
}

#[allow(clippy::too_many_arguments)]
fn learn_cmd(
    model: &std::path::Path,
    clip: &std::path::Path,
    before: &[std::path::PathBuf],
    after: &[std::path::PathBuf],
    output: &std::path::Path,
    init: &Init,
    opts: &LearnOptions,
    schedule: Option<&std::path::Path>,
    log: Option<&std::path::Path>,
    dev: Device,
) -> Result<(), Box<dyn std::error::Error>> {
    let schedule = match schedule {
        Some(p) => Some(visii_pipeline::repro::read_schedule(&read_input(p, MAX_DATA_FILE)?).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let total = schedule.as_ref().map(|s| s.timesteps.len()).unwrap_or(opts.steps);
    if before.len() != after.len() {
        return Err(format!("{} --before images but {} --after images: give them in pairs", before.len(), after.len()).into());
    }
    let pairs =
        before.iter().zip(after).map(|(b, a)| Ok((read_image(b)?, read_image(a)?))).collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
    let ip2p = load_ip2p(model, &dev)?;
    let cf = open_clip(clip)?;
    let parts = cf.vision(&dev)?.model;
    let pre = cf.preprocess_config()?;
    let mut log_file = log.map(std::fs::File::create).transpose()?;
    let caption = match init {
        Init::Text(t) => t.clone(),
        Init::Search(copts) => {
            let target = visii_pipeline::learn::after_target(&parts, &pre, &pairs, &dev)?;
            let t0 = Instant::now();
            let found = visii_pipeline::caption::auto_caption(&ip2p, &parts.text_projection, target, copts, &mut |i, best| {
                let el = t0.elapsed().as_secs_f64();
                eprint!(
                    "\r  caption search {i}/{}  similarity {best:+.3}  ETA {:.0} s   ",
                    copts.iterations,
                    el / i as f64 * copts.iterations.saturating_sub(i) as f64
                );
                true
            });
            eprintln!();
            match found {
                Ok(c) => {
                    eprintln!("initial caption: \"{}\" (CLIP similarity {:+.3}, from {:+.3})", c.text, c.similarity, c.initial_similarity);
                    c.text
                }
                Err(e) => {
                    eprintln!("caption search failed ({e}); starting from \"a photo\"");
                    "a photo".into()
                }
            }
        }
    };
    let t0 = Instant::now();
    let learned = learn(&ip2p, &parts, &pre, &pairs, &caption, opts, schedule.as_ref(), &mut |s, best| {
        let k = s.step + 1;
        let el = t0.elapsed().as_secs_f64();
        eprint!(
            "\r  step {k}/{}  t={:<4} mse {:.4} cos {:+.3} loss {:.4} best {:.4}  ETA {:.0} s   ",
            total,
            s.t,
            s.mse,
            s.cos,
            s.loss,
            best,
            el / k as f64 * total.saturating_sub(k) as f64
        );
        if let Some(f) = log_file.as_mut() {
            use std::io::Write;
            let _ = writeln!(f, "{}", serde_json::to_string(s).unwrap_or_default());
        }
        true
    })?;
    eprintln!();
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);

    let identity = ModelIdentity::of(&ip2p)?;
    let thumb = RgbImage::strip(&[&pairs[0].0, &pairs[0].1], 64).to_png()?;
    let bytes = visii_pipeline::instruction::save(
        &learned,
        &SaveInfo {
            model: &identity,
            thumbnail_png: Some(&thumb),
            extra: &[("created_at_unix", created.to_string()), ("hyper_parameters", serde_json::to_string(opts)?)],
        },
    )?;
    write_output(output, &bytes)?;
    eprintln!("{} steps, best mse {:.4}: wrote {}", learned.steps_run, learned.best_mse, output.display());
    Ok(())
}

/// `apply`'s numeric options, refused by their flag names.
fn check_apply_flags(steps: usize, guidance: f32, image_guidance: f32) -> Result<(), Box<dyn std::error::Error>> {
    let max = visii_pipeline::apply::MAX_APPLY_STEPS;
    if !(1..=max).contains(&steps) {
        return Err(format!("--steps {steps}: expected 1..={max}").into());
    }
    let g = visii_pipeline::apply::MAX_GUIDANCE;
    for (flag, v) in [("--guidance", guidance), ("--image-guidance", image_guidance)] {
        if !v.is_finite() || v.abs() > g {
            return Err(format!("{flag} {v}: expected a finite number within ±{g}").into());
        }
    }
    Ok(())
}

/// Most caption-search iterations `learn` runs.
const MAX_CAPTION_ITERATIONS: usize = 10_000;

/// `N` (longer side) or `WxH` (exact, multiples of 8), at most [`visii_pipeline::apply::MAX_SIDE`].
fn parse_size(s: &str) -> Result<(usize, Option<(usize, usize)>), Box<dyn std::error::Error>> {
    let max = visii_pipeline::apply::MAX_SIDE;
    let bad = || {
        format!(
            "--size {:?}: give WxH with multiples of 8 (e.g. 512x384) or one number for the longer side, at most {max}",
            visii_formats::text::printable_short(s, 40)
        )
    };
    if let Some((w, h)) = s.split_once(['x', 'X']) {
        let (w, h): (usize, usize) = (w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?);
        if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 || w.max(h) > max {
            return Err(bad().into());
        }
        Ok((w.max(h), Some((w, h))))
    } else {
        let n: usize = s.trim().parse().map_err(|_| bad())?;
        if !(8..=max).contains(&n) {
            return Err(bad().into());
        }
        Ok((n, None))
    }
}

struct ApplyInputs<'a> {
    text: Option<&'a str>,
    instruction: Option<&'a std::path::Path>,
    extra: Option<&'a str>,
    noise: Option<&'a std::path::Path>,
    size: (usize, Option<(usize, usize)>),
    reuse_noise: bool,
    allow_foreign_model: bool,
}

enum Init {
    Text(String),
    Search(CaptionOptions),
}

fn inspect_instruction(
    path: &std::path::Path,
    model: Option<&std::path::Path>,
    k: usize,
    as_json: bool,
    backend: Backend,
) -> Result<(), Box<dyn std::error::Error>> {
    if !(1..=20).contains(&k) {
        return Err(format!("--words {k}: expected 1..=20").into());
    }
    let bytes = read_input(path, visii_pipeline::instruction::MAX_BYTES as u64)?;
    let ins = visii_pipeline::instruction::peek(&bytes).map_err(|e| format!("{}: {e}", shown(path)))?;
    // The nearest words need the model's text encoder and vocabulary (not its UNet or VAE).
    let words = match model {
        Some(m) => {
            let folder = open_ip2p(m)?;
            let dev = device(backend);
            let text = folder.text_encoder(&dev)?.model;
            let tokenizer = folder.tokenizer()?;
            let full = visii_pipeline::instruction::load(&bytes, text.final_layer_norm.gamma.val().dims()[0], tokenizer.encode("")?.len())
                .map_err(|e| format!("{}: {e} (for the model {})", shown(path), shown(m)))?;
            Some(visii_pipeline::words::nearest_words(&text, &tokenizer, &full.rows, full.positions, 1..full.eos, k)?)
        }
        None => None,
    };
    if as_json {
        let mut meta = ins.metadata.clone();
        meta.remove("thumbnail_png_base64");
        let v = serde_json::json!({
            "positions": ins.positions, "hidden": ins.hidden, "eos": ins.eos, "metadata": meta,
            "baseModel": ins.base_model.as_ref().map(|b| serde_json::json!({"name": b.name, "fingerprint": b.fingerprint()})),
            "reusableNoise": ins.noise_reuse.is_some(),
            "words": words,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut keys: Vec<_> = ins.metadata.iter().collect();
    keys.sort();
    // Everything from the file is printed escaped: a shared file's metadata must not act on the terminal.
    let p = visii_formats::text::printable;
    println!("{}: instruction [{} x {}], learned span 1..{}", shown(path), ins.positions, ins.hidden, ins.eos);
    for (k, v) in keys {
        if k == "thumbnail_png_base64" {
            continue;
        }
        println!("  {:<18} {}", p(k), p(v));
    }
    if let Some(png) = ins.thumbnail_png() {
        // A thumbnail is small: its size is checked before it is decoded.
        let small = visii_formats::image::Limits { max_side: 1024, max_pixels: 1 << 20, max_aspect: 16, max_alloc: 64 << 20, min_side: 1 };
        match visii_formats::image::decode_rgb_within(&png, &small) {
            Ok((_, w, h)) => println!("  {:<18} {w}x{h} PNG, {} bytes", "thumbnail", png.len()),
            Err(_) => println!("  {:<18} unreadable", "thumbnail"),
        }
    }
    if let Some(words) = words {
        println!("  nearest words (position: word cosine, ...; a hint of what it does):");
        for (i, list) in words.iter().enumerate() {
            let shown: Vec<String> = list.iter().map(|w| format!("{} {:.2}", p(&w.word), w.score)).collect();
            println!("  {:>4}: {}", i + 1, shown.join(", "));
        }
        let first: Vec<String> = words.iter().filter_map(|l| l.first()).map(|w| p(&w.word)).collect();
        println!("  reads roughly as: \"{}\"", first.join(" "));
    }
    Ok(())
}

/// The images `--image` names (files as given; folders as their PNG / JPEG files, sorted, not
/// recursively), each with its output: `-o` itself for one image file, else `-o/NAME.png` (a
/// second image of the same name gets `NAME-2.png`). Every output is checked before anything is
/// computed (not an input, not in the model folder, writable); a batch's output folder is made
/// if missing, but is never an input folder.
fn batch_jobs(
    images: &[std::path::PathBuf],
    output: &std::path::Path,
    other_inputs: &[Option<&std::path::Path>],
    model: &std::path::Path,
) -> Result<Vec<(std::path::PathBuf, std::path::PathBuf)>, String> {
    let mut files = vec![];
    let mut folders = vec![];
    for p in images {
        if p.is_dir() {
            let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("--image {}: cannot list the folder ({e})", shown(p)))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension().and_then(|x| x.to_str()).is_some_and(|x| ["png", "jpg", "jpeg"].contains(&x.to_ascii_lowercase().as_str()))
                })
                .collect();
            if found.is_empty() {
                return Err(format!("--image {}: a directory (not a regular file) that holds no PNG or JPEG files to edit", shown(p)));
            }
            found.sort();
            files.extend(found);
            folders.push(p.as_path());
        } else {
            files.push(p.clone());
        }
    }
    if files.len() > MAX_BATCH {
        return Err(format!("{} images: a batch may have at most {MAX_BATCH}; split it", files.len()));
    }
    let mut inputs: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    inputs.extend(other_inputs.iter().flatten());
    // One image file: -o is the output file (a folder there is refused, as it always was).
    if files.len() == 1 && folders.is_empty() {
        check_output(output, &inputs, &[model])?;
        return Ok(vec![(files[0].clone(), output.to_path_buf())]);
    }
    // A batch: -o is a folder.
    if output.exists() && !output.is_dir() {
        return Err(format!("-o {}: {} images are edited, so -o must be a folder, and this is a file", shown(output), files.len()));
    }
    if !output.exists() {
        std::fs::create_dir(output).map_err(|e| format!("-o {}: cannot make the folder ({e})", shown(output)))?;
    }
    for f in &folders {
        if same_file(f, output) {
            return Err(format!("-o {} is an input folder: its results would be read as inputs next time; choose another folder", shown(output)));
        }
    }
    let mut taken = std::collections::HashSet::new();
    let mut jobs = vec![];
    for f in &files {
        let stem = f.file_stem().map(|s| s.to_string_lossy().into_owned()).filter(|s| !s.is_empty()).unwrap_or_else(|| "image".into());
        let mut name = format!("{stem}.png");
        let mut k = 2;
        while !taken.insert(name.clone()) {
            name = format!("{stem}-{k}.png");
            k += 1;
        }
        let out = output.join(&name);
        check_output(&out, &inputs, &[model])?;
        jobs.push((f.clone(), out));
    }
    Ok(jobs)
}

/// Most images one `apply` edits.
const MAX_BATCH: usize = 10_000;

fn apply(
    model: &std::path::Path,
    jobs: &[(std::path::PathBuf, std::path::PathBuf)],
    how: &ApplyInputs,
    opts: &ApplyOptions,
    dev: Device,
) -> Result<(), Box<dyn std::error::Error>> {
    let (text, instruction) = (how.text, how.instruction);
    let mut reuse = None;
    // A single image is read before the model loads (a bad one costs nothing); a batch's one at a time.
    let first = if jobs.len() == 1 { Some(read_image(&jobs[0].0)?) } else { None };
    let t0 = Instant::now();
    let ip2p = load_ip2p(model, &dev)?;
    eprintln!("loaded {} in {:.1} s", model.display(), t0.elapsed().as_secs_f64());
    let cond = match (text, instruction) {
        (Some(t), _) => ip2p.encode_text(t)?,
        (None, Some(p)) => {
            let bytes = read_input(p, visii_pipeline::instruction::MAX_BYTES as u64)?;
            let (cond, ins) =
                ip2p.instruction_conditioning(&bytes, &ModelIdentity::of(&ip2p)?, how.allow_foreign_model, how.extra).map_err(|e| match e {
                    visii_pipeline::PipelineError::ForeignModel(_) => format!("{}: {e}. To apply it anyway, pass --allow-foreign-model", shown(p)),
                    e => format!("{}: {e}", shown(p)),
                })?;
            if how.reuse_noise {
                reuse = Some(ins.noise_reuse.clone().ok_or_else(|| {
                    format!("{}: this instruction was learned with noises from a schedule file, which cannot be regenerated", p.display())
                })?);
            }
            cond
        }
        (None, None) => return Err("give --text or --instruction".into()),
    };
    let noise = match how.noise {
        Some(p) => {
            let (noise, n) = visii_pipeline::repro::read_noise(&read_input(p, MAX_DATA_FILE)?).map_err(|e| format!("{}: {e}", p.display()))?;
            if n < opts.steps {
                return Err(format!("{}: {n} step noises for {} steps", p.display(), opts.steps).into());
            }
            noise
        }
        None => match reuse {
            Some(r) => Noise::Reuse(r),
            None => Noise::Seeded(opts.seed),
        },
    };
    // Each image as a single apply with the same settings and seed would edit it; a batch goes on
    // past an image that fails (unreadable, too large) and names every failure at the end.
    let mut failed = vec![];
    for (k, (image, output)) in jobs.iter().enumerate() {
        let label = if jobs.len() > 1 { format!("[{}/{}] {}: ", k + 1, jobs.len(), shown(image)) } else { String::new() };
        let one = || -> Result<(), Box<dyn std::error::Error>> {
            let input = match &first {
                Some(i) => i.clone(),
                None => read_image(image)?,
            };
            let (w, h) = how.size.1.unwrap_or_else(|| input.working_size(how.size.0));
            eprintln!("{label}editing at {w}x{h}");
            let work = input.resized(w, h);
            let t1 = Instant::now();
            let out = ip2p.apply(&work, cond.clone(), opts, &noise, &mut |i, n| {
                let el = t1.elapsed().as_secs_f64();
                let eta = if i > 0 { el / i as f64 * (n - i) as f64 } else { 0.0 };
                eprint!("\r  step {i}/{n}  {el:.1} s elapsed, ETA {eta:.1} s   ");
                true
            })?;
            eprintln!();
            let v: Vec<f32> = out.into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err("the decoded image holds non-finite values (the model's weights or the settings are broken); nothing was written".into());
            }
            let result = RgbImage::from_unit_floats(&v, w, h);
            write_output(output, &result.to_png()?)?;
            eprintln!("wrote {}", output.display());
            Ok(())
        };
        match one() {
            Ok(()) => {}
            Err(e) if jobs.len() == 1 => return Err(e),
            Err(e) => {
                eprintln!("\n{label}not edited: {e}");
                failed.push(format!("{}: {e}", shown(image)));
            }
        }
    }
    if !failed.is_empty() {
        return Err(format!("{} of {} images were not edited (the others were written):\n  {}", failed.len(), jobs.len(), failed.join("\n  ")).into());
    }
    if jobs.len() > 1 {
        eprintln!("{} images edited", jobs.len());
    }
    Ok(())
}

fn convert(
    model: &std::path::Path,
    clip: &std::path::Path,
    out: &std::path::Path,
    quant: &str,
    clip_quant: Option<&str>,
    shard_mb: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use visii_models::pack::Quant;
    let quant: Quant = quant.parse()?;
    let clip_quant: Quant = match clip_quant {
        Some(q) => q.parse()?,
        None => quant.default_clip(),
    };
    let t0 = Instant::now();
    let ip2p = Ip2pFolder::open(model)?;
    let cf = ClipFolder::open(clip)?;
    let r = visii_models::pack::convert(&ip2p, &cf, out, quant, clip_quant, shard_mb)?;
    let source: u64 = [model, clip].iter().map(|d| dir_bytes(d)).sum();
    println!(
        "{}: {} tensors, {} parameters, {} shards, {:.1} MB ({:.1}% of the {:.1} MB of source folders), fingerprint {}, {:.1} s",
        out.display(),
        r.tensors,
        group_digits(r.params as u64),
        r.shards,
        r.bytes as f64 / 1e6,
        100.0 * r.bytes as f64 / source.max(1) as f64,
        source as f64 / 1e6,
        r.fingerprint,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn dir_bytes(d: &std::path::Path) -> u64 {
    std::fs::read_dir(d)
        .map(|it| {
            it.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Largest input image file read (a 50 MP PNG is well under this).
const MAX_IMAGE_FILE: u64 = 256 << 20;
/// Largest noise or schedule file read (a 1024 px latent's noises for 1000 steps are ~260 MB).
const MAX_DATA_FILE: u64 = 1 << 30;

/// A whole input file, regular files only (a named pipe or a device is refused, not read forever),
/// at most `max` bytes.
fn read_input(p: &std::path::Path, max: u64) -> Result<Vec<u8>, String> {
    visii_formats::files::read_regular(p, max).map_err(|e| format!("cannot read {}: {e}", shown(p)))
}

/// A path as printed: control characters and bidi overrides escaped.
fn shown(p: &std::path::Path) -> String {
    visii_formats::text::printable(&p.display().to_string())
}

/// Whether two paths name the same file (through links and other spellings).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Refuse an output that would overwrite an input or land inside an input folder, or that cannot be
/// written, before anything is computed.
fn check_output(out: &std::path::Path, input_files: &[&std::path::Path], input_dirs: &[&std::path::Path]) -> Result<(), String> {
    let name = shown(out);
    if out.as_os_str().is_empty() || out.is_dir() {
        return Err(format!("-o {name}: is a directory (or empty); give a file name"));
    }
    for i in input_files {
        if same_file(out, i) {
            return Err(format!("-o {name} is an input ({}): it would overwrite it; choose another output file", shown(i)));
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let parent = parent.canonicalize().map_err(|e| format!("-o {name}: its directory {} does not exist ({e})", shown(&parent)))?;
    if !parent.is_dir() {
        return Err(format!("-o {name}: {} is not a directory", shown(&parent)));
    }
    for d in input_dirs {
        if let Ok(d) = d.canonicalize() {
            // A new file at the top of the model folder is harmless; replacing one of its files, or adding one
            // to a component folder (where it could be read as weights or config next time), is not.
            if parent.starts_with(&d) && (out.exists() || parent != d) {
                return Err(format!(
                    "-o {name} lies inside the model folder {} and would replace or add a model file: write outputs elsewhere",
                    shown(&d)
                ));
            }
        }
    }
    // Writable? An existing file is opened for appending (nothing changes); otherwise a probe file is made and removed.
    if out.exists() {
        std::fs::OpenOptions::new().append(true).open(out).map_err(|e| format!("-o {name}: not writable ({e})"))?;
    } else {
        let probe = parent.join(format!(".visii-write-test-{}", std::process::id()));
        std::fs::File::create(&probe).map_err(|e| format!("-o {name}: the folder is not writable ({e})"))?;
        let _ = std::fs::remove_file(&probe);
    }
    Ok(())
}

/// Write `bytes` to `out` through a temporary file in the same folder, renamed into place: an
/// interrupted write never leaves a half file where a good one was.
fn write_output(out: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let tmp =
        parent.join(format!(".{}.visii-tmp-{}", out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", shown(out)))?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", shown(out))
    })
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn bench(
    latent: usize,
    what: BenchWhat,
    config: BenchConfig,
    backends: &[Backend],
    runs: usize,
    shape: &[usize],
    torch: Option<(&str, &str)>,
    profile: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = bench_config(config)?;
    let full = config == BenchConfig::Full;
    if matches!(what, BenchWhat::Conv | BenchWhat::Linear | BenchWhat::Attention | BenchWhat::AttentionGrad) {
        println!("{what:?} {shape:?}: {:.1} GFLOP per call", op_flop(what, shape) / 1e9);
    } else if what == BenchWhat::Groupnorm {
        println!("{what:?} {shape:?}: {:.1} M values", shape[..4].iter().product::<usize>() as f64 / 1e6);
    } else if matches!(what, BenchWhat::VaeDecode | BenchWhat::VaeEncode) {
        println!(
            "{what:?}: {} VAE (random weights), batch 1, {1}x{1} pixels",
            if full { "full-size InstructPix2Pix" } else { "tiny test" },
            latent * 8
        );
    } else {
        println!(
            "{what:?}: {} UNet ({} parameters, random weights{}), batch 1, {latent}x{latent} latents, 77 x {} text states",
            if full { "full-size InstructPix2Pix" } else { "tiny test" },
            if full { "859.5 M" } else { "1.4 M" },
            match (resident_q8(), f16_activations()) {
                (false, false) => "",
                (true, false) => ", int8 on the device",
                (false, true) => ", f16 activations",
                (true, true) => ", int8 on the device, f16 activations",
            },
            cfg.cross_attention_dim.get(0)
        );
    }
    println!("{:<8} {:>10} {:>14} {:>12} {:>14} {:>12}", "backend", "build s", "first run s", "run s", "device pool", "peak RSS");
    let gib = |b: &serde_json::Value| b.as_f64().map(|v| format!("{:.2} GiB", v / (1u64 << 30) as f64)).unwrap_or_else(|| "n/a".into());
    // A value as its command-line spelling (clap's: `LearnStep` -> `learn-step`).
    fn arg<T: ValueEnum>(v: &T) -> String {
        v.to_possible_value().expect("no skipped values").get_name().to_string()
    }
    let mut times = vec![];
    // The checkout's script: from the repository root, else where this binary was built from.
    let script = Some(std::path::PathBuf::from("tests/fullsize/torch_bench.py"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fullsize/torch_bench.py"));
    let mut runners: Vec<(String, std::process::Command)> = vec![];
    let mut profiles: Vec<(String, std::path::PathBuf)> = vec![];
    for &b in backends {
        let mut c = std::process::Command::new(std::env::current_exe()?);
        c.args(["bench-one", "--latent", &latent.to_string(), "--what", &arg(&what), "--config", &arg(&config)]);
        if !shape.is_empty() {
            c.args(["--shape", &shape.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")]);
        }
        c.args(["--backend", &arg(&b), "--runs", &runs.to_string()]);
        if GPU_LIMITS.get() == Some(&GpuLimits::Spec) {
            c.args(["--gpu-limits", "spec"]);
        }
        if resident_q8() {
            c.args(["--resident", "q8"]);
        }
        if f16_activations() {
            c.args(["--activations", "f16"]);
        }
        if browser_memory() {
            let (every, backward) = visii_models::memory::tidy_settings();
            c.args(["--gpu-memory", "browser", "--gpu-tidy-every", &every.to_string(), "--gpu-tidy-backward-every", &backward.to_string()]);
            c.args(["--gpu-exact-fit", &visii_models::memory::exact_fit_in_force().to_string()]);
        }
        if profile && b != Backend::Ndarray {
            // cubecl reads its settings from `cubecl.toml` in the working directory.
            let dir = std::env::temp_dir().join(format!("visii-profile-{}-{}", std::process::id(), arg(&b)));
            std::fs::create_dir_all(&dir)?;
            // Each kernel's compilation logged too (a pipeline made: what a first run pays for).
            let toml =
                "[profiling.logger]\nlevel = \"basic\"\nfile = \"prof.log\"\n[compilation.logger]\nlevel = \"basic\"\nfile = \"compile.log\"\n";
            std::fs::write(dir.join("cubecl.toml"), toml)?;
            let _ = std::fs::remove_file(dir.join("prof.log"));
            let _ = std::fs::remove_file(dir.join("compile.log"));
            c.current_dir(&dir);
            profiles.push((arg(&b), dir.join("prof.log")));
        }
        runners.push((arg(&b), c));
    }
    if let Some((py, torch_device)) = torch.filter(|_| !what.is_op()) {
        let mut c = std::process::Command::new(py);
        c.arg(&script).args(["--latent", &latent.to_string(), "--what", &arg(&what), "--config", &arg(&config), "--runs", &runs.to_string()]);
        c.args(["--device", torch_device]);
        runners.push(("pytorch".into(), c));
    }
    for (name, mut cmd) in runners {
        let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
        if !out.status.success() {
            // The child's exit status says how it ended (a code, or the signal that killed it).
            return Err(format!("the {name} run failed ({})", out.status).into());
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let r: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or(""))?;
        println!(
            "{:<8} {:>10.1} {:>14.3} {:>12.3} {:>14} {:>12}",
            name,
            r["build_s"].as_f64().unwrap_or(0.0),
            r["first_s"].as_f64().unwrap_or(0.0),
            r["run_s"].as_f64().unwrap_or(0.0),
            gib(&r["device_pool_bytes"]),
            gib(&r["peak_rss_bytes"])
        );
        if r["device_held_peak_bytes"].is_u64() {
            println!(
                "  {name}, browser allocator: held at most {} with at most {} in use (read at every layer), {} in use after the last run",
                gib(&r["device_held_peak_bytes"]),
                gib(&r["device_in_use_peak_bytes"]),
                gib(&r["device_in_use_bytes"])
            );
        }
        let run_s = r["run_s"].as_f64().unwrap_or(f64::NAN);
        match what {
            BenchWhat::Conv | BenchWhat::Linear | BenchWhat::Attention | BenchWhat::AttentionGrad => println!("  {name}: {:.1} GFLOP/s", op_flop(what, shape) / run_s / 1e9),
            // What a norm cannot do with less: read the input once, write the output once.
            BenchWhat::Groupnorm => {
                println!("  {name}: {:.1} GB/s (one read + one write)", 8.0 * shape[..4].iter().product::<usize>() as f64 / run_s / 1e9)
            }
            _ => {}
        }
        times.push((name, r["run_s"].as_f64().unwrap_or(f64::NAN)));
    }
    for w in times.windows(2).filter(|w| w[1].0 != "pytorch") {
        println!("time ratio {}/{}: {:.2}", w[0].0, w[1].0, w[0].1 / w[1].1);
    }
    if let Some((_, t)) = times.iter().find(|(n, _)| n == "pytorch") {
        for (n, x) in times.iter().filter(|(n, _)| n != "pytorch") {
            println!("time ratio {n}/pytorch: {:.2}", x / t);
        }
    }
    for (name, log) in profiles {
        let text = std::fs::read_to_string(&log).map_err(|e| format!("the {name} profile {}: {e}", log.display()))?;
        let compiled = std::fs::read_to_string(log.with_file_name("compile.log")).unwrap_or_default();
        print_profile(&name, &text, &compiled);
    }
    Ok(())
}

/// A duration as Rust's `Debug` prints it (`12.5µs`, `3.1ms`, `1.2s`, `800ns`), in seconds.
fn debug_duration_s(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (value, unit) = text.split_at(split);
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some(value.parse::<f64>().ok()? * scale)
}

/// The time cubecl's profiler logged (`| <duration> | <kernel>` lines) per kernel (its name without
/// type parameters): the sum over all runs, and the median launch times the launches, which leaves
/// out the first launch's shader compilation (it lands in that launch's time); sorted by the latter.
/// Then the kernels compiled (`[Compiling kernel] <name>` lines of cubecl's compilation log), per
/// class, and what their first launches took over the class's median.
fn print_profile(backend: &str, log: &str, compiled: &str) {
    let mut per: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for line in log.lines() {
        let mut cols = line.trim_start_matches('|').splitn(2, '|');
        let (Some(d), Some(name)) = (cols.next(), cols.next()) else { continue };
        let Some(s) = debug_duration_s(d) else { continue };
        per.entry(kernel_class(name)).or_default().push(s);
    }
    let mut rows: Vec<(String, f64, f64, usize)> = per
        .into_iter()
        .map(|(name, mut times)| {
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            (name, times.iter().sum(), median * times.len() as f64, times.len())
        })
        .collect();
    let total: f64 = rows.iter().map(|r| r.1).sum();
    let steady: f64 = rows.iter().map(|r| r.2).sum();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!(
        "\n{backend}: time per kernel (cubecl profiler, all runs): {total:.3} s in {} launches; median launch x launches: {steady:.3} s",
        rows.iter().map(|r| r.3).sum::<usize>()
    );
    println!("  {:>6}  {:>9}  {:>9}  {:>7}  kernel", "share", "median x n", "sum", "n");
    for (name, sum, est, n) in rows.iter().take(15) {
        println!("  {:>5.1}%  {:>8.3} s  {:>7.3} s  {:>6}x  {}", 100.0 * est / steady.max(1e-12), est, sum, n, name);
    }
    let mut made: std::collections::BTreeMap<String, usize> = Default::default();
    for name in compiled.lines().filter_map(|l| l.trim().strip_prefix("[Compiling kernel]")) {
        *made.entry(kernel_class(name)).or_default() += 1;
    }
    let ours: usize = made.iter().filter(|(k, _)| k.starts_with("visii::")).map(|(_, n)| n).sum();
    let mut made: Vec<_> = made.into_iter().collect();
    made.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    println!(
        "  kernels compiled: {} ({ours} ours); launches over their class's median (first launches: compilation): {:.3} s",
        made.iter().map(|r| r.1).sum::<usize>(),
        total - steady
    );
    for (name, n) in made.iter().take(15) {
        println!("  {n:>6}  {name}");
    }
}

/// A kernel's class in cubecl's logs: ours by name, burn's without its module path and type parameters.
fn kernel_class(name: &str) -> String {
    let name = name.trim();
    if name.starts_with("visii::") {
        return name.to_string();
    }
    name.split(['<', '{', ' ']).next().unwrap_or(name).rsplit("::").next().unwrap_or(name).to_string()
}

fn bench_config(config: BenchConfig) -> Result<visii_models::UNetConfig, Box<dyn std::error::Error>> {
    Ok(match config {
        BenchConfig::Full => presets::ip2p_unet(),
        BenchConfig::Tiny => serde_json::from_str(include_str!("../../../tests/fixtures/tiny-ip2p/unet/config.json"))?,
    })
}

/// `--shape` for `--what conv|linear|groupnorm` (checked, defaults filled in); empty for the rest.
fn op_shape(what: BenchWhat, shape: Vec<usize>) -> Result<Vec<usize>, Box<dyn std::error::Error>> {
    let shape = match (what, shape.is_empty()) {
        (BenchWhat::Conv, true) => vec![1, 320, 32, 32, 320, 3, 1],
        (BenchWhat::Linear, true) => vec![1024, 320, 2560],
        (BenchWhat::Groupnorm, true) => vec![1, 128, 256, 256, 32],
        // The UNet's first-level self-attention at 512 px (64 x 64 latents, 8 heads of 40).
        (BenchWhat::Attention, true) => vec![1, 4096, 4096, 8, 40],
        // Learning's first-level self-attention at 256 px (32 x 32 latents).
        (BenchWhat::AttentionGrad, true) => vec![1, 1024, 1024, 8, 40],
        (_, false) if what.is_op() => shape,
        (_, true) => return Ok(shape),
        (_, false) => return Err("--shape is for --what conv, linear, groupnorm, attention or attention-grad".into()),
    };
    let want = match what {
        BenchWhat::Conv => 7,
        BenchWhat::Groupnorm | BenchWhat::Attention | BenchWhat::AttentionGrad => 5,
        _ => 3,
    };
    if shape.len() != want || shape.contains(&0) || shape.iter().any(|&v| v > 1 << 20) {
        return Err(format!("--shape takes {want} positive sizes for --what {what:?} (conv: batch,c_in,h,w,c_out,k,stride; linear: rows,in,out; groupnorm: batch,c,h,w,groups; attention: batch,queries,keys,heads,head_dim)").into());
    }
    // Every tensor the op makes (inputs, output; attention's q, k, v) within 2^28 values (1 GiB of f32).
    let p = |idx: &[usize]| idx.iter().map(|&i| shape[i] as u128).product::<u128>();
    let values: u128 = match what {
        BenchWhat::Conv => p(&[0, 1, 2, 3]).max(p(&[0, 4, 2, 3])).max(p(&[4, 1, 5, 5])),
        BenchWhat::Attention | BenchWhat::AttentionGrad => p(&[0, 1, 3, 4]).max(p(&[0, 2, 3, 4])),
        BenchWhat::Groupnorm => p(&[0, 1, 2, 3]),
        _ => p(&[0, 1]).max(p(&[1, 2])).max(p(&[0, 2])),
    };
    if values > 1 << 28 {
        return Err(format!("--shape {shape:?}: a tensor of {values} values; at most 2^28 (1 GiB of f32) here").into());
    }
    if what == BenchWhat::Groupnorm && shape[1] % shape[4] != 0 {
        return Err(format!("--shape: {} channels do not split into {} groups", shape[1], shape[4]).into());
    }
    Ok(shape)
}

/// Multiply-adds x 2 of one call of `--what conv|linear`.
fn op_flop(what: BenchWhat, s: &[usize]) -> f64 {
    match what {
        BenchWhat::Conv => {
            let (oh, ow) = ((s[2] + 2 * (s[5] / 2) - s[5]) / s[6] + 1, (s[3] + 2 * (s[5] / 2) - s[5]) / s[6] + 1);
            2.0 * (s[0] * s[4] * oh * ow * s[1] * s[5] * s[5]) as f64
        }
        // q kᵀ and the weights times v: two multiply-adds per query, key, head and head dim.
        BenchWhat::Attention => 4.0 * (s[0] * s[1] * s[2] * s[3] * s[4]) as f64,
        // The forward's two and the backward's four (dV = Pᵀ dO, dP = dO vᵀ, dQ = dS k, dK = dSᵀ q);
        // a fused backward that recomputes the scores does one more.
        BenchWhat::AttentionGrad => 12.0 * (s[0] * s[1] * s[2] * s[3] * s[4]) as f64,
        _ => 2.0 * (s[0] * s[1] * s[2]) as f64,
    }
}

/// `bench-one` for one conv or Linear (random values; our kernel, or burn's op on `wgpu-burn`).
fn bench_op(what: BenchWhat, s: &[usize], backend: Backend, runs: usize, dev: &Device) -> Result<(), Box<dyn std::error::Error>> {
    use burn::module::Param;
    use visii_models::resident::Layer;
    let normal = |shape: Vec<usize>, sd: f64| Tensor::<1>::random([shape.iter().product::<usize>()], Distribution::Normal(0.0, sd), dev);
    // `--activations f16`: the input in f16, the weights f32 (as the models keep them).
    visii_models::unet::check_f16(f16_activations(), dev)?;
    let act = if f16_activations() { burn::tensor::FloatDType::F16 } else { burn::tensor::FloatDType::F32 };
    let t0 = Instant::now();
    match what {
        BenchWhat::Conv => {
            let (k, pad) = (s[5], s[5] / 2);
            let conv = burn::nn::conv::Conv2d {
                weight: Param::from_tensor(normal(vec![s[4], s[1], k, k], 0.05).reshape([s[4], s[1], k, k])),
                bias: Some(Param::from_tensor(normal(vec![s[4]], 0.1))),
                stride: [s[6], s[6]],
                kernel_size: [k, k],
                dilation: [1, 1],
                groups: 1,
                padding: burn::nn::PaddingConfig2d::Explicit(pad, pad, pad, pad),
            };
            let x = normal(vec![s[0], s[1], s[2], s[3]], 1.0).reshape([s[0], s[1], s[2], s[3]]).cast(act);
            let build_s = t0.elapsed().as_secs_f64();
            timed(backend, s[1] * s[4] * k * k, build_s, runs, dev, || {
                let _ = conv.run(x.clone()).slice([0..1, 0..1, 0..1, 0..1]).into_data();
            });
        }
        BenchWhat::Attention => {
            let (b, n, m, heads, d) = (s[0], s[1], s[2], s[3], s[4]);
            let t = |rows: usize| normal(vec![b, rows, heads * d], 1.0).reshape([b, rows, heads * d]).cast(act);
            let (q, k, v) = (t(n), t(m), t(m));
            let build_s = t0.elapsed().as_secs_f64();
            timed(backend, 0, build_s, runs, dev, || {
                let _ = visii_models::nn::attention(q.clone(), k.clone(), v.clone(), heads, false).slice([0..1, 0..1, 0..1]).into_data();
            });
        }
        BenchWhat::AttentionGrad => {
            let (b, n, m, heads, d) = (s[0], s[1], s[2], s[3], s[4]);
            let t = |rows: usize| normal(vec![b, rows, heads * d], 1.0).reshape([b, rows, heads * d]).cast(act);
            let (q, k, v, r) = (t(n), t(m), t(m), t(n));
            let build_s = t0.elapsed().as_secs_f64();
            timed(backend, 0, build_s, runs, dev, || {
                let [qa, ka, va] = [&q, &k, &v].map(|x| x.clone().autodiff().require_grad());
                let out = visii_models::nn::attention(qa.clone(), ka.clone(), va.clone(), heads, false);
                let grads = (out * r.clone().autodiff()).sum().backward();
                for x in [qa, ka, va] {
                    let _ = x.grad(&grads).map(|g| g.slice([0..1, 0..1, 0..1]).into_data());
                }
            });
        }
        BenchWhat::Groupnorm => {
            let norm = visii_models::nn::GroupNorm {
                gamma: Param::from_tensor(normal(vec![s[1]], 0.1).add_scalar(1.0)),
                beta: Param::from_tensor(normal(vec![s[1]], 0.1)),
                num_groups: s[4],
                epsilon: 1e-6,
            };
            let x = normal(vec![s[0], s[1], s[2], s[3]], 1.0).reshape([s[0], s[1], s[2], s[3]]).cast(act);
            let build_s = t0.elapsed().as_secs_f64();
            timed(backend, 2 * s[1], build_s, runs, dev, || {
                let _ = norm.forward_silu(x.clone()).slice([0..1, 0..1, 0..1, 0..1]).into_data();
            });
        }
        _ => {
            let linear = burn::nn::Linear {
                weight: Param::from_tensor(normal(vec![s[1], s[2]], 0.05).reshape([s[1], s[2]])),
                bias: Some(Param::from_tensor(normal(vec![s[2]], 0.1))),
            };
            let x = normal(vec![1, s[0], s[1]], 1.0).reshape([1, s[0], s[1]]).cast(act);
            let build_s = t0.elapsed().as_secs_f64();
            timed(backend, s[1] * s[2], build_s, runs, dev, || {
                let _ = linear.run(x.clone()).slice([0..1, 0..1, 0..1]).into_data();
            });
        }
    }
    Ok(())
}

fn bench_one(
    latent: usize,
    shape: &[usize],
    what: BenchWhat,
    config: BenchConfig,
    backend: Backend,
    runs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use visii_pipeline::block_on;
    use visii_pipeline::probe::UnetProbe;
    let dev = device(backend);
    if what.is_op() {
        return bench_op(what, &op_shape(what, shape.to_vec())?, backend, runs, &dev);
    }
    if matches!(what, BenchWhat::VaeDecode | BenchWhat::VaeEncode) {
        return bench_vae(latent, what, config, backend, runs, &dev);
    }
    let cfg = bench_config(config)?;
    let t0 = Instant::now();
    let w = Weights::random(0, &dev).with_resident_q8(resident_q8());
    let mut unet = UNet2DConditionModel::load(&w, &cfg)?;
    unet.set_f16_activations(f16_activations(), &dev)?;
    let build_s = t0.elapsed().as_secs_f64();
    let mut probe = block_on(UnetProbe::new(&unet, cfg.cross_attention_dim.get(0), latent, &dev))?;
    let mut failed = None;
    timed(backend, w.param_count(), build_s, runs, &dev, || {
        let r = match what {
            BenchWhat::Forward => block_on(probe.forward(&unet)),
            BenchWhat::LearnStep => block_on(probe.learn_step(&unet)),
            BenchWhat::SampleStep => block_on(probe.sample_step(&unet)),
            BenchWhat::VaeDecode | BenchWhat::VaeEncode => unreachable!("bench_vae"),
            _ => unreachable!("bench_op (what.is_op())"),
        };
        failed = failed.take().or(r.err());
    });
    failed.map_or(Ok(()), |e| Err(e.into()))
}

/// Time `once` (first run, then the best of `runs`) and print bench-one's JSON line.
fn timed(backend: Backend, params: usize, build_s: f64, runs: usize, dev: &Device, mut once: impl FnMut()) {
    // With the browser's allocator, what it holds is read at every layer (a little slower).
    visii_models::memory::watch(browser_memory());
    visii_models::memory::take_peak();
    // Each run ends when the device has finished all it was given: reading back a value is not
    // enough (a read of a small region may return before unrelated queued work has run; the VAE
    // encode once measured 10 ms for ~1.1 TFLOP).
    let mut run = || {
        let t = Instant::now();
        once();
        dev.sync().unwrap_or_else(|e| panic!("the device failed: {e}"));
        t.elapsed().as_secs_f64()
    };
    let first_s = run();
    let mut best = first_s;
    for _ in 0..runs {
        best = best.min(run());
    }
    let peak = browser_memory().then(visii_models::memory::take_peak);
    let report = json!({
        "backend": format!("{backend:?}").to_lowercase(), "params": params, "build_s": build_s,
        "first_s": first_s, "run_s": best,
        "device_pool_bytes": dev.memory_pool_usage().map(|u| u.bytes_reserved), "peak_rss_bytes": peak_rss(),
        "device_in_use_bytes": dev.memory_pool_usage().map(|u| u.bytes_in_use),
        "device_held_peak_bytes": peak.map(|p| p.held),
        "device_in_use_peak_bytes": peak.map(|p| p.in_use),
        "gpu_limits": GPU_LIMITS.get().copied().unwrap_or(GpuLimits::Adapter).to_possible_value().map(|v| v.get_name().to_string()),
        "activations": if f16_activations() { "f16" } else { "f32" },
        "gpu_memory": GPU_MEMORY.get().copied().unwrap_or(GpuMemory::Native).to_possible_value().map(|v| v.get_name().to_string()),
    });
    println!("{report}");
}

/// `bench-one` for the VAE: decode a [1, 4, n, n] latent or encode an 8n x 8n image.
fn bench_vae(
    latent: usize,
    what: BenchWhat,
    config: BenchConfig,
    backend: Backend,
    runs: usize,
    dev: &Device,
) -> Result<(), Box<dyn std::error::Error>> {
    let cfg: visii_models::VaeConfig = match config {
        BenchConfig::Full => presets::ip2p_vae(),
        BenchConfig::Tiny => serde_json::from_str(include_str!("../../../tests/fixtures/tiny-ip2p/vae/config.json"))?,
    };
    let t0 = Instant::now();
    let w = Weights::random(0, dev).with_resident_q8(resident_q8());
    let vae = visii_models::AutoencoderKL::load(&w, &cfg)?;
    let build_s = t0.elapsed().as_secs_f64();
    let px = latent * cfg.downscale();
    let normal = |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), dev);
    timed(backend, w.param_count(), build_s, runs, dev, || match what {
        BenchWhat::VaeDecode => {
            // As `apply` decodes (stage by stage, handing buffers back between, as in a browser).
            let z = normal([1, cfg.latent_channels, latent, latent]);
            let x = visii_pipeline::block_on(visii_pipeline::apply::decode_staged(&vae, z)).expect("decode");
            let _ = x.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        }
        _ => {
            let _ = vae.encode_mode(normal([1, cfg.in_channels, px, px])).slice([0..1, 0..1, 0..1, 0..1]).into_data();
        }
    });
    Ok(())
}
