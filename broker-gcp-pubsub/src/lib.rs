//! # broker-gcp-pubsub: the Google Cloud Pub/Sub backend (plugin `gcp-pubsub`)
//!
//! Link it with `use broker_gcp_pubsub as _;` (or the facade's `gcp-pubsub` feature), then pick it
//! with `MICRO_BROKER=gcp-pubsub`. At-least-once over Pub/Sub's API (publish and streaming pull
//! over gRPC, the admin calls over REST) with the official client,
//! [google-cloud-pubsub](https://docs.rs/google-cloud-pubsub) (googleapis/google-cloud-rust).
//! Parameters are listed in [`config::PARAMS`].
//!
//! ## Why this client
//! `google-cloud-pubsub` 1.x is Google's own, maintained Rust client (the crate name was handed
//! over by the author of the older community client, which lives on as `gcloud-pubsub`). It does
//! streaming pull with lease management (it extends the ack deadline, `modifyAckDeadline`, while a
//! handler runs), batching publishers with ordering keys, and the admin API, over tonic 0.14 /
//! prost 0.14 (which the workspace already builds for etcd-client) and reqwest. A thin tonic
//! client of our own would have had to redo the lease management and carry Google's protos. Its
//! default feature pulls in aws-lc-rs (a C and CMake build); this crate turns it off and installs
//! rustls' `ring` provider instead, which the workspace already builds.
//!
//! ## Where it connects
//! - `MICRO_BROKER_ADDRESS=host:port` (or `http://host:port`): a **Pub/Sub emulator**, plain gRPC,
//!   no credentials. Without an address, `PUBSUB_EMULATOR_HOST` (what Google's clients read) does
//!   the same.
//! - Neither: **Google's endpoint** (`https://pubsub.googleapis.com`, or an `https://` address such
//!   as a regional endpoint) with Application Default Credentials, or the JSON key in the parameter
//!   `credentials_file`. This path compiles and is unit-tested for its errors, but is not tested
//!   against Google here (the test machine reaches no cloud).
//! - The project: the parameter `project`, else `GOOGLE_CLOUD_PROJECT` / `GCLOUD_PROJECT` /
//!   `CLOUDSDK_CORE_PROJECT`, else (emulator only) `test`.
//! - `connect()` builds the clients and makes one call (a `GetTopic`) within `connect_timeout`: an
//!   unreachable endpoint, missing or refused credentials are a [`Connection`](ErrorKind::Connection)
//!   error naming the endpoint, never a hang.
//!
//! ## Mapping
//! - **Topic = Pub/Sub topic**, named by [`wire::topic_id`] (letters, digits, `- _ . +` kept, the
//!   rest `~XX`-escaped, `mb~~` in front of ids Pub/Sub would refuse), created on first use
//!   (publish or subscribe). A name that cannot be mapped (too long) is `InvalidInput`.
//! - **Queue group** = one named subscription `<topic id>~~<group>` shared by its members (Pub/Sub
//!   spreads the messages over their streams). It is created on first subscribe and never deleted
//!   by this backend: it keeps messages while all members are away. If it already exists, its
//!   settings are left as they are.
//! - **Broadcast** = a subscription of its own per subscriber, `<topic id>~~b~~<unique>`, deleted on
//!   unsubscribe and on disconnect (and by Pub/Sub after `broadcast_ttl_hours` of disuse if the
//!   process died). It starts empty: a new broadcast subscriber does not read older messages
//!   (`persistence: false`), and a message published while a topic has no subscription is dropped
//!   by Pub/Sub (`backlog: false`).
//! - Body = data, **headers = attributes** (checked against Pub/Sub's limits, [`wire`]).
//! - **Ordering**: subscriptions are created with message ordering on; an `ordering_key` is the
//!   Pub/Sub ordering key. A message published without one gets this broker's own key
//!   (`mb-<unique>`, one per `connect()`), so one publisher's messages arrive in publish order
//!   (`ordering: true`) while several publishers still spread over a queue group's members. Pub/Sub
//!   limits the throughput of one ordering key (about 1 MB/s): give messages keys of their own
//!   where that matters.
//!
//! ## Publishing
//! `publish` returns after Pub/Sub stored the message (the message id came back), within
//! `publish_timeout`. Messages are batched for at most `batch_delay_ms` (1 ms by default). A failed
//! publish with an ordering key resumes that key for the next publish (the caller got the error).
//!
//! ## Consuming
//! - A streaming pull per subscription, holding at most `max_outstanding_messages` (default 100, at
//!   least `concurrency`) unacknowledged; at most `concurrency` handlers run. The client extends
//!   each message's ack deadline while its handler runs.
//! - With auto-ack a message is acked **after** its handler succeeds.
//! - A nack (a failed handler, or `Event::nack`) is a Pub/Sub nack (ack deadline 0), after a short
//!   pause (10 ms, doubling, at most 1 s): Pub/Sub redelivers the message.
//! - [`Event::attempt`]: Pub/Sub's delivery attempt where the subscription has a dead-letter policy;
//!   otherwise this subscriber counts deliveries per message id (in memory, up to 10,000 messages in
//!   flight; a queue group's members count their own deliveries only). The previous failure's reason
//!   is offered as [`Event::error`] on a redelivery this subscriber saw fail.
//! - After `max_redeliveries` redeliveries the message is **dead-lettered** by this backend: published
//!   to `<topic>.dlq` with its body and headers plus `x-dead-letter-reason`, `x-delivery-attempts`,
//!   `x-original-topic` ([`broker_core::headers`]), then acked. With `dead_letter_policy=true`
//!   (default) the subscription also gets Pub/Sub's own dead-letter policy to the same topic, with
//!   `max_delivery_attempts` = `max_redeliveries + 2` clamped to Pub/Sub's 5..=100 (not set for
//!   `max_redeliveries` of 100 or more): it gives the server's delivery count, and on Google's
//!   service it catches messages whose consumer crashes (the Pub/Sub service account then needs
//!   publisher rights on the dead-letter topic and subscriber rights on the subscription).
//! - **What the emulator does not do**: the Pub/Sub emulator of this machine image (0.8.20, gcloud
//!   528.0.0) stores the dead-letter policy, counts delivery attempts and stops redelivering after
//!   `max_delivery_attempts`, but does not publish the message to the dead-letter topic: it drops
//!   it. The broker's own dead-lettering comes first, so nothing is lost through the broker; a
//!   consumer that crashes that many times loses the message on the emulator only. Requests that
//!   name an id holding `%` (legal on Google's service) fail on it with HTTP 404 (the admin calls
//!   go over REST, the id in the URL path), hence the `~XX` escaping of [`wire`].
//!
//! ## Disconnect
//! `disconnect()` stops every stream, lets running handlers finish and their acks go out (bounded by
//! `drain_timeout`), deletes the broadcast subscriptions and flushes the publishers.
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use broker_core::{BrokerOptions, Message, PublishOptions};
//! use broker_gcp_pubsub as _;
//! let options = BrokerOptions::new().with_addresses(["127.0.0.1:8085"]).with_param("project", "test");
//! let broker = broker_core::from_name("gcp-pubsub", options)?;
//! broker.connect().await?;
//! broker.publish("orders.created", Message::new("42"), PublishOptions::new()).await?;
//! broker.disconnect().await
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
mod error;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use broker_core::{
    Acknowledger, Broker, BrokerOptions, Capabilities, Error, ErrorKind, Event, Handler, Message, PublishOptions,
    Result, RunningState, SubscribeOptions, Subscriber, headers, run_handler, running_handler_of, scope_handler,
    validate_topic,
};
use google_cloud_auth::credentials::Credentials;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::options::RequestOptionsBuilder;
use google_cloud_gax::retry_policy::NeverRetry;
use google_cloud_pubsub::client::{BasePublisher, Publisher, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::{DeadLetterPolicy, ExpirationPolicy};
use google_cloud_pubsub::subscriber::handler::Handler as PubSubHandle;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use config::Endpoint;
pub use config::PubSubConfig;

/// The plugin name.
pub const NAME: &str = "gcp-pubsub";

/// What this backend does. See the [crate docs](crate).
pub const CAPABILITIES: Capabilities = Capabilities {
    queue_groups: true,
    persistence: false,
    backlog: false,
    ordering: true,
    redelivery: true,
    delayed_delivery: false,
    native_headers: true,
    tls: false,
};

broker_core::register_plugin! {
    name: NAME,
    description: "Google Cloud Pub/Sub (google-cloud-pubsub; the emulator with PUBSUB_EMULATOR_HOST): ack after the handler, redelivery, dead letters, ordering keys",
    capabilities: CAPABILITIES,
    factory: build,
}

fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(PubSubBroker::with_options(options)?))
}

/// How long a cleanup call (delete a subscription, flush, stream shutdown) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most messages whose deliveries a subscription counts at once (see [`Event::attempt`]).
const MAX_COUNTED: usize = 10_000;

/// Pub/Sub's bounds of a dead-letter policy's `max_delivery_attempts`.
const DELIVERY_ATTEMPTS_RANGE: (u32, u32) = (5, 100);

/// The largest message Pub/Sub accepts (data, attributes and ordering key), in bytes.
const MAX_MESSAGE_BYTES: usize = 10_000_000;

/// Counters of what the broker did beyond plain delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PubSubStats {
    /// Messages nacked for redelivery.
    pub redeliveries: u64,
    /// Messages dead-lettered to `<topic>.dlq` after `max_redeliveries`.
    pub dead_lettered: u64,
    /// Topics created by this broker.
    pub topics_created: u64,
}

#[derive(Debug, Default)]
struct Counters {
    redeliveries: AtomicU64,
    dead_lettered: AtomicU64,
    topics_created: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A name no other process or broker of this process uses at the same time.
fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}-{nanos:x}-{n}", std::process::id())
}

/// The Google Cloud Pub/Sub broker. See the [crate docs](crate).
pub struct PubSubBroker {
    inner: Arc<Inner>,
}

struct Inner {
    options: RwLock<BrokerOptions>,
    config: RwLock<PubSubConfig>,
    slot: tokio::sync::Mutex<Option<Arc<Running>>>,
    current: RunningState<Running>,
    counters: Arc<Counters>,
}

/// Everything that exists while connected.
struct Running {
    config: PubSubConfig,
    options: BrokerOptions,
    /// The endpoint, for messages.
    endpoint: String,
    /// `projects/<project>`.
    project_path: String,
    topic_admin: TopicAdmin,
    subscription_admin: SubscriptionAdmin,
    subscriber: google_cloud_pubsub::client::Subscriber,
    base_publisher: BasePublisher,
    /// One batching publisher per Pub/Sub topic id.
    publishers: Mutex<HashMap<String, Publisher>>,
    /// Topic ids known to exist.
    topics: Mutex<HashSet<String>>,
    /// The ordering key of messages published without one.
    own_key: String,
    subs: Mutex<HashMap<u64, Arc<SubState>>>,
    next_sub: AtomicU64,
    counters: Arc<Counters>,
}

impl PubSubBroker {
    /// A Pub/Sub broker with default options (see [`config`]: `PUBSUB_EMULATOR_HOST` or Google's endpoint).
    ///
    /// # Errors
    ///
    /// When `PUBSUB_EMULATOR_HOST` holds something that is not `host:port`.
    pub fn new() -> Result<Self> {
        PubSubBroker::with_options(BrokerOptions::default())
    }

    /// A Pub/Sub broker with `options`; see [`config::PARAMS`] for its parameters. Does no I/O.
    pub fn with_options(options: BrokerOptions) -> Result<Self> {
        let config = PubSubConfig::from_options(&options)?;
        Ok(PubSubBroker {
            inner: Arc::new(Inner {
                options: RwLock::new(options),
                config: RwLock::new(config),
                slot: tokio::sync::Mutex::new(None),
                current: RunningState::new(),
                counters: Arc::new(Counters::default()),
            }),
        })
    }

    /// What the broker did so far.
    pub fn stats(&self) -> PubSubStats {
        let c = &self.inner.counters;
        PubSubStats {
            redeliveries: c.redeliveries.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            topics_created: c.topics_created.load(Ordering::Relaxed),
        }
    }

    fn current(&self) -> Option<Arc<Running>> {
        self.inner.current.get()
    }

    fn connected(&self) -> Result<Arc<Running>> {
        self.inner.current.connected(NAME)
    }

    fn config(&self) -> PubSubConfig {
        self.inner.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl fmt::Debug for PubSubBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubBroker")
            .field("config", &self.config())
            .field("connected", &self.current().is_some())
            .finish()
    }
}

impl Inner {
    fn options(&self) -> BrokerOptions {
        self.options.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without disconnect(): stop the pumps rather than leak them.
        if let Some(running) = self.current.take() {
            for sub in lock(&running.subs).values() {
                sub.stop.cancel();
            }
        }
    }
}

/// The credentials for `config`'s endpoint: none for an emulator, the key file, or ADC.
fn credentials(config: &PubSubConfig) -> Result<Credentials> {
    if matches!(config.endpoint, Endpoint::Emulator(_)) {
        return Ok(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    let Some(path) = &config.credentials_file else {
        return google_cloud_auth::credentials::Builder::default().build().map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!(
                    "no Application Default Credentials for {}: set GOOGLE_APPLICATION_CREDENTIALS or the parameter \
                     credentials_file, or use an emulator (PUBSUB_EMULATOR_HOST): {e}",
                    config.endpoint
                ),
            )
            .with_source(e)
        });
    };
    let bad = |why: String| Error::invalid_input(format!("credentials_file {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("is not a JSON key file: {e}")))?;
    let built = match json.get("type").and_then(|t| t.as_str()) {
        Some("service_account") => google_cloud_auth::credentials::service_account::Builder::new(json).build(),
        Some("authorized_user") => google_cloud_auth::credentials::user_account::Builder::new(json).build(),
        other => {
            return Err(bad(format!("has \"type\": {other:?}; expected \"service_account\" or \"authorized_user\"")));
        }
    };
    built.map_err(|e| bad(format!("is not a usable key: {e}")))
}

/// Builds the clients and checks that the endpoint answers, within the connect timeout.
async fn open(config: PubSubConfig, options: BrokerOptions, counters: Arc<Counters>) -> Result<Running> {
    // google-cloud-auth and tonic's TLS need a process-wide rustls provider; another one already
    // installed (by the application) is fine too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let project = config.project()?.to_string();
    let endpoint = config.endpoint.to_string();
    let url = config.endpoint.url();
    let credentials = credentials(&config)?;
    let limit = options.connect_timeout;
    let build = async {
        let topic_admin = TopicAdmin::builder()
            .with_endpoint(url.clone())
            .with_credentials(credentials.clone())
            .build()
            .await
            .map_err(|e| error::client(&endpoint, e))?;
        let subscription_admin = SubscriptionAdmin::builder()
            .with_endpoint(url.clone())
            .with_credentials(credentials.clone())
            .build()
            .await
            .map_err(|e| error::client(&endpoint, e))?;
        let subscriber = google_cloud_pubsub::client::Subscriber::builder()
            .with_endpoint(url.clone())
            .with_credentials(credentials.clone())
            .build()
            .await
            .map_err(|e| error::client(&endpoint, e))?;
        let base_publisher = BasePublisher::builder()
            .with_endpoint(url.clone())
            .with_credentials(credentials.clone())
            .build()
            .await
            .map_err(|e| error::client(&endpoint, e))?;
        // One call proves the endpoint answers and takes the credentials: a topic that need not exist.
        let probe = format!("projects/{project}/topics/micro-broker-connect-probe");
        // Without retries: an endpoint that does not answer is an error now, not at the timeout.
        match topic_admin.get_topic().set_topic(probe).with_retry_policy(NeverRetry).send().await {
            Ok(_) => {}
            Err(e) if matches!(error::code(&e), Some(Code::NotFound | Code::PermissionDenied)) => {}
            Err(e) => {
                let (kind, hint) = error::classify(&e);
                let kind = if kind == ErrorKind::Timeout { ErrorKind::Connection } else { kind };
                return Err(Error::new(kind, format!("cannot connect to {endpoint}: {hint}: {e}")).with_source(e));
            }
        }
        Ok::<_, Error>((topic_admin, subscription_admin, subscriber, base_publisher))
    };
    let (topic_admin, subscription_admin, subscriber, base_publisher) =
        tokio::time::timeout(limit, build).await.map_err(|_| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot connect to {endpoint}: no answer within the connect timeout of {limit:?}"),
            )
        })??;
    Ok(Running {
        config,
        options,
        endpoint,
        project_path: format!("projects/{project}"),
        topic_admin,
        subscription_admin,
        subscriber,
        base_publisher,
        publishers: Mutex::new(HashMap::new()),
        topics: Mutex::new(HashSet::new()),
        own_key: format!("mb-{}", unique()),
        subs: Mutex::new(HashMap::new()),
        next_sub: AtomicU64::new(1),
        counters,
    })
}

impl Running {
    fn topic_path(&self, id: &str) -> String {
        format!("{}/topics/{id}", self.project_path)
    }

    fn subscription_path(&self, id: &str) -> String {
        format!("{}/subscriptions/{id}", self.project_path)
    }

    /// Creates the topic `id` unless this broker knows it exists.
    async fn ensure_topic(&self, id: &str) -> Result<()> {
        if lock(&self.topics).contains(id) {
            return Ok(());
        }
        let limit = self.options.publish_timeout;
        let what = format!("create the topic {id:?}");
        let created = tokio::time::timeout(limit, self.topic_admin.create_topic().set_name(self.topic_path(id)).send())
            .await
            .map_err(|_| error::timeout(&what, &self.endpoint, limit))?;
        match created {
            Ok(_) => {
                self.counters.topics_created.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if error::code(&e) == Some(Code::AlreadyExists) => {}
            Err(e) => return Err(error::rpc(&what, &self.endpoint, e)),
        }
        lock(&self.topics).insert(id.to_string());
        Ok(())
    }

    fn publisher(&self, id: &str) -> Publisher {
        lock(&self.publishers)
            .entry(id.to_string())
            .or_insert_with(|| {
                self.base_publisher.publisher(self.topic_path(id)).set_delay_threshold(self.config.batch_delay).build()
            })
            .clone()
    }

    /// Publishes `message` to broker topic `topic` with `key` and waits for its message id (creating
    /// the topic first if needed), within the publish timeout.
    async fn send(&self, topic: &str, message: &Message, key: &str) -> Result<()> {
        let id = wire::topic_id(topic)?;
        let encoded = wire::encode(message, key)?;
        let size =
            encoded.data.len() + key.len() + encoded.attributes.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if size > MAX_MESSAGE_BYTES {
            return Err(Error::invalid_input(format!(
                "the message to {topic:?} is {size} bytes; Pub/Sub accepts at most {MAX_MESSAGE_BYTES}"
            )));
        }
        let limit = self.options.publish_timeout;
        let what = format!("publish to {topic:?}");
        let attempt = async {
            for retry in [false, true] {
                self.ensure_topic(&id).await?;
                let publisher = self.publisher(&id);
                match publisher.publish(encoded.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        if !key.is_empty() {
                            // The caller hears of the failure: later publishes with the key go on.
                            publisher.resume_publish(key);
                        }
                        let not_found = matches!(&e, google_cloud_pubsub::error::PublishError::Rpc(rpc)
                            if error::code(rpc) == Some(Code::NotFound));
                        if not_found && !retry {
                            // Deleted behind our back: create it again, once.
                            lock(&self.topics).remove(&id);
                            continue;
                        }
                        return Err(error::publish(&what, &self.endpoint, e));
                    }
                }
            }
            Err(Error::new(ErrorKind::Backend, format!("{what}: the topic disappeared twice")))
        };
        tokio::time::timeout(limit, attempt).await.map_err(|_| error::timeout(&what, &self.endpoint, limit))?
    }

    /// Publishes a dead letter of `message` (first published to `topic`) to `<topic>.dlq`.
    async fn dead_letter(&self, topic: &str, message: &Message, reason: &str, attempts: u32) -> Result<()> {
        let dlq = format!("{topic}.dlq");
        let letter = message
            .clone()
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::DELIVERY_ATTEMPTS, attempts.to_string())
            .with_header(headers::ORIGINAL_TOPIC, topic);
        self.send(&dlq, &letter, &self.own_key).await?;
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%topic, %dlq, reason, attempts, "gcp-pubsub broker: dead-lettered");
        Ok(())
    }

    /// Creates the subscription of `plan` (a group's may exist already).
    async fn create_subscription(&self, plan: &Plan) -> Result<()> {
        let limit = self.options.publish_timeout;
        let topic_id = wire::topic_id(&plan.topic)?;
        self.ensure_topic(&topic_id).await?;
        let ack_deadline = i32::try_from(self.config.ack_deadline.as_secs()).unwrap_or(600);
        let mut request = self
            .subscription_admin
            .create_subscription()
            .set_name(self.subscription_path(&plan.subscription))
            .set_topic(self.topic_path(&topic_id))
            .set_ack_deadline_seconds(ack_deadline)
            .set_enable_message_ordering(true);
        // Only where the broker's own dead-lettering (at attempt max + 1) comes first: past
        // Pub/Sub's bound of 100 attempts the server would act before it (and the emulator drops).
        if let Some(max) = plan.options.max_redeliveries
            && self.config.dead_letter_policy
            && max < DELIVERY_ATTEMPTS_RANGE.1
        {
            let dlq_id = wire::topic_id(&format!("{}.dlq", plan.topic))?;
            self.ensure_topic(&dlq_id).await?;
            let (low, high) = DELIVERY_ATTEMPTS_RANGE;
            let attempts = max.saturating_add(2).clamp(low, high);
            request = request.set_dead_letter_policy(
                DeadLetterPolicy::new()
                    .set_dead_letter_topic(self.topic_path(&dlq_id))
                    .set_max_delivery_attempts(i32::try_from(attempts).unwrap_or(100)),
            );
        }
        if plan.temporary {
            let secs = i64::try_from(self.config.broadcast_ttl.as_secs()).unwrap_or(24 * 3600);
            request = request.set_expiration_policy(ExpirationPolicy::new().set_ttl(wkt::Duration::clamp(secs, 0)));
        }
        let what = format!("create the subscription {:?} to {:?}", plan.subscription, plan.topic);
        let created = tokio::time::timeout(limit, request.send())
            .await
            .map_err(|_| error::timeout(&what, &self.endpoint, limit))?;
        match created {
            Ok(_) => Ok(()),
            Err(e) if !plan.temporary && error::code(&e) == Some(Code::AlreadyExists) => Ok(()),
            Err(e) => Err(error::rpc(&what, &self.endpoint, e)),
        }
    }

    /// Opens the streaming pull of `plan`'s subscription.
    fn stream(&self, plan: &Plan) -> MessageStream {
        let outstanding =
            self.config.max_outstanding_messages.max(i64::try_from(plan.options.concurrency).unwrap_or(i64::MAX));
        self.subscriber
            .subscribe(self.subscription_path(&plan.subscription))
            .set_max_outstanding_messages(outstanding)
            .set_max_lease_extension(self.config.ack_deadline)
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build()
    }

    /// Deletes a broadcast subscription.
    async fn delete_subscription(&self, id: &str) {
        let call = self.subscription_admin.delete_subscription().set_subscription(self.subscription_path(id)).send();
        match tokio::time::timeout(CLOSE_TIMEOUT, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if error::code(&e) == Some(Code::NotFound) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, subscription = id, "gcp-pubsub broker: cannot delete a broadcast subscription (it expires by itself)")
            }
            Err(_) => tracing::warn!(
                subscription = id,
                "gcp-pubsub broker: deleting a broadcast subscription timed out (it expires by itself)"
            ),
        }
    }
}

/// What a subscription consumes.
struct Plan {
    topic: Arc<str>,
    /// The Pub/Sub subscription id.
    subscription: String,
    /// A broadcast subscription, deleted on unsubscribe.
    temporary: bool,
    options: SubscribeOptions,
}

/// How often this subscriber saw a message, and why its last attempt failed.
#[derive(Debug, Default)]
struct Seen {
    deliveries: u32,
    last_failure: Option<String>,
}

/// One subscription's control state.
struct SubState {
    id: u64,
    plan: Arc<Plan>,
    stop: CancellationToken,
    pump: TaskTracker,
    handlers: TaskTracker,
    drain_timeout: Duration,
    /// The stream, handed over by the pump when it stops, shut down (acks flushed) by `finish`.
    parked: Mutex<Option<MessageStream>>,
    /// Deliveries per message id (see [`Event::attempt`]).
    seen: Mutex<HashMap<String, Seen>>,
    finished: tokio::sync::Mutex<bool>,
}

impl SubState {
    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    async fn wait_for_others(self: &Arc<Self>) {
        broker_core::wait_for_other_handlers(&self.handlers, self.key()).await;
    }

    /// Counts a delivery of `message_id`: the attempt (the server's where it has one) and the
    /// previous attempt's failure, if this subscriber saw it.
    fn count(&self, message_id: &str, server_attempt: Option<i32>) -> (u32, Option<String>) {
        let mut seen = lock(&self.seen);
        if seen.len() >= MAX_COUNTED && !seen.contains_key(message_id) {
            seen.clear();
        }
        let entry = seen.entry(message_id.to_string()).or_default();
        entry.deliveries = entry.deliveries.saturating_add(1);
        let attempt = server_attempt.and_then(|a| u32::try_from(a).ok()).filter(|a| *a > 0).unwrap_or(entry.deliveries);
        (attempt, entry.last_failure.clone())
    }

    fn forget(&self, message_id: &str) {
        lock(&self.seen).remove(message_id);
    }

    fn failed(&self, message_id: &str, reason: &str) {
        if let Some(entry) = lock(&self.seen).get_mut(message_id) {
            entry.last_failure = Some(reason.to_string());
        }
    }

    fn dispatch(
        self: &Arc<Self>,
        handler: &Arc<dyn Handler>,
        event: Event,
        auto_ack: bool,
        permit: OwnedSemaphorePermit,
    ) {
        let handler = Arc::clone(handler);
        self.handlers.spawn(scope_handler(self.key(), async move {
            if let Err(error) = run_handler(handler.as_ref(), event, auto_ack).await {
                tracing::debug!(%error, "gcp-pubsub broker: delivery failed");
            }
            drop(permit);
        }));
    }

    /// After the pump and the handlers are done: shuts the stream down (pending acks go out) and
    /// deletes a broadcast subscription. Runs once.
    async fn finish(&self, running: Option<Arc<Running>>) {
        let mut finished = self.finished.lock().await;
        if *finished {
            return;
        }
        *finished = true;
        let stream = lock(&self.parked).take();
        if let Some(stream) = stream {
            let token = stream.shutdown_token();
            if tokio::time::timeout(CLOSE_TIMEOUT, token.shutdown()).await.is_err() {
                tracing::warn!(topic = %self.plan.topic, "gcp-pubsub broker: the stream did not shut down in time");
            }
            drop(stream);
        }
        if self.plan.temporary
            && let Some(running) = running
        {
            running.delete_subscription(&self.plan.subscription).await;
        }
    }
}

/// How a delivery is settled: ack; nack = Pub/Sub nack after a pause (or dead-letter, then ack).
struct Settle {
    handle: Mutex<Option<PubSubHandle>>,
    running: Weak<Running>,
    state: Weak<SubState>,
    message_id: String,
    topic: Arc<str>,
    message: Message,
    attempt: u32,
    max_redeliveries: Option<u32>,
}

impl Settle {
    fn take(&self) -> Option<PubSubHandle> {
        lock(&self.handle).take()
    }

    fn forget(&self) {
        if let Some(state) = self.state.upgrade() {
            state.forget(&self.message_id);
        }
    }
}

#[async_trait]
impl Acknowledger for Settle {
    async fn ack(&self) -> Result<()> {
        if let Some(handle) = self.take() {
            handle.ack();
        }
        self.forget();
        Ok(())
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        let redeliveries_so_far = self.attempt.saturating_sub(1);
        if self.max_redeliveries.is_some_and(|max| redeliveries_so_far >= max)
            && let Some(running) = self.running.upgrade()
        {
            return match running.dead_letter(&self.topic, &self.message, reason, self.attempt).await {
                Ok(()) => {
                    if let Some(handle) = self.take() {
                        handle.ack();
                    }
                    self.forget();
                    Ok(())
                }
                Err(error) => {
                    tracing::warn!(%error, "gcp-pubsub broker: cannot dead-letter a message; nacking it");
                    if let Some(handle) = self.take() {
                        handle.nack();
                    }
                    Err(error)
                }
            };
        }
        if let Some(state) = self.state.upgrade() {
            state.failed(&self.message_id, reason);
        }
        let pause = Duration::from_millis(10u64 << redeliveries_so_far.min(7)).min(Duration::from_secs(1));
        tokio::time::sleep(pause).await;
        if let Some(handle) = self.take() {
            handle.nack();
            if let Some(running) = self.running.upgrade() {
                running.counters.redeliveries.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// One subscription's loop: a concurrency permit, then a message, then its handler in a task. A
/// stream that fails is opened again (with backoff) until the subscription stops.
async fn pump(running: Weak<Running>, state: Arc<SubState>, handler: Arc<dyn Handler>, mut stream: MessageStream) {
    let plan = Arc::clone(&state.plan);
    let limit = Arc::new(Semaphore::new(plan.options.concurrency));
    let mut backoff = Duration::from_millis(100);
    'outer: loop {
        let permit = tokio::select! {
            biased;
            _ = state.stop.cancelled() => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            biased;
            _ = state.stop.cancelled() => break,
            next = stream.next() => next,
        };
        let (message, handle) = match next {
            Some(Ok(pair)) => pair,
            Some(Err(error)) => {
                tracing::warn!(%error, topic = %plan.topic, subscription = %plan.subscription, "gcp-pubsub broker: the stream failed; opening it again");
                loop {
                    tokio::select! {
                        biased;
                        _ = state.stop.cancelled() => break 'outer,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    let Some(current) = running.upgrade() else { break 'outer };
                    // A deleted subscription (expired, or removed by hand) is created again.
                    match current.create_subscription(&plan).await {
                        Ok(()) => {
                            stream = current.stream(&plan);
                            continue 'outer;
                        }
                        Err(error) => {
                            tracing::warn!(%error, topic = %plan.topic, "gcp-pubsub broker: resubscribe failed; trying again")
                        }
                    }
                }
            }
            None => break,
        };
        backoff = Duration::from_millis(100);
        let (attempt, previous_failure) = state.count(&message.message_id, handle.delivery_attempt());
        let message_id = message.message_id.clone();
        let decoded = wire::decode(message);
        let settle = Settle {
            handle: Mutex::new(Some(handle)),
            running: running.clone(),
            state: Arc::downgrade(&state),
            message_id,
            topic: Arc::clone(&plan.topic),
            message: decoded.clone(),
            attempt,
            max_redeliveries: plan.options.max_redeliveries,
        };
        let mut event = Event::builder(Arc::clone(&plan.topic), decoded).attempt(attempt).acknowledger(settle);
        if let Some(reason) = previous_failure {
            event = event.error(Error::new(ErrorKind::Handler, format!("the previous attempt failed: {reason}")));
        }
        state.dispatch(&handler, event.build(), plan.options.auto_ack, permit);
    }
    // Stopped: keep the stream (and so the leases of running handlers) until `finish`.
    *lock(&state.parked) = Some(stream);
}

#[async_trait]
impl Broker for PubSubBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        if self.current().is_some() {
            return Err(Error::invalid_input("init() on a connected gcp-pubsub broker: call disconnect() first"));
        }
        let config = PubSubConfig::from_options(&options)?;
        *self.inner.options.write().unwrap_or_else(|p| p.into_inner()) = options;
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        self.inner.options()
    }

    fn address(&self) -> String {
        match &self.config().endpoint {
            Endpoint::Emulator(host) => host.clone(),
            Endpoint::Google(url) => url.clone(),
        }
    }

    async fn connect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let options = self.inner.options();
        let config = PubSubConfig::from_options(&options)?;
        let running = Arc::new(open(config, options, Arc::clone(&self.inner.counters)).await?);
        self.inner.current.set(Arc::clone(&running));
        *slot = Some(running);
        Ok(())
    }

    async fn disconnect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        let Some(running) = slot.take() else { return Ok(()) };
        self.inner.current.clear();
        let timeout = running.options.drain_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let subs: Vec<Arc<SubState>> = lock(&running.subs).drain().map(|(_, s)| s).collect();
        for sub in &subs {
            sub.stop.cancel();
            sub.pump.close();
            sub.handlers.close();
        }
        let drained = tokio::time::timeout_at(deadline, async {
            for sub in &subs {
                sub.pump.wait().await;
                sub.wait_for_others().await;
            }
        })
        .await
        .is_ok();
        for sub in &subs {
            sub.finish(Some(Arc::clone(&running))).await;
        }
        let publishers: Vec<Publisher> = lock(&running.publishers).drain().map(|(_, p)| p).collect();
        for publisher in publishers {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, publisher.flush()).await;
        }
        if drained {
            return Ok(());
        }
        let problem = format!("handlers were still running after the drain timeout of {timeout:?}");
        tracing::warn!(%problem, "gcp-pubsub broker: disconnect did not drain cleanly");
        Err(Error::new(ErrorKind::Timeout, format!("gcp-pubsub broker disconnect: {problem}")))
    }

    async fn publish(&self, topic: &str, mut message: Message, options: PublishOptions) -> Result<()> {
        let running = self.connected()?;
        validate_topic(topic)?;
        CAPABILITIES.check_publish(NAME, &options)?;
        message.headers.extend(options.headers);
        let key = options.ordering_key.as_deref().unwrap_or(&running.own_key);
        running.send(topic, &message, key).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let running = self.connected()?;
        validate_topic(topic)?;
        CAPABILITIES.check_subscribe(NAME, &options)?;
        let (subscription, temporary) = match options.queue.as_deref() {
            Some(group) => (wire::group_subscription_id(topic, group)?, false),
            None => (wire::broadcast_subscription_id(topic, &unique())?, true),
        };
        let plan = Arc::new(Plan { topic: topic.into(), subscription, temporary, options: options.clone() });
        running.create_subscription(&plan).await?;
        let stream = running.stream(&plan);
        let id = running.next_sub.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(SubState {
            id,
            plan,
            stop: CancellationToken::new(),
            pump: TaskTracker::new(),
            handlers: TaskTracker::new(),
            drain_timeout: running.options.drain_timeout,
            parked: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
            finished: tokio::sync::Mutex::new(false),
        });
        state.pump.spawn(pump(Arc::downgrade(&running), Arc::clone(&state), handler, stream));
        lock(&running.subs).insert(id, Arc::clone(&state));
        Ok(Box::new(PubSubSubscriber { topic: topic.to_string(), options, state, running: Arc::downgrade(&running) }))
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }
}

/// A subscription of the Pub/Sub broker.
struct PubSubSubscriber {
    topic: String,
    options: SubscribeOptions,
    state: Arc<SubState>,
    running: Weak<Running>,
}

impl fmt::Debug for PubSubSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubSubscriber")
            .field("topic", &self.topic)
            .field("subscription", &self.state.plan.subscription)
            .finish()
    }
}

#[async_trait]
impl Subscriber for PubSubSubscriber {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn options(&self) -> &SubscribeOptions {
        &self.options
    }

    async fn unsubscribe(&self) -> Result<()> {
        let state = &self.state;
        let running = self.running.upgrade();
        if let Some(running) = &running {
            lock(&running.subs).remove(&state.id);
        }
        state.stop.cancel();
        state.pump.close();
        state.handlers.close();
        let timeout = state.drain_timeout;
        let waited = tokio::time::timeout(timeout, async {
            state.pump.wait().await;
            state.wait_for_others().await;
        })
        .await;
        if running_handler_of() == Some(state.key()) {
            // Called from this subscription's own handler: finish once that handler (and its ack) is done.
            let state = Arc::clone(state);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(state.drain_timeout, state.handlers.wait()).await;
                state.finish(running).await;
            });
        } else {
            state.finish(running).await;
        }
        waited.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!("unsubscribe from {:?}: handlers still running after {timeout:?}", self.topic),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_with_its_capabilities() {
        let plugin = broker_core::plugin(NAME).unwrap();
        assert_eq!(plugin.capabilities, CAPABILITIES);
        let options = BrokerOptions::new().with_addresses(["127.0.0.1:8085"]);
        let broker = broker_core::from_name(NAME, options).unwrap();
        assert_eq!(broker.name(), NAME);
        assert_eq!(broker.address(), "127.0.0.1:8085");
    }

    #[tokio::test]
    async fn not_connected_and_tls_rejected() {
        let broker = PubSubBroker::with_options(BrokerOptions::new().with_addresses(["127.0.0.1:8085"])).unwrap();
        let err = broker.publish("t", Message::new("x"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotConnected);
        let err =
            PubSubBroker::with_options(BrokerOptions::new().with_tls(broker_core::TlsOptions::new())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }

    #[tokio::test]
    async fn unreachable_emulator_is_a_connection_error_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let options = BrokerOptions::new()
            .with_addresses([format!("127.0.0.1:{port}")])
            .with_connect_timeout(Duration::from_secs(3));
        let broker = PubSubBroker::with_options(options).unwrap();
        let started = std::time::Instant::now();
        let err = broker.connect().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused at once, not at the timeout: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn bad_credentials_file_is_a_typed_error() {
        let dir = std::env::temp_dir().join(format!("broker-gcp-pubsub-test-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.json");
        std::fs::write(&garbage, "not json").unwrap();
        let wrong_type = dir.join("wrong.json");
        std::fs::write(&wrong_type, r#"{"type":"nonsense"}"#).unwrap();
        let broken_key = dir.join("broken.json");
        std::fs::write(&broken_key, r#"{"type":"service_account","client_email":"a@b"}"#).unwrap();
        for path in [dir.join("missing.json"), garbage, wrong_type, broken_key] {
            let options = BrokerOptions::new()
                .with_addresses(["https://pubsub.googleapis.com"])
                .with_param("project", "some-project")
                .with_param("credentials_file", path.display().to_string());
            let broker = PubSubBroker::with_options(options).unwrap();
            let err = broker.connect().await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}: {err}", path.display());
            assert!(err.to_string().contains("credentials_file"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn google_endpoint_without_project_is_invalid_input() {
        let options = BrokerOptions::new().with_addresses(["https://pubsub.googleapis.com"]);
        let broker = PubSubBroker::with_options(options).unwrap();
        if PubSubConfig::from_options(&broker.options()).unwrap().project.is_none() {
            let err = broker.connect().await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        }
    }
}
