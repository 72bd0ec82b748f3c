//! One error type for every backend, with a small [`ErrorKind`] to match on.
//!
//! Backends map their client's errors into an [`ErrorKind`] in one place (their `error.rs`)
//! and keep the client error as [`std::error::Error::source`], as sqlx does.

use std::fmt;

/// A boxed error from anywhere: what handlers return and what backends keep as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in the few categories a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker is not connected: call `connect()` first (or it was disconnected).
    NotConnected,
    /// The backend's server could not be reached or the connection broke.
    Connection,
    /// A network operation, a full buffer or a drain did not finish in time.
    Timeout,
    /// The backend cannot honour an option that was asked for.
    Unsupported,
    /// The caller passed something malformed: an empty topic, a bad address, a zero limit.
    InvalidInput,
    /// No backend of that name exists.
    UnknownBackend,
    /// The backend exists but is not compiled into or linked with this binary.
    BackendNotLinked,
    /// A body or envelope could not be encoded or decoded.
    Codec,
    /// A message handler returned an error or panicked.
    Handler,
    /// A bounded buffer is full and its policy is to reject rather than wait or drop.
    Overflow,
    /// The subscription or broker was closed while the operation was under way.
    Closed,
    /// Any other error reported by the backend's server or client.
    Backend,
}

impl ErrorKind {
    /// A short lower-case name, used in error messages and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotConnected => "not connected",
            ErrorKind::Connection => "connection error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::UnknownBackend => "unknown backend",
            ErrorKind::BackendNotLinked => "backend not linked",
            ErrorKind::Codec => "codec error",
            ErrorKind::Handler => "handler error",
            ErrorKind::Overflow => "overflow",
            ErrorKind::Closed => "closed",
            ErrorKind::Backend => "backend error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every broker operation.
///
/// ```
/// use broker_core::{Error, ErrorKind};
/// let err = Error::unsupported("memory", "delay", "this backend delivers immediately");
/// assert_eq!(err.kind(), ErrorKind::Unsupported);
/// assert!(err.to_string().contains("delay"));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind` with a message that says what was wrong and, where it helps, what would be right.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// Keeps `source` (the backend client's error) behind this one.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// `NotConnected` for an operation on `backend` before `connect()` or after `disconnect()`.
    pub fn not_connected(backend: &str) -> Self {
        Error::new(ErrorKind::NotConnected, format!("the {backend} broker is not connected: call connect() first"))
    }

    /// `Unsupported` naming the option, the backend, and why or what to do instead.
    pub fn unsupported(backend: &str, option: &str, why: &str) -> Self {
        Error::new(
            ErrorKind::Unsupported,
            format!("option `{option}` is not supported by the {backend} backend: {why}"),
        )
    }

    /// `InvalidInput` with the given explanation.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// `Codec` for a body or envelope that could not be encoded or decoded.
    pub fn codec(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Codec, message)
    }

    /// `Handler` wrapping what a message handler returned.
    pub fn handler(source: BoxError) -> Self {
        // A handler that already returned one of ours keeps its kind and message visible.
        let message = format!("message handler failed: {source}");
        Error::new(ErrorKind::Handler, message).with_source(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn display_has_kind_and_message() {
        let err = Error::invalid_input("topic must not be empty");
        assert_eq!(err.to_string(), "invalid input: topic must not be empty");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.source().is_none());
    }

    #[test]
    fn source_is_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::new(ErrorKind::Connection, "cannot reach 127.0.0.1:1").with_source(io);
        let source = err.source().expect("source kept");
        assert_eq!(source.to_string(), "refused");
    }

    #[test]
    fn unsupported_names_option_and_backend() {
        let err = Error::unsupported("redis", "queue", "Redis Pub/Sub has no consumer groups");
        let text = err.to_string();
        assert!(text.starts_with("unsupported: "), "{text}");
        assert!(text.contains("`queue`") && text.contains("redis"), "{text}");
    }

    #[test]
    fn handler_error_wraps_any_error() {
        let err = Error::handler("boom".into());
        assert_eq!(err.kind(), ErrorKind::Handler);
        assert!(err.to_string().contains("boom"));
        assert_eq!(err.source().map(|s| s.to_string()).as_deref(), Some("boom"));
    }
}
