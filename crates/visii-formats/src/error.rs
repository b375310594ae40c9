//! Errors of the readers that are not plain byte-format refusals (those are `String` reasons the
//! caller wraps with the file's name).

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A config file with a value outside what can be built, naming the file and the field.
    #[error("invalid config {path}: {message}")]
    Config { path: String, message: String },
    /// An image that cannot be decoded or used.
    #[error("image: {0}")]
    Image(String),
    /// A config value the implementation does not support.
    #[error("unsupported model: {0}")]
    Unsupported(String),
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;
