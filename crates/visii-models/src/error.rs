//! Typed errors of the model crate: each says what was wrong and, where it helps, what to do.

/// Everything that can go wrong while reading configs, weights, tokenizers and images.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    /// A config file is missing a field or is not the JSON we expect.
    #[error("invalid config {path}: {message}")]
    Config { path: String, message: String },
    /// Bytes that are not a safetensors file.
    #[error("{source_name} is not a valid safetensors file ({message}); the download may be truncated or corrupt: fetch it again")]
    BadSafetensors { source_name: String, message: String },
    /// Bytes that are not a PyTorch checkpoint we can read.
    #[error("{source_name} is not a PyTorch checkpoint this app can read ({message}); a truncated download needs fetching again, other files converting to safetensors")]
    BadTorchFile { source_name: String, message: String },
    /// The config asks for a tensor the weights do not have.
    #[error("{source_name}: missing tensor `{name}` (the config expects shape {expected:?}); the weights do not match this model's config.json")]
    MissingTensor { source_name: String, name: String, expected: Vec<usize> },
    /// A tensor exists but its shape differs from what the config implies.
    #[error("{source_name}: tensor `{name}` has shape {found:?} but the config expects {expected:?}")]
    ShapeMismatch { source_name: String, name: String, found: Vec<usize>, expected: Vec<usize> },
    /// The weights hold a tensor the architecture does not use (and it is not a known buffer).
    #[error(
        "{source_name}: unexpected tensor `{name}`, not part of the {component} described by its config.json (is the config from another model?)"
    )]
    UnexpectedTensor { source_name: String, name: String, component: String },
    /// A dtype we cannot turn into f32.
    #[error("{source_name}: tensor `{name}` has dtype {dtype}, only F32, F16, BF16 and F64 weights are supported")]
    UnsupportedDtype { source_name: String, name: String, dtype: String },
    /// A config value the implementation does not support.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The device cannot do what was asked (f16 arithmetic).
    #[error("this GPU cannot {0}")]
    DeviceLacks(String),
    /// The tokenizer files could not be used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An image could not be decoded or is unusable.
    #[error("image: {0}")]
    Image(String),
    /// A config, image or preprocessing refusal from the byte readers.
    #[error(transparent)]
    Format(#[from] visii_formats::FormatError),
    /// A folder is not a model folder of the expected kind.
    #[error("{path} is not {expected}: {message}")]
    NotAModel { path: String, expected: String, message: String },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
