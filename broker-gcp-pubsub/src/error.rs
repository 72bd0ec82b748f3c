//! Every google-cloud-pubsub error becomes a [`broker_core::Error`] here, keeping the client error
//! as its source.

use std::time::Duration;

use broker_core::{Error, ErrorKind};
use google_cloud_gax::error::rpc::Code;

/// The gRPC status code of a client error, if the service answered with one.
pub(crate) fn code(error: &google_cloud_pubsub::Error) -> Option<Code> {
    error.status().map(|status| status.code)
}

/// A failed Pub/Sub call `what` on `endpoint` (already printable).
pub(crate) fn rpc(what: &str, endpoint: &str, error: google_cloud_pubsub::Error) -> Error {
    let (kind, hint) = classify(&error);
    Error::new(kind, format!("{what} on {endpoint}: {hint}: {error}")).with_source(error)
}

/// The kind of a client error, and a hint at what to check.
pub(crate) fn classify(error: &google_cloud_pubsub::Error) -> (ErrorKind, &'static str) {
    match code(error) {
        Some(Code::InvalidArgument | Code::OutOfRange) => {
            (ErrorKind::InvalidInput, "the service rejected a name or value")
        }
        Some(Code::NotFound) => (ErrorKind::Backend, "not found (was it deleted, or is the project id right?)"),
        Some(Code::Unauthenticated) => (
            ErrorKind::Connection,
            "the service refused the credentials (UNAUTHENTICATED): check credentials_file or ADC",
        ),
        Some(Code::PermissionDenied) => {
            (ErrorKind::Connection, "the credentials lack a permission (PERMISSION_DENIED): grant roles/pubsub.editor")
        }
        Some(Code::Unavailable) => (ErrorKind::Connection, "the service is unavailable (is the emulator running?)"),
        Some(Code::DeadlineExceeded) => (ErrorKind::Timeout, "the call's deadline expired"),
        Some(Code::ResourceExhausted) => (ErrorKind::Overflow, "a quota or flow-control limit was reached"),
        Some(_) => (ErrorKind::Backend, "the service refused the call"),
        None if error.is_timeout() => (ErrorKind::Timeout, "the call timed out"),
        None if error.is_authentication() => (ErrorKind::Connection, "no usable credentials"),
        None if error.http_status_code().is_some() => (
            ErrorKind::Backend,
            "the endpoint answered with an HTTP error (is it Pub/Sub, and does it take this name?)",
        ),
        None if error.is_connect() || error.is_io() || error.is_transport() => {
            (ErrorKind::Connection, "nothing answered (is the emulator or the network up?)")
        }
        None => (ErrorKind::Backend, "the call failed"),
    }
}

/// Building a client for `endpoint` failed (credentials not found or not loadable, most often).
pub(crate) fn client(endpoint: &str, error: google_cloud_gax::client_builder::Error) -> Error {
    let hint = if error.is_default_credentials() {
        "no Application Default Credentials (set GOOGLE_APPLICATION_CREDENTIALS, the parameter credentials_file, \
         or use an emulator with PUBSUB_EMULATOR_HOST)"
    } else {
        "the client could not be built"
    };
    Error::new(ErrorKind::Connection, format!("cannot connect to {endpoint}: {hint}: {error}")).with_source(error)
}

/// A network operation `what` did not finish within `limit`.
pub(crate) fn timeout(what: &str, endpoint: &str, limit: Duration) -> Error {
    Error::new(ErrorKind::Timeout, format!("{what} on {endpoint} did not finish within {limit:?}"))
}

/// A failed publish `what` on `endpoint`.
pub(crate) fn publish(what: &str, endpoint: &str, error: google_cloud_pubsub::error::PublishError) -> Error {
    use google_cloud_pubsub::error::PublishError;
    let kind = match &error {
        PublishError::Rpc(rpc) => match code(rpc) {
            Some(Code::InvalidArgument | Code::OutOfRange) => ErrorKind::InvalidInput,
            Some(Code::Unauthenticated | Code::PermissionDenied | Code::Unavailable) => ErrorKind::Connection,
            Some(Code::DeadlineExceeded) => ErrorKind::Timeout,
            Some(Code::ResourceExhausted) => ErrorKind::Overflow,
            Some(_) => ErrorKind::Backend,
            None if rpc.is_timeout() => ErrorKind::Timeout,
            None if rpc.is_connect() || rpc.is_io() || rpc.is_transport() || rpc.is_authentication() => {
                ErrorKind::Connection
            }
            None => ErrorKind::Backend,
        },
        PublishError::OrderingKeyPaused => ErrorKind::Backend,
        _ => ErrorKind::Closed,
    };
    Error::new(kind, format!("{what} on {endpoint}: {error}")).with_source(error)
}
