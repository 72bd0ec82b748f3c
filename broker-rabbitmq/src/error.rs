//! Every lapin error becomes a [`broker_core::Error`] here, keeping the client error as its source.

use std::future::Future;
use std::time::Duration;

use broker_core::{Error, ErrorKind, Result};

/// Says whether a lapin error is the server refusing the login.
fn is_access_refused(error: &lapin::Error) -> bool {
    let text = error.to_string();
    text.contains("ACCESS_REFUSED") || text.contains("access refused") || text.contains("authentication")
}

/// A failed connection attempt to `address` (already redacted).
pub(crate) fn connect(error: lapin::Error, address: &str) -> Error {
    let what = if is_access_refused(&error) {
        "the server refused the credentials (ACCESS_REFUSED): check user and password in the address"
    } else {
        match error.kind() {
            lapin::ErrorKind::IOError(_) => "nothing answered (is rabbitmq-server running there?)",
            lapin::ErrorKind::ProtocolError(_) => "the server closed the connection during the handshake",
            _ => "the connection could not be opened",
        }
    };
    Error::new(ErrorKind::Connection, format!("cannot connect to RabbitMQ at {address}: {what}: {error}"))
        .with_source(error)
}

/// `connect()` did not finish within the connect timeout.
pub(crate) fn connect_timeout(address: &str, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("cannot connect to RabbitMQ at {address}: no connection within the connect timeout of {timeout:?}"),
    )
}

/// A network operation `what` did not finish within `timeout`.
pub(crate) fn timeout(what: &str, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("{what} did not finish within {timeout:?} (is the RabbitMQ connection down? it reconnects by itself)"),
    )
}

/// A failed AMQP operation `what`: connection-level failures are `Connection`, the rest `Backend`.
pub(crate) fn amqp(what: &str, error: lapin::Error) -> Error {
    let kind = match error.kind() {
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::InvalidChannelState(..)
        | lapin::ErrorKind::MissingHeartbeatError => ErrorKind::Connection,
        _ if error.is_amqp_hard_error() => ErrorKind::Connection,
        _ => ErrorKind::Backend,
    };
    Error::new(kind, format!("{what}: {error}")).with_source(error)
}

/// Runs `future` (one AMQP operation) bounded by `limit`, mapping both failures.
pub(crate) async fn bounded<T>(
    what: &str,
    limit: Duration,
    future: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(amqp(what, error)),
        Err(_) => Err(timeout(what, limit)),
    }
}
