//! Schedulers from `scheduler/scheduler_config.json`: the training noise schedule (scaled-linear
//! betas, sigma space) and diffusers' `EulerAncestralDiscreteScheduler` for sampling. Noise is always
//! an argument: nothing here draws random numbers, so every step can be golden-tested.

use burn::tensor::Tensor;
use serde::Deserialize;

use crate::error::{PipelineError, Result};

/// The fields of `scheduler_config.json` we use (diffusers defaults otherwise).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub prediction_type: String,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    /// diffusers' explicit betas (one per training timestep, in place of the schedule) and its
    /// zero-terminal-SNR rescaling: read only to refuse them (the schedule here is computed from
    /// `beta_start`, `beta_end` and `beta_schedule`; a model that needs either would sample wrongly).
    #[serde(skip_serializing)]
    pub trained_betas: Option<serde_json::Value>,
    #[serde(skip_serializing)]
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: "epsilon".into(),
            timestep_spacing: "linspace".into(),
            steps_offset: 1,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

impl SchedulerConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = visii_formats::config::from_json(text).map_err(|e| PipelineError::Config(format!("scheduler_config.json: {e}")))?;
        if c.prediction_type != "epsilon" {
            return Err(PipelineError::Config(format!(
                "scheduler_config.json: `prediction_type` {:?} is not supported (only epsilon)",
                visii_formats::text::printable_short(&c.prediction_type, 40)
            )));
        }
        c.validate().map_err(|m| PipelineError::Config(format!("scheduler_config.json: {m}")))?;
        Ok(c)
    }

    /// Every field the schedules are computed from, naming the one that is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let max = visii_formats::config::MAX_TRAIN_TIMESTEPS;
        if !(2..=max).contains(&self.num_train_timesteps) {
            return Err(format!("`num_train_timesteps` is {}, expected 2..={max}", self.num_train_timesteps));
        }
        let (a, b) = (self.beta_start, self.beta_end);
        if !(a.is_finite() && b.is_finite() && a > 0.0 && a <= b && b < 1.0) {
            return Err(format!("`beta_start` {a} and `beta_end` {b} must satisfy 0 < beta_start <= beta_end < 1"));
        }
        if self.steps_offset >= self.num_train_timesteps {
            return Err(format!("`steps_offset` {} is not below `num_train_timesteps` {}", self.steps_offset, self.num_train_timesteps));
        }
        if !["linspace", "leading", "trailing"].contains(&self.timestep_spacing.as_str()) {
            return Err(format!(
                "`timestep_spacing` {:?} is not supported (linspace, leading, trailing)",
                visii_formats::text::printable_short(&self.timestep_spacing, 40)
            ));
        }
        if self.trained_betas.is_some() {
            return Err("`trained_betas` (an explicit beta per timestep) is not supported: the betas are computed from beta_start, beta_end and beta_schedule".into());
        }
        if self.rescale_betas_zero_snr {
            return Err("`rescale_betas_zero_snr` true is not supported (the schedule is not rescaled to zero terminal SNR here)".into());
        }
        if !["scaled_linear", "linear"].contains(&self.beta_schedule.as_str()) {
            return Err(format!(
                "`beta_schedule` {:?} is not supported (scaled_linear, linear)",
                visii_formats::text::printable_short(&self.beta_schedule, 40)
            ));
        }
        Ok(())
    }

    /// `alphas_cumprod`, computed in f32 as diffusers does.
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match self.beta_schedule.as_str() {
            "scaled_linear" => {
                let (a, b) = ((self.beta_start as f32).sqrt(), (self.beta_end as f32).sqrt());
                (0..n).map(|i| a + (b - a) * i as f32 / (n - 1) as f32).map(|v| v * v).collect()
            }
            "linear" => (0..n).map(|i| self.beta_start as f32 + (self.beta_end - self.beta_start) as f32 * i as f32 / (n - 1) as f32).collect(),
            other => return Err(PipelineError::Config(format!("beta_schedule `{other}` (scaled_linear or linear)"))),
        };
        let mut acc = 1f32;
        Ok(betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect())
    }

    /// Training sigmas `sqrt((1 - abar_t) / abar_t)` for t = 0..T-1.
    pub fn train_sigmas(&self) -> Result<Vec<f32>> {
        Ok(self.alphas_cumprod()?.iter().map(|a| ((1.0 - a) / a).sqrt()).collect())
    }
}

/// Euler-ancestral sampling over `steps` inference steps (diffusers' arithmetic).
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    /// Timesteps passed to the UNet (fractional with `linspace` spacing).
    pub timesteps: Vec<f32>,
    /// One sigma per timestep, then 0.
    pub sigmas: Vec<f32>,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(PipelineError::Config("at least one sampling step is needed".into()));
        }
        let t_max = (cfg.num_train_timesteps - 1) as f32;
        let timesteps: Vec<f32> = match cfg.timestep_spacing.as_str() {
            "linspace" => (0..steps).rev().map(|i| if steps == 1 { 0.0 } else { (i as f64 * t_max as f64 / (steps - 1) as f64) as f32 }).collect(),
            "leading" => {
                let ratio = cfg.num_train_timesteps / steps;
                (0..steps).rev().map(|i| (i * ratio + cfg.steps_offset) as f32).collect()
            }
            "trailing" => {
                let ratio = cfg.num_train_timesteps as f64 / steps as f64;
                (0..steps).map(|i| (cfg.num_train_timesteps as f64 - i as f64 * ratio).round() as f32 - 1.0).collect()
            }
            other => return Err(PipelineError::Config(format!("timestep_spacing `{other}`"))),
        };
        let train = cfg.train_sigmas()?;
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| {
                // np.interp over integer positions
                let t = (t as f64).clamp(0.0, (train.len() - 1) as f64);
                let i = t.floor() as usize;
                let j = (i + 1).min(train.len() - 1);
                let f = t - i as f64;
                (train[i] as f64 * (1.0 - f) + train[j] as f64 * f) as f32
            })
            .collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas })
    }

    /// The initial latent is `noise * init_noise_sigma` (the largest sigma for linspace / trailing).
    pub fn init_noise_sigma(&self, cfg: &SchedulerConfig) -> f32 {
        let max = self.sigmas.iter().cloned().fold(0f32, f32::max);
        if cfg.timestep_spacing == "linspace" || cfg.timestep_spacing == "trailing" {
            max
        } else {
            (max * max + 1.0).sqrt()
        }
    }

    /// `sample / sqrt(sigma_i^2 + 1)`: the UNet's input at step `i`.
    pub fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        let s = self.sigmas[i];
        sample.div_scalar((s * s + 1.0).sqrt())
    }

    /// The clean latent `sample` predicts at step `i` with the noise prediction `eps`:
    /// `sample - sigma_i eps` (what a live preview shows).
    pub fn pred_original(&self, eps: Tensor<4>, i: usize, sample: Tensor<4>) -> Tensor<4> {
        sample - eps.mul_scalar(self.sigmas[i])
    }

    /// One ancestral step from `sample` with the noise prediction `eps` and the injected `noise`.
    pub fn step(&self, eps: Tensor<4>, i: usize, sample: Tensor<4>, noise: Tensor<4>) -> Tensor<4> {
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let sigma_up = ((to * to * (from * from - to * to)) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        // x0 = sample - sigma * eps; derivative = (sample - x0) / sigma = eps
        let dt = sigma_down - from;
        sample + eps.mul_scalar(dt) + noise.mul_scalar(sigma_up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip2p_schedule_values() {
        let cfg = SchedulerConfig::default();
        let s = cfg.train_sigmas().unwrap();
        // diffusers: sigmas[0] = 0.02916753, sigmas[999] = 14.6146 for the SD scaled-linear schedule.
        assert!((s[0] - 0.029167).abs() < 1e-5, "{}", s[0]);
        assert!((s[999] - 14.6146).abs() < 1e-3, "{}", s[999]);
        let e = EulerAncestral::new(&cfg, 20).unwrap();
        assert_eq!(e.timesteps.len(), 20);
        assert_eq!(e.timesteps[0], 999.0);
        assert!((e.timesteps[1] - 946.4211).abs() < 1e-3, "{}", e.timesteps[1]);
        assert_eq!(*e.sigmas.last().unwrap(), 0.0);
        assert!((e.init_noise_sigma(&cfg) - 14.6146).abs() < 1e-3);
    }
}
