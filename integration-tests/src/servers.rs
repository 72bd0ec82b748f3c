//! Where the network backends' servers are, for their conformance suites.
//!
//! A suite for a backend that talks to a server (NATS, Redis, RabbitMQ, Kafka, SQS, Pub/Sub) needs its
//! address. [`discover`] finds it, in this order:
//!
//! 1. `BROKER_TEST_<BACKEND>_URL` ([`env_var`]: the backend name in upper case, `-` as `_`), for
//!    example `BROKER_TEST_NATS_URL=nats://127.0.0.1:4222`. `redis-streams` falls back to
//!    `BROKER_TEST_REDIS_URL`, as it uses the same server.
//! 2. With the cargo feature `testcontainers`, a container started with `testcontainers-modules`
//!    (nats, redis, rabbitmq, kafka), started once and kept for the rest of the test process
//!    (labelled [`CONTAINER_LABEL`], for CI to remove afterwards).
//! 3. Otherwise the backend is unavailable: its cases are skipped, each printing a `SKIP` line,
//!    unless `BROKER_TEST_REQUIRE=all` (or a comma-separated list naming the backend) is set, in which
//!    case they fail, naming the variable to set. CI sets it so a missing server cannot pass as skipped.
//!
//! Backends that need no server (`memory`, and the peer-to-peer `http`) are [`Server::NotNeeded`].

use std::fmt;

/// The variable that makes unavailable servers a failure instead of a skip: `all`, or a
/// comma-separated list of backend names.
pub const ENV_REQUIRE: &str = "BROKER_TEST_REQUIRE";

/// The Docker label on every container the `testcontainers` feature starts. Containers live until
/// the test process exits and are not removed by it (statics are never dropped), so CI removes them
/// afterwards: `docker rm -f $(docker ps -aq --filter label=micro-broker.conformance)`.
pub const CONTAINER_LABEL: &str = "micro-broker.conformance";

/// The backends whose suites need a server.
pub const SERVER_BACKENDS: &[&str] = &["nats", "redis", "redis-streams", "rabbitmq", "kafka", "sqs", "gcp-pubsub"];

/// The environment variable holding the server URL of `backend`: `BROKER_TEST_<BACKEND>_URL`,
/// upper case, with `-` (and any other character that is not a letter or digit) as `_`.
///
/// ```
/// assert_eq!(integration_tests::servers::env_var("redis-streams"), "BROKER_TEST_REDIS_STREAMS_URL");
/// ```
pub fn env_var(backend: &str) -> String {
    let name: String =
        backend.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("BROKER_TEST_{name}_URL")
}

/// Whether `backend`'s suite needs a server to talk to.
pub fn needs_server(backend: &str) -> bool {
    SERVER_BACKENDS.contains(&backend)
}

/// The server family of `backend`: the backend whose server (and container) it shares.
fn family(backend: &str) -> &str {
    match backend {
        "redis-streams" => "redis",
        other => other,
    }
}

/// The server URL of `backend` from the process environment (see [`endpoint_from`]).
pub fn endpoint(backend: &str) -> Option<String> {
    endpoint_from(&|key| std::env::var(key).ok(), backend)
}

/// The server URL of `backend` through `lookup`: `BROKER_TEST_<BACKEND>_URL`, trimmed, ignored when
/// blank; for a backend sharing another's server (`redis-streams`), that one's variable next.
pub fn endpoint_from(lookup: &dyn Fn(&str) -> Option<String>, backend: &str) -> Option<String> {
    let own = env_var(backend);
    let shared = env_var(family(backend));
    let mut keys = vec![own];
    if !keys.contains(&shared) {
        keys.push(shared);
    }
    keys.iter().find_map(|key| lookup(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()))
}

/// Whether `BROKER_TEST_REQUIRE=all` is set in the process environment.
pub fn require_all() -> bool {
    require_all_from(&|key| std::env::var(key).ok())
}

/// Whether `BROKER_TEST_REQUIRE` is `all` (any case, blanks trimmed) through `lookup`.
pub fn require_all_from(lookup: &dyn Fn(&str) -> Option<String>) -> bool {
    lookup(ENV_REQUIRE).is_some_and(|v| v.split(',').any(|item| item.trim().eq_ignore_ascii_case("all")))
}

/// Whether `backend`'s server is required (its cases must not be skipped) in the process environment.
pub fn required(backend: &str) -> bool {
    required_from(&|key| std::env::var(key).ok(), backend)
}

/// Whether `BROKER_TEST_REQUIRE` (through `lookup`) is `all` or a comma-separated list naming `backend`.
pub fn required_from(lookup: &dyn Fn(&str) -> Option<String>, backend: &str) -> bool {
    lookup(ENV_REQUIRE).is_some_and(|v| {
        v.split(',').map(str::trim).any(|item| item.eq_ignore_ascii_case("all") || item.eq_ignore_ascii_case(backend))
    })
}

/// The URL of a service a suite needs besides its backend's server (the http backend's etcd
/// registry): `BROKER_TEST_<SERVICE>_URL`, or `None` to skip. Panics, naming the variable, when
/// `BROKER_TEST_REQUIRE` asks for it (`all`, or a list naming the service) and it is unset.
pub fn service_or_skip(service: &str) -> Option<String> {
    match endpoint(service) {
        Some(url) => Some(url),
        None if required(service) => {
            panic!("the {service} server is required ({ENV_REQUIRE} is set) but {} is not set", env_var(service))
        }
        None => None,
    }
}

/// What [`discover`] found for a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// The backend needs no server (`memory`, `http`).
    NotNeeded,
    /// The server's URL, from the environment or a container started for this process.
    Endpoint(String),
    /// No server: why, and what to set. The cases are skipped (or fail when required).
    Unavailable(String),
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Server::NotNeeded => f.write_str("no server needed"),
            Server::Endpoint(url) => write!(f, "server at {}", broker_core::redact_credentials(url)),
            Server::Unavailable(why) => write!(f, "no server: {why}"),
        }
    }
}

/// Finds the server of `backend`: the environment, else (feature `testcontainers`) a container,
/// else [`Server::Unavailable`]. Never panics; [`server_or_skip`] applies `BROKER_TEST_REQUIRE`.
pub async fn discover(backend: &str) -> Server {
    if !needs_server(backend) {
        return Server::NotNeeded;
    }
    if let Some(url) = endpoint(backend) {
        return Server::Endpoint(url);
    }
    start_container(backend).await
}

/// The server of `backend` for a case: `Some(None)` when none is needed, `Some(Some(url))` when found,
/// `None` when unavailable (the caller skips).
///
/// # Panics
///
/// When the server is unavailable and [`required`] (`BROKER_TEST_REQUIRE=all`), with a message
/// naming the variable to set.
pub async fn server_or_skip(backend: &str) -> Option<Option<String>> {
    match discover(backend).await {
        Server::NotNeeded => Some(None),
        Server::Endpoint(url) => Some(Some(url)),
        Server::Unavailable(why) => {
            if required(backend) {
                panic!(
                    "the {backend} server is required ({ENV_REQUIRE} is set) but unavailable: {why}. \
                     Set {} to its URL, or run with --features testcontainers and Docker.",
                    env_var(backend)
                );
            }
            None
        }
    }
}

#[cfg(not(feature = "testcontainers"))]
async fn start_container(backend: &str) -> Server {
    Server::Unavailable(format!(
        "{} is not set (or build with --features testcontainers to start one in Docker)",
        env_var(backend)
    ))
}

#[cfg(feature = "testcontainers")]
async fn start_container(backend: &str) -> Server {
    match containers::url(family(backend)).await {
        Ok(url) => Server::Endpoint(url),
        Err(why) => {
            Server::Unavailable(format!("{} is not set and no container could be started: {why}", env_var(backend)))
        }
    }
}

/// Containers started on demand, one per server family, kept for the life of the test process.
#[cfg(feature = "testcontainers")]
mod containers {
    use std::sync::{Mutex, OnceLock, mpsc};

    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::{ContainerAsync, Image, ImageExt};
    use testcontainers_modules::{kafka, nats, rabbitmq, redis};

    use super::CONTAINER_LABEL as LABEL;

    type Started = Result<String, String>;

    /// One slot per family; the first case to ask starts the container, the others wait for it.
    fn slot(family: &str) -> Option<&'static Mutex<Option<Started>>> {
        static NATS: OnceLock<Mutex<Option<Started>>> = OnceLock::new();
        static REDIS: OnceLock<Mutex<Option<Started>>> = OnceLock::new();
        static RABBITMQ: OnceLock<Mutex<Option<Started>>> = OnceLock::new();
        static KAFKA: OnceLock<Mutex<Option<Started>>> = OnceLock::new();
        let cell = match family {
            "nats" => &NATS,
            "redis" => &REDIS,
            "rabbitmq" => &RABBITMQ,
            "kafka" => &KAFKA,
            _ => return None,
        };
        Some(cell.get_or_init(|| Mutex::new(None)))
    }

    /// The URL of the family's container, starting it on first use.
    pub(super) async fn url(family: &str) -> Started {
        let family = family.to_string();
        // Starting blocks (a std mutex serialises the first start); keep it off the async workers.
        tokio::task::spawn_blocking(move || url_blocking(&family))
            .await
            .unwrap_or_else(|e| Err(format!("the container start task failed: {e}")))
    }

    fn url_blocking(family: &str) -> Started {
        let Some(slot) = slot(family) else {
            return Err(format!("no container is known for {family:?}"));
        };
        let mut guard = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(started) = guard.as_ref() {
            return started.clone();
        }
        let started = start(family);
        *guard = Some(started.clone());
        started
    }

    /// Starts the container on a thread of its own, with its own runtime, that holds it until the
    /// process exits (each `#[tokio::test]` has a runtime that ends with the test, so the
    /// container must not belong to one).
    fn start(family: &str) -> Started {
        let (tx, rx) = mpsc::channel::<Started>();
        let family_owned = family.to_string();
        let spawned = std::thread::Builder::new().name(format!("container-{family}")).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot build a runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                match family_owned.as_str() {
                    "nats" => {
                        // JetStream on, for the nats_jetstream suite.
                        let image = nats::Nats::default()
                            .with_cmd(&nats::NatsServerCmd::default().with_jetstream())
                            .with_label(LABEL, "nats");
                        hold(image, 4222, |host, port| format!("nats://{host}:{port}"), tx).await;
                    }
                    "redis" => {
                        let image = redis::Redis::default().with_label(LABEL, "redis");
                        hold(image, redis::REDIS_PORT, |host, port| format!("redis://{host}:{port}"), tx).await;
                    }
                    "rabbitmq" => {
                        let image = rabbitmq::RabbitMq::default().with_label(LABEL, "rabbitmq");
                        hold(image, 5672, |host, port| format!("amqp://guest:guest@{host}:{port}/%2f"), tx).await;
                    }
                    "kafka" => {
                        let image = kafka::apache::Kafka::default().with_label(LABEL, "kafka");
                        let port = kafka::apache::KAFKA_PORT.as_u16();
                        hold(image, port, |host, port| format!("{host}:{port}"), tx).await;
                    }
                    other => {
                        let _ = tx.send(Err(format!("no container is known for {other:?}")));
                    }
                }
            });
        });
        if let Err(e) = spawned {
            return Err(format!("cannot spawn the container thread: {e}"));
        }
        rx.recv().unwrap_or_else(|_| Err("the container thread ended without an answer".to_string()))
    }

    /// Starts `image`, sends its URL, and keeps it alive for the rest of the process.
    async fn hold<I: Image>(
        image: testcontainers_modules::testcontainers::ContainerRequest<I>,
        port: u16,
        url: impl Fn(String, u16) -> String,
        tx: mpsc::Sender<Started>,
    ) {
        let container: ContainerAsync<I> = match image.start().await {
            Ok(container) => container,
            Err(e) => {
                let _ = tx.send(Err(format!("docker: {e}")));
                return;
            }
        };
        let host = match container.get_host().await {
            Ok(host) => host.to_string(),
            Err(e) => {
                let _ = tx.send(Err(format!("container host: {e}")));
                return;
            }
        };
        let mapped = match container.get_host_port_ipv4(port).await {
            Ok(mapped) => mapped,
            Err(e) => {
                let _ = tx.send(Err(format!("container port {port}: {e}")));
                return;
            }
        };
        let _ = tx.send(Ok(url(host, mapped)));
        // The container lives as long as this future; the process exit ends both.
        std::future::pending::<()>().await;
        drop(container);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
    }

    #[test]
    fn variable_names() {
        assert_eq!(env_var("nats"), "BROKER_TEST_NATS_URL");
        assert_eq!(env_var("rabbitmq"), "BROKER_TEST_RABBITMQ_URL");
        assert_eq!(env_var("redis-streams"), "BROKER_TEST_REDIS_STREAMS_URL");
        assert_eq!(env_var("Kafka"), "BROKER_TEST_KAFKA_URL");
        assert_eq!(env_var("gcp-pubsub"), "BROKER_TEST_GCP_PUBSUB_URL");
    }

    #[test]
    fn endpoint_is_read_and_trimmed() {
        let lookup = env(&[("BROKER_TEST_NATS_URL", "  nats://127.0.0.1:4222 \n")]);
        assert_eq!(endpoint_from(&lookup, "nats").as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(endpoint_from(&lookup, "redis"), None);
        assert_eq!(endpoint_from(&env(&[("BROKER_TEST_NATS_URL", "   ")]), "nats"), None);
        assert_eq!(endpoint_from(&env(&[]), "nats"), None);
    }

    #[test]
    fn redis_streams_falls_back_to_redis() {
        let shared = env(&[("BROKER_TEST_REDIS_URL", "redis://h:6379")]);
        assert_eq!(endpoint_from(&shared, "redis-streams").as_deref(), Some("redis://h:6379"));
        let both =
            env(&[("BROKER_TEST_REDIS_URL", "redis://h:6379"), ("BROKER_TEST_REDIS_STREAMS_URL", "redis://s:1")]);
        assert_eq!(endpoint_from(&both, "redis-streams").as_deref(), Some("redis://s:1"));
        assert_eq!(endpoint_from(&both, "redis").as_deref(), Some("redis://h:6379"));
    }

    #[test]
    fn require_parsing() {
        assert!(!require_all_from(&env(&[])));
        assert!(require_all_from(&env(&[(ENV_REQUIRE, "all")])));
        assert!(require_all_from(&env(&[(ENV_REQUIRE, " ALL ")])));
        assert!(!require_all_from(&env(&[(ENV_REQUIRE, "")])));
        assert!(!require_all_from(&env(&[(ENV_REQUIRE, "nats")])));
        assert!(!require_all_from(&env(&[(ENV_REQUIRE, "allx")])));
        assert!(required_from(&env(&[(ENV_REQUIRE, "all")]), "kafka"));
        assert!(required_from(&env(&[(ENV_REQUIRE, "nats, kafka")]), "kafka"));
        assert!(!required_from(&env(&[(ENV_REQUIRE, "nats")]), "kafka"));
        assert!(!required_from(&env(&[]), "kafka"));
    }

    #[test]
    fn which_backends_need_a_server() {
        for backend in ["nats", "redis", "redis-streams", "rabbitmq", "kafka", "sqs", "gcp-pubsub"] {
            assert!(needs_server(backend), "{backend}");
        }
        assert!(!needs_server("memory"));
        assert!(!needs_server("http"));
    }

    #[tokio::test]
    async fn memory_needs_no_server() {
        assert_eq!(discover("memory").await, Server::NotNeeded);
        assert_eq!(server_or_skip("memory").await, Some(None));
    }

    #[test]
    fn display_redacts_credentials() {
        let shown = Server::Endpoint("amqp://guest:secret@h:5672/%2f".into()).to_string();
        assert!(!shown.contains("secret"), "{shown}");
    }
}
