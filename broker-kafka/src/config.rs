//! The Kafka backend's configuration, read from [`BrokerOptions`]: addresses and `params`.
//!
//! Every parameter is listed in [`PARAMS`]. Parameters prefixed `rdkafka.` are passed, without the
//! prefix, straight to librdkafka's client configuration of every client this backend makes
//! (producer, consumers, admin): that is the way to SASL and other settings this backend does not
//! name (`rdkafka.sasl.mechanism=SCRAM-SHA-256`, `rdkafka.sasl.username=…`,
//! `rdkafka.sasl.password=…`, `rdkafka.security.protocol=sasl_ssl`, …). They are applied last, so
//! they win over this backend's own settings. Their values are hidden in `Debug` when the key
//! names a secret (password, secret, token, key material, JAAS).

use std::fmt;
use std::time::Duration;

use broker_core::codec::{Envelope, PARAM_ENVELOPE};
use broker_core::params::{bad_value, boolean as parse_bool, non_empty, positive};
use broker_core::{BrokerOptions, Error, Result, TlsOptions};

use crate::NAME;

/// The server used when no address is given (`MICRO_BROKER_ADDRESS` unset), as Go Micro.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9092";

/// The prefix of parameters passed straight to librdkafka.
pub const RDKAFKA_PREFIX: &str = "rdkafka.";

/// Every parameter this backend reads from [`BrokerOptions::params`], with its default.
pub const PARAMS: &[(&str, &str)] = &[
    ("envelope", "native | go-micro (default native: raw value, record headers; go-micro: JSON envelope as value)"),
    (
        "auto_create_topics",
        "true | false (default true): create absent topics (and `<topic>.dlq`) through the admin API",
    ),
    ("partitions", "partitions of the topics this backend creates (default 1: one total order per topic)"),
    ("replication_factor", "replication factor of the topics this backend creates (default 1)"),
    (
        "group_id",
        "topic | go-micro (default topic: a queue group's Kafka group id is `<topic>:<group>`; go-micro: the \
         group name alone, as Go Micro's plugin)",
    ),
    ("group_start", "earliest | latest (default earliest): where a queue group that has no committed offset starts"),
    (
        "fetch_wait_ms",
        "fetch.wait.max.ms of consumers (default 10; tansu answers a waiting fetch only when it expires)",
    ),
    ("session_timeout_ms", "session.timeout.ms of queue-group consumers (default 6000)"),
    ("heartbeat_interval_ms", "heartbeat.interval.ms of queue-group consumers (default 250: quick rebalances)"),
    ("commit_interval_ms", "how often handled offsets are committed (auto.commit.interval.ms, default 500)"),
    ("join_timeout_ms", "how long subscribe() waits for a queue-group consumer to join its group (default 30000)"),
    ("linger_ms", "linger.ms of the producer (default 0: a publish goes out at once; raise it to batch)"),
    ("max_message_bytes", "message.max.bytes of the producer (default 16777216)"),
    ("redelivery_backoff_ms", "pause before the first redelivery of a nacked message, doubling up to 1 s (default 10)"),
    ("client_id", "client.id shown by the server (default micro-broker)"),
    ("rdkafka.<key>", "any librdkafka client setting, passed as <key> to every client (SASL, TLS, tuning)"),
];

/// How a queue group's Kafka group id is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupIdNaming {
    /// `<topic>:<group>`: one Kafka group per topic and queue group.
    Topic,
    /// `<group>`: Go Micro's naming, to share a group with Go Micro services.
    GoMicro,
}

/// The Kafka backend's settings.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port` bootstrap servers.
    pub bootstrap: Vec<String>,
    /// SASL user and password from an address's user info (`kafka://user:password@host:port`).
    pub credentials: Option<(String, String)>,
    /// How messages are put on the wire.
    pub envelope: Envelope,
    /// Create absent topics through the admin API.
    pub auto_create_topics: bool,
    /// Partitions of created topics.
    pub partitions: i32,
    /// Replication factor of created topics.
    pub replication_factor: i32,
    /// How queue-group ids are named.
    pub group_id: GroupIdNaming,
    /// A new queue group starts at the earliest offset (else the latest).
    pub group_start_earliest: bool,
    /// fetch.wait.max.ms.
    pub fetch_wait_ms: u32,
    /// session.timeout.ms.
    pub session_timeout_ms: u32,
    /// heartbeat.interval.ms.
    pub heartbeat_interval_ms: u32,
    /// auto.commit.interval.ms.
    pub commit_interval_ms: u32,
    /// How long subscribe() waits to join a group.
    pub join_timeout: Duration,
    /// linger.ms.
    pub linger_ms: u32,
    /// message.max.bytes of the producer.
    pub max_message_bytes: u32,
    /// The first redelivery pause.
    pub redelivery_backoff: Duration,
    /// client.id.
    pub client_id: String,
    /// `rdkafka.` parameters, prefix removed, applied last.
    pub overrides: Vec<(String, String)>,
    /// TLS from [`BrokerOptions::tls`].
    pub tls: Option<TlsOptions>,
}

/// Whether a librdkafka setting holds a secret, to be hidden in `Debug`.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "jaas", ".pem", "key.location", "keystore", "credentials"]
        .iter()
        .any(|s| key.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let overrides: Vec<(String, String)> = self
            .overrides
            .iter()
            .map(|(k, v)| (k.clone(), if is_secret_key(k) { "***".to_string() } else { v.clone() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("credentials", &self.credentials.as_ref().map(|(user, _)| format!("{user}:***")))
            .field("envelope", &self.envelope)
            .field("auto_create_topics", &self.auto_create_topics)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("group_id", &self.group_id)
            .field("group_start_earliest", &self.group_start_earliest)
            .field("fetch_wait_ms", &self.fetch_wait_ms)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("commit_interval_ms", &self.commit_interval_ms)
            .field("join_timeout", &self.join_timeout)
            .field("linger_ms", &self.linger_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("redelivery_backoff", &self.redelivery_backoff)
            .field("client_id", &self.client_id)
            .field("overrides", &overrides)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap: vec![DEFAULT_ADDRESS.to_string()],
            credentials: None,
            envelope: Envelope::Native,
            auto_create_topics: true,
            partitions: 1,
            replication_factor: 1,
            group_id: GroupIdNaming::Topic,
            group_start_earliest: true,
            fetch_wait_ms: 10,
            session_timeout_ms: 6000,
            heartbeat_interval_ms: 250,
            commit_interval_ms: 500,
            join_timeout: Duration::from_secs(30),
            linger_ms: 0,
            max_message_bytes: 16 * 1024 * 1024,
            redelivery_backoff: Duration::from_millis(10),
            client_id: "micro-broker".to_string(),
            overrides: Vec::new(),
            tls: None,
        }
    }
}

fn number<T: std::str::FromStr + PartialOrd + Default>(key: &str, value: &str) -> Result<T> {
    positive::<T>(key, value)
}

impl KafkaConfig {
    /// Reads the configuration from broker options, rejecting unknown parameters and bad values.
    /// Does no I/O.
    pub fn from_options(options: &BrokerOptions) -> Result<Self> {
        options.validate()?;
        let mut config = KafkaConfig::default();
        if !options.addresses.is_empty() {
            let mut bootstrap = Vec::new();
            for entry in &options.addresses {
                for address in entry.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    let (host_port, credentials) = parse_address(address)?;
                    if credentials.is_some() {
                        config.credentials = credentials;
                    }
                    bootstrap.push(host_port);
                }
            }
            if bootstrap.is_empty() {
                return Err(Error::invalid_input("the Kafka address list is empty"));
            }
            config.bootstrap = bootstrap;
        }
        config.tls = options.tls.clone();
        for (key, value) in &options.params {
            if let Some(setting) = key.strip_prefix(RDKAFKA_PREFIX) {
                if setting.is_empty() {
                    return Err(bad_value(key, value, "a librdkafka setting name after `rdkafka.`"));
                }
                config.overrides.push((setting.to_string(), value.clone()));
                continue;
            }
            let value = value.trim();
            match key.as_str() {
                PARAM_ENVELOPE => config.envelope = Envelope::parse(value)?,
                "auto_create_topics" => config.auto_create_topics = parse_bool(key, value)?,
                "partitions" => config.partitions = number(key, value)?,
                "replication_factor" => config.replication_factor = number(key, value)?,
                "group_id" => {
                    config.group_id = match value {
                        "topic" => GroupIdNaming::Topic,
                        "go-micro" | "gomicro" => GroupIdNaming::GoMicro,
                        _ => return Err(bad_value(key, value, "topic or go-micro")),
                    }
                }
                "group_start" => {
                    config.group_start_earliest = match value {
                        "earliest" => true,
                        "latest" => false,
                        _ => return Err(bad_value(key, value, "earliest or latest")),
                    }
                }
                "fetch_wait_ms" => {
                    config.fetch_wait_ms = value
                        .parse::<u32>()
                        .ok()
                        .filter(|ms| *ms <= 300_000)
                        .ok_or_else(|| bad_value(key, value, "a number of milliseconds between 0 and 300000"))?
                }
                "session_timeout_ms" => config.session_timeout_ms = number(key, value)?,
                "heartbeat_interval_ms" => config.heartbeat_interval_ms = number(key, value)?,
                "commit_interval_ms" => config.commit_interval_ms = number(key, value)?,
                "join_timeout_ms" => config.join_timeout = Duration::from_millis(number(key, value)?),
                "linger_ms" => {
                    config.linger_ms = value
                        .parse::<u32>()
                        .ok()
                        .filter(|ms| *ms <= 900_000)
                        .ok_or_else(|| bad_value(key, value, "a number of milliseconds between 0 and 900000"))?
                }
                "max_message_bytes" => config.max_message_bytes = number(key, value)?,
                "redelivery_backoff_ms" => config.redelivery_backoff = Duration::from_millis(number(key, value)?),
                "client_id" => config.client_id = non_empty(key, value)?,
                unknown => {
                    let known: Vec<&str> = PARAMS.iter().map(|(k, _)| *k).collect();
                    return Err(Error::unsupported(
                        NAME,
                        unknown,
                        &format!("unknown parameter; the Kafka backend reads {}", known.join(", ")),
                    ));
                }
            }
        }
        if config.heartbeat_interval_ms >= config.session_timeout_ms {
            return Err(bad_value(
                "heartbeat_interval_ms",
                &config.heartbeat_interval_ms.to_string(),
                "less than session_timeout_ms",
            ));
        }
        Ok(config)
    }

    /// The bootstrap servers as librdkafka takes them.
    pub fn bootstrap_servers(&self) -> String {
        self.bootstrap.join(",")
    }

    /// The Kafka group id of queue group `group` on `topic`.
    pub fn group_id(&self, topic: &str, group: &str) -> String {
        match self.group_id {
            GroupIdNaming::Topic => format!("{topic}:{group}"),
            GroupIdNaming::GoMicro => group.to_string(),
        }
    }

    /// The `security.protocol` this configuration asks for, lower case (overrides win).
    pub fn security_protocol(&self) -> String {
        if let Some((_, protocol)) = self.overrides.iter().rev().find(|(k, _)| k == "security.protocol") {
            return protocol.trim().to_ascii_lowercase();
        }
        match (self.tls.is_some(), self.credentials.is_some()) {
            (true, true) => "sasl_ssl",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (false, false) => "plaintext",
        }
        .to_string()
    }

    /// Whether this configuration needs TLS (options, or a `security.protocol` override).
    pub fn needs_tls(&self) -> bool {
        self.security_protocol().ends_with("ssl")
    }

    /// The settings every client of this backend shares: servers, client id, reconnect pacing,
    /// security (from the address's credentials and [`BrokerOptions::tls`]); the `rdkafka.`
    /// overrides are applied by [`apply_overrides`](Self::apply_overrides) after the
    /// client-specific settings.
    pub fn base_client_config(&self) -> rdkafka::ClientConfig {
        let mut client = rdkafka::ClientConfig::new();
        client
            .set("bootstrap.servers", self.bootstrap_servers())
            .set("client.id", &self.client_id)
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set("log_level", "3");
        client.set("security.protocol", self.security_protocol());
        if let Some((user, password)) = &self.credentials {
            client.set("sasl.mechanism", "PLAIN").set("sasl.username", user).set("sasl.password", password);
        }
        if let Some(tls) = &self.tls {
            if let Some(ca) = &tls.ca_file {
                client.set("ssl.ca.location", ca.to_string_lossy());
            }
            if let Some(cert) = &tls.cert_file {
                client.set("ssl.certificate.location", cert.to_string_lossy());
            }
            if let Some(key) = &tls.key_file {
                client.set("ssl.key.location", key.to_string_lossy());
            }
            if tls.insecure_skip_verify {
                client
                    .set("enable.ssl.certificate.verification", "false")
                    .set("ssl.endpoint.identification.algorithm", "none");
            }
        }
        client
    }

    /// Applies the `rdkafka.` overrides to `client`.
    pub fn apply_overrides(&self, client: &mut rdkafka::ClientConfig) {
        for (key, value) in &self.overrides {
            client.set(key, value);
        }
    }
}

/// Splits an address (`kafka://user:password@host:port`, `kafka://host:port` or `host:port`) into
/// `host:port` and the credentials it carries.
pub(crate) fn parse_address(address: &str) -> Result<(String, Option<(String, String)>)> {
    let shown = broker_core::redact_credentials(address);
    let rest = match address.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("kafka") || scheme.eq_ignore_ascii_case("tcp") => rest,
        Some((scheme, _)) => {
            return Err(Error::invalid_input(format!(
                "Kafka address {shown:?} has the scheme {scheme:?}: use kafka://host:port or host:port"
            )));
        }
        None => address,
    };
    let rest = rest.trim_end_matches('/');
    let (credentials, host_port) = match rest.rsplit_once('@') {
        Some((user_info, host_port)) => {
            let (user, password) = user_info.split_once(':').unwrap_or((user_info, ""));
            (Some((user.to_string(), password.to_string())), host_port)
        }
        None => (None, rest),
    };
    let valid = match host_port.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    };
    if !valid || host_port.contains('/') {
        return Err(Error::invalid_input(format!(
            "Kafka address {shown:?} is not an address like kafka://127.0.0.1:9092 or 127.0.0.1:9092"
        )));
    }
    Ok((host_port.to_string(), credentials))
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::ErrorKind;

    #[test]
    fn defaults() {
        let config = KafkaConfig::from_options(&BrokerOptions::new()).unwrap();
        assert_eq!(config.bootstrap, vec![DEFAULT_ADDRESS]);
        assert_eq!(config.partitions, 1);
        assert!(config.auto_create_topics && config.group_start_earliest);
        assert_eq!(config.group_id("orders", "billing"), "orders:billing");
        assert_eq!(config.security_protocol(), "plaintext");
        assert!(!config.needs_tls());
    }

    #[test]
    fn addresses() {
        let options = BrokerOptions::new().with_addresses(["kafka://a:9092, b:9093", "tcp://c:1"]);
        let config = KafkaConfig::from_options(&options).unwrap();
        assert_eq!(config.bootstrap_servers(), "a:9092,b:9093,c:1");
        let config =
            KafkaConfig::from_options(&BrokerOptions::new().with_addresses(["kafka://u:s3cret@h:9092"])).unwrap();
        assert_eq!(config.credentials, Some(("u".to_string(), "s3cret".to_string())));
        assert_eq!(config.security_protocol(), "sasl_plaintext");
        assert!(!format!("{config:?}").contains("s3cret"));
        for bad in ["http://h:1", "h", "h:0", "h:x", ":9092", "kafka://h:1/x"] {
            let err = KafkaConfig::from_options(&BrokerOptions::new().with_addresses([bad])).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad}");
        }
        let err =
            KafkaConfig::from_options(&BrokerOptions::new().with_addresses(["http://u:pw-secret@h:1"])).unwrap_err();
        assert!(!err.to_string().contains("pw-secret"), "{err}");
    }

    #[test]
    fn params_and_overrides() {
        let options = BrokerOptions::new()
            .with_param("partitions", "3")
            .with_param("group_id", "go-micro")
            .with_param("group_start", "latest")
            .with_param("fetch_wait_ms", "0")
            .with_param("envelope", "go-micro")
            .with_param("rdkafka.sasl.password", "hunter2")
            .with_param("rdkafka.ssl.key.password", "hunter3")
            .with_param("rdkafka.security.protocol", "SASL_SSL")
            .with_param("rdkafka.sasl.mechanism", "SCRAM-SHA-256");
        let config = KafkaConfig::from_options(&options).unwrap();
        assert_eq!(config.partitions, 3);
        assert_eq!(config.group_id("orders", "billing"), "billing");
        assert!(!config.group_start_earliest);
        assert_eq!(config.fetch_wait_ms, 0);
        assert_eq!(config.envelope, Envelope::GoMicro);
        assert_eq!(config.security_protocol(), "sasl_ssl");
        assert!(config.needs_tls());
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2") && !text.contains("hunter3"), "{text}");
        assert!(text.contains("SCRAM-SHA-256"), "{text}");
    }

    #[test]
    fn bad_values_are_rejected() {
        for (key, value) in [
            ("partitions", "0"),
            ("auto_create_topics", "maybe"),
            ("group_id", "x"),
            ("group_start", "middle"),
            ("fetch_wait_ms", "-1"),
            ("envelope", "xml"),
            ("client_id", ""),
            ("rdkafka.", "x"),
        ] {
            let err = KafkaConfig::from_options(&BrokerOptions::new().with_param(key, value)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key}={value}: {err}");
        }
        let err = KafkaConfig::from_options(&BrokerOptions::new().with_param("nosuch", "1")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("nosuch"), "{err}");
        let err = KafkaConfig::from_options(
            &BrokerOptions::new().with_param("heartbeat_interval_ms", "7000").with_param("session_timeout_ms", "6000"),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn tls_maps_to_ssl() {
        let tls = TlsOptions::new().with_ca_file("/ca.pem").with_client_cert("/c.pem", "/k.pem");
        let config = KafkaConfig::from_options(&BrokerOptions::new().with_tls(tls)).unwrap();
        assert_eq!(config.security_protocol(), "ssl");
        let client = config.base_client_config();
        assert_eq!(client.get("security.protocol"), Some("ssl"));
        assert_eq!(client.get("ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(client.get("ssl.key.location"), Some("/k.pem"));
    }
}
