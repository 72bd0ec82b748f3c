//! Every SQS / SNS SDK error becomes a [`broker_core::Error`] here, keeping the SDK error as its source.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use broker_core::{Error, ErrorKind, Result};

/// Error codes meaning the service refused the credentials or the signature.
const CREDENTIAL_CODES: &[&str] = &[
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidSignatureException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "AccessDenied",
    "AccessDeniedException",
    "AuthorizationError",
    "InvalidSecurity",
];

/// Error codes meaning the service rejected a name or a value.
const INPUT_CODES: &[&str] = &[
    "InvalidParameterValue",
    "InvalidParameter",
    "InvalidParameterCombination",
    "InvalidAttributeName",
    "InvalidAttributeValue",
    "InvalidMessageContents",
    "MissingParameter",
    "ValidationError",
    "InvalidParameterException",
    "QueueAlreadyExists",
];

/// A failed SDK call `what` against `endpoint`.
pub(crate) fn sdk<E, R>(what: &str, endpoint: &str, error: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let (kind, detail) = match &error {
        SdkError::TimeoutError(_) => (ErrorKind::Timeout, "the SDK's operation timeout expired".to_string()),
        SdkError::DispatchFailure(failure) => {
            let why = if failure.is_timeout() {
                "no connection within the connect timeout"
            } else {
                "nothing answered (is the SQS server running there?)"
            };
            (ErrorKind::Connection, format!("cannot reach {endpoint}: {why}"))
        }
        SdkError::ResponseError(_) => {
            (ErrorKind::Connection, format!("{endpoint} answered something that is not SQS/SNS"))
        }
        SdkError::ConstructionFailure(_) => (ErrorKind::InvalidInput, "the request could not be built".to_string()),
        _ => {
            let code = error.code().unwrap_or("unknown");
            let message = error.message().unwrap_or("");
            if CREDENTIAL_CODES.contains(&code) {
                (
                    ErrorKind::Connection,
                    format!(
                        "the service refused the credentials ({code}: {message}): check access_key_id / \
                         secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the region"
                    ),
                )
            } else if INPUT_CODES.contains(&code) {
                (ErrorKind::InvalidInput, format!("the service rejected the request ({code}): {message}"))
            } else {
                (ErrorKind::Backend, format!("{code}: {message}"))
            }
        }
    };
    Error::new(kind, format!("{what}: {detail}")).with_source(error)
}

/// A call `what` did not finish within `limit`.
pub(crate) fn timeout(what: &str, limit: Duration) -> Error {
    Error::new(ErrorKind::Timeout, format!("{what} did not finish within {limit:?}"))
}

/// Runs `future` (one SDK call) bounded by `limit`, mapping both failures.
pub(crate) async fn bounded<T, E, R>(
    what: &str,
    endpoint: &str,
    limit: Duration,
    future: impl Future<Output = std::result::Result<T, SdkError<E, R>>>,
) -> Result<T>
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(sdk(what, endpoint, error)),
        Err(_) => Err(timeout(what, limit)),
    }
}
