//! The one place where the redis client's errors become [`broker_core::Error`]s (keeping the
//! client error as the source).

use std::time::Duration;

use broker_core::{Error, ErrorKind};
use redis::RedisError;

/// Maps a redis error from `what` (an operation, naming the redacted address where it helps).
pub(crate) fn map(what: &str, error: RedisError) -> Error {
    let kind = if error.kind() == redis::ErrorKind::AuthenticationFailed
        || error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
    {
        ErrorKind::Connection
    } else if error.is_timeout() {
        ErrorKind::Timeout
    } else if error.kind() == redis::ErrorKind::InvalidClientConfig {
        ErrorKind::InvalidInput
    } else {
        ErrorKind::Backend
    };
    Error::new(kind, format!("{what}: {error}")).with_source(error)
}

/// A connection-level failure: connecting, authenticating or the connection breaking.
pub(crate) fn connection(what: &str, error: RedisError) -> Error {
    Error::new(ErrorKind::Connection, format!("{what}: {error}")).with_source(error)
}

/// `Timeout` for `what` after `after`.
pub(crate) fn timeout(what: &str, after: Duration) -> Error {
    Error::new(ErrorKind::Timeout, format!("{what}: no answer within {after:?}"))
}

/// Runs a redis future bounded by `limit`, mapping both failures.
pub(crate) async fn bounded<T>(
    what: &str,
    limit: Duration,
    future: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> broker_core::Result<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(map(what, error)),
        Err(_) => Err(timeout(what, limit)),
    }
}

/// [`bounded`], with the operation's description built only when it failed (`what` formats the
/// address: an allocation per call that the hot paths (PUBLISH, XADD, XACK) need not pay).
pub(crate) async fn bounded_with<T>(
    what: impl FnOnce() -> String,
    limit: Duration,
    future: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> broker_core::Result<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(map(&what(), error)),
        Err(_) => Err(timeout(&what(), limit)),
    }
}

/// Whether the server said the consumer group or stream does not exist (`NOGROUP`).
pub(crate) fn is_no_group(error: &RedisError) -> bool {
    error.code() == Some("NOGROUP") || error.to_string().contains("NOGROUP")
}

/// Whether the server said the consumer group exists already (`BUSYGROUP`).
pub(crate) fn is_busy_group(error: &RedisError) -> bool {
    error.code() == Some("BUSYGROUP") || error.to_string().contains("BUSYGROUP")
}
