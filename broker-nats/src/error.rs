//! Every async-nats error becomes a [`broker_core::Error`] here, keeping the client error as its source.

use std::time::Duration;

use async_nats::ConnectErrorKind;
use broker_core::{Error, ErrorKind};

/// A failed `connect()` to `servers` (already redacted).
pub(crate) fn connect(error: async_nats::ConnectError, servers: &str) -> Error {
    let (kind, what) = match error.kind() {
        ConnectErrorKind::ServerParse => (ErrorKind::InvalidInput, "the server address does not parse"),
        ConnectErrorKind::AuthorizationViolation => (
            ErrorKind::Connection,
            "the server refused the credentials (authorization violation): check user/password or token",
        ),
        ConnectErrorKind::Authentication => (ErrorKind::Connection, "authentication failed (credentials unusable)"),
        ConnectErrorKind::Tls => (ErrorKind::Connection, "the TLS set-up or handshake failed"),
        ConnectErrorKind::TimedOut => (ErrorKind::Connection, "the connection attempt timed out"),
        ConnectErrorKind::Dns => (ErrorKind::Connection, "the server name does not resolve"),
        ConnectErrorKind::Io | ConnectErrorKind::MaxReconnects => {
            (ErrorKind::Connection, "nothing answered (is nats-server running there?)")
        }
    };
    Error::new(kind, format!("cannot connect to NATS at {servers}: {what}: {error}")).with_source(error)
}

/// `connect()` did not finish within the connect timeout.
pub(crate) fn connect_timeout(servers: &str, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("cannot connect to NATS at {servers}: no connection within the connect timeout of {timeout:?}"),
    )
}

/// A network operation `what` did not finish within `timeout`.
pub(crate) fn timeout(what: &str, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("{what} did not finish within {timeout:?} (is the NATS connection down? it reconnects by itself)"),
    )
}

/// A core publish that the client refused.
pub(crate) fn publish(error: async_nats::PublishError, topic: &str) -> Error {
    let kind = match error.kind() {
        async_nats::client::PublishErrorKind::InvalidSubject => ErrorKind::InvalidInput,
        async_nats::client::PublishErrorKind::MaxPayloadExceeded => ErrorKind::InvalidInput,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, format!("publish to {topic:?}: {error}")).with_source(error)
}

/// A flush that failed: the connection is closed.
pub(crate) fn flush(error: async_nats::client::FlushError, topic: &str) -> Error {
    Error::new(ErrorKind::Connection, format!("publish to {topic:?}: the message could not be flushed: {error}"))
        .with_source(error)
}

/// A subscribe the client refused.
pub(crate) fn subscribe(error: async_nats::SubscribeError, topic: &str) -> Error {
    Error::new(ErrorKind::Connection, format!("subscribe to {topic:?}: {error}")).with_source(error)
}

/// Any other client or JetStream error during `what`.
pub(crate) fn backend(what: &str, error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::Backend, format!("{what}: {error}")).with_source(error)
}

/// A JetStream publish whose acknowledgement failed.
pub(crate) fn jetstream_publish(error: async_nats::jetstream::context::PublishError, topic: &str) -> Error {
    use async_nats::jetstream::context::PublishErrorKind as K;
    let kind = match error.kind() {
        K::TimedOut => ErrorKind::Timeout,
        K::BrokenPipe | K::MaxAckPending => ErrorKind::Connection,
        K::MaxPayloadExceeded => ErrorKind::InvalidInput,
        _ => ErrorKind::Backend,
    };
    Error::new(kind, format!("JetStream publish to {topic:?}: {error}")).with_source(error)
}
