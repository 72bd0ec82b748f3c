//! The publisher side: the shared inbox / retry / failover publisher ([`broker_registry::outbox`])
//! over a transport that calls `/Broker/Publish` on a node, through ONE HTTP/2 channel per node
//! address, kept and reused (Go Micro dials a new connection for every message).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::{Message, Result};
use broker_registry::outbox::{self, DeliveryCounters, Outcome, Transport, error_chain};
use broker_registry::{Cache, Node};
use bytes::Bytes;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

use crate::config::GrpcConfig;
use crate::proto::{self, Empty, Outgoing};
use crate::{ATTEMPT_METADATA, BROADCAST_VERSION, SECRET_METADATA, lock, tls};

/// The gRPC broker's outbox.
pub(crate) type Outbox = outbox::Outbox<GrpcTransport>;

/// Builds the outbox of a connected broker.
pub(crate) fn new(
    config: GrpcConfig,
    tls: Option<tls::Connector>,
    cache: Arc<Cache>,
    counters: Arc<DeliveryCounters>,
) -> Arc<Outbox> {
    let bounds = config.outbox.clone();
    let transport = GrpcTransport { config, tls, channels: Mutex::new(HashMap::new()) };
    outbox::Outbox::new(bounds, transport, cache, counters)
}

/// One unary `Publish` call to one node.
pub(crate) struct GrpcTransport {
    config: GrpcConfig,
    /// Dials secure nodes; `None` without TLS options (secure nodes are then refused).
    tls: Option<tls::Connector>,
    /// One channel per node address and security (all subscriptions of a peer broker share its
    /// address). A channel reconnects by itself; one that failed is dropped, so that peers that
    /// went away do not accumulate.
    channels: Mutex<HashMap<(String, bool), Channel>>,
}

impl GrpcTransport {
    fn channel(&self, address: &str, secure: bool) -> std::result::Result<Channel, String> {
        let key = (address.to_string(), secure);
        if let Some(channel) = lock(&self.channels).get(&key) {
            return Ok(channel.clone());
        }
        // `http://` for secure nodes too: our connector does the TLS, and tonic would refuse an
        // `https://` URI (or wrap it in a second TLS) if another crate turned on its TLS features.
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("{address:?} is not a usable node address: {e}"))?
            .connect_timeout(self.config.request_timeout)
            .timeout(self.config.request_timeout)
            .tcp_nodelay(true);
        let channel = if secure {
            match &self.tls {
                #[cfg(feature = "tls")]
                Some(connector) => endpoint.connect_with_connector_lazy(connector.clone()),
                #[cfg(not(feature = "tls"))]
                Some(never) => match *never {},
                None => return Err(no_tls_for(address)),
            }
        } else {
            endpoint.connect_lazy()
        };
        Ok(lock(&self.channels).entry(key).or_insert(channel).clone())
    }

    fn forget_channel(&self, address: &str, secure: bool) {
        lock(&self.channels).remove(&(address.to_string(), secure));
    }

    async fn call(&self, node: &Node, body: &Bytes, attempt: u32) -> Outcome {
        let secure = node.metadata.get("secure").map(String::as_str) == Some("true");
        let outgoing = Outgoing { encoded: body.clone(), id: node.id.clone() };
        let size = prost::Message::encoded_len(&outgoing);
        if size > self.config.max_message_bytes {
            return Outcome::Refused(format!(
                "the message is {size} bytes encoded, over max_message_bytes ({})",
                self.config.max_message_bytes
            ));
        }
        let channel = match self.channel(&node.address, secure) {
            Ok(channel) => channel,
            Err(reason) => return Outcome::Refused(reason),
        };
        let mut request = tonic::Request::new(outgoing);
        request.set_timeout(self.config.request_timeout);
        let metadata = request.metadata_mut();
        if let Ok(value) = attempt.to_string().parse() {
            metadata.insert(ATTEMPT_METADATA, value);
        }
        if let Some(secret) = &self.config.secret {
            match secret.parse() {
                Ok(value) => {
                    metadata.insert(SECRET_METADATA, value);
                }
                Err(_) => return Outcome::Refused("the shared secret is not a valid gRPC metadata value".into()),
            }
        }
        let mut client = tonic::client::Grpc::new(channel).max_encoding_message_size(self.config.max_message_bytes);
        let exchange = async {
            client.ready().await.map_err(|e| tonic::Status::unavailable(error_chain(&e)))?;
            client
                .unary::<Outgoing, Empty, _>(
                    request,
                    PathAndQuery::from_static(proto::PUBLISH_PATH),
                    ProstCodec::<Outgoing, Empty>::default(),
                )
                .await
        };
        // Bounded here too: the channel's own timeout does not cover waiting for it to be ready.
        let outcome =
            match tokio::time::timeout(self.config.request_timeout + Duration::from_millis(100), exchange).await {
                Err(_) => Outcome::Unreachable(format!("no answer within {:?}", self.config.request_timeout)),
                Ok(Ok(_)) => Outcome::Delivered,
                Ok(Err(status)) => classify(&status),
            };
        if matches!(outcome, Outcome::Unreachable(_)) {
            self.forget_channel(&node.address, secure);
        }
        outcome
    }
}

impl Transport for GrpcTransport {
    fn backend(&self) -> &'static str {
        crate::NAME
    }

    fn broadcast_version(&self) -> &str {
        BROADCAST_VERSION
    }

    fn service_name(&self, topic: &str) -> String {
        crate::service_name(topic)
    }

    fn encode(&self, topic: &str, message: &Message) -> Bytes {
        proto::encode_without_id(topic, message)
    }

    async fn send(&self, node: &Node, body: &Bytes, attempt: u32) -> Outcome {
        self.call(node, body, attempt).await
    }
}

/// Why a secure node is not called: never in clear text.
fn no_tls_for(address: &str) -> String {
    let how = if crate::tls::ENABLED {
        "this publisher has no TLS options (BrokerOptions::tls with the peers' ca_file)"
    } else {
        "this build of the grpc backend has no TLS (cargo feature `tls`)"
    };
    format!("the node at {address} serves gRPC over TLS only, and {how}; refusing to send in clear text")
}

/// What a status from a subscriber (ours, or Go Micro's, which answers `Empty` even when its
/// handler failed) means for the message.
pub(crate) fn classify(status: &tonic::Status) -> Outcome {
    let detail = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Ok => Outcome::Delivered,
        Code::NotFound => Outcome::Gone,
        // The handler failed or nacked (ours: Internal; Go Micro's errors arrive as Unknown).
        Code::Internal | Code::Unknown | Code::Aborted => Outcome::HandlerFailed(detail),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Outcome::Unreachable(detail),
        // Too large, bad message, wrong secret, not a broker at that address: for good.
        _ => Outcome::Refused(detail),
    }
}

/// Checks a message against `max_message_bytes` before it goes into the inbox (with room for a
/// node id of our own shape), so that a message no subscriber would accept fails at `publish`.
pub(crate) fn check_size(config: &GrpcConfig, topic: &str, message: &Message) -> Result<()> {
    let size = proto::encoded_len(topic, NODE_ID_ROOM, message);
    if size > config.max_message_bytes {
        return Err(broker_core::Error::invalid_input(format!(
            "the message to {topic:?} is {size} bytes encoded, over the gRPC backend's max_message_bytes ({}); \
             raise the parameter on publishers and subscribers alike",
            config.max_message_bytes
        )));
    }
    Ok(())
}

/// As long as our node ids (`broker-<uuid>.<uuid>`).
const NODE_ID_ROOM: &str = "broker-00000000-0000-0000-0000-000000000000.00000000-0000-0000-0000-000000000000";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert!(matches!(classify(&tonic::Status::not_found("x")), Outcome::Gone));
        assert!(matches!(classify(&tonic::Status::internal("boom")), Outcome::HandlerFailed(d) if d.contains("boom")));
        assert!(matches!(classify(&tonic::Status::unavailable("x")), Outcome::Unreachable(_)));
        assert!(matches!(classify(&tonic::Status::resource_exhausted("x")), Outcome::Refused(_)));
        assert!(matches!(classify(&tonic::Status::unauthenticated("x")), Outcome::Refused(_)));
        assert!(matches!(classify(&tonic::Status::unimplemented("x")), Outcome::Refused(_)));
    }
}
