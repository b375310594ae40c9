//! The `visii` binary end to end on the committed tiny models.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn visii(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_visii")).args(args).output().expect("run visii")
}

#[test]
fn inspect_json_reports_exact_parameter_counts() {
    let f = fixtures();
    let out = visii(&["inspect", "--model", f.join("tiny-ip2p").to_str().unwrap(), "--clip", f.join("tiny-clip").to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f.join("goldens/goldens.json")).unwrap()).unwrap();
    for c in ["unet", "vae", "text_encoder", "clip_vision"] {
        assert_eq!(report[c]["params"], meta["param_counts"][c], "{c}");
    }
    assert_eq!(report["unet"]["in_channels"], 8);
    assert_eq!(report["vae"]["downscale"], 8);
    assert_eq!(report["text_encoder"]["pad_id"], 49407);
}

#[test]
fn a_closed_pipe_ends_quietly() {
    // `visii inspect --json | head -c 0`: the reader is gone before anything is printed.
    let (ip2p, clip) = (fixtures().join("tiny-ip2p"), fixtures().join("tiny-clip"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_visii"))
        .args(["inspect", "--model", ip2p.to_str().unwrap(), "--clip", clip.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run visii");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn inspect_table_and_errors() {
    let f = fixtures();
    let out = visii(&["inspect", "--model", f.join("tiny-ip2p").to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("unet") && text.contains("1,381,124"), "{text}");
    // A folder that is not a model: exit code 2 and a message that says what is missing.
    let out = visii(&["inspect", "--model", f.join("images").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an InstructPix2Pix diffusers folder") && err.contains("model_index.json"), "{err}");
}

#[test]
fn apply_writes_an_edited_png() {
    let f = fixtures();
    let out_path = std::env::temp_dir().join(format!("visii-apply-{}.png", std::process::id()));
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/tall.png").to_str().unwrap(),
        "--prompt",
        "make it snowy",
        "-o",
        out_path.to_str().unwrap(),
        "--steps",
        "2",
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&out_path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (40, 72));
    let input = image::open(f.join("images/tall.png")).unwrap().to_rgb8();
    let diff: u64 = img.as_raw().iter().zip(input.as_raw()).map(|(a, b)| (*a as i64 - *b as i64).unsigned_abs()).sum();
    assert!(diff > 1000, "the result equals the input");
    // A file that is not an image: exit code 2, a message naming the file.
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("goldens/goldens.json").to_str().unwrap(),
        "--prompt",
        "x",
        "-o",
        out_path.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a readable PNG or JPEG"));
    let _ = std::fs::remove_file(out_path);
}

#[test]
fn learn_then_apply_the_instruction_file() {
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("visii-learn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ins = dir.join("edit.visii.safetensors");
    let log = dir.join("log.jsonl");
    let out = visii(&[
        "learn",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--clip",
        f.join("tiny-clip").to_str().unwrap(),
        "--before",
        f.join("images/before.png").to_str().unwrap(),
        "--after",
        f.join("images/after.png").to_str().unwrap(),
        "-o",
        ins.to_str().unwrap(),
        "--steps",
        "4",
        "--size",
        "64",
        "--init",
        "a watercolor painting",
        "--seed",
        "5",
        "--log",
        log.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().all(|l| l["mse"].as_f64().unwrap().is_finite() && l["t"].as_u64().unwrap() < 1000));
    // The file validates and carries its metadata.
    let bytes = std::fs::read(&ins).unwrap();
    let loaded = visii_pipeline::instruction::load(&bytes, 32, 77).unwrap();
    assert_eq!((loaded.positions, loaded.hidden), (77, 32));
    assert_eq!(loaded.metadata["init_caption"], "a watercolor painting");
    assert_eq!(loaded.metadata["seed"], "5");
    assert_eq!(loaded.metadata["steps_run"], "4");
    // A model of another width refuses it, naming the model it needs.
    let err = visii_pipeline::instruction::load(&bytes, 768, 77).unwrap_err().to_string();
    assert!(err.contains("width 32") && err.contains("tiny-ip2p"), "{err}");

    let png = dir.join("out.png");
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/tall.png").to_str().unwrap(),
        "--instruction",
        ins.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--steps",
        "2",
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(image::open(&png).unwrap().to_rgb8().dimensions(), (40, 72));
    // A safetensors file that is not an instruction is refused with a clear message.
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/tall.png").to_str().unwrap(),
        "--instruction",
        f.join("goldens/goldens.safetensors").to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a visii instruction"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(dir);
}

/// `learn --schedule` with the reference's timesteps and noises reproduces its per-step losses;
/// `apply --noise` with diffusers' noises reproduces its image (the "done when").
#[test]
fn reproducibility_files_reproduce_the_references() {
    let f = fixtures();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f.join("goldens/goldens.json")).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("visii-repro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ins, log) = (dir.join("r.visii.safetensors"), dir.join("r.jsonl"));
    let out = visii(&[
        "learn",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--clip",
        f.join("tiny-clip").to_str().unwrap(),
        "--before",
        f.join("images/before.png").to_str().unwrap(),
        "--after",
        f.join("images/after.png").to_str().unwrap(),
        "-o",
        ins.to_str().unwrap(),
        "--size",
        "80x56",
        "--init",
        meta["learn"]["init"].as_str().unwrap(),
        "--schedule",
        f.join("goldens/learn_schedule.safetensors").to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let want = meta["learn"]["stats_mse_cos_loss"].as_array().unwrap();
    assert_eq!(lines.len(), want.len());
    for (k, (got, w)) in lines.iter().zip(want).enumerate() {
        assert_eq!(got["step"], k);
        for (i, key) in ["mse", "cos", "loss"].iter().enumerate() {
            let (a, b) = (got[key].as_f64().unwrap(), w[i].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4 * b.abs().max(0.1), "step {k} {key}: {a} vs reference {b}");
        }
    }
    // inspect FILE describes the instruction.
    let out = visii(&["inspect", ins.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("init_caption") && text.contains("a photo of a cat") && text.contains("[77 x 32]"), "{text}");

    let png = dir.join("r.png");
    let a = &meta["apply"];
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/before.png").to_str().unwrap(),
        "--prompt",
        a["prompt"].as_str().unwrap(),
        "--steps",
        &a["steps"].to_string(),
        "--size",
        "80x56",
        "--noise",
        f.join("goldens/apply_noise.safetensors").to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&png).unwrap().to_rgb8();
    let g = visii_models::WeightFile::from_path(f.join("goldens/goldens.safetensors")).unwrap();
    let want = g.read_f32("apply.output").unwrap();
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut worst = 0f32;
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            worst = worst.max((p[c] as f32 - want[c * n + i] * 255.0).abs());
        }
    }
    assert!(worst <= 0.51, "pixels differ from diffusers' by up to {worst} levels");

    // Hybrid: a learned instruction plus extra words runs and changes the result.
    let hy = dir.join("h.png");
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/before.png").to_str().unwrap(),
        "--instruction",
        ins.to_str().unwrap(),
        "--extra",
        "a husky",
        "--steps",
        "2",
        "-o",
        hy.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Noises given by a schedule file cannot be regenerated: reuse is refused with the reason.
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/before.png").to_str().unwrap(),
        "--instruction",
        ins.to_str().unwrap(),
        "--reuse-noise",
        "--steps",
        "2",
        "-o",
        hy.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("schedule file"));
    // The 10-step reference run, through the CLI.
    let a = &meta["apply10"];
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images").join(a["image"].as_str().unwrap()).to_str().unwrap(),
        "--prompt",
        a["prompt"].as_str().unwrap(),
        "--steps",
        &a["steps"].to_string(),
        "--noise",
        f.join("goldens/apply10_noise.safetensors").to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&png).unwrap().to_rgb8();
    let want = g.read_f32("apply10.output").unwrap();
    let n = (img.width() * img.height()) as usize;
    let worst = img.pixels().enumerate().fold(0f32, |m, (i, p)| (0..3).fold(m, |m, c| m.max((p[c] as f32 - want[c * n + i] * 255.0).abs())));
    assert!(worst <= 0.51, "10-step pixels differ from diffusers' by up to {worst} levels");
    let out = visii(&["apply", "--model", "x", "--image", "y", "--prompt", "z", "-o", "o.png", "--size", "81x56"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiples of 8"));
    let _ = std::fs::remove_dir_all(dir);
}

/// `learn` without `--init` searches a caption; `apply --reuse-noise` regenerates the learning
/// noises; an instruction made on another model is refused unless `--allow-foreign-model`.
#[test]
fn automatic_caption_noise_reuse_and_foreign_models() {
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("visii-auto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ins = dir.join("auto.visii.safetensors");
    let model = f.join("tiny-ip2p");
    let out = visii(&[
        "learn",
        "--model",
        model.to_str().unwrap(),
        "--clip",
        f.join("tiny-clip").to_str().unwrap(),
        "--before",
        f.join("images/before.png").to_str().unwrap(),
        "--after",
        f.join("images/after.png").to_str().unwrap(),
        "-o",
        ins.to_str().unwrap(),
        "--steps",
        "3",
        "--caption-iterations",
        "20",
        "--seed",
        "2",
        "--backend",
        "ndarray",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("initial caption: \""), "{err}");
    let bytes = std::fs::read(&ins).unwrap();
    let loaded = visii_pipeline::instruction::load(&bytes, 32, 77).unwrap();
    let caption = &loaded.metadata["init_caption"];
    assert_eq!(caption.split(' ').count(), 8, "{caption}");
    assert!(caption.chars().all(|c| c == ' ' || c.is_ascii_lowercase()), "{caption}");
    assert_eq!(loaded.noise_reuse.as_ref().unwrap().timesteps.len(), 3);
    let text = String::from_utf8_lossy(&visii(&["inspect", ins.to_str().unwrap()]).stdout).to_string();
    assert!(text.contains("thumbnail") && text.contains("132x64 PNG") && text.contains("model_fingerprint"), "{text}");

    let before = f.join("images/before.png");
    let run = |instruction: &std::path::Path, extra: &[&str], name: &str| {
        let png = dir.join(name);
        let mut args = vec![
            "apply",
            "--model",
            model.to_str().unwrap(),
            "--image",
            before.to_str().unwrap(),
            "--instruction",
            instruction.to_str().unwrap(),
            "--steps",
            "2",
            "--size",
            "80x56",
            "-o",
            png.to_str().unwrap(),
            "--backend",
            "ndarray",
        ];
        args.extend_from_slice(extra);
        let out = visii(&args);
        (out, png)
    };
    let (out, reused) = run(&ins, &["--reuse-noise"], "reused.png");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (out, fresh) = run(&ins, &["--seed", "2"], "fresh.png");
    assert!(out.status.success());
    assert_ne!(std::fs::read(&reused).unwrap(), std::fs::read(&fresh).unwrap(), "reused noises equal fresh ones");
    let (_, again) = run(&ins, &["--reuse-noise"], "again.png");
    assert_eq!(std::fs::read(&reused).unwrap(), std::fs::read(&again).unwrap());

    // The same instruction, claiming another base model (same width): refused, naming both.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut base: serde_json::Value = serde_json::from_str(&meta["base_model"]).unwrap();
    base["name"] = "someone/other-model".into();
    base["signature"][0] = (base["signature"][0].as_f64().unwrap() * 1.5).into();
    meta.insert("base_model".into(), base.to_string());
    let t = st.tensor("instruction").unwrap();
    let foreign = dir.join("foreign.visii.safetensors");
    std::fs::write(&foreign, safetensors::serialize([("instruction", t)], Some(meta)).unwrap()).unwrap();
    let (out, _) = run(&foreign, &[], "foreign.png");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("learned on model \"someone/other-model\"")
            && err.contains("the loaded model is \"tiny-ip2p\"")
            && err.contains("--allow-foreign-model"),
        "{err}"
    );
    let (out, _) = run(&foreign, &["--allow-foreign-model"], "forced.png");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(dir);
}

/// `convert` writes a pack; `inspect`, `learn` (with the pack's own CLIP) and `apply` take it as --model.
#[test]
fn convert_then_use_the_pack() {
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("visii-pack-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = visii(&[
        "convert",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--clip",
        f.join("tiny-clip").to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--quant",
        "q8",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("shards") && text.contains("fingerprint"), "{text}");
    let out = visii(&["inspect", "--model", dir.to_str().unwrap(), "--clip", dir.join("clip").to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f.join("goldens/goldens.json")).unwrap()).unwrap();
    for c in ["unet", "vae", "text_encoder", "clip_vision"] {
        assert_eq!(report[c]["params"], meta["param_counts"][c], "{c}: the pack holds every parameter");
    }
    let ins = dir.join("p.visii.safetensors");
    let out = visii(&[
        "learn",
        "--model",
        dir.to_str().unwrap(),
        "--before",
        f.join("images/before.png").to_str().unwrap(),
        "--after",
        f.join("images/after.png").to_str().unwrap(),
        "-o",
        ins.to_str().unwrap(),
        "--steps",
        "2",
        "--size",
        "64",
        "--init",
        "a photo",
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // An instruction learned on the pack applies to the f32 model it came from (same identity).
    let png = dir.join("o.png");
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/tall.png").to_str().unwrap(),
        "--instruction",
        ins.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--steps",
        "2",
        "--size",
        "64",
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = visii(&[
        "convert",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--clip",
        f.join("tiny-clip").to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--quant",
        "q3",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown quantisation"));
    let _ = std::fs::remove_dir_all(dir);
}

/// With `--gpu-memory browser` on wgpu, `apply` reports the most device memory burn's allocator
/// held and had in use, as a tab's would (read at every layer).
#[test]
fn apply_reports_what_the_browser_allocator_held() {
    let f = fixtures();
    let png = std::env::temp_dir().join(format!("visii-apply-mem-{}.png", std::process::id()));
    let out = visii(&[
        "--gpu-memory",
        "browser",
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/before.png").to_str().unwrap(),
        "--prompt",
        "make it snowy",
        "-o",
        png.to_str().unwrap(),
        "--steps",
        "1",
        "--size",
        "32",
        "--backend",
        "wgpu",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let line = err.lines().find(|l| l.starts_with("GPU memory (browser allocator): held at most ")).unwrap_or_else(|| panic!("no report: {err}"));
    // "... held at most 12.3 MiB, at most 4.5 MiB in use; ..."
    let mib = |after: &str| -> f64 {
        let rest = &line[line.find(after).unwrap_or_else(|| panic!("{line}")) + after.len()..];
        let mut words = rest.split_whitespace();
        let v: f64 = words.next().unwrap().parse().unwrap();
        match words.next().unwrap().trim_end_matches([',', ';']) {
            "MiB" => v,
            "GiB" => v * 1024.0,
            u => panic!("unit {u} in {line}"),
        }
    };
    let (held, in_use) = (mib("held at most "), mib(", at most "));
    // The tiny networks' f32 weights alone are several MiB; a 32 px edit adds little.
    assert!(in_use >= 1.0 && in_use <= held && held < 256.0, "{line}");
    let _ = std::fs::remove_file(png);
}

/// A batch: three images (two named on the command line, one from a folder, one name taken twice)
/// edited into a folder give exactly what three single applies with the same seed give; a batch
/// needs a folder as -o and never writes into an input folder; an unreadable image in a batch is
/// named at the end while the others are written.
#[test]
fn batch_apply_equals_single_applies() {
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("visii-batch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inputs = dir.join("more");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::copy(f.join("images/before.png"), inputs.join("tall.png")).unwrap();
    std::fs::write(inputs.join("notes.txt"), "not an image").unwrap();
    let model = f.join("tiny-ip2p");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let common = ["--prompt", "make it snowy", "--steps", "2", "--size", "64", "--seed", "7", "--backend", "ndarray"];
    let run = |images: &[String], out: &std::path::Path| {
        let mut a: Vec<String> = vec!["apply".into(), "--model".into(), s(&model)];
        for i in images {
            a.extend(["--image".into(), i.clone()]);
        }
        a.extend(["-o".into(), s(out)]);
        a.extend(common.iter().map(|x| x.to_string()));
        Command::new(env!("CARGO_BIN_EXE_visii")).args(&a).output().expect("run visii")
    };
    let batch = dir.join("results");
    let out = run(&[s(&f.join("images/tall.png")), s(&f.join("images/after.png")), s(&inputs)], &batch);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&batch).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["after.png", "tall-2.png", "tall.png"]);
    for (input, name) in [(f.join("images/tall.png"), "tall.png"), (f.join("images/after.png"), "after.png"), (inputs.join("tall.png"), "tall-2.png")]
    {
        let single = dir.join(format!("single-{name}"));
        let o = run(&[s(&input)], &single);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            image::open(batch.join(name)).unwrap().to_rgb8().into_raw(),
            image::open(&single).unwrap().to_rgb8().into_raw(),
            "{name}: batch and single apply differ"
        );
    }
    // Several images need a folder as -o.
    let file_out = dir.join("single-tall.png");
    let o = run(&[s(&f.join("images/tall.png")), s(&f.join("images/after.png"))], &file_out);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("must be a folder"), "{}", String::from_utf8_lossy(&o.stderr));
    // Not into an input folder.
    let o = run(&[s(&inputs)], &inputs);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is an input folder"), "{}", String::from_utf8_lossy(&o.stderr));
    // An unreadable image among good ones: named, the others written.
    std::fs::write(inputs.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let partial = dir.join("partial");
    let o = run(&[s(&inputs)], &partial);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("1 of 2 images were not edited") && err.contains("broken.png"), "{err}");
    assert!(partial.join("tall.png").is_file() && !partial.join("broken.png").exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// `visii inspect FILE --model DIR`: an instruction learned at --lr 0 from a caption reads as that
/// caption.
#[test]
fn inspect_reads_an_instruction_as_words() {
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("visii-words-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ins = dir.join("w.visii.safetensors");
    let caption = "a watercolor painting of a cat";
    let out = visii(&[
        "learn",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--clip",
        f.join("tiny-clip").to_str().unwrap(),
        "--before",
        f.join("images/before.png").to_str().unwrap(),
        "--after",
        f.join("images/after.png").to_str().unwrap(),
        "-o",
        ins.to_str().unwrap(),
        "--steps",
        "1",
        "--size",
        "32",
        "--lr",
        "0",
        "--init",
        caption,
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = visii(&["inspect", ins.to_str().unwrap(), "--model", f.join("tiny-ip2p").to_str().unwrap(), "--json", "--words", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let words: Vec<&str> = v["words"].as_array().unwrap().iter().map(|l| l[0]["word"].as_str().unwrap()).collect();
    assert_eq!(words.join(" "), caption);
    assert!(v["words"].as_array().unwrap().iter().all(|l| l.as_array().unwrap().len() == 2));
    let out = visii(&["inspect", ins.to_str().unwrap(), "--model", f.join("tiny-ip2p").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("reads roughly as: \"{caption}\"")), "{text}");
    // Without --model: the metadata only, no words.
    let out = visii(&["inspect", ins.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["words"].is_null() && v["eos"].as_u64().is_some());
    let _ = std::fs::remove_dir_all(dir);
}

/// Instruction files other tools can use: diffusers' `StableDiffusionInstructPix2PixPipeline` given a
/// committed instruction file as `prompt_embeds` (tests/fixtures/generate_interop.py) and `visii
/// apply --instruction` with the same injected noises make the same image.
#[test]
fn diffusers_applies_an_instruction_file() {
    let f = fixtures();
    let png = std::env::temp_dir().join(format!("visii-interop-{}.png", std::process::id()));
    let out = visii(&[
        "apply",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--image",
        f.join("images/before.png").to_str().unwrap(),
        "--instruction",
        f.join("goldens/interop.visii.safetensors").to_str().unwrap(),
        "--noise",
        f.join("goldens/interop_noise.safetensors").to_str().unwrap(),
        "--steps",
        "3",
        "-o",
        png.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&png).unwrap().to_rgb8();
    let want = visii_models::WeightFile::from_path(f.join("goldens/interop_output.safetensors")).unwrap().read_f32("output").unwrap();
    let n = (img.width() * img.height()) as usize;
    assert_eq!(want.len(), 3 * n, "{}x{}", img.width(), img.height());
    let worst = img.pixels().enumerate().fold(0f32, |m, (i, p)| (0..3).fold(m, |m, c| m.max((p[c] as f32 - want[c * n + i] * 255.0).abs())));
    assert!(worst <= 0.51, "pixels differ from diffusers' by up to {worst} levels");
    // And the result is not the input: the instruction did something.
    let input = image::open(f.join("images/before.png")).unwrap().to_rgb8();
    let moved =
        img.pixels().zip(input.pixels()).map(|(a, b)| (0..3).map(|c| (a[c] as f32 - b[c] as f32).abs()).sum::<f32>()).sum::<f32>() / (3 * n) as f32;
    assert!(moved > 5.0, "mean change from the input {moved} levels");
    let _ = std::fs::remove_file(png);
}

#[test]
fn bench_times_one_attention_and_checks_its_shape() {
    // The fused attention on wgpu (lavapipe here): GFLOP per call (4 x 1 x 64 x 48 x 2 x 8) and the rate.
    let out = visii(&["bench", "--what", "attention", "--shape", "1,64,48,2,8", "--backends", "wgpu", "--runs", "1"]);
    let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{err}");
    assert!(text.contains("Attention [1, 64, 48, 2, 8]: 0.0 GFLOP per call") && text.contains("  wgpu: ") && text.contains("GFLOP/s"), "{text}");
    // A shape of the wrong length, and one whose tensors would not fit: refused before anything runs.
    let out = visii(&["bench", "--what", "attention", "--shape", "1,2,3", "--backends", "wgpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("5 positive sizes") && err.contains("attention: batch,queries,keys,heads,head_dim"), "{err}");
    let out = visii(&["bench", "--what", "attention", "--shape", "1048576,1048576,1048576,8,40", "--backends", "wgpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("at most 2^28") && !err.contains("panicked"), "{err}");
}
