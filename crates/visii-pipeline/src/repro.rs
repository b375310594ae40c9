//! The reproducibility interface: explicit timesteps and noises for learning (`--schedule`) and
//! explicit noises for sampling (`--noise`), as safetensors files, so runs can be compared step by
//! step with a reference implementation.

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::apply::Noise;
use crate::error::{PipelineError, Result};

/// A learning schedule: step k uses timestep `timesteps[k]` and noise `noises[k]`.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub timesteps: Vec<usize>,
    pub noises: Vec<Vec<f32>>,
}

fn bad(what: &str, m: impl std::fmt::Display) -> PipelineError {
    PipelineError::Config(format!("{what}: {m}"))
}

fn floats(st: &SafeTensors, what: &str, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = st.tensor(name).map_err(|_| bad(what, format!("no `{name}` tensor")))?;
    if t.dtype() != Dtype::F32 {
        return Err(bad(what, format!("`{name}` must be f32, found {:?}", t.dtype())));
    }
    Ok((t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(), t.shape().to_vec()))
}

fn split(v: Vec<f32>, n: usize) -> Vec<Vec<f32>> {
    let per = v.len() / n.max(1);
    v.chunks(per.max(1)).map(|c| c.to_vec()).collect()
}

/// `timesteps` [N] int64 (or int32) and `noises` [N, 4, h, w] f32.
pub fn read_schedule(bytes: &[u8]) -> Result<Schedule> {
    let what = "schedule file";
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(what, e))?;
    let t = st.tensor("timesteps").map_err(|_| bad(what, "no `timesteps` tensor"))?;
    let timesteps: Vec<usize> = match t.dtype() {
        Dtype::I64 => t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize).collect(),
        Dtype::I32 => t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as usize).collect(),
        d => return Err(bad(what, format!("`timesteps` must be int64, found {d:?}"))),
    };
    let (noises, shape) = floats(&st, what, "noises")?;
    if shape.first() != Some(&timesteps.len()) || timesteps.is_empty() {
        return Err(bad(what, format!("{} timesteps but noises of shape {shape:?}", timesteps.len())));
    }
    if let Some(t) = timesteps.iter().find(|&&t| t >= 100_000) {
        return Err(bad(what, format!("timestep {t} is out of range")));
    }
    Ok(Schedule { noises: split(noises, timesteps.len()), timesteps })
}

/// `init` [1, 4, h, w] and `step_noise` [steps, 4, h, w], both f32.
pub fn read_noise(bytes: &[u8]) -> Result<(Noise, usize)> {
    let what = "noise file";
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(what, e))?;
    let (init, _) = floats(&st, what, "init")?;
    let (steps, shape) = floats(&st, what, "step_noise")?;
    let n = *shape.first().ok_or_else(|| bad(what, "`step_noise` is a scalar"))?;
    Ok((Noise::Given { init, steps: split(steps, n) }, n))
}
