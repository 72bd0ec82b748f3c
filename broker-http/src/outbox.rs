//! The publisher side over HTTP: the shared inbox / retry / failover publisher
//! ([`broker_registry::outbox`]) with a transport that POSTs Go Micro's JSON body to a node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::{Error, Message, Result};
use broker_registry::outbox::{self, DeliveryCounters, OutboxConfig, Outcome, Transport, error_chain};
use broker_registry::{Cache, Node};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::SECRET_HEADER;
use crate::config::HttpConfig;
use crate::tls;
use crate::wire::{self, BROADCAST_VERSION, Dialect};

/// The HTTP broker's outbox.
pub(crate) type Outbox = outbox::Outbox<HttpTransport>;

/// Builds the outbox of a connected broker.
pub(crate) fn new(config: HttpConfig, cache: Arc<Cache>, counters: Arc<DeliveryCounters>) -> Result<Arc<Outbox>> {
    let bounds = OutboxConfig {
        max_in_flight: config.max_in_flight,
        max_attempts: config.max_attempts,
        inbox_max_messages: config.inbox_max_messages,
        inbox_max_bytes: config.inbox_max_bytes,
        inbox_total_bytes: config.inbox_total_bytes,
        inbox_overflow: config.inbox_overflow,
    };
    Ok(outbox::Outbox::new(bounds, HttpTransport::new(config)?, cache, counters))
}

/// How many nodes' request targets [`HttpTransport`] keeps (entries of nodes that left are
/// otherwise never removed); past it, every other entry goes. Every subscription is a node of its
/// own, so this is sized for tens of thousands of topics (at 4,096, a publisher to 10,000 topics
/// found almost none of its targets: the map was cleared every 4,096 of them).
const MAX_CACHED_TARGETS: usize = 32_768;

/// One POST of Go Micro's JSON body to one node, in the configured dialect.
pub(crate) struct HttpTransport {
    config: HttpConfig,
    client: Client<tls::Connector, Full<Bytes>>,
    /// The shared secret as a header value, checked once at connect.
    secret: Option<HeaderValue>,
    /// Per node id, the URI of its deliveries, built once: encoding the query and parsing the
    /// URI cost more than the rest of preparing a POST.
    targets: Mutex<HashMap<String, Arc<NodeTarget>>>,
}

/// Where the deliveries to one node go.
struct NodeTarget {
    address: String,
    secure: bool,
    /// `scheme://address/path?id=<id>&attempt=`: an attempt after the first appends its number.
    prefix: String,
    /// The URI of a first attempt, parsed.
    first: Uri,
    /// The `Host` header (the client would otherwise format one per request).
    host: HeaderValue,
}

impl HttpTransport {
    fn new(config: HttpConfig) -> Result<HttpTransport> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.request_timeout));
        // https URIs must reach the TLS layer, which then wraps the TCP connection.
        connector.enforce_http(false);
        let connector = tls::connector(connector, config.tls.as_ref())?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.max_in_flight)
            .build(connector);
        let secret = match &config.secret {
            None => None,
            Some(secret) => Some(HeaderValue::from_str(secret).map_err(|_| {
                Error::invalid_input(
                    "parameter `secret` is not a valid HTTP header value: use visible ASCII characters and spaces",
                )
            })?),
        };
        Ok(HttpTransport { config, client, secret, targets: Mutex::new(HashMap::new()) })
    }

    /// The target of `node`, from the map when its address and scheme are unchanged.
    fn target(&self, node: &Node) -> std::result::Result<Arc<NodeTarget>, String> {
        let secure = node.metadata.get("secure").map(String::as_str) == Some("true");
        let mut targets = self.targets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(target) = targets.get(&node.id) {
            if target.address == node.address && target.secure == secure {
                return Ok(Arc::clone(target));
            }
        }
        let scheme = if secure { "https" } else { "http" };
        let id: String = form_urlencoded::byte_serialize(node.id.as_bytes()).collect();
        let prefix = format!("{scheme}://{}{}?id={id}&attempt=", node.address, self.config.dialect.path());
        let first = Uri::try_from(format!("{prefix}1")).map_err(|error| {
            format!("node {} has an address that makes no URI ({:?}): {error}", node.id, node.address)
        })?;
        let host = host_header(&first)
            .ok_or_else(|| format!("node {} has an address with no host name ({:?})", node.id, node.address))?;
        let target = Arc::new(NodeTarget { address: node.address.clone(), secure, prefix, first, host });
        if targets.len() >= MAX_CACHED_TARGETS {
            let mut keep = false;
            targets.retain(|_, _| {
                keep = !keep;
                keep
            });
        }
        targets.insert(node.id.clone(), Arc::clone(&target));
        Ok(target)
    }

    async fn post(&self, node: &Node, body: &Bytes, attempt: u32) -> Outcome {
        let target = match self.target(node) {
            Ok(target) => target,
            Err(reason) => return Outcome::Refused(reason),
        };
        if target.secure && (!tls::ENABLED || self.config.tls.is_none()) {
            return Outcome::Refused(format!(
                "node {} serves https only, and this broker has no TLS {}; refusing to send in clear text",
                node.id,
                if tls::ENABLED { "settings (set tls.ca_file)" } else { "support (cargo feature `tls`)" }
            ));
        }
        let uri = match attempt {
            1 => target.first.clone(),
            n => match Uri::try_from(format!("{}{n}", target.prefix)) {
                Ok(uri) => uri,
                Err(error) => return Outcome::Refused(format!("cannot build a request to {}: {error}", node.address)),
            },
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(http::header::HOST, target.host.clone())
            .header(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secret) = &self.secret {
            request = request.header(SECRET_HEADER, secret.clone());
        }
        let request = match request.body(Full::new(body.clone())) {
            Ok(request) => request,
            Err(error) => return Outcome::Refused(format!("cannot build a request to {}: {error}", node.address)),
        };
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| error_chain(&e))?;
            let status = response.status();
            // Read the answer to the end, so that the connection is reused; its text is only
            // wanted for an error.
            let body = Limited::new(response.into_body(), 64 * 1024).collect().await;
            let detail = match body {
                Ok(body) if !status.is_success() => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                _ => String::new(),
            };
            Ok::<_, String>((status, detail))
        };
        match tokio::time::timeout(self.config.request_timeout, exchange).await {
            Err(_) => Outcome::Unreachable(format!("no answer within {:?}", self.config.request_timeout)),
            Ok(Err(error)) => Outcome::Unreachable(error),
            Ok(Ok((status, detail))) => classify(status, detail),
        }
    }
}

impl Transport for HttpTransport {
    fn backend(&self) -> &'static str {
        crate::NAME
    }

    fn broadcast_version(&self) -> &str {
        BROADCAST_VERSION
    }

    fn service_name(&self, topic: &str) -> String {
        self.config.dialect.service_name(topic)
    }

    fn serves(&self, node: &Node, topic: &str) -> bool {
        match self.config.dialect {
            // Today's dialect shares one service name: keep only this topic's HTTP nodes.
            Dialect::Current => {
                node.metadata.get("broker").map(String::as_str) == Some("http")
                    && node.metadata.get("topic").map(String::as_str) == Some(topic)
            }
            Dialect::Legacy => true,
        }
    }

    fn encode(&self, topic: &str, message: &Message) -> Bytes {
        wire::encode(topic, message, self.config.dialect)
    }

    async fn send(&self, node: &Node, body: &Bytes, attempt: u32) -> Outcome {
        self.post(node, body, attempt).await
    }
}

/// The `Host` header hyper-util's client would write for `uri`: the host, and the port unless it
/// is the scheme's default.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
    match uri.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

fn classify(status: StatusCode, detail: String) -> Outcome {
    if status.is_success() {
        // No text to build for the usual answer.
        return Outcome::Delivered;
    }
    let detail = if detail.is_empty() { status.to_string() } else { format!("{status}: {detail}") };
    match status.as_u16() {
        404 => Outcome::Gone,
        500..=599 => Outcome::HandlerFailed(detail),
        _ => Outcome::Refused(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_that_is_no_header_value_is_refused_at_connect() {
        let options = broker_core::BrokerOptions::new().with_param("secret", "line\nbreak");
        let config = HttpConfig::from_options(&options).unwrap();
        let Err(error) = HttpTransport::new(config) else { panic!("a secret with a newline was accepted") };
        assert_eq!(error.kind(), broker_core::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn the_host_header_is_the_clients_own() {
        let host = |uri: &str| host_header(&Uri::try_from(uri).unwrap()).map(|h| h.to_str().unwrap().to_owned());
        assert_eq!(host("http://127.0.0.1:8080/_sub?id=a").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(host("http://node.local:80/").as_deref(), Some("node.local"));
        assert_eq!(host("https://node.local:443/").as_deref(), Some("node.local"));
        assert_eq!(host("https://node.local:80/").as_deref(), Some("node.local:80"));
        assert_eq!(host("http://[::1]:9000/").as_deref(), Some("[::1]:9000"));
    }

    #[test]
    fn statuses_are_classified() {
        assert!(matches!(classify(StatusCode::OK, String::new()), Outcome::Delivered));
        assert!(matches!(classify(StatusCode::NO_CONTENT, String::new()), Outcome::Delivered));
        assert!(matches!(classify(StatusCode::NOT_FOUND, String::new()), Outcome::Gone));
        assert!(
            matches!(classify(StatusCode::INTERNAL_SERVER_ERROR, "x".into()), Outcome::HandlerFailed(d) if d.contains('x'))
        );
        assert!(matches!(classify(StatusCode::PAYLOAD_TOO_LARGE, String::new()), Outcome::Refused(_)));
        assert!(matches!(classify(StatusCode::UNAUTHORIZED, String::new()), Outcome::Refused(_)));
    }
}
