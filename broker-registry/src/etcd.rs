//! Go Micro's etcd registry layout (cargo feature `etcd`), so Go Micro and Rust services can share
//! one etcd.
//!
//! - Key: `/micro/registry/<service name>/<node id>`, a `/` inside either replaced by `-`.
//! - Value: the JSON of a [`Service`] holding that one node
//!   (`{"name":…,"version":…,"metadata":null,"endpoints":null,"nodes":[{"id":…,"address":…,"metadata":{…}}]}`).
//! - TTL: an etcd lease per key, granted at the first registration and kept alive by each
//!   re-registration (a new lease is granted if it expired meanwhile). A zero TTL uses no lease.
//! - `deregister` deletes the key; `get_service` reads the prefix `/micro/registry/<name>/` and
//!   groups the nodes by version; `watch` watches that prefix (`/micro/registry/` for all).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};

use crate::common::{group_by_version, lock, split_nodes, validate_for_register, validate_name};
use crate::{Action, Error, ErrorKind, Node, Registry, Result, Service, WatchEvent, Watcher};

/// The key prefix of every service, as in Go Micro.
pub const ETCD_PREFIX: &str = "/micro/registry/";
/// The endpoint used when none is given.
pub const DEFAULT_ETCD_ENDPOINT: &str = "127.0.0.1:2379";
/// Default time allowed to reach etcd when connecting.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for each request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The key of node `node_id` of service `service_name`: `/micro/registry/<name>/<id>`, with `/`
/// replaced by `-` in both, exactly as Go Micro builds it.
pub fn etcd_key(service_name: &str, node_id: &str) -> String {
    format!("{}{}", service_prefix(service_name), node_id.replace('/', "-"))
}

/// The prefix holding every node of service `service_name`: `/micro/registry/<name>/`.
pub fn service_prefix(service_name: &str) -> String {
    format!("{ETCD_PREFIX}{}/", service_name.replace('/', "-"))
}

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    credentials: Option<(String, String)>,
}

impl EtcdOptions {
    /// Options for `endpoints` (`host:port` or `http://host:port`); none means
    /// [`DEFAULT_ETCD_ENDPOINT`].
    pub fn new(endpoints: Vec<String>) -> Self {
        let endpoints = if endpoints.is_empty() { vec![DEFAULT_ETCD_ENDPOINT.to_owned()] } else { endpoints };
        EtcdOptions {
            endpoints,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            credentials: None,
        }
    }

    /// Time allowed to reach etcd when connecting (default 5 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for each request (default 5 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Authenticates as `user` (Go Micro reads `ETCD_USERNAME` / `ETCD_PASSWORD`).
    pub fn with_credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// The etcd registry. See the [module documentation](self) for the layout.
pub struct EtcdRegistry {
    client: Client,
    options: EtcdOptions,
    /// key → the lease we attached to it and the TTL it was granted with.
    leases: Mutex<HashMap<String, Lease>>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    ttl_secs: i64,
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.options.endpoints)
            .field("leases", &lock(&self.leases).len())
            .finish()
    }
}

impl EtcdRegistry {
    /// Connects to `endpoints` (default [`DEFAULT_ETCD_ENDPOINT`]) and checks that etcd answers
    /// within [`DEFAULT_CONNECT_TIMEOUT`]: an [`ErrorKind::Connection`] error naming the
    /// endpoints otherwise.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        Self::connect_with(EtcdOptions::new(endpoints.to_vec())).await
    }

    /// Connects with `options`.
    pub async fn connect_with(options: EtcdOptions) -> Result<Self> {
        // HTTP/2 pings notice a dead server under an idle watch; etcd accepts one every 5 s at most.
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &options.credentials {
            connect = connect.with_user(user.clone(), password.clone()).with_auto_token_refresh(true);
        }
        let endpoints = options.endpoints.join(",");
        let unreachable = |detail: String| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot reach etcd at {endpoints} within {:?}: {detail}", options.connect_timeout),
            )
        };
        let connected = tokio::time::timeout(options.connect_timeout, async {
            let mut client = Client::connect(&options.endpoints, Some(connect)).await?;
            // The channel connects lazily: one request proves that etcd answers.
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        })
        .await;
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                let kind = classify(&e);
                let kind = if kind == ErrorKind::Timeout { ErrorKind::Connection } else { kind };
                let message = format!("cannot connect to etcd at {endpoints}: {e}");
                return Err(Error::new(kind, message).with_source(e));
            }
            Err(elapsed) => return Err(unreachable("no answer".to_owned()).with_source(elapsed)),
        };
        Ok(EtcdRegistry { client, options, leases: Mutex::new(HashMap::new()) })
    }

    /// The endpoints this registry talks to.
    pub fn endpoints(&self) -> &[String] {
        &self.options.endpoints
    }

    /// Runs one request with the request timeout, mapping its error.
    async fn call<T, F>(&self, op: &str, request: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.options.request_timeout, request).await {
            Ok(result) => result.map_err(|e| self.error(op, e)),
            Err(elapsed) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "etcd {op} at {} took longer than {:?}",
                    self.options.endpoints.join(","),
                    self.options.request_timeout
                ),
            )
            .with_source(elapsed)),
        }
    }

    /// The one place where etcd client errors become [`Error`]s.
    fn error(&self, op: &str, error: etcd_client::Error) -> Error {
        let message = format!("etcd {op} at {}: {error}", self.options.endpoints.join(","));
        Error::new(classify(&error), message).with_source(error)
    }

    /// Keeps `lease` alive once; `false` when etcd no longer knows it.
    async fn keep_alive_once(&self, lease: i64) -> Result<bool> {
        let mut client = self.client.clone();
        match tokio::time::timeout(self.options.request_timeout, client.lease_keep_alive(lease)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Ok(false),
            Ok(Err(e)) if is_lease_not_found(&e) => Ok(false),
            Ok(Err(e)) => Err(self.error("lease keep-alive", e)),
            Err(elapsed) => Err(Error::new(ErrorKind::Timeout, "etcd lease keep-alive timed out").with_source(elapsed)),
        }
    }

    async fn grant(&self, ttl_secs: i64) -> Result<i64> {
        let mut client = self.client.clone();
        Ok(self.call("lease grant", client.lease_grant(ttl_secs, None)).await?.id())
    }

    async fn put(&self, key: &str, value: &[u8], lease: i64) -> std::result::Result<(), etcd_client::Error> {
        let mut client = self.client.clone();
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        client.put(key, value, options).await.map(|_| ())
    }

    async fn register_node(&self, entry: &Service, ttl: Duration) -> Result<()> {
        let node_id = entry.nodes.first().map(|node| node.id.as_str()).unwrap_or_default();
        let key = etcd_key(&entry.name, node_id);
        let value = serde_json::to_vec(entry)
            .map_err(|e| Error::codec(format!("cannot encode service {:?}: {e}", entry.name)).with_source(e))?;
        // etcd leases count whole seconds: round up.
        let whole_secs = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0));
        let ttl_secs = i64::try_from(whole_secs).unwrap_or(i64::MAX);
        let known = lock(&self.leases).get(&key).copied();
        let mut lease = 0;
        if ttl_secs > 0 {
            if let Some(known) = known.filter(|known| known.ttl_secs == ttl_secs) {
                if self.keep_alive_once(known.id).await? {
                    lease = known.id;
                }
            }
        }
        for attempt in 0..2 {
            if ttl_secs > 0 && lease == 0 {
                lease = self.grant(ttl_secs).await?;
            }
            match tokio::time::timeout(self.options.request_timeout, self.put(&key, &value, lease)).await {
                Ok(Ok(())) => break,
                // The lease expired between the keep-alive and the put: grant a new one.
                Ok(Err(e)) if attempt == 0 && lease != 0 && is_lease_not_found(&e) => lease = 0,
                Ok(Err(e)) => return Err(self.error("put", e)),
                Err(elapsed) => {
                    return Err(
                        Error::new(ErrorKind::Timeout, format!("etcd put of {key} timed out")).with_source(elapsed)
                    );
                }
            }
        }
        let previous = if lease == 0 {
            lock(&self.leases).remove(&key)
        } else {
            lock(&self.leases).insert(key.clone(), Lease { id: lease, ttl_secs })
        };
        if let Some(previous) = previous.filter(|previous| previous.id != lease) {
            // The key moved to another lease: the old one holds nothing any more.
            let mut client = self.client.clone();
            if let Err(error) = self.call("lease revoke", client.lease_revoke(previous.id)).await {
                tracing::debug!(%error, key, "could not revoke a replaced lease (it expires anyway)");
            }
        }
        Ok(())
    }

    async fn deregister_node(&self, name: &str, version: &str, node_id: &str) -> Result<()> {
        let key = etcd_key(name, node_id);
        let mut client = self.client.clone();
        let response = self.call("get", client.get(key.as_str(), None)).await?;
        let Some(kv) = response.kvs().first() else {
            lock(&self.leases).remove(&key);
            return Ok(());
        };
        let stored_version = serde_json::from_slice::<Service>(kv.value()).ok().map(|service| service.version);
        if stored_version.is_some_and(|stored| stored != version) {
            return Ok(());
        }
        // Delete only what we read: a concurrent re-registration wins.
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let mut client = self.client.clone();
        self.call("delete", client.txn(txn)).await?;
        let lease = lock(&self.leases).remove(&key);
        if let Some(lease) = lease {
            let mut client = self.client.clone();
            if let Err(error) = self.call("lease revoke", client.lease_revoke(lease.id)).await {
                tracing::debug!(%error, key, "could not revoke the lease of a deregistered node");
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn register(&self, service: &Service, ttl: Duration) -> Result<()> {
        validate_for_register(service)?;
        for entry in split_nodes(service) {
            self.register_node(&entry, ttl).await?;
        }
        Ok(())
    }

    async fn deregister(&self, service: &Service) -> Result<()> {
        validate_name(&service.name)?;
        for node in &service.nodes {
            self.deregister_node(&service.name, &service.version, &node.id).await?;
        }
        Ok(())
    }

    async fn get_service(&self, name: &str) -> Result<Vec<Service>> {
        validate_name(name)?;
        let mut client = self.client.clone();
        let response =
            self.call("get", client.get(service_prefix(name), Some(GetOptions::new().with_prefix()))).await?;
        Ok(group_by_version(response.kvs().iter().filter_map(|kv| decode(kv.value(), kv.key()))))
    }

    async fn watch(&self, name: Option<&str>) -> Result<Watcher> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        let prefix = name.map_or_else(|| ETCD_PREFIX.to_owned(), service_prefix);
        let mut client = self.client.clone();
        let options = WatchOptions::new().with_prefix().with_prev_key();
        let mut stream = self.call("watch", client.watch(prefix.as_str(), Some(options))).await?;
        // Wait for etcd to confirm the watch, so that no change made after this returns is missed.
        let created = self.call("watch", stream.message()).await?;
        match created {
            Some(response) if response.created() && !response.canceled() => {}
            other => {
                let reason = other.map(|r| r.cancel_reason().to_owned()).unwrap_or_else(|| "stream closed".to_owned());
                return Err(Error::new(ErrorKind::Backend, format!("etcd refused the watch of {prefix}: {reason}")));
            }
        }
        let watch = EtcdWatch {
            stream,
            pending: VecDeque::new(),
            name: name.map(str::to_owned),
            endpoints: self.options.endpoints.join(","),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(watch, EtcdWatch::next)))
    }

    fn name(&self) -> &'static str {
        "etcd"
    }
}

struct EtcdWatch {
    stream: WatchStream,
    pending: VecDeque<WatchEvent>,
    name: Option<String>,
    endpoints: String,
    done: bool,
}

impl EtcdWatch {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            let broken = match self.stream.message().await {
                Ok(Some(response)) if response.canceled() => {
                    format!("etcd canceled the watch: {}", response.cancel_reason())
                }
                Ok(Some(response)) => {
                    for event in response.events() {
                        if let Some(event) = convert(event) {
                            if self.name.as_deref().is_none_or(|name| name == event.service.name) {
                                self.pending.push_back(event);
                            }
                        }
                    }
                    continue;
                }
                Ok(None) => "etcd closed the watch stream".to_owned(),
                Err(e) => {
                    self.done = true;
                    let message = format!("etcd watch at {}: {e}", self.endpoints);
                    return Some((Err(Error::new(classify(&e), message).with_source(e)), self));
                }
            };
            self.done = true;
            return Some((Err(Error::new(ErrorKind::Connection, format!("{broken} ({})", self.endpoints))), self));
        }
    }
}

/// One etcd event as a [`WatchEvent`]; `None` for a value that is not a service.
fn convert(event: &etcd_client::Event) -> Option<WatchEvent> {
    let kv = event.kv()?;
    match event.event_type() {
        EventType::Put => {
            let service = decode(kv.value(), kv.key())?;
            // Version 1 is the first write since the key was created.
            let action = if kv.version() == 1 { Action::Create } else { Action::Update };
            Some(WatchEvent { action, service })
        }
        EventType::Delete => {
            let service = match event.prev_kv() {
                Some(prev) => decode(prev.value(), prev.key())?,
                // No previous value (compacted): name the node from the key.
                None => service_from_key(kv.key())?,
            };
            Some(WatchEvent { action: Action::Delete, service })
        }
    }
}

fn decode(value: &[u8], key: &[u8]) -> Option<Service> {
    match serde_json::from_slice::<Service>(value) {
        Ok(service) => Some(service),
        Err(error) => {
            let key = String::from_utf8_lossy(key);
            tracing::warn!(%key, %error, "ignoring an etcd registry value that is not a service");
            None
        }
    }
}

fn service_from_key(key: &[u8]) -> Option<Service> {
    let key = std::str::from_utf8(key).ok()?.strip_prefix(ETCD_PREFIX)?;
    let (name, id) = key.split_once('/')?;
    Some(Service::new(name, "").with_node(Node::new(id, "")))
}

fn classify(error: &etcd_client::Error) -> ErrorKind {
    use etcd_client::Error as E;
    match error {
        E::TransportError(_) | E::IoError(_) => ErrorKind::Connection,
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) | E::EndpointError(_) => {
            ErrorKind::InvalidInput
        }
        E::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable => ErrorKind::Connection,
            tonic::Code::Unknown if is_transport_status(status) => ErrorKind::Connection,
            tonic::Code::DeadlineExceeded => ErrorKind::Timeout,
            tonic::Code::InvalidArgument => ErrorKind::InvalidInput,
            tonic::Code::Cancelled => ErrorKind::Closed,
            _ => ErrorKind::Backend,
        },
        _ => ErrorKind::Backend,
    }
}

fn is_transport_status(status: &tonic::Status) -> bool {
    let message = status.message();
    message.contains("transport error") || message.contains("connection")
}

fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_go_micro_keys() {
        assert_eq!(etcd_key("micro.http.broker", "events-1234"), "/micro/registry/micro.http.broker/events-1234");
        assert_eq!(etcd_key("topic:a/b", "x/y"), "/micro/registry/topic:a-b/x-y");
        assert_eq!(service_prefix("a/b"), "/micro/registry/a-b/");
    }

    #[test]
    fn service_from_a_bare_key() {
        let service = service_from_key(b"/micro/registry/s/n-1").unwrap();
        assert_eq!((service.name.as_str(), service.nodes[0].id.as_str()), ("s", "n-1"));
        assert!(service_from_key(b"/other/s/n").is_none());
    }

    #[tokio::test]
    async fn unreachable_etcd_is_a_connection_error_naming_the_address() {
        let options = EtcdOptions::new(vec!["127.0.0.1:1".to_owned()]).with_connect_timeout(Duration::from_millis(500));
        let started = std::time::Instant::now();
        let err = EtcdRegistry::connect_with(options).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = EtcdRegistry::connect(&["not a url at all".to_owned()]).await.unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::Connection), "{err}");
    }
}
