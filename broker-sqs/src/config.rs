//! The SQS backend's configuration, read from [`BrokerOptions`]: the endpoint (address), the
//! standard AWS environment variables, and `params`.

use std::fmt;
use std::time::Duration;

use broker_core::codec::{Envelope, PARAM_ENVELOPE};
use broker_core::params::{bad_value, boolean as parse_bool, non_empty, positive};
use broker_core::{BrokerOptions, Error, Result};

use crate::NAME;

/// The region used when neither the `region` parameter nor `AWS_REGION` / `AWS_DEFAULT_REGION` says.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The prefix of every queue and SNS topic name this backend creates, by default.
pub const DEFAULT_PREFIX: &str = "micro";

/// The longest `prefix` accepted: the names must stay within SQS's 80 characters.
pub const MAX_PREFIX_LEN: usize = 10;

/// Every parameter this backend reads from [`BrokerOptions::params`], with its default.
pub const PARAMS: &[(&str, &str)] = &[
    ("region", "AWS region (default: AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1)"),
    (
        "access_key_id",
        "AWS access key id (default: the user of the address, http://KEY:SECRET@host:port, else AWS_ACCESS_KEY_ID)",
    ),
    (
        "secret_access_key",
        "AWS secret access key (default: the password of the address, else AWS_SECRET_ACCESS_KEY); never printed",
    ),
    ("session_token", "AWS session token (default: AWS_SESSION_TOKEN); never printed"),
    (
        "sns_address",
        "SNS endpoint when it is not the SQS one (default: the address, as moto and LocalStack serve both; \
         with no address, AWS's regional endpoints)",
    ),
    ("prefix", "prefix of every queue and SNS topic name (default micro; at most 10 of [A-Za-z0-9_-])"),
    ("wait_time_secs", "long-polling wait of each ReceiveMessage, 1 to 20 seconds (default 20)"),
    (
        "visibility_timeout_secs",
        "visibility timeout of received messages, extended every half of it while the handler runs \
         (default 30, at least 2)",
    ),
    (
        "fifo",
        "true | false (default false): FIFO SNS topics and queues (names end in .fifo); an ordering key \
         is the MessageGroupId, without one a publisher's messages share one group",
    ),
    ("envelope", "native (the only mapping: headers are SQS message attributes, see the crate docs)"),
];

/// The SQS backend's settings.
#[derive(Clone)]
pub struct SqsConfig {
    /// The SQS endpoint URL (`MICRO_BROKER_ADDRESS`); `None`: AWS's regional endpoint.
    pub endpoint: Option<String>,
    /// The SNS endpoint URL; `None`: the SQS endpoint, or AWS's regional one.
    pub sns_endpoint: Option<String>,
    /// The AWS region.
    pub region: String,
    /// The access key id.
    pub access_key_id: Option<String>,
    /// The secret access key (hidden by `Debug`).
    pub secret_access_key: Option<String>,
    /// The session token (hidden by `Debug`).
    pub session_token: Option<String>,
    /// The prefix of queue and topic names.
    pub prefix: String,
    /// Long-polling wait of a receive.
    pub wait_time: Duration,
    /// Visibility timeout of a received message.
    pub visibility_timeout: Duration,
    /// FIFO topics and queues.
    pub fifo: bool,
    /// TLS options were given: rejected at `connect()` (https endpoints use the system's roots).
    pub tls_requested: bool,
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("SqsConfig")
            .field("endpoint", &self.endpoint.as_deref().map(broker_core::redact_credentials))
            .field("sns_endpoint", &self.sns_endpoint.as_deref().map(broker_core::redact_credentials))
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("session_token", &hidden(&self.session_token))
            .field("prefix", &self.prefix)
            .field("wait_time", &self.wait_time)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("fifo", &self.fifo)
            .field("tls_requested", &self.tls_requested)
            .finish()
    }
}

impl Default for SqsConfig {
    /// The defaults, without looking at the environment: AWS's endpoints in [`DEFAULT_REGION`], no credentials.
    fn default() -> Self {
        SqsConfig {
            endpoint: None,
            sns_endpoint: None,
            region: DEFAULT_REGION.to_string(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            prefix: DEFAULT_PREFIX.to_string(),
            wait_time: Duration::from_secs(20),
            visibility_timeout: Duration::from_secs(30),
            fifo: false,
            tls_requested: false,
        }
    }
}

impl SqsConfig {
    /// Reads the configuration from broker options and the AWS environment variables.
    pub fn from_options(options: &BrokerOptions) -> Result<Self> {
        Self::from_options_and_env(options, &|key| std::env::var(key).ok())
    }

    /// Like [`from_options`](Self::from_options) with a custom environment lookup (tests).
    pub fn from_options_and_env(options: &BrokerOptions, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        options.validate()?;
        let env = |key: &str| env(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let endpoint = match options.addresses.as_slice() {
            [] => None,
            [one] => Some(parse_endpoint(one.trim())?),
            more => {
                return Err(Error::invalid_input(format!(
                    "the sqs backend takes one endpoint address, got {}: {}",
                    more.len(),
                    more.iter().map(|a| broker_core::redact_credentials(a)).collect::<Vec<_>>().join(", ")
                )));
            }
        };
        let (endpoint, url_key, url_secret) = match endpoint {
            Some(e) => (Some(e.url), e.access_key_id, e.secret_access_key),
            None => (None, None, None),
        };
        let mut config = SqsConfig {
            endpoint,
            region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).unwrap_or_else(|| DEFAULT_REGION.into()),
            access_key_id: url_key.clone().or_else(|| env("AWS_ACCESS_KEY_ID")),
            secret_access_key: url_key.and(url_secret).or_else(|| env("AWS_SECRET_ACCESS_KEY")),
            session_token: env("AWS_SESSION_TOKEN"),
            tls_requested: options.tls.is_some(),
            ..SqsConfig::default()
        };
        for (key, value) in &options.params {
            let value = value.trim();
            match key.as_str() {
                "region" => {
                    let region = non_empty(key, value)?;
                    if !region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                        return Err(bad_value(key, value, "an AWS region such as us-east-1"));
                    }
                    config.region = region;
                }
                "access_key_id" => config.access_key_id = Some(non_empty(key, value)?),
                "secret_access_key" => {
                    if value.is_empty() {
                        return Err(bad_value(key, "", "a non-empty value"));
                    }
                    config.secret_access_key = Some(value.to_string());
                }
                "session_token" => config.session_token = Some(non_empty(key, value)?),
                "sns_address" => config.sns_endpoint = Some(parse_endpoint(value)?.url),
                "prefix" => {
                    let ok = !value.is_empty()
                        && value.len() <= MAX_PREFIX_LEN
                        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if !ok {
                        return Err(bad_value(key, value, "1 to 10 characters of [A-Za-z0-9_-]"));
                    }
                    config.prefix = value.to_string();
                }
                "wait_time_secs" => {
                    let secs: u64 = positive(key, value)?;
                    if secs > 20 {
                        return Err(bad_value(key, value, "1 to 20 seconds (SQS's longest long poll)"));
                    }
                    config.wait_time = Duration::from_secs(secs);
                }
                "visibility_timeout_secs" => {
                    let secs: u64 = positive(key, value)?;
                    if !(2..=43_200).contains(&secs) {
                        return Err(bad_value(key, value, "2 to 43200 seconds"));
                    }
                    config.visibility_timeout = Duration::from_secs(secs);
                }
                "fifo" => config.fifo = parse_bool(key, value)?,
                PARAM_ENVELOPE => {
                    if Envelope::parse(value)? == Envelope::GoMicro {
                        return Err(Error::unsupported(
                            NAME,
                            "envelope=go-micro",
                            "Go Micro has no SQS broker to interoperate with; the sqs backend maps headers to \
                             SQS message attributes (envelope=native)",
                        ));
                    }
                }
                unknown => {
                    let known: Vec<&str> = PARAMS.iter().map(|(k, _)| *k).collect();
                    return Err(Error::unsupported(
                        NAME,
                        unknown,
                        &format!("unknown parameter; the sqs backend reads {}", known.join(", ")),
                    ));
                }
            }
        }
        Ok(config)
    }
}

/// An endpoint address split: the URL without user info, and the credentials it carried.
#[derive(Debug)]
struct Endpoint {
    url: String,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
}

/// Checks an endpoint address, `http://host:port` or `https://host[:port]`, optionally with
/// static credentials as user info: `http://KEY:SECRET@host:port` (percent-encoded).
fn parse_endpoint(address: &str) -> Result<Endpoint> {
    let bad = || {
        Error::invalid_input(format!(
            "SQS endpoint {:?} is not an address like http://127.0.0.1:4566 (optionally \
             http://KEY:SECRET@127.0.0.1:4566) or https://sqs.us-east-1.amazonaws.com",
            broker_core::redact_credentials(address)
        ))
    };
    let (scheme, rest) = if let Some(rest) = address.strip_prefix("http://") {
        ("http://", rest)
    } else if let Some(rest) = address.strip_prefix("https://") {
        ("https://", rest)
    } else {
        return Err(bad());
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (user_info, host) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    let (access_key_id, secret_access_key) = match user_info {
        None => (None, None),
        Some(info) => match info.split_once(':') {
            Some((key, secret)) if !key.is_empty() && !secret.is_empty() => {
                (Some(percent_decode(key).ok_or_else(bad)?), Some(percent_decode(secret).ok_or_else(bad)?))
            }
            _ => {
                return Err(Error::invalid_input(format!(
                    "SQS endpoint {:?}: user info must be ACCESS_KEY_ID:SECRET_ACCESS_KEY",
                    broker_core::redact_credentials(address)
                )));
            }
        },
    };
    Ok(Endpoint { url: format!("{scheme}{host}{}", path.trim_end_matches('/')), access_key_id, secret_access_key })
}

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A duration as whole seconds for the SQS API, at least 1.
pub(crate) fn secs_i32(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::{ErrorKind, TlsOptions};

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults() {
        let config = SqsConfig::from_options_and_env(&BrokerOptions::new(), &no_env).unwrap();
        assert_eq!(config.endpoint, None);
        assert_eq!(config.region, DEFAULT_REGION);
        assert_eq!(config.prefix, "micro");
        assert_eq!(config.wait_time, Duration::from_secs(20));
        assert!(!config.fifo && !config.tls_requested && config.access_key_id.is_none());
    }

    #[test]
    fn env_and_params() {
        let env = |key: &str| match key {
            "AWS_REGION" => Some("eu-west-1".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("AKIDENV".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("envsecret".to_string()),
            _ => None,
        };
        let config = SqsConfig::from_options_and_env(&BrokerOptions::new(), &env).unwrap();
        assert_eq!(config.region, "eu-west-1");
        assert_eq!(config.access_key_id.as_deref(), Some("AKIDENV"));
        let options = BrokerOptions::new()
            .with_addresses(["http://127.0.0.1:4566/"])
            .with_param("region", "us-west-2")
            .with_param("access_key_id", "AKID")
            .with_param("secret_access_key", "s3cret")
            .with_param("session_token", "t0ken")
            .with_param("prefix", "svc_1")
            .with_param("wait_time_secs", "1")
            .with_param("visibility_timeout_secs", "5")
            .with_param("fifo", "true");
        let config = SqsConfig::from_options_and_env(&options, &env).unwrap();
        assert_eq!(config.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(config.region, "us-west-2");
        assert_eq!(config.secret_access_key.as_deref(), Some("s3cret"));
        assert_eq!((config.wait_time, config.visibility_timeout), (Duration::from_secs(1), Duration::from_secs(5)));
        assert!(config.fifo);
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("t0ken"), "{shown}");
    }

    #[test]
    fn credentials_in_the_address() {
        let options = BrokerOptions::new().with_addresses(["http://AKID:s%2Fcr%40t@127.0.0.1:4566/"]);
        let env = |key: &str| (key == "AWS_ACCESS_KEY_ID").then(|| "from-env".to_string());
        let config = SqsConfig::from_options_and_env(&options, &env).unwrap();
        assert_eq!(config.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(config.access_key_id.as_deref(), Some("AKID"));
        assert_eq!(config.secret_access_key.as_deref(), Some("s/cr@t"));
        assert!(!format!("{config:?}").contains("cr@t"));
        let config = SqsConfig::from_options_and_env(&options.with_param("access_key_id", "P"), &env).unwrap();
        assert_eq!(config.access_key_id.as_deref(), Some("P"), "a parameter wins");
    }

    #[test]
    fn bad_values_are_rejected() {
        for (key, value) in [
            ("wait_time_secs", "0"),
            ("wait_time_secs", "21"),
            ("visibility_timeout_secs", "1"),
            ("prefix", "has.dot"),
            ("prefix", "much-too-long-prefix"),
            ("region", "us east"),
            ("fifo", "maybe"),
            ("sns_address", "localhost:4566"),
            ("envelope", "xml"),
        ] {
            let err =
                SqsConfig::from_options_and_env(&BrokerOptions::new().with_param(key, value), &no_env).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key}={value}: {err}");
        }
        let err =
            SqsConfig::from_options_and_env(&BrokerOptions::new().with_param("nosuch", "1"), &no_env).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        let err = SqsConfig::from_options_and_env(&BrokerOptions::new().with_param("envelope", "go-micro"), &no_env)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        for address in ["127.0.0.1:4566", "sqs://h", "http://", "http://usersecret@h:1", "http://u:%zzsecret@h"] {
            let err =
                SqsConfig::from_options_and_env(&BrokerOptions::new().with_addresses([address]), &no_env).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{address}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        let two = BrokerOptions::new().with_addresses(["http://a:1", "http://b:2"]);
        assert_eq!(SqsConfig::from_options_and_env(&two, &no_env).unwrap_err().kind(), ErrorKind::InvalidInput);
        let tls = SqsConfig::from_options_and_env(&BrokerOptions::new().with_tls(TlsOptions::new()), &no_env).unwrap();
        assert!(tls.tls_requested);
    }
}
