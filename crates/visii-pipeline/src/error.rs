//! Typed errors of the pipeline.

use visii_models::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("instruction file: {0}")]
    Instruction(String),
    /// An instruction learned on another base model.
    #[error("instruction file: {0}")]
    ForeignModel(String),
    #[error("cancelled")]
    Cancelled,
    /// A readback from the device failed: the GPU was lost (reset, removed, out of memory) and
    /// nothing more can run on it.
    #[error("the GPU device was lost or failed: {0}")]
    Gpu(String),
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

impl From<visii_formats::FormatError> for PipelineError {
    fn from(e: visii_formats::FormatError) -> Self {
        PipelineError::Model(e.into())
    }
}
