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
    let out = visii(&[
        "inspect",
        "--model",
        f.join("tiny-ip2p").to_str().unwrap(),
        "--clip",
        f.join("tiny-clip").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("goldens/goldens.json")).unwrap()).unwrap();
    for c in ["unet", "vae", "text_encoder", "clip_vision"] {
        assert_eq!(report[c]["params"], meta["param_counts"][c], "{c}");
    }
    assert_eq!(report["unet"]["in_channels"], 8);
    assert_eq!(report["vae"]["downscale"], 8);
    assert_eq!(report["text_encoder"]["pad_id"], 49407);
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
