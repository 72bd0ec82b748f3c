//! The NATS backend's configuration, read from [`BrokerOptions`]: addresses and `params`.

use std::fmt;
use std::time::Duration;

use broker_core::codec::{Envelope, PARAM_ENVELOPE};
use broker_core::params::{bad_value, boolean as parse_bool, non_empty};
use broker_core::{BrokerOptions, Error, Result, TlsOptions};

use crate::NAME;

/// The server used when no address is given (`MICRO_BROKER_ADDRESS` unset).
pub const DEFAULT_ADDRESS: &str = "nats://127.0.0.1:4222";

/// Messages a core subscription buffers in the client before NATS drops the overflow (a slow consumer).
pub const DEFAULT_BUFFER_SIZE: usize = 65_536;

/// Every parameter this backend reads from [`BrokerOptions::params`], with its default.
pub const PARAMS: &[(&str, &str)] = &[
    ("jetstream", "true | false (default false: core NATS, at-most-once)"),
    ("envelope", "native | go-micro (default native; MICRO_BROKER_ENVELOPE sets it)"),
    ("user", "user name (with `password`); or put user:password@ in the address"),
    ("password", "password of `user`"),
    ("token", "authentication token"),
    ("name", "client connection name shown by the server (default micro-broker)"),
    ("buffer_size", "messages buffered per core subscription before NATS drops them (default 65536)"),
    ("stream_prefix", "JetStream: prefix of stream names; a stream per first topic segment (default MICRO_)"),
    ("stream_max_msgs", "JetStream: most messages a stream keeps (default 1000000)"),
    ("stream_max_bytes", "JetStream: most bytes a stream keeps (default 1073741824)"),
    ("stream_max_age_secs", "JetStream: oldest message a stream keeps, in seconds (default 604800)"),
    ("ack_wait_ms", "JetStream: redelivery of an unacknowledged message after this long (default 30000)"),
];

/// The NATS backend's settings.
#[derive(Clone)]
pub struct NatsConfig {
    /// Server addresses, in `nats://host:port` form.
    pub servers: Vec<String>,
    /// JetStream mode instead of core NATS.
    pub jetstream: bool,
    /// How messages are put on the wire.
    pub envelope: Envelope,
    /// User name and password.
    pub user_password: Option<(String, String)>,
    /// Token.
    pub token: Option<String>,
    /// Connection name.
    pub client_name: String,
    /// Client buffer of a core subscription.
    pub buffer_size: usize,
    /// TLS settings.
    pub tls: Option<TlsOptions>,
    /// JetStream stream name prefix.
    pub stream_prefix: String,
    /// JetStream stream bound, messages.
    pub stream_max_msgs: i64,
    /// JetStream stream bound, bytes.
    pub stream_max_bytes: i64,
    /// JetStream stream bound, age.
    pub stream_max_age: Duration,
    /// JetStream ack wait.
    pub ack_wait: Duration,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(|s| broker_core::redact_credentials(s)).collect();
        f.debug_struct("NatsConfig")
            .field("servers", &servers)
            .field("jetstream", &self.jetstream)
            .field("envelope", &self.envelope)
            .field("user", &self.user_password.as_ref().map(|(user, _)| user))
            .field("password", &self.user_password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("client_name", &self.client_name)
            .field("buffer_size", &self.buffer_size)
            .field("tls", &self.tls)
            .field("stream_prefix", &self.stream_prefix)
            .field("stream_max_msgs", &self.stream_max_msgs)
            .field("stream_max_bytes", &self.stream_max_bytes)
            .field("stream_max_age", &self.stream_max_age)
            .field("ack_wait", &self.ack_wait)
            .finish()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: vec![DEFAULT_ADDRESS.to_string()],
            jetstream: false,
            envelope: Envelope::Native,
            user_password: None,
            token: None,
            client_name: "micro-broker".to_string(),
            buffer_size: DEFAULT_BUFFER_SIZE,
            tls: None,
            stream_prefix: "MICRO_".to_string(),
            stream_max_msgs: 1_000_000,
            stream_max_bytes: 1 << 30,
            stream_max_age: Duration::from_secs(7 * 24 * 3600),
            ack_wait: Duration::from_secs(30),
        }
    }
}

impl NatsConfig {
    /// Reads the configuration from broker options, rejecting unknown parameters and bad values.
    pub fn from_options(options: &BrokerOptions) -> Result<Self> {
        options.validate()?;
        let mut config = NatsConfig::default();
        if !options.addresses.is_empty() {
            config.servers = options.addresses.iter().map(|a| a.trim().to_string()).collect();
        }
        let mut from_url = None;
        for server in &config.servers {
            let parsed = server.parse::<async_nats::ServerAddr>().map_err(|e| {
                Error::invalid_input(format!(
                    "NATS address {:?} is not a server address like nats://127.0.0.1:4222: {e}",
                    broker_core::redact_credentials(server)
                ))
            })?;
            // async-nats does not send credentials written in the address: take them from there.
            if from_url.is_none()
                && let Some(user) = parsed.username().filter(|u| !u.is_empty())
            {
                from_url = Some((percent_decode(user), parsed.password().map(percent_decode)));
            }
        }
        let mut user = None;
        let mut password = None;
        for (key, value) in &options.params {
            let value = value.trim();
            match key.as_str() {
                "jetstream" => config.jetstream = parse_bool(key, value)?,
                PARAM_ENVELOPE => config.envelope = Envelope::parse(value)?,
                "user" => user = Some(non_empty(key, value)?),
                "password" => password = Some(non_empty(key, value)?),
                "token" => config.token = Some(non_empty(key, value)?),
                "name" => config.client_name = non_empty(key, value)?,
                "buffer_size" => config.buffer_size = positive(key, value)? as usize,
                "stream_prefix" => {
                    let prefix = non_empty(key, value)?;
                    if !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                        return Err(bad_value(key, value, "letters, digits, '_' and '-' only"));
                    }
                    config.stream_prefix = prefix;
                }
                "stream_max_msgs" => config.stream_max_msgs = positive(key, value)? as i64,
                "stream_max_bytes" => config.stream_max_bytes = positive(key, value)? as i64,
                "stream_max_age_secs" => config.stream_max_age = Duration::from_secs(positive(key, value)?),
                "ack_wait_ms" => config.ack_wait = Duration::from_millis(positive(key, value)?),
                unknown => {
                    let known: Vec<&str> = PARAMS.iter().map(|(k, _)| *k).collect();
                    return Err(Error::unsupported(
                        NAME,
                        unknown,
                        &format!("unknown parameter; the NATS backend reads {}", known.join(", ")),
                    ));
                }
            }
        }
        if user.is_none() && password.is_none() && config.token.is_none() {
            match from_url {
                Some((user, Some(password))) => config.user_password = Some((user, password)),
                Some((token, None)) => config.token = Some(token),
                None => {}
            }
        }
        match (user, password) {
            (Some(user), Some(password)) => config.user_password = Some((user, password)),
            (None, None) => {}
            _ => return Err(Error::invalid_input("parameters `user` and `password` must be given together")),
        }
        if config.token.is_some() && config.user_password.is_some() {
            return Err(Error::invalid_input("give either `token` or `user`/`password`, not both"));
        }
        if let Some(tls) = &options.tls {
            check_tls(tls)?;
            config.tls = Some(tls.clone());
        }
        Ok(config)
    }
}

/// TLS as async-nats offers it: CA file, client certificate and key. Skipping verification is not offered.
fn check_tls(tls: &TlsOptions) -> Result<()> {
    if tls.insecure_skip_verify {
        return Err(Error::unsupported(
            NAME,
            "tls.insecure_skip_verify",
            "the NATS backend always verifies the server certificate; give the CA file instead",
        ));
    }
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(Error::invalid_input("TLS client certificate and key must be given together"));
    }
    for path in [&tls.ca_file, &tls.cert_file, &tls.key_file].into_iter().flatten() {
        if !path.is_file() {
            return Err(Error::invalid_input(format!("TLS file {} does not exist", path.display())));
        }
    }
    Ok(())
}

/// `%XX` escapes of a URL's user info, decoded (invalid escapes are kept as written).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole number from 1 to `i64::MAX` (what the server's JetStream limits take).
fn positive(key: &str, value: &str) -> Result<u64> {
    broker_core::params::positive::<i64>(key, value).map(|n| n.unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::ErrorKind;

    #[test]
    fn defaults() {
        let config = NatsConfig::from_options(&BrokerOptions::new()).unwrap();
        assert_eq!(config.servers, vec![DEFAULT_ADDRESS]);
        assert!(!config.jetstream);
        assert_eq!(config.envelope, Envelope::Native);
        assert_eq!(config.buffer_size, DEFAULT_BUFFER_SIZE);
    }

    #[test]
    fn params_are_read_and_secrets_hidden() {
        let options = BrokerOptions::new()
            .with_addresses(["nats://a:4222", "b:4223"])
            .with_param("jetstream", "true")
            .with_param("envelope", "go-micro")
            .with_param("user", "ada")
            .with_param("password", "hunter2")
            .with_param("stream_prefix", "T_1");
        let config = NatsConfig::from_options(&options).unwrap();
        assert!(config.jetstream);
        assert_eq!(config.envelope, Envelope::GoMicro);
        assert_eq!(config.servers.len(), 2);
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2") && text.contains("ada"), "{text}");
        let token = NatsConfig::from_options(&BrokerOptions::new().with_param("token", "s3cr3t")).unwrap();
        assert!(!format!("{token:?}").contains("s3cr3t"));
        let in_url = NatsConfig::from_options(&BrokerOptions::new().with_addresses(["nats://u:pw1@h:4222"])).unwrap();
        assert!(!format!("{in_url:?}").contains("pw1"));
        assert_eq!(in_url.user_password, Some(("u".to_string(), "pw1".to_string())));
        let token = NatsConfig::from_options(&BrokerOptions::new().with_addresses(["nats://t%40k@h:4222"])).unwrap();
        assert_eq!(token.token.as_deref(), Some("t@k"));
    }

    #[test]
    fn bad_input_is_named() {
        let cases = [
            (BrokerOptions::new().with_param("jetstream", "maybe"), ErrorKind::InvalidInput, "jetstream"),
            (BrokerOptions::new().with_param("user", "u"), ErrorKind::InvalidInput, "password"),
            (BrokerOptions::new().with_param("buffer_size", "0"), ErrorKind::InvalidInput, "buffer_size"),
            (BrokerOptions::new().with_param("registry", "etcd"), ErrorKind::Unsupported, "registry"),
            (BrokerOptions::new().with_param("envelope", "xml"), ErrorKind::InvalidInput, "envelope"),
            (BrokerOptions::new().with_param("stream_prefix", "a.b"), ErrorKind::InvalidInput, "stream_prefix"),
            (BrokerOptions::new().with_addresses(["nats://h:notaport"]), ErrorKind::InvalidInput, "h:notaport"),
            (
                BrokerOptions::new().with_tls(TlsOptions::new().with_insecure_skip_verify(true)),
                ErrorKind::Unsupported,
                "insecure_skip_verify",
            ),
            (
                BrokerOptions::new().with_tls(TlsOptions::new().with_ca_file("/nonexistent/ca.pem")),
                ErrorKind::InvalidInput,
                "/nonexistent/ca.pem",
            ),
        ];
        for (options, kind, needle) in cases {
            let err = NatsConfig::from_options(&options).unwrap_err();
            assert_eq!(err.kind(), kind, "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}
