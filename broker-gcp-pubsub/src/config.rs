//! The Pub/Sub backend's configuration, read from [`BrokerOptions`] (addresses and `params`) and
//! the environment (`PUBSUB_EMULATOR_HOST`, `GOOGLE_CLOUD_PROJECT`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use broker_core::codec::{Envelope, PARAM_ENVELOPE};
use broker_core::params::{bad_value, boolean as parse_bool, non_empty, positive};
use broker_core::{BrokerOptions, Error, Result};

use crate::NAME;

/// The variable Google's client libraries read for the emulator's `host:port`.
pub const ENV_EMULATOR_HOST: &str = "PUBSUB_EMULATOR_HOST";

/// The variables the project id is read from when the `project` parameter is not given, in order.
pub const ENV_PROJECT: &[&str] = &["GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT"];

/// The project used with an emulator when none is given (the emulator accepts any).
pub const EMULATOR_DEFAULT_PROJECT: &str = "test";

/// Google's Pub/Sub endpoint, used when neither an address nor `PUBSUB_EMULATOR_HOST` is given.
pub const GOOGLE_ENDPOINT: &str = "https://pubsub.googleapis.com";

/// Every parameter this backend reads from [`BrokerOptions::params`], with its default.
pub const PARAMS: &[(&str, &str)] = &[
    (
        "project",
        "the Google Cloud project id (default: $GOOGLE_CLOUD_PROJECT, $GCLOUD_PROJECT or \
         $CLOUDSDK_CORE_PROJECT; with an emulator `test`)",
    ),
    (
        "credentials_file",
        "a service-account or authorized-user JSON key for Google's endpoint (default: Application \
         Default Credentials); ignored by an emulator",
    ),
    (
        "ack_deadline_secs",
        "ack deadline of the subscriptions this broker creates, 10..600 (default 10); the client \
         extends it while a handler runs, so it is how soon a crashed consumer's messages return",
    ),
    (
        "max_outstanding_messages",
        "flow control: messages a subscription holds unacknowledged at once (default 100, at least \
         the subscription's concurrency)",
    ),
    (
        "batch_delay_ms",
        "how long a publish waits for others to batch with, in milliseconds (default 1; 0 sends at once)",
    ),
    (
        "dead_letter_policy",
        "true | false (default true): with max_redeliveries, also set Pub/Sub's own dead-letter policy \
         on the subscription (topic <topic>.dlq), which catches messages whose consumers crash",
    ),
    (
        "broadcast_ttl_hours",
        "expiration TTL of broadcast subscriptions, at least 24 (default 24): Pub/Sub deletes one left \
         behind by a process that died; an unsubscribe deletes it at once",
    ),
    ("envelope", "native | go-micro (both: Go Micro's Pub/Sub plugin already maps headers to attributes)"),
];

/// Where the broker connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Pub/Sub emulator at `host:port`: plain gRPC, no credentials.
    Emulator(String),
    /// Google's service (or another `https://` endpoint) with credentials.
    Google(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Emulator(host) => write!(f, "the Pub/Sub emulator at {host}"),
            Endpoint::Google(url) => write!(f, "Google Cloud Pub/Sub at {url}"),
        }
    }
}

impl Endpoint {
    /// The URL the client connects to.
    pub fn url(&self) -> String {
        match self {
            Endpoint::Emulator(host) => format!("http://{host}"),
            Endpoint::Google(url) => url.clone(),
        }
    }
}

/// The Pub/Sub backend's settings.
#[derive(Debug, Clone)]
pub struct PubSubConfig {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// The project id; `None` when neither the parameter nor the environment gives one (an error at
    /// `connect()` for Google's endpoint).
    pub project: Option<String>,
    /// A JSON key file for Google's endpoint.
    pub credentials_file: Option<PathBuf>,
    /// The ack deadline of created subscriptions.
    pub ack_deadline: Duration,
    /// Flow control of each subscription's stream.
    pub max_outstanding_messages: i64,
    /// The publisher's batching delay.
    pub batch_delay: Duration,
    /// Set Pub/Sub's dead-letter policy on subscriptions with `max_redeliveries`.
    pub dead_letter_policy: bool,
    /// The expiration TTL of broadcast subscriptions.
    pub broadcast_ttl: Duration,
}

impl PubSubConfig {
    /// Reads the configuration from broker options and the process environment, rejecting unknown
    /// parameters and bad values.
    pub fn from_options(options: &BrokerOptions) -> Result<Self> {
        Self::from_lookup(options, &|key| std::env::var(key).ok())
    }

    /// Like [`from_options`](Self::from_options), with the environment read through `lookup`.
    pub fn from_lookup(options: &BrokerOptions, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        options.validate()?;
        let endpoint = match options.addresses.as_slice() {
            [] => match lookup(ENV_EMULATOR_HOST).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
                Some(host) => Endpoint::Emulator(parse_host_port(&host, ENV_EMULATOR_HOST)?),
                None => Endpoint::Google(GOOGLE_ENDPOINT.to_string()),
            },
            [address] => parse_address(address.trim())?,
            more => {
                return Err(Error::invalid_input(format!(
                    "the gcp-pubsub backend takes one address (an emulator's host:port, or an https:// endpoint), got {}",
                    more.len()
                )));
            }
        };
        if options.tls.is_some() {
            return Err(Error::unsupported(
                NAME,
                "tls",
                "Google's endpoint is always TLS with the system's roots and an emulator is plain; custom \
                 certificates are not supported",
            ));
        }
        let env_project =
            ENV_PROJECT.iter().find_map(|key| lookup(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()));
        let mut config = PubSubConfig {
            project: env_project,
            endpoint,
            credentials_file: None,
            ack_deadline: Duration::from_secs(10),
            max_outstanding_messages: 100,
            batch_delay: Duration::from_millis(1),
            dead_letter_policy: true,
            broadcast_ttl: Duration::from_secs(24 * 3600),
        };
        for (key, value) in &options.params {
            let value = value.trim();
            match key.as_str() {
                "project" => config.project = Some(parse_project(key, value)?),
                "credentials_file" => config.credentials_file = Some(PathBuf::from(non_empty(key, value)?)),
                "ack_deadline_secs" => {
                    let secs: u64 = positive(key, value)?;
                    if !(10..=600).contains(&secs) {
                        return Err(bad_value(key, value, "a number of seconds from 10 to 600 (Pub/Sub's range)"));
                    }
                    config.ack_deadline = Duration::from_secs(secs);
                }
                "max_outstanding_messages" => config.max_outstanding_messages = positive(key, value)?,
                "batch_delay_ms" => {
                    let ms = value
                        .parse::<u64>()
                        .ok()
                        .filter(|ms| *ms <= 60_000)
                        .ok_or_else(|| bad_value(key, value, "a number of milliseconds from 0 to 60000"))?;
                    config.batch_delay = Duration::from_millis(ms);
                }
                "dead_letter_policy" => config.dead_letter_policy = parse_bool(key, value)?,
                "broadcast_ttl_hours" => {
                    let hours: u64 = positive(key, value)?;
                    if !(24..=31 * 24).contains(&hours) {
                        return Err(bad_value(key, value, "a number of hours from 24 to 744 (Pub/Sub's range)"));
                    }
                    config.broadcast_ttl = Duration::from_secs(hours * 3600);
                }
                PARAM_ENVELOPE => {
                    // Go Micro's Pub/Sub plugin already sends the body as data and headers as attributes.
                    Envelope::parse(value)?;
                }
                unknown => {
                    let known: Vec<&str> = PARAMS.iter().map(|(k, _)| *k).collect();
                    return Err(Error::unsupported(
                        NAME,
                        unknown,
                        &format!("unknown parameter; the gcp-pubsub backend reads {}", known.join(", ")),
                    ));
                }
            }
        }
        if config.project.is_none() && matches!(config.endpoint, Endpoint::Emulator(_)) {
            config.project = Some(EMULATOR_DEFAULT_PROJECT.to_string());
        }
        Ok(config)
    }

    /// The project, or the error saying how to give one.
    pub fn project(&self) -> Result<&str> {
        self.project.as_deref().ok_or_else(|| {
            Error::invalid_input(format!(
                "no Google Cloud project: set the broker parameter `project` or {} (with an emulator, \
                 set MICRO_BROKER_ADDRESS or {ENV_EMULATOR_HOST} to its host:port)",
                ENV_PROJECT.join(" or ")
            ))
        })
    }
}

/// A project id as Google names them: 6–30 lower-case letters, digits and hyphens (or a
/// domain-scoped `example.com:project`); anything else is rejected before any request.
fn parse_project(key: &str, value: &str) -> Result<String> {
    let id = value.rsplit(':').next().unwrap_or(value);
    let legal = !id.is_empty()
        && id.len() <= 30
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && id.as_bytes()[0].is_ascii_lowercase();
    if !legal {
        return Err(bad_value(
            key,
            value,
            "a Google Cloud project id: lower-case letters, digits and hyphens, starting with a letter",
        ));
    }
    Ok(value.to_string())
}

/// An address: `host:port` or `http://host:port` (an emulator), or `https://...` (Google's service
/// or a regional endpoint, with credentials).
fn parse_address(address: &str) -> Result<Endpoint> {
    if let Some(rest) = address.strip_prefix("https://") {
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            return Err(Error::invalid_input(format!("Pub/Sub address {address:?} has no host")));
        }
        return Ok(Endpoint::Google(address.trim_end_matches('/').to_string()));
    }
    let host = address.strip_prefix("http://").unwrap_or(address).trim_end_matches('/');
    Ok(Endpoint::Emulator(parse_host_port(host, "the Pub/Sub address")?))
}

/// Checks `host:port` (what `PUBSUB_EMULATOR_HOST` holds).
fn parse_host_port(value: &str, what: &str) -> Result<String> {
    let bad = || {
        Error::invalid_input(format!(
            "{what} {value:?} is not an emulator address like 127.0.0.1:8085 (host:port), nor an https:// endpoint"
        ))
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains(['/', ' ', '@']) || port.parse::<u16>().ok().filter(|p| *p > 0).is_none() {
        return Err(bad());
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::ErrorKind;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
    }

    #[test]
    fn endpoint_from_address_emulator_variable_or_google() {
        let none = env(&[]);
        let config = PubSubConfig::from_lookup(&BrokerOptions::new(), &none).unwrap();
        assert_eq!(config.endpoint, Endpoint::Google(GOOGLE_ENDPOINT.into()));
        assert_eq!(config.project, None);
        assert_eq!(config.project().unwrap_err().kind(), ErrorKind::InvalidInput);

        let emulator = env(&[(ENV_EMULATOR_HOST, "127.0.0.1:8085")]);
        let config = PubSubConfig::from_lookup(&BrokerOptions::new(), &emulator).unwrap();
        assert_eq!(config.endpoint, Endpoint::Emulator("127.0.0.1:8085".into()));
        assert_eq!(config.endpoint.url(), "http://127.0.0.1:8085");
        assert_eq!(config.project().unwrap(), EMULATOR_DEFAULT_PROJECT);

        let options = BrokerOptions::new().with_addresses(["http://localhost:9999"]).with_param("project", "my-proj");
        let config = PubSubConfig::from_lookup(&options, &emulator).unwrap();
        assert_eq!(config.endpoint, Endpoint::Emulator("localhost:9999".into()));
        assert_eq!(config.project().unwrap(), "my-proj");

        let options = BrokerOptions::new().with_addresses(["https://europe-west1-pubsub.googleapis.com"]);
        let config = PubSubConfig::from_lookup(&options, &env(&[("GOOGLE_CLOUD_PROJECT", "prod-1")])).unwrap();
        assert!(matches!(config.endpoint, Endpoint::Google(_)));
        assert_eq!(config.project().unwrap(), "prod-1");
    }

    #[test]
    fn params() {
        let options = BrokerOptions::new()
            .with_param("ack_deadline_secs", "30")
            .with_param("max_outstanding_messages", "5")
            .with_param("batch_delay_ms", "0")
            .with_param("dead_letter_policy", "false")
            .with_param("broadcast_ttl_hours", "48")
            .with_param("credentials_file", "/k.json")
            .with_param("envelope", "go-micro");
        let config = PubSubConfig::from_lookup(&options, &env(&[])).unwrap();
        assert_eq!(config.ack_deadline, Duration::from_secs(30));
        assert_eq!(config.max_outstanding_messages, 5);
        assert_eq!(config.batch_delay, Duration::ZERO);
        assert!(!config.dead_letter_policy);
        assert_eq!(config.broadcast_ttl, Duration::from_secs(48 * 3600));
        assert_eq!(config.credentials_file, Some(PathBuf::from("/k.json")));
    }

    #[test]
    fn bad_values_are_rejected() {
        for (key, value) in [
            ("ack_deadline_secs", "5"),
            ("ack_deadline_secs", "601"),
            ("max_outstanding_messages", "0"),
            ("batch_delay_ms", "x"),
            ("dead_letter_policy", "maybe"),
            ("broadcast_ttl_hours", "1"),
            ("project", "Bad Project"),
            ("project", ""),
            ("envelope", "xml"),
        ] {
            let err = PubSubConfig::from_lookup(&BrokerOptions::new().with_param(key, value), &env(&[])).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key}={value}: {err}");
        }
        let err = PubSubConfig::from_lookup(&BrokerOptions::new().with_param("nosuch", "1"), &env(&[])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        for address in ["127.0.0.1", "h:0", "h:port", "https://", "a b:1"] {
            let options = BrokerOptions::new().with_addresses([address]);
            let err = PubSubConfig::from_lookup(&options, &env(&[])).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{address}: {err}");
        }
        let err =
            PubSubConfig::from_lookup(&BrokerOptions::new(), &env(&[(ENV_EMULATOR_HOST, "nonsense")])).unwrap_err();
        assert!(err.to_string().contains(ENV_EMULATOR_HOST), "{err}");
        let two = BrokerOptions::new().with_addresses(["a:1", "b:2"]);
        assert_eq!(PubSubConfig::from_lookup(&two, &env(&[])).unwrap_err().kind(), ErrorKind::InvalidInput);
        let tls = BrokerOptions::new().with_tls(broker_core::TlsOptions::new());
        assert_eq!(PubSubConfig::from_lookup(&tls, &env(&[])).unwrap_err().kind(), ErrorKind::Unsupported);
    }
}
