//! Options for a broker, a subscription and a publish, as Go Micro's `broker.Options`,
//! `SubscribeOptions` and `PublishOptions`.
//!
//! Every option is either honoured by a backend or rejected with an
//! [`Unsupported`](crate::ErrorKind::Unsupported) error: see [`Capabilities`](crate::Capabilities).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::message::Headers;

/// The environment variable naming the backend, as in Go Micro.
pub const ENV_BROKER: &str = "MICRO_BROKER";
/// The environment variable with comma-separated addresses, as in Go Micro.
pub const ENV_BROKER_ADDRESS: &str = "MICRO_BROKER_ADDRESS";

/// TLS settings. A backend that speaks TLS honours them; one that cannot rejects them at `connect()`.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsOptions {
    /// PEM file of the certificate authorities to trust; the system roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client's private key, for mutual TLS.
    pub key_file: Option<PathBuf>,
    /// Skip verifying the server certificate (tests only).
    pub insecure_skip_verify: bool,
}

impl TlsOptions {
    /// TLS with the system's roots and no client certificate.
    pub fn new() -> Self {
        TlsOptions::default()
    }

    /// Trusts the authorities in `path` (PEM).
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents the client certificate and key in `cert` and `key` (PEM).
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert_file = Some(cert.into());
        self.key_file = Some(key.into());
        self
    }

    /// Skips verification of the server's certificate.
    pub fn with_insecure_skip_verify(mut self, skip: bool) -> Self {
        self.insecure_skip_verify = skip;
        self
    }
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key file path is not secret, but keep Debug uniform with other secret-bearing options.
        f.debug_struct("TlsOptions")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file.as_ref().map(|_| "<set>"))
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

/// Options of a broker: where it connects, how long it waits, TLS, and backend-specific parameters.
///
/// ```
/// use std::time::Duration;
/// use broker_core::BrokerOptions;
/// let opts = BrokerOptions::new()
///     .with_addresses(["nats://127.0.0.1:4222"])
///     .with_connect_timeout(Duration::from_secs(2));
/// assert_eq!(opts.addresses, vec!["nats://127.0.0.1:4222".to_string()]);
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerOptions {
    /// Server addresses (or, for peer-to-peer backends, the address to listen on). Empty: the backend's default.
    pub addresses: Vec<String>,
    /// How long `connect()` may take.
    pub connect_timeout: Duration,
    /// How long a `publish()` may wait (for the server, or for room in a full buffer) before it fails with `Timeout`.
    pub publish_timeout: Duration,
    /// How long `disconnect()` waits for buffered and in-flight messages to be handled, and
    /// `unsubscribe()` for the subscription's running handlers.
    pub drain_timeout: Duration,
    /// TLS settings; `None` for plain connections.
    pub tls: Option<TlsOptions>,
    /// Backend-specific settings (for example `jetstream=true`). A backend rejects keys it does not know.
    pub params: BTreeMap<String, String>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            addresses: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            tls: None,
            params: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for BrokerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Addresses may carry credentials (amqp://user:password@host): never print them.
        let addresses: Vec<String> = self.addresses.iter().map(|a| redact_credentials(a)).collect();
        f.debug_struct("BrokerOptions")
            .field("addresses", &addresses)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("tls", &self.tls)
            .field("params", &self.params.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Query parameters whose values are secrets, hidden by [`redact_credentials`].
const SECRET_PARAMS: &[&str] = &["password", "pass", "passwd", "token", "secret", "sasl.password", "auth"];

/// Hides the secrets of an address: the password of `scheme://user:password@host` (or the whole
/// user info when it has no `:`), and the values of query parameters such as `password` or `token`.
///
/// ```
/// use broker_core::redact_credentials;
/// assert_eq!(redact_credentials("amqp://guest:s3cr3t@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
/// assert_eq!(redact_credentials("redis://127.0.0.1:6379/0?password=s3cr3t"), "redis://127.0.0.1:6379/0?password=***");
/// ```
pub fn redact_credentials(address: &str) -> String {
    let Some(scheme_end) = address.find("://").map(|i| i + 3) else { return address.to_string() };
    let (before_query, query) = match address.find('?') {
        Some(q) if q >= scheme_end => (&address[..q], Some(&address[q + 1..])),
        _ => (address, None),
    };
    let rest = &before_query[scheme_end..];
    // The user info ends at the last '@' before the query: a password may itself hold '/' or '@'.
    let mut out = String::with_capacity(address.len());
    out.push_str(&address[..scheme_end]);
    match rest.rfind('@') {
        Some(at) => {
            let user_info = &rest[..at];
            match user_info.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str("***"),
            }
            out.push_str(&rest[at..]);
        }
        None => out.push_str(rest),
    }
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if SECRET_PARAMS.iter().any(|s| key.eq_ignore_ascii_case(s)) => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

impl BrokerOptions {
    /// The defaults: no addresses (the backend's own default), 10 s connect and publish timeouts, 30 s drain.
    pub fn new() -> Self {
        BrokerOptions::default()
    }

    /// Reads `MICRO_BROKER_ADDRESS` (comma-separated) and `MICRO_BROKER_ENVELOPE` (the broker
    /// parameter `envelope`) from the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Like [`from_env`](Self::from_env) with a custom variable lookup (for tests and embedding).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let addresses = lookup(ENV_BROKER_ADDRESS).map(|v| parse_addresses(&v)).unwrap_or_default();
        let mut options = BrokerOptions { addresses, ..BrokerOptions::default() };
        if let Some(envelope) =
            lookup(crate::codec::ENV_ENVELOPE).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
        {
            options.params.insert(crate::codec::PARAM_ENVELOPE.to_string(), envelope);
        }
        options
    }

    /// Sets the addresses.
    pub fn with_addresses<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.addresses = addresses.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the publish timeout.
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets the drain timeout of `disconnect()` and `unsubscribe()`.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Sets TLS options.
    pub fn with_tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets one backend-specific parameter.
    pub fn with_param(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// Checks the values every backend relies on: non-zero timeouts and non-empty addresses.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("publish_timeout", self.publish_timeout),
            ("drain_timeout", self.drain_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::invalid_input(format!("{name} must be greater than zero")));
            }
        }
        if self.addresses.iter().any(|a| a.trim().is_empty()) {
            return Err(Error::invalid_input("an address in the address list is empty"));
        }
        Ok(())
    }
}

/// Splits a comma-separated address list, trimming blanks and dropping empty entries.
///
/// ```
/// assert_eq!(broker_core::parse_addresses(" a:1, ,b:2,"), vec!["a:1", "b:2"]);
/// ```
pub fn parse_addresses(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Options of one subscription.
///
/// ```
/// use broker_core::SubscribeOptions;
/// let opts = SubscribeOptions::new().with_queue("emails").with_concurrency(8);
/// assert_eq!(opts.queue.as_deref(), Some("emails"));
/// assert!(opts.auto_ack);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// The queue group: each message goes to one member of the group. `None` is broadcast:
    /// every subscriber gets every message.
    pub queue: Option<String>,
    /// Ack when the handler returns `Ok`, nack when it returns `Err` (default `true`). When `false`
    /// the handler acks or nacks through the [`Event`](crate::Event).
    pub auto_ack: bool,
    /// How many handlers of this subscription may run at once (default 1, which keeps order).
    pub concurrency: usize,
    /// How many times a nacked message is delivered again before it is dead-lettered to
    /// `<topic>.dlq`; `None` is the backend's default.
    pub max_redeliveries: Option<u32>,
    /// How many messages may wait in this subscription's buffer, where the backend has one.
    /// `None` is the backend's default.
    pub buffer_size: Option<usize>,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions { queue: None, auto_ack: true, concurrency: 1, max_redeliveries: None, buffer_size: None }
    }
}

impl SubscribeOptions {
    /// Broadcast, auto-ack, one handler at a time.
    pub fn new() -> Self {
        SubscribeOptions::default()
    }

    /// Joins queue group `queue`; an empty name means broadcast, as in Go Micro.
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        self.queue = if queue.is_empty() { None } else { Some(queue) };
        self
    }

    /// Turns auto-ack on or off.
    pub fn with_auto_ack(mut self, auto_ack: bool) -> Self {
        self.auto_ack = auto_ack;
        self
    }

    /// Sets the number of handlers that may run at once.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets how many redeliveries a nacked message gets before it is dead-lettered.
    pub fn with_max_redeliveries(mut self, max: u32) -> Self {
        self.max_redeliveries = Some(max);
        self
    }

    /// Sets the subscription's buffer size.
    pub fn with_buffer_size(mut self, size: usize) -> Self {
        self.buffer_size = Some(size);
        self
    }

    /// Checks what holds for every backend: a non-zero concurrency and buffer, a queue name without blanks.
    pub fn validate(&self) -> Result<()> {
        if self.concurrency == 0 {
            return Err(Error::invalid_input("concurrency must be at least 1"));
        }
        if self.buffer_size == Some(0) {
            return Err(Error::invalid_input("buffer_size must be at least 1"));
        }
        if let Some(queue) = &self.queue {
            if queue.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::invalid_input(format!(
                    "queue group name {queue:?} must not contain whitespace or control characters"
                )));
            }
        }
        Ok(())
    }
}

/// Options of one publish.
///
/// ```
/// use broker_core::PublishOptions;
/// let opts = PublishOptions::new().with_header("trace", "abc").with_ordering_key("user-42");
/// assert_eq!(opts.ordering_key.as_deref(), Some("user-42"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// Headers added to the message's own (they win over the message's on a clash).
    pub headers: Headers,
    /// Messages with the same key are delivered in publish order (Kafka key, SQS group id, ...).
    pub ordering_key: Option<String>,
    /// Deliver no earlier than this long after the publish.
    pub delay: Option<Duration>,
}

impl PublishOptions {
    /// No extra headers, no key, no delay.
    pub fn new() -> Self {
        PublishOptions::default()
    }

    /// Adds one header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Sets the ordering key.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Asks for delayed delivery.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

/// Checks a topic name as every backend needs it: non-empty, at most 255 bytes, no whitespace or
/// control characters, and no wildcard characters (`*`, `>`, `#`) that some servers would interpret.
pub fn validate_topic(topic: &str) -> Result<()> {
    if is_plain_ascii_topic(topic.as_bytes()) {
        return Ok(());
    }
    check_topic(topic)
}

/// The longest topic [`validate_topic`] accepts, in bytes.
const MAX_TOPIC_BYTES: usize = 255;

/// The full check of [`validate_topic`], saying what is wrong.
fn check_topic(topic: &str) -> Result<()> {
    const MAX: usize = MAX_TOPIC_BYTES;
    if topic.len() > MAX {
        return Err(Error::invalid_input(format!("topic is {} bytes long; at most {MAX} are allowed", topic.len())));
    }
    if topic.is_empty() {
        return Err(Error::invalid_input("topic must not be empty"));
    }
    if let Some(c) = topic.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid_input(format!(
            "topic {topic:?} contains {c:?}: whitespace and control characters are not allowed"
        )));
    }
    if let Some(c) = topic.chars().find(|c| matches!(c, '*' | '>' | '#')) {
        return Err(Error::invalid_input(format!(
            "topic {topic:?} contains the wildcard {c:?}: publish and subscribe to concrete topics"
        )));
    }
    if topic.starts_with('.') || topic.ends_with('.') || topic.contains("..") {
        return Err(Error::invalid_input(format!("topic {topic:?} has an empty segment between dots")));
    }
    Ok(())
}

/// The fast path of [`validate_topic`], on every publish: one pass over the bytes of a printable
/// ASCII topic that breaks no rule. Anything else (non-ASCII, or a rule broken) takes the full
/// check, which accepts or names what is wrong.
fn is_plain_ascii_topic(bytes: &[u8]) -> bool {
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else { return false };
    if bytes.len() > MAX_TOPIC_BYTES || first == b'.' || last == b'.' {
        return false;
    }
    // One table load per byte, no branch (the byte-by-byte comparisons were ~18 instructions a
    // byte, on every publish).
    let mut bad = 0u8;
    let mut previous = 0u8;
    for &b in bytes {
        let class = TOPIC_BYTE[usize::from(b)];
        bad |= (class & BAD) | (class & previous & DOT);
        previous = class;
    }
    bad == 0
}

/// [`TOPIC_BYTE`] of a byte no topic may hold: ASCII controls and whitespace (`<= b' '`), DEL and
/// every non-ASCII byte (`>= 0x7f`; the full check decides on those), the wildcards `*`, `>`, `#`.
const BAD: u8 = 1;
/// [`TOPIC_BYTE`] of `.`: two in a row are an empty segment.
const DOT: u8 = 2;
/// The class of each byte for [`is_plain_ascii_topic`]: [`BAD`], [`DOT`] or 0.
static TOPIC_BYTE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = if b <= b' ' || b >= 0x7f || b == b'*' || b == b'>' || b == b'#' {
            BAD
        } else if b == b'.' {
            DOT
        } else {
            0
        };
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn address_list_from_env() {
        let opts = BrokerOptions::from_lookup(|k| {
            (k == ENV_BROKER_ADDRESS).then(|| "nats://a:4222, nats://b:4222,,  ".to_string())
        });
        assert_eq!(opts.addresses, vec!["nats://a:4222", "nats://b:4222"]);
        assert!(BrokerOptions::from_lookup(|_| None).addresses.is_empty());
        assert!(BrokerOptions::from_lookup(|_| Some("  ".into())).addresses.is_empty());
        let enveloped = BrokerOptions::from_lookup(|k| (k == "MICRO_BROKER_ENVELOPE").then(|| "go-micro".to_string()));
        assert_eq!(enveloped.params.get("envelope").map(String::as_str), Some("go-micro"));
    }

    #[test]
    fn defaults_are_sane() {
        let s = SubscribeOptions::default();
        assert!(s.auto_ack);
        assert_eq!(s.concurrency, 1);
        assert_eq!(s.queue, None);
        assert!(s.validate().is_ok());
        assert!(BrokerOptions::default().validate().is_ok());
    }

    #[test]
    fn empty_queue_is_broadcast() {
        assert_eq!(SubscribeOptions::new().with_queue("").queue, None);
        assert_eq!(SubscribeOptions::new().with_queue("g").queue.as_deref(), Some("g"));
    }

    #[test]
    fn invalid_options_are_rejected() {
        let err = SubscribeOptions::new().with_concurrency(0).validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains("concurrency"));
        assert!(SubscribeOptions::new().with_buffer_size(0).validate().is_err());
        assert!(SubscribeOptions::new().with_queue("a b").validate().is_err());
        assert!(BrokerOptions::new().with_connect_timeout(Duration::ZERO).validate().is_err());
        assert!(BrokerOptions::new().with_addresses(["a", " "]).validate().is_err());
    }

    #[test]
    fn topics() {
        for good in ["user.registered", "a", "orders-v2", "é.ü", &"x".repeat(255)] {
            assert!(validate_topic(good).is_ok(), "{good}");
        }
        for bad in ["", " ", "a b", "a\n", "a.*", "a.>", "#", ".a", "a.", "a..b", &"x".repeat(256)] {
            let err = validate_topic(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn the_topic_fast_path_agrees_with_the_full_check() {
        let alphabet =
            ["a", "Z", "0", "-", "_", ":", "/", ".", "*", ">", "#", " ", "\t", "\x7f", "\x01", "é", "\u{a0}"];
        let mut topics = vec![String::new()];
        for _ in 0..3 {
            let longer: Vec<String> =
                topics.iter().flat_map(|t| alphabet.iter().map(move |c| format!("{t}{c}"))).collect();
            topics.extend(longer);
        }
        topics.extend(["x".repeat(255), "x".repeat(256)]);
        for topic in &topics {
            let full = check_topic(topic).is_ok();
            let fast = is_plain_ascii_topic(topic.as_bytes());
            assert!(!fast || full, "fast path accepts {topic:?}, the full check does not");
            let printable_ascii = topic.bytes().all(|b| (b'!'..=b'~').contains(&b));
            assert_eq!(fast, full && printable_ascii, "{topic:?}");
            assert_eq!(validate_topic(topic).is_ok(), full, "{topic:?}");
        }
    }

    #[test]
    fn debug_hides_credentials() {
        let opts = BrokerOptions::new()
            .with_addresses(["amqp://guest:secret@127.0.0.1:5672/%2f"])
            .with_param("token", "s3cr3t");
        let text = format!("{opts:?}");
        assert!(!text.contains("secret") && !text.contains("s3cr3t"), "{text}");
        assert!(text.contains("amqp://guest:***@127.0.0.1:5672/%2f"), "{text}");
        assert_eq!(redact_credentials("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_credentials("redis://tok@h/0"), "redis://***@h/0");
        assert_eq!(redact_credentials("amqp://user:pa/ss@host/vh"), "amqp://user:***@host/vh");
        assert_eq!(redact_credentials("amqp://user:p@ss@host/vh"), "amqp://user:***@host/vh");
        assert_eq!(
            redact_credentials("redis://host:6379/0?db=1&Password=secret&token=t"),
            "redis://host:6379/0?db=1&Password=***&token=***"
        );
        assert_eq!(redact_credentials("127.0.0.1:9092"), "127.0.0.1:9092");
    }
}
