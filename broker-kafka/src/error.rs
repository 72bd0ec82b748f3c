//! Every rdkafka error becomes a [`broker_core::Error`] here, keeping the client error as its source.

use std::time::Duration;

use broker_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};

/// The kind of an rdkafka error code.
fn code_kind(code: Code) -> ErrorKind {
    match code {
        Code::MessageTimedOut | Code::OperationTimedOut | Code::RequestTimedOut | Code::TimedOutQueue => {
            ErrorKind::Timeout
        }
        Code::BrokerTransportFailure
        | Code::AllBrokersDown
        | Code::Resolve
        | Code::NetworkException
        | Code::BrokerDestroy
        | Code::DestroyBroker
        | Code::Authentication
        | Code::SaslAuthenticationFailed
        | Code::UnsupportedSASLMechanism
        | Code::IllegalSASLState
        | Code::TopicAuthorizationFailed
        | Code::GroupAuthorizationFailed
        | Code::ClusterAuthorizationFailed => ErrorKind::Connection,
        Code::InvalidTopic
        | Code::MessageSizeTooLarge
        | Code::MessageBatchTooLarge
        | Code::InvalidArgument
        | Code::InvalidPartitions
        | Code::InvalidReplicationFactor
        | Code::InvalidConfig
        | Code::PolicyViolation => ErrorKind::InvalidInput,
        Code::QueueFull => ErrorKind::Overflow,
        _ => ErrorKind::Backend,
    }
}

/// Whether an error code says the credentials were refused.
pub(crate) fn is_auth(code: Code) -> bool {
    matches!(
        code,
        Code::Authentication
            | Code::SaslAuthenticationFailed
            | Code::UnsupportedSASLMechanism
            | Code::IllegalSASLState
            | Code::TopicAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::ClusterAuthorizationFailed
    )
}

/// The kind of any rdkafka error.
pub(crate) fn kind_of(error: &KafkaError) -> ErrorKind {
    match error {
        KafkaError::ClientConfig(..) | KafkaError::Nul(_) => ErrorKind::InvalidInput,
        KafkaError::ClientCreation(_) => ErrorKind::InvalidInput,
        KafkaError::Canceled => ErrorKind::Closed,
        KafkaError::Subscription(_) => ErrorKind::InvalidInput,
        other => other.rdkafka_error_code().map_or(ErrorKind::Backend, code_kind),
    }
}

/// A failed rdkafka operation `what`.
pub(crate) fn kafka(what: &str, error: KafkaError) -> Error {
    let kind = kind_of(&error);
    let hint = match error.rdkafka_error_code() {
        Some(code) if is_auth(code) => " (the server refused the credentials or the access: check the SASL settings)",
        Some(Code::MessageSizeTooLarge) => " (raise the parameter max_message_bytes, and the server's limit)",
        _ => "",
    };
    Error::new(kind, format!("{what}: {error}{hint}")).with_source(error)
}

/// A failed client creation: a bad setting (often an `rdkafka.` parameter, or TLS without the
/// `ssl` feature).
pub(crate) fn client_config(what: &str, error: KafkaError) -> Error {
    let text = error.to_string();
    let feature = if text.contains("ssl") || text.contains("OpenSSL") || text.contains("sasl") {
        " (TLS and SCRAM need broker-kafka's cargo feature `ssl`)"
    } else {
        ""
    };
    Error::new(ErrorKind::InvalidInput, format!("cannot create the Kafka {what}: {text}{feature}")).with_source(error)
}

/// `connect()` could not reach or use the servers `servers` within `timeout`.
pub(crate) fn connect(error: KafkaError, servers: &str, sasl: bool, timeout: Duration) -> Error {
    let what = match error.rdkafka_error_code() {
        Some(code) if is_auth(code) => "the server refused the credentials (check the SASL settings)".to_string(),
        Some(_) if sasl => format!(
            "no usable connection within the connect timeout of {timeout:?} (is the Kafka server running there, \
             and does its listener accept SASL with these credentials?)"
        ),
        Some(Code::OperationTimedOut | Code::TimedOutQueue | Code::RequestTimedOut | Code::MessageTimedOut)
        | Some(Code::AllBrokersDown | Code::BrokerTransportFailure | Code::Resolve) => {
            format!("no answer within the connect timeout of {timeout:?} (is the Kafka server running there?)")
        }
        _ => "the cluster metadata could not be read".to_string(),
    };
    Error::new(ErrorKind::Connection, format!("cannot connect to Kafka at {servers}: {what}: {error}"))
        .with_source(error)
}

/// A network operation `what` did not finish within `timeout`.
pub(crate) fn timeout(what: &str, timeout: Duration) -> Error {
    Error::new(ErrorKind::Timeout, format!("{what} did not finish within {timeout:?} (is the Kafka server reachable?)"))
}

/// A blocking rdkafka call could not be run (the runtime is shutting down).
pub(crate) fn join(what: &str, error: tokio::task::JoinError) -> Error {
    Error::new(ErrorKind::Closed, format!("{what}: the blocking task did not complete: {error}")).with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn kinds() {
        let e = kafka("publish", KafkaError::MessageProduction(Code::MessageTimedOut));
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.source().is_some());
        assert_eq!(kafka("x", KafkaError::MetadataFetch(Code::AllBrokersDown)).kind(), ErrorKind::Connection);
        assert_eq!(kafka("x", KafkaError::MessageProduction(Code::QueueFull)).kind(), ErrorKind::Overflow);
        assert_eq!(kafka("x", KafkaError::AdminOp(Code::InvalidTopic)).kind(), ErrorKind::Backend);
        assert_eq!(kafka("x", KafkaError::MessageProduction(Code::InvalidTopic)).kind(), ErrorKind::InvalidInput);
        assert_eq!(kafka("x", KafkaError::Canceled).kind(), ErrorKind::Closed);
        let auth = kafka("x", KafkaError::MetadataFetch(Code::SaslAuthenticationFailed));
        assert_eq!(auth.kind(), ErrorKind::Connection);
        assert!(auth.to_string().contains("SASL"), "{auth}");
        let c = connect(KafkaError::MetadataFetch(Code::OperationTimedOut), "h:1", false, Duration::from_secs(1));
        assert_eq!(c.kind(), ErrorKind::Connection);
        assert!(c.to_string().contains("h:1"));
    }
}
