//! PyTorch `.bin` checkpoints (what transformers and diffusers wrote by default through 2023) load
//! like safetensors: `tests/fixtures/generate_torch.py` saved the tiny models again with
//! `torch.save` (fp16 variant, fp32, a sharded index, a transposed view, a storage offset), and
//! every tensor must read back exactly as in the committed safetensors files.

#![allow(deprecated)] // Device::ndarray: the reference CPU backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use visii_models::loader::weight_files_in;
use visii_models::source::ByteSource;
use visii_models::{ClipFolder, Ip2pFolder, ModelError, WeightFile};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Every tensor of `st` is in `bin` with the same shape and values (`half`: the .bin holds f16).
fn same_tensors(bin: &[WeightFile], st: &WeightFile, half: bool) -> usize {
    let mut bin_names: Vec<&str> = bin.iter().flat_map(|f| f.names()).collect();
    let mut st_names: Vec<&str> = st.names().collect();
    bin_names.sort();
    st_names.sort();
    assert_eq!(bin_names, st_names, "the same tensor names");
    let mut checked = 0;
    for name in st_names {
        let f = bin.iter().find(|f| f.shape(name).is_some()).unwrap();
        assert_eq!(f.shape(name), st.shape(name), "{name}");
        let Ok(want) = st.read_f32(name) else { continue }; // integer buffers (position_ids)
        let got = f.read_f32(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want: Vec<f32> = if half { want.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect() } else { want };
        assert_eq!(got, want, "{name}");
        checked += 1;
    }
    checked
}

#[test]
fn every_tensor_reads_back_as_in_the_safetensors_checkpoint() {
    let (fx, bin) = (fixtures(), fixtures().join("torch-bin"));
    let st = |p: &str| WeightFile::from_path(fx.join(p)).unwrap();
    let unet = weight_files_in(&bin.join("unet"), "diffusion_pytorch_model").unwrap();
    let vae = weight_files_in(&bin.join("vae"), "diffusion_pytorch_model").unwrap();
    let text = weight_files_in(&bin.join("text_encoder"), "model").unwrap();
    let clip = weight_files_in(&bin.join("clip"), "model").unwrap();
    assert_eq!((unet.len(), vae.len(), text.len(), clip.len()), (1, 1, 2, 1), "the fp16 variant, one file, two shards, one file");
    let n = same_tensors(&unet, &st("tiny-ip2p/unet/diffusion_pytorch_model.safetensors"), true)
        + same_tensors(&vae, &st("tiny-ip2p/vae/diffusion_pytorch_model.safetensors"), false)
        + same_tensors(&text, &st("tiny-ip2p/text_encoder/model.safetensors"), true)
        + same_tensors(&clip, &st("tiny-clip/model.safetensors"), true);
    assert!(n > 600, "{n} tensors compared");
    // The transposed view and the offset view were saved as such: their bytes are gathered.
    let w = &clip[0];
    let vp = w.read_f32("visual_projection.weight").unwrap();
    assert_eq!(w.shape("visual_projection.weight").unwrap().len(), 2);
    assert!(vp.iter().any(|v| *v != 0.0));
}

fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dest, keep);
        } else if keep(&p) {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// The tiny IP2P and CLIP folders with every safetensors file replaced by the `.bin` checkpoints.
fn bin_folders() -> (tempdir::Dir, PathBuf, PathBuf) {
    let dir = tempdir::Dir::new("visii-torch-bin");
    let (ip2p, clip) = (dir.path.join("ip2p"), dir.path.join("clip"));
    let not_st = |p: &Path| p.extension().is_none_or(|e| e != "safetensors");
    copy_tree(&fixtures().join("tiny-ip2p"), &ip2p, &not_st);
    copy_tree(&fixtures().join("tiny-clip"), &clip, &not_st);
    let bin = fixtures().join("torch-bin");
    for c in ["unet", "vae", "text_encoder"] {
        copy_tree(&bin.join(c), &ip2p.join(c), &|_| true);
    }
    copy_tree(&bin.join("clip"), &clip, &|_| true);
    (dir, ip2p, clip)
}

mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!("{tag}-{}-{:?}", std::process::id(), std::thread::current().id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[test]
fn folders_of_bin_checkpoints_load_every_network() {
    let (_dir, ip2p_dir, clip_dir) = bin_folders();
    let dev = Device::ndarray();
    let (bin, st) = (Ip2pFolder::open(&ip2p_dir).unwrap(), Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap());
    let (clip_bin, clip_st) = (ClipFolder::open(&clip_dir).unwrap(), ClipFolder::open(fixtures().join("tiny-clip")).unwrap());
    // Every network loads with no tensor missing or left over, and the same parameter count.
    assert_eq!(bin.unet(&dev).unwrap().params, st.unet(&dev).unwrap().params);
    assert_eq!(bin.text_encoder(&dev).unwrap().params, st.text_encoder(&dev).unwrap().params);
    assert_eq!(clip_bin.vision(&dev).unwrap().params, clip_st.vision(&dev).unwrap().params);
    // The fp32 VAE decodes exactly as the safetensors one.
    let (vb, vs) = (bin.vae(&dev).unwrap(), st.vae(&dev).unwrap());
    assert_eq!(vb.params, vs.params);
    let z: Vec<f32> = (0..4 * 4 * 6).map(|i| ((i * 37 % 11) as f32 - 5.0) / 4.0).collect();
    let z = || Tensor::<4>::from_data(TensorData::new(z.clone(), [1, 4, 4, 6]), &dev);
    let (a, b) = (vb.model.decode(z()).into_data().to_vec::<f32>().unwrap(), vs.model.decode(z()).into_data().to_vec::<f32>().unwrap());
    assert!(a.len() >= 3 * 4 * 6 && a.iter().all(|v| v.is_finite()));
    assert_eq!(a, b);
}

#[test]
fn unreadable_bin_files_say_why() {
    let bin = fixtures().join("torch-bin");
    let bytes = std::fs::read(bin.join("vae/diffusion_pytorch_model.bin")).unwrap();
    let open = |b: &[u8]| {
        let src: Arc<dyn ByteSource> = Arc::new(Arc::<[u8]>::from(b));
        WeightFile::open_torch("vae.bin", src).err().expect("refused").to_string()
    };
    let e = open(&bytes[..bytes.len() * 2 / 3]);
    assert!(e.contains("vae.bin") && e.contains("truncated"), "{e}");
    let e = open(&std::fs::read(bin.join("legacy.bin")).unwrap());
    assert!(e.contains("before PyTorch 1.6"), "{e}");
    let e = open(b"definitely not a checkpoint");
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");
    let empty = tempdir::Dir::new("visii-torch-none");
    let e = weight_files_in(&empty.path, "diffusion_pytorch_model").err().expect("nothing to load");
    assert!(matches!(e, ModelError::NotAModel { .. }) && e.to_string().contains("diffusion_pytorch_model.bin"), "{e}");
}
