//! # broker-sqs: the AWS SQS + SNS backend (plugin `sqs`)
//!
//! Link it with `use broker_sqs as _;` (or the facade's `sqs` feature), then pick it with
//! `MICRO_BROKER=sqs`; `MICRO_BROKER_ADDRESS` is the endpoint of any SQS-compatible server
//! (`http://127.0.0.1:4566` for moto or LocalStack, which serve SNS on the same port), or unset for
//! AWS's regional endpoints. Parameters are listed in [`config::PARAMS`]. At-least-once, with
//! [aws-sdk-sqs](https://docs.rs/aws-sdk-sqs) and [aws-sdk-sns](https://docs.rs/aws-sdk-sns).
//!
//! ## Topology
//! - Each broker topic is an **SNS topic**; `publish` is an SNS `Publish` to it (created on first
//!   use, `CreateTopic` is idempotent). Names: [`names`] (legal, stable, collision-resistant).
//! - Every subscription reads an **SQS queue** subscribed to that SNS topic with
//!   `RawMessageDelivery=true` (so headers arrive as SQS message attributes), and a queue policy
//!   that lets the SNS topic send to it. So broadcast subscribers and queue groups of one topic all
//!   get every publish.
//! - A **queue group** is one queue named from the topic and the group, shared by its members
//!   in every process; it is kept when its members unsubscribe, so it keeps messages while all
//!   members are away.
//! - **Broadcast** is a temporary queue per subscriber, created on subscribe, unsubscribed and
//!   deleted on unsubscribe and disconnect (a process that dies without `disconnect` leaves it
//!   behind: SQS has no auto-delete). A new broadcast subscriber reads only what is published after
//!   it (`persistence: false`); a publish to a topic without subscriptions is dropped by SNS
//!   (`backlog: false`).
//! - Headers and body: [`wire`] (message attributes, up to SQS's 10; beyond that, or names SQS
//!   refuses, in the documented `x-micro-headers` JSON attribute; non-text bodies in base64).
//!   SNS and SQS take at most 256 KiB per message: a larger one is an `InvalidInput` error.
//!
//! ## Consuming
//! - Long polling (`wait_time_secs`, default 20), up to 10 messages per receive and never more
//!   than the subscription's free `concurrency`.
//! - While a handler runs, its message's visibility timeout (`visibility_timeout_secs`, default
//!   30) is extended every half of it, so a slow handler does not see its message redelivered.
//! - With auto-ack, success deletes the message; deletes are batched (`DeleteMessageBatch`, what
//!   was acked while the previous batch was under way) and `ack` does not wait for them: a delete
//!   that fails is logged and the message is received again (a duplicate, never a loss);
//!   unsubscribe and disconnect wait for the queued deletes. A failure (or `Event::nack`)
//!   sets its visibility to 0, so it is received again at once. [`Event::attempt`] is SQS's
//!   `ApproximateReceiveCount`.
//! - After `max_redeliveries` redeliveries the message is **dead-lettered**: published to
//!   `<topic>.dlq` (an ordinary broker topic) with its body and headers plus
//!   `x-dead-letter-reason`, `x-delivery-attempts` and `x-original-topic`, then deleted. A
//!   subscription with `max_redeliveries` also gets SQS's **redrive policy** (`maxReceiveCount` =
//!   `max_redeliveries + 1`) to the queue `<SNS topic name>-dlq` ([`names::redrive_queue`]): a
//!   message whose handler never settles it (the process died) lands there instead of cycling.
//!   Without `max_redeliveries` there is no limit, as in the other backends.
//! - A message received but not yet handed to a handler when the subscription stops (the receive
//!   is cancelled) becomes visible again after its visibility timeout.
//!
//! ## FIFO and ordering
//! Standard SQS queues do not keep order, so by default `ordering: false` and an ordering key is
//! `Unsupported`. With `fifo=true` every SNS topic and queue is FIFO (names end in `.fifo`):
//! `ordering: true`; the ordering key is the `MessageGroupId` (a key that SQS would refuse, over
//! 128 characters or not printable ASCII, is replaced by a hash of it), and messages without a key
//! use one group per broker, so one publisher's messages keep their order. Each publish carries a
//! fresh `MessageDeduplicationId`. FIFO throughput is what AWS allows per message group.
//!
//! ## Connecting
//! - Credentials: the parameters `access_key_id` / `secret_access_key` / `session_token`, else
//!   the user info of the address (`http://KEY:SECRET@127.0.0.1:4566`, percent-encoded), else
//!   `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`; region `region`, else
//!   `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`. (No profiles or instance roles: that is
//!   aws-config, which this crate does not build.) `Debug` hides the secrets.
//! - `connect()` checks the endpoint and the credentials with `ListQueues` and `ListTopics`,
//!   within `connect_timeout`: an unreachable endpoint or refused credentials is a `Connection` error.
//! - Every SDK call is bounded (`publish_timeout`; a receive by its long-poll wait plus that).
//! - HTTPS with rustls over ring and the system's roots; [`BrokerOptions::tls`] (own CA, client
//!   certificates) is `Unsupported` (`tls: false`).
//!
//! ## What the tests verify, and what they cannot
//! The conformance suite and `tests/sqs.rs` run against moto_server (`scripts/services/moto.sh`),
//! which answers SNS → SQS fan-out with raw delivery, message attributes,
//! `ChangeMessageVisibility`, `DeleteMessageBatch`, redrive policies and FIFO topics and queues.
//! moto accepts any credentials and enforces neither queue policies nor the limit of 10 message
//! attributes, and its SNS subscriptions take effect at once: refused credentials, the SNS → SQS
//! permission and subscription propagation delays are written for AWS as documented, not tested.
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use broker_core::{BrokerOptions, Message, PublishOptions};
//! use broker_sqs as _;
//! // moto or LocalStack on 127.0.0.1:4566 (they take any credentials).
//! let options = BrokerOptions::new().with_addresses(["http://test:test@127.0.0.1:4566"]);
//! let broker = broker_core::from_name("sqs", options)?;
//! broker.connect().await?;
//! broker.publish("orders.created", Message::new("42"), PublishOptions::new()).await?;
//! broker.disconnect().await
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
mod error;
pub mod names;
pub mod wire;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use broker_core::{
    Acknowledger, Broker, BrokerOptions, Capabilities, Error, ErrorKind, Event, Handler, Message, PublishOptions,
    Result, RunningState, SubscribeOptions, Subscriber, headers, run_handler, running_handler_of, scope_handler,
    validate_topic,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::SqsConfig;

/// The plugin name.
pub const NAME: &str = "sqs";

/// What this backend does by default (standard queues). See the [crate docs](crate).
pub const CAPABILITIES: Capabilities = Capabilities {
    queue_groups: true,
    persistence: false,
    backlog: false,
    ordering: false,
    redelivery: true,
    delayed_delivery: false,
    native_headers: true,
    tls: false,
};

/// What this backend does with `fifo=true`: [`CAPABILITIES`] plus ordering.
pub const FIFO_CAPABILITIES: Capabilities = Capabilities { ordering: true, ..CAPABILITIES };

broker_core::register_plugin! {
    name: NAME,
    description: "AWS SQS + SNS (any SQS-compatible endpoint): SNS topic per topic, a queue per group or broadcast subscriber, delete after the handler, redelivery, dead letters, FIFO with fifo=true",
    capabilities: CAPABILITIES,
    factory: build,
}

fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(SqsBroker::with_options(options)?))
}

/// How long the clean-up of a temporary queue (unsubscribe from SNS, delete the queue) may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The most messages one `ReceiveMessage` returns.
const MAX_RECEIVE: usize = 10;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The SQS broker. See the [crate docs](crate).
pub struct SqsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    options: RwLock<BrokerOptions>,
    config: RwLock<SqsConfig>,
    slot: tokio::sync::Mutex<Option<Arc<Running>>>,
    current: RunningState<Running>,
}

/// Everything that exists while connected.
struct Running {
    config: SqsConfig,
    options: BrokerOptions,
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    /// Where the clients talk to, for messages.
    endpoint: String,
    /// SNS topic name → ARN, for topics created (or found) so far.
    topic_arns: Mutex<HashMap<String, String>>,
    /// The FIFO message group of this broker's publishes without an ordering key.
    publisher_group: String,
    subs: Mutex<HashMap<u64, Arc<SubState>>>,
    next_sub: AtomicU64,
}

impl SqsBroker {
    /// An SQS broker with default options (AWS's endpoints, credentials from the environment).
    pub fn new() -> Self {
        // Default options cannot be rejected; should the environment ever be, ignore it.
        SqsBroker::with_options(BrokerOptions::default())
            .unwrap_or_else(|_| SqsBroker::build(BrokerOptions::default(), SqsConfig::default()))
    }

    /// An SQS broker with `options`; see [`config::PARAMS`] for its parameters. Does no I/O.
    pub fn with_options(options: BrokerOptions) -> Result<Self> {
        let config = SqsConfig::from_options(&options)?;
        Ok(SqsBroker::build(options, config))
    }

    fn build(options: BrokerOptions, config: SqsConfig) -> Self {
        SqsBroker {
            inner: Arc::new(Inner {
                options: RwLock::new(options),
                config: RwLock::new(config),
                slot: tokio::sync::Mutex::new(None),
                current: RunningState::new(),
            }),
        }
    }

    fn current(&self) -> Option<Arc<Running>> {
        self.inner.current.get()
    }

    fn connected(&self) -> Result<Arc<Running>> {
        self.inner.current.connected(NAME)
    }

    fn config(&self) -> SqsConfig {
        self.inner.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for SqsBroker {
    fn default() -> Self {
        SqsBroker::new()
    }
}

impl fmt::Debug for SqsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsBroker")
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
        // Dropped without disconnect(): stop the pumps rather than leak them (temporary queues stay).
        if let Some(running) = self.current.take() {
            for sub in lock(&running.subs).values() {
                sub.stop.cancel();
            }
        }
    }
}

/// Where `config` points the clients, for messages.
fn endpoint_text(config: &SqsConfig) -> String {
    match &config.endpoint {
        Some(endpoint) => endpoint.clone(),
        None => format!("AWS SQS/SNS in {}", config.region),
    }
}

/// The SQS and SNS clients of `config`: static credentials, rustls over ring, bounded connects.
fn clients(config: &SqsConfig, options: &BrokerOptions) -> Result<(aws_sdk_sqs::Client, aws_sdk_sns::Client)> {
    let (Some(key), Some(secret)) = (&config.access_key_id, &config.secret_access_key) else {
        return Err(Error::invalid_input(
            "no AWS credentials: set the broker parameters access_key_id and secret_access_key, put them in \
             the address (http://KEY:SECRET@host:port), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (moto takes any value)",
        ));
    };
    let credentials =
        aws_sdk_sqs::config::Credentials::new(key, secret, config.session_token.clone(), None, "micro-broker");
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let timeouts =
        aws_sdk_sqs::config::timeout::TimeoutConfig::builder().connect_timeout(options.connect_timeout).build();
    let retry = aws_sdk_sqs::config::retry::RetryConfig::standard()
        .with_max_attempts(3)
        .with_initial_backoff(Duration::from_millis(100));
    let region = aws_sdk_sqs::config::Region::new(config.region.clone());

    let mut sqs = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(region.clone())
        .credentials_provider(credentials.clone())
        .http_client(http.clone())
        .timeout_config(timeouts.clone())
        .retry_config(retry.clone());
    if let Some(endpoint) = &config.endpoint {
        sqs = sqs.endpoint_url(endpoint);
    }
    let mut sns = aws_sdk_sns::Config::builder()
        .behavior_version(aws_sdk_sns::config::BehaviorVersion::latest())
        .region(region)
        .credentials_provider(credentials)
        .http_client(http)
        .timeout_config(timeouts)
        .retry_config(retry);
    if let Some(endpoint) = config.sns_endpoint.as_ref().or(config.endpoint.as_ref()) {
        sns = sns.endpoint_url(endpoint);
    }
    Ok((aws_sdk_sqs::Client::from_conf(sqs.build()), aws_sdk_sns::Client::from_conf(sns.build())))
}

/// A FIFO `MessageGroupId` for an ordering key: the key itself when SQS takes it (1 to 128
/// printable ASCII characters), else `k-` and a hash of it.
fn message_group_id(key: &str) -> String {
    if !key.is_empty() && key.len() <= 128 && key.chars().all(|c| c.is_ascii_graphic()) {
        key.to_string()
    } else {
        format!("k-{}", names::sns_topic("k", key, false))
    }
}

impl Running {
    fn limit(&self) -> Duration {
        self.options.publish_timeout
    }

    /// The ARN of the SNS topic of broker topic `topic`, creating the SNS topic when needed.
    async fn topic_arn(&self, topic: &str) -> Result<String> {
        let name = names::sns_topic(&self.config.prefix, topic, self.config.fifo);
        if let Some(arn) = lock(&self.topic_arns).get(&name) {
            return Ok(arn.clone());
        }
        let mut request = self.sns.create_topic().name(&name);
        if self.config.fifo {
            request = request.attributes("FifoTopic", "true").attributes("ContentBasedDeduplication", "false");
        }
        let what = format!("create the SNS topic {name:?} of {topic:?}");
        let created = error::bounded(&what, &self.endpoint, self.limit(), request.send()).await?;
        let arn = created
            .topic_arn()
            .ok_or_else(|| Error::new(ErrorKind::Backend, format!("{what}: the answer has no TopicArn")))?
            .to_string();
        lock(&self.topic_arns).insert(name, arn.clone());
        Ok(arn)
    }

    /// Publishes `message` to the SNS topic of `topic`.
    async fn send(&self, topic: &str, message: &Message, ordering_key: Option<&str>) -> Result<()> {
        let encoded = wire::encode(message)?;
        let arn = self.topic_arn(topic).await?;
        let mut request = self.sns.publish().topic_arn(arn).message(encoded.body);
        for (name, value) in encoded.attributes {
            let value = aws_sdk_sns::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(|e| Error::invalid_input(format!("message attribute {name:?}: {e}")))?;
            request = request.message_attributes(name, value);
        }
        if self.config.fifo {
            let group = ordering_key.map_or_else(|| self.publisher_group.clone(), message_group_id);
            request =
                request.message_group_id(group).message_deduplication_id(uuid::Uuid::new_v4().simple().to_string());
        }
        error::bounded(&format!("publish to {topic:?}"), &self.endpoint, self.limit(), request.send()).await?;
        Ok(())
    }

    /// Publishes a dead letter of `message` (first published to `topic`) to `<topic>.dlq`.
    async fn dead_letter(&self, topic: &str, message: &Message, reason: &str, attempts: u32) -> Result<()> {
        let dlq = format!("{topic}.dlq");
        let letter = message
            .clone()
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::DELIVERY_ATTEMPTS, attempts.to_string())
            .with_header(headers::ORIGINAL_TOPIC, topic);
        self.send(&dlq, &letter, None).await?;
        tracing::warn!(%topic, %dlq, reason, attempts, "sqs broker: dead-lettered");
        Ok(())
    }

    /// Creates (or finds) the queue `name` and returns its URL and ARN.
    async fn create_queue(&self, name: &str) -> Result<(String, String)> {
        if !names::is_legal_queue_name(name, self.config.fifo) {
            return Err(Error::invalid_input(format!(
                "{name:?} is not a legal SQS queue name (1 to 80 of [A-Za-z0-9_-], .fifo for FIFO)"
            )));
        }
        let mut request = self.sqs.create_queue().queue_name(name);
        if self.config.fifo {
            request = request.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let what = format!("create the queue {name:?}");
        let created = error::bounded(&what, &self.endpoint, self.limit(), request.send()).await?;
        let url = created
            .queue_url()
            .ok_or_else(|| Error::new(ErrorKind::Backend, format!("{what}: the answer has no QueueUrl")))?
            .to_string();
        let what = format!("read the ARN of the queue {name:?}");
        let attributes = error::bounded(
            &what,
            &self.endpoint,
            self.limit(),
            self.sqs.get_queue_attributes().queue_url(&url).attribute_names(QueueAttributeName::QueueArn).send(),
        )
        .await?;
        let arn = attributes
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .ok_or_else(|| Error::new(ErrorKind::Backend, format!("{what}: the answer has no QueueArn")))?
            .clone();
        Ok((url, arn))
    }

    /// Creates the subscription's queue, lets the SNS topic send to it, subscribes it.
    async fn set_up(&self, topic: &str, queue: &str, options: &SubscribeOptions) -> Result<Cleanup> {
        let topic_arn = self.topic_arn(topic).await?;
        let (url, arn) = self.create_queue(queue).await?;
        let cleanup = Cleanup { queue_url: url.clone(), subscription_arn: Mutex::new(None) };
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "micro-broker-sns",
                "Effect": "Allow",
                "Principal": { "Service": "sns.amazonaws.com" },
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } },
            }],
        });
        let mut request = self
            .sqs
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                config::secs_i32(self.config.visibility_timeout).to_string(),
            )
            .attributes(QueueAttributeName::Policy, policy.to_string());
        // SQS's maxReceiveCount is 1 to 1000; a larger bound is kept by the dead-letter rule alone.
        if let Some(max) = options.max_redeliveries.filter(|max| *max < 1000) {
            let (_, dlq_arn) =
                self.create_queue(&names::redrive_queue(&self.config.prefix, topic, self.config.fifo)).await?;
            let redrive = serde_json::json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": max + 1 });
            request = request.attributes(QueueAttributeName::RedrivePolicy, redrive.to_string());
        }
        let what = format!("set the attributes of the queue {queue:?}");
        error::bounded(&what, &self.endpoint, self.limit(), request.send()).await?;
        let what = format!("subscribe the queue {queue:?} to the SNS topic of {topic:?}");
        let subscribed = error::bounded(
            &what,
            &self.endpoint,
            self.limit(),
            self.sns
                .subscribe()
                .topic_arn(topic_arn)
                .protocol("sqs")
                .endpoint(arn)
                .attributes("RawMessageDelivery", "true")
                .return_subscription_arn(true)
                .send(),
        )
        .await?;
        *lock(&cleanup.subscription_arn) = subscribed.subscription_arn().map(str::to_string);
        Ok(cleanup)
    }

    /// Unsubscribes a temporary queue from SNS and deletes it; failures are logged.
    async fn clean_up(&self, cleanup: &Cleanup) {
        let subscription = lock(&cleanup.subscription_arn).take();
        if let Some(arn) = subscription {
            let sent = error::bounded(
                "unsubscribe a broadcast queue from SNS",
                &self.endpoint,
                CLEANUP_TIMEOUT,
                self.sns.unsubscribe().subscription_arn(arn).send(),
            )
            .await;
            if let Err(error) = sent {
                tracing::warn!(%error, "sqs broker: cannot unsubscribe a broadcast queue");
            }
        }
        let deleted = error::bounded(
            "delete a broadcast queue",
            &self.endpoint,
            CLEANUP_TIMEOUT,
            self.sqs.delete_queue().queue_url(&cleanup.queue_url).send(),
        )
        .await;
        if let Err(error) = deleted {
            tracing::warn!(%error, queue = %cleanup.queue_url, "sqs broker: cannot delete a broadcast queue");
        }
    }
}

/// What a temporary (broadcast) queue leaves to undo.
struct Cleanup {
    queue_url: String,
    subscription_arn: Mutex<Option<String>>,
}

/// What a subscription consumes.
struct Plan {
    topic: Arc<str>,
    queue_url: Arc<str>,
    options: SubscribeOptions,
    /// The subscription's batching deleter (see [`delete_in_batches`]).
    acks: mpsc::UnboundedSender<String>,
}

/// Deletes acked messages of one queue (their receipt handles), up to 10 per
/// `DeleteMessageBatch`: what was acked while the previous batch was under way goes in the next,
/// so a lone ack waits for no timer, and a handler's ack does not wait for the round trip (with
/// concurrency 1 that would be one round trip per message). A delete that fails is logged: the
/// message is received again after its visibility timeout (a duplicate, never a loss). On `flush`
/// (unsubscribe, disconnect: the handlers are done) it deletes what is queued and ends; later acks
/// delete one by one.
async fn delete_in_batches(
    sqs: aws_sdk_sqs::Client,
    endpoint: String,
    queue_url: Arc<str>,
    limit: Duration,
    mut receipts: mpsc::UnboundedReceiver<String>,
    flush: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            receipt = receipts.recv() => match receipt {
                Some(receipt) => receipt,
                None => return,
            },
            _ = flush.cancelled() => match receipts.try_recv() {
                Ok(receipt) => receipt,
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_RECEIVE {
            match receipts.try_recv() {
                Ok(receipt) => batch.push(receipt),
                Err(_) => break,
            }
        }
        let mut call = sqs.delete_message_batch().queue_url(&*queue_url);
        for (i, receipt) in batch.iter().enumerate() {
            let entry = aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .build();
            match entry {
                Ok(entry) => call = call.entries(entry),
                Err(error) => tracing::warn!(%error, "sqs broker: cannot build a delete entry"),
            }
        }
        match error::bounded("ack (delete the messages)", &endpoint, limit, call.send()).await {
            Ok(output) => {
                for failed in output.failed() {
                    tracing::warn!(
                        code = failed.code(),
                        message = failed.message().unwrap_or_default(),
                        "sqs broker: an acked message was not deleted; it will be received again"
                    );
                }
            }
            Err(error) => {
                tracing::warn!(%error, count = batch.len(), "sqs broker: acked messages were not deleted; they will be received again");
            }
        }
    }
}

/// One subscription's control state.
struct SubState {
    id: u64,
    stop: CancellationToken,
    pump: TaskTracker,
    handlers: TaskTracker,
    drain_timeout: Duration,
    /// The batching deleter, and its signal to delete what is queued and end.
    deleter: TaskTracker,
    flush: CancellationToken,
    /// For a broadcast subscription: its queue, deleted once.
    temporary: Option<Cleanup>,
    cleaned: AtomicBool,
}

impl SubState {
    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// Waits for the running handlers, except the one calling.
    async fn wait_for_others(self: &Arc<Self>) {
        broker_core::wait_for_other_handlers(&self.handlers, self.key()).await;
    }

    /// Stops receiving; what runs goes on.
    fn stop(&self) {
        self.stop.cancel();
        self.pump.close();
        self.handlers.close();
    }

    /// Lets the deleter delete the acked messages it holds, then waits for it (bounded).
    async fn flush_acks(&self, limit: Duration) {
        self.flush.cancel();
        self.deleter.close();
        if tokio::time::timeout(limit, self.deleter.wait()).await.is_err() {
            tracing::warn!("sqs broker: acked messages were still being deleted after {limit:?}");
        }
    }

    /// Deletes the temporary queue, once.
    async fn clean_up(&self, running: &Running) {
        if let Some(cleanup) = &self.temporary
            && !self.cleaned.swap(true, Ordering::SeqCst)
        {
            running.clean_up(cleanup).await;
        }
    }
}

/// Extends the visibility of a received message every half of the visibility timeout, until
/// it is settled (the caller drops this future then); never returns.
async fn keep_invisible(settle: Arc<Settle>, visibility: Duration) {
    loop {
        tokio::time::sleep(visibility / 2).await;
        let request = settle
            .sqs
            .change_message_visibility()
            .queue_url(&*settle.queue_url)
            .receipt_handle(&settle.receipt)
            .visibility_timeout(config::secs_i32(visibility));
        let extended =
            error::bounded("extend the visibility of a message", &settle.endpoint, visibility / 2, request.send())
                .await;
        if let Err(error) = extended {
            tracing::warn!(%error, "sqs broker: cannot extend a message's visibility; it may be redelivered");
        }
    }
}

/// One subscription's loop: room in the prefetch window, a long-polling receive of up to that
/// many messages (at most 10), then a task per message that waits for a concurrency permit, in
/// arrival order, and runs the handler. A message's visibility is extended from its receipt on.
async fn pump(running: Weak<Running>, state: Arc<SubState>, handler: Arc<dyn Handler>, plan: Arc<Plan>) {
    let concurrency = Arc::new(Semaphore::new(plan.options.concurrency));
    // Received but unsettled messages: the running handlers and a receive's worth waiting.
    let prefetch = Arc::new(Semaphore::new(plan.options.concurrency.saturating_add(MAX_RECEIVE)));
    let mut backoff = Duration::from_millis(100);
    loop {
        let first = tokio::select! {
            biased;
            _ = state.stop.cancelled() => break,
            permit = Arc::clone(&prefetch).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let mut slots = vec![first];
        while slots.len() < MAX_RECEIVE {
            match Arc::clone(&prefetch).try_acquire_owned() {
                Ok(permit) => slots.push(permit),
                Err(_) => break,
            }
        }
        let Some(current) = running.upgrade() else { break };
        let wait = current.config.wait_time;
        let request = current
            .sqs
            .receive_message()
            .queue_url(&*plan.queue_url)
            .max_number_of_messages(i32::try_from(slots.len()).unwrap_or(1))
            .wait_time_seconds(config::secs_i32(wait))
            .visibility_timeout(config::secs_i32(current.config.visibility_timeout))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount);
        let what = format!("receive from the queue of {:?}", plan.topic);
        let received = tokio::select! {
            biased;
            _ = state.stop.cancelled() => break,
            received = error::bounded(&what, &current.endpoint, wait + current.limit(), request.send()) => received,
        };
        let output = match received {
            Ok(output) => {
                backoff = Duration::from_millis(100);
                output
            }
            Err(error) => {
                tracing::warn!(%error, topic = %plan.topic, "sqs broker: receive failed; trying again");
                drop(slots);
                tokio::select! {
                    biased;
                    _ = state.stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for received in output.messages.unwrap_or_default() {
            let Some(slot) = slots.pop() else { break };
            let Some(receipt) = received.receipt_handle().map(str::to_string) else { continue };
            let attempt = received
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.trim().parse::<u32>().ok())
                .unwrap_or(1)
                .max(1);
            let attributes = received
                .message_attributes()
                .into_iter()
                .flatten()
                .filter_map(|(name, value)| value.string_value().map(|text| (name.as_str(), text)));
            let message = wire::decode(received.body().unwrap_or_default(), attributes);
            let settle = Arc::new(Settle {
                sqs: current.sqs.clone(),
                endpoint: current.endpoint.clone(),
                queue_url: Arc::clone(&plan.queue_url),
                receipt,
                running: running.clone(),
                topic: Arc::clone(&plan.topic),
                message: message.clone(),
                attempt,
                max_redeliveries: plan.options.max_redeliveries,
                limit: current.limit(),
                acks: plan.acks.clone(),
            });
            let event = Event::builder(Arc::clone(&plan.topic), message)
                .attempt(attempt)
                .acknowledger(SharedSettle(Arc::clone(&settle)))
                .build();
            let heartbeat = keep_invisible(Arc::clone(&settle), current.config.visibility_timeout);
            let delivery = Delivery { event, settle, slot, heartbeat: Box::pin(heartbeat) };
            state.dispatch(&handler, delivery, plan.options.auto_ack, Arc::clone(&concurrency));
        }
    }
}

/// A received message on its way to the handler.
struct Delivery {
    event: Event,
    settle: Arc<Settle>,
    /// Its place in the prefetch window, given back when it is settled.
    slot: OwnedSemaphorePermit,
    heartbeat: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl SubState {
    fn dispatch(
        self: &Arc<Self>,
        handler: &Arc<dyn Handler>,
        delivery: Delivery,
        auto_ack: bool,
        concurrency: Arc<Semaphore>,
    ) {
        let handler = Arc::clone(handler);
        let stop = self.stop.clone();
        self.handlers.spawn(scope_handler(self.key(), async move {
            let Delivery { event, settle, slot, mut heartbeat } = delivery;
            let handled = async {
                // Semaphore waiters are served in order: messages start in the order received.
                let permit = tokio::select! {
                    biased;
                    _ = stop.cancelled() => None,
                    permit = concurrency.acquire_owned() => permit.ok(),
                };
                let Some(permit) = permit else {
                    // Stopped before its handler started: give the message back at once.
                    if let Err(error) = settle.make_visible().await {
                        tracing::debug!(%error, "sqs broker: cannot release an unhandled message");
                    }
                    return;
                };
                if let Err(error) = run_handler(handler.as_ref(), event, auto_ack).await {
                    tracing::debug!(%error, "sqs broker: delivery failed");
                }
                drop(permit);
            };
            tokio::select! {
                () = handled => {}
                () = &mut heartbeat => {}
            }
            drop(slot);
        }));
    }
}

/// How a delivery is settled: ack = delete; nack = visibility 0 (or a dead letter, then delete).
struct Settle {
    sqs: aws_sdk_sqs::Client,
    endpoint: String,
    queue_url: Arc<str>,
    receipt: String,
    running: Weak<Running>,
    topic: Arc<str>,
    message: Message,
    attempt: u32,
    max_redeliveries: Option<u32>,
    limit: Duration,
    acks: mpsc::UnboundedSender<String>,
}

impl Settle {
    async fn make_visible(&self) -> Result<()> {
        let request = self.sqs.change_message_visibility().queue_url(&*self.queue_url).receipt_handle(&self.receipt);
        error::bounded("nack (visibility 0)", &self.endpoint, self.limit, request.visibility_timeout(0).send())
            .await
            .map(|_| ())
    }
}

/// The event's handle on a [`Settle`] the delivery task shares.
struct SharedSettle(Arc<Settle>);

#[async_trait]
impl Acknowledger for SharedSettle {
    async fn ack(&self) -> Result<()> {
        self.0.ack().await
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        self.0.nack(reason).await
    }
}

#[async_trait]
impl Acknowledger for Settle {
    async fn ack(&self) -> Result<()> {
        if self.acks.send(self.receipt.clone()).is_ok() {
            return Ok(());
        }
        // The deleter has flushed (after unsubscribe or disconnect): delete alone.
        let request = self.sqs.delete_message().queue_url(&*self.queue_url).receipt_handle(&self.receipt);
        error::bounded("ack (delete the message)", &self.endpoint, self.limit, request.send()).await.map(|_| ())
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        let redeliveries_so_far = self.attempt.saturating_sub(1);
        if self.max_redeliveries.is_some_and(|max| redeliveries_so_far >= max)
            && let Some(running) = self.running.upgrade()
        {
            return match running.dead_letter(&self.topic, &self.message, reason, self.attempt).await {
                Ok(()) => self.ack().await,
                Err(error) => {
                    tracing::warn!(%error, "sqs broker: cannot dead-letter a message; it is received again");
                    let _ = self.make_visible().await;
                    Err(error)
                }
            };
        }
        self.make_visible().await
    }
}

#[async_trait]
impl Broker for SqsBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        if self.current().is_some() {
            return Err(Error::invalid_input("init() on a connected sqs broker: call disconnect() first"));
        }
        let config = SqsConfig::from_options(&options)?;
        *self.inner.options.write().unwrap_or_else(|p| p.into_inner()) = options;
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        self.inner.options()
    }

    fn address(&self) -> String {
        endpoint_text(&self.config())
    }

    async fn connect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let options = self.inner.options();
        let config = SqsConfig::from_options(&options)?;
        if config.tls_requested {
            return Err(Error::unsupported(
                NAME,
                "tls",
                "the sqs backend speaks HTTPS to https:// endpoints with the system's roots; it takes no TLS \
                 options (own CA, client certificates)",
            ));
        }
        let (sqs, sns) = clients(&config, &options)?;
        let endpoint = endpoint_text(&config);
        let limit = options.connect_timeout;
        let (sqs_what, sns_what) = (format!("connect to SQS at {endpoint}"), format!("connect to SNS at {endpoint}"));
        let queues = error::bounded(&sqs_what, &endpoint, limit, sqs.list_queues().max_results(1).send());
        let topics = error::bounded(&sns_what, &endpoint, limit, sns.list_topics().send());
        let (queues, topics) = tokio::join!(queues, topics);
        queues?;
        topics?;
        let running = Arc::new(Running {
            config,
            options,
            sqs,
            sns,
            endpoint,
            topic_arns: Mutex::new(HashMap::new()),
            publisher_group: format!("micro-broker-{}", uuid::Uuid::new_v4().simple()),
            subs: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
        });
        self.inner.current.set(Arc::clone(&running));
        *slot = Some(running);
        Ok(())
    }

    async fn disconnect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        let Some(running) = slot.take() else { return Ok(()) };
        self.inner.current.clear();
        let timeout = running.options.drain_timeout;
        let subs: Vec<Arc<SubState>> = lock(&running.subs).drain().map(|(_, s)| s).collect();
        for sub in &subs {
            sub.stop();
        }
        let drained = tokio::time::timeout(timeout, async {
            for sub in &subs {
                sub.pump.wait().await;
                sub.wait_for_others().await;
            }
        })
        .await
        .is_ok();
        for sub in &subs {
            sub.flush_acks(running.limit()).await;
            sub.clean_up(&running).await;
        }
        if drained {
            return Ok(());
        }
        let problem = format!("handlers were still running after the drain timeout of {timeout:?}");
        tracing::warn!(%problem, "sqs broker: disconnect did not drain cleanly");
        Err(Error::new(ErrorKind::Timeout, format!("sqs broker disconnect: {problem}")))
    }

    async fn publish(&self, topic: &str, mut message: Message, options: PublishOptions) -> Result<()> {
        let running = self.connected()?;
        validate_topic(topic)?;
        if options.ordering_key.is_some() && !running.config.fifo {
            return Err(Error::unsupported(
                NAME,
                "ordering_key",
                "standard SQS queues do not keep order; set the broker parameter fifo=true for FIFO topics and \
                 queues, where the key is the MessageGroupId",
            ));
        }
        self.capabilities().check_publish(NAME, &options)?;
        message.headers.extend(options.headers);
        running.send(topic, &message, options.ordering_key.as_deref()).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let running = self.connected()?;
        validate_topic(topic)?;
        self.capabilities().check_subscribe(NAME, &options)?;
        let (prefix, fifo) = (&running.config.prefix, running.config.fifo);
        let queue = match options.queue.as_deref() {
            Some(group) => names::group_queue(prefix, topic, group, fifo),
            None => {
                let unique = uuid::Uuid::new_v4().simple().to_string();
                names::broadcast_queue(prefix, topic, &unique[..12], fifo)
            }
        };
        let cleanup = match running.set_up(topic, &queue, &options).await {
            Ok(cleanup) => cleanup,
            Err(error) => {
                if options.queue.is_none() {
                    // Best effort: a half-made broadcast queue is nobody's.
                    if let Ok(url) = running.sqs.get_queue_url().queue_name(&queue).send().await
                        && let Some(url) = url.queue_url()
                    {
                        let cleanup = Cleanup { queue_url: url.to_string(), subscription_arn: Mutex::new(None) };
                        running.clean_up(&cleanup).await;
                    }
                }
                return Err(error);
            }
        };
        let queue_url: Arc<str> = cleanup.queue_url.as_str().into();
        let id = running.next_sub.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(SubState {
            id,
            stop: CancellationToken::new(),
            pump: TaskTracker::new(),
            handlers: TaskTracker::new(),
            drain_timeout: running.options.drain_timeout,
            deleter: TaskTracker::new(),
            flush: CancellationToken::new(),
            temporary: options.queue.is_none().then_some(cleanup),
            cleaned: AtomicBool::new(false),
        });
        let (acks, receipts) = mpsc::unbounded_channel();
        state.deleter.spawn(delete_in_batches(
            running.sqs.clone(),
            running.endpoint.clone(),
            Arc::clone(&queue_url),
            running.limit(),
            receipts,
            state.flush.clone(),
        ));
        let plan = Arc::new(Plan { topic: topic.into(), queue_url, options: options.clone(), acks });
        state.pump.spawn(pump(Arc::downgrade(&running), Arc::clone(&state), handler, plan));
        lock(&running.subs).insert(id, Arc::clone(&state));
        Ok(Box::new(SqsSubscriber { topic: topic.to_string(), options, state, running: Arc::downgrade(&running) }))
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        if self.config().fifo { FIFO_CAPABILITIES } else { CAPABILITIES }
    }
}

/// A subscription of the SQS broker.
struct SqsSubscriber {
    topic: String,
    options: SubscribeOptions,
    state: Arc<SubState>,
    running: Weak<Running>,
}

impl fmt::Debug for SqsSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsSubscriber").field("topic", &self.topic).field("id", &self.state.id).finish()
    }
}

#[async_trait]
impl Subscriber for SqsSubscriber {
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
        state.stop();
        let timeout = state.drain_timeout;
        let waited = tokio::time::timeout(timeout, async {
            state.pump.wait().await;
            state.wait_for_others().await;
        })
        .await;
        if let Some(running) = running {
            if running_handler_of() == Some(state.key()) {
                // Called from this subscription's own handler: delete the queue once that handler
                // (and its ack) is done.
                let state = Arc::clone(state);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(state.drain_timeout, state.handlers.wait()).await;
                    state.flush_acks(running.limit()).await;
                    state.clean_up(&running).await;
                });
            } else {
                state.flush_acks(running.limit()).await;
                state.clean_up(&running).await;
            }
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
        let options = BrokerOptions::new().with_addresses(["http://127.0.0.1:4566"]);
        let broker = broker_core::from_name(NAME, options.clone()).unwrap();
        assert_eq!(broker.name(), NAME);
        assert_eq!(broker.address(), "http://127.0.0.1:4566");
        let fifo = broker_core::from_name(NAME, options.with_param("fifo", "true")).unwrap();
        assert_eq!(fifo.capabilities(), FIFO_CAPABILITIES);
    }

    #[test]
    fn group_ids() {
        assert_eq!(message_group_id("user-42"), "user-42");
        let hashed = message_group_id("ключ");
        assert!(hashed.starts_with("k-") && hashed.is_ascii() && hashed.len() <= 128, "{hashed}");
        assert_ne!(message_group_id("ключ"), message_group_id("ключи"));
        assert!(message_group_id(&"x".repeat(200)).len() <= 128);
    }

    #[tokio::test]
    async fn not_connected_tls_and_missing_credentials() {
        let broker = SqsBroker::with_options(BrokerOptions::new().with_param("access_key_id", "a")).unwrap();
        let err = broker.publish("t", Message::new("x"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotConnected);
        let options = BrokerOptions::new()
            .with_param("access_key_id", "a")
            .with_param("secret_access_key", "b")
            .with_tls(broker_core::TlsOptions::new());
        let err = SqsBroker::with_options(options).unwrap().connect().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        let config = SqsConfig::from_options_and_env(&BrokerOptions::new(), &|_| None).unwrap();
        let err = clients(&config, &BrokerOptions::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
    }
}
