//! The metrics layer: counters and histograms through the [`metrics`] facade, labelled by
//! `backend` (the broker's name) and `topic`. Install any `metrics` recorder (Prometheus,
//! StatsD, ...) to export them; without one they cost next to nothing.
//!
//! | metric | kind | counts |
//! | --- | --- | --- |
//! | [`PUBLISHED`] | counter | successful publishes |
//! | [`PUBLISH_ERRORS`] | counter | failed publishes |
//! | [`PUBLISH_DURATION`] | histogram (seconds) | how long each publish took, failed or not |
//! | [`DELIVERED`] | counter | deliveries handed to the handler (redeliveries included) |
//! | [`REDELIVERED`] | counter | deliveries with `attempt() > 1` |
//! | [`ACKED`] | counter | deliveries acked (by the handler, or by auto-ack after `Ok`) |
//! | [`NACKED`] | counter | deliveries nacked (by the handler, or by auto-ack after `Err` or a panic) |
//! | [`HANDLER_DURATION`] | histogram (seconds) | how long each handler run took |
//! | [`DEAD_LETTERED`] | counter | messages the [`RetryLayer`](super::RetryLayer) published to `<topic>.dlq` |
//!
//! A backend that dead-letters natively does not report it through this layer (count the
//! deliveries on `<topic>.dlq` instead).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use broker_core::layers::{BrokerLayerExt, MetricsLayer};
//! use broker_core::{Broker, MemoryBroker, Message, PublishOptions};
//!
//! // With a recorder installed (metrics::set_global_recorder), this counts in `broker_published_total`.
//! let broker = MemoryBroker::new().with_layer(MetricsLayer::new());
//! broker.connect().await?;
//! broker.publish("orders.created", Message::new("42"), PublishOptions::new()).await?;
//! broker.disconnect().await?;
//! # Ok::<(), broker_core::Error>(())
//! # }).unwrap();
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use futures::FutureExt;

use super::{Layer, delegate_broker};
use crate::broker::{Broker, Handler, HandlerResult, Subscriber};
use crate::error::Result;
use crate::event::{Event, Settlement};
use crate::message::Message;
use crate::options::{PublishOptions, SubscribeOptions};

/// Counter: successful publishes.
pub const PUBLISHED: &str = "broker_published_total";
/// Counter: failed publishes.
pub const PUBLISH_ERRORS: &str = "broker_publish_errors_total";
/// Histogram: publish duration in seconds.
pub const PUBLISH_DURATION: &str = "broker_publish_duration_seconds";
/// Counter: deliveries handed to the handler.
pub const DELIVERED: &str = "broker_delivered_total";
/// Counter: deliveries with `attempt() > 1`.
pub const REDELIVERED: &str = "broker_redelivered_total";
/// Counter: acked deliveries.
pub const ACKED: &str = "broker_acked_total";
/// Counter: nacked deliveries.
pub const NACKED: &str = "broker_nacked_total";
/// Histogram: handler duration in seconds.
pub const HANDLER_DURATION: &str = "broker_handler_duration_seconds";
/// Counter: messages the retry layer dead-lettered.
pub const DEAD_LETTERED: &str = "broker_dead_lettered_total";
/// Counter: messages a backend dropped from its own buffer (the HTTP backend's inbox, when full
/// with policy `drop_oldest`, or discarded at disconnect); recorded by the backend itself.
pub const INBOX_DROPPED: &str = "broker_inbox_dropped_total";
/// The label holding the broker's name.
pub const LABEL_BACKEND: &str = "backend";
/// The label holding the topic.
pub const LABEL_TOPIC: &str = "topic";

/// Describes every metric of this module to the installed recorder (units and help texts).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(PUBLISHED, Unit::Count, "messages published successfully");
    describe_counter!(INBOX_DROPPED, Unit::Count, "messages a backend dropped from its own buffer");
    describe_counter!(PUBLISH_ERRORS, Unit::Count, "publishes that failed");
    describe_histogram!(PUBLISH_DURATION, Unit::Seconds, "how long a publish took");
    describe_counter!(DELIVERED, Unit::Count, "deliveries handed to a handler");
    describe_counter!(REDELIVERED, Unit::Count, "deliveries of a message delivered before");
    describe_counter!(ACKED, Unit::Count, "deliveries acknowledged");
    describe_counter!(NACKED, Unit::Count, "deliveries negatively acknowledged");
    describe_histogram!(HANDLER_DURATION, Unit::Seconds, "how long a handler ran");
    describe_counter!(DEAD_LETTERED, Unit::Count, "messages published to <topic>.dlq by the retry layer");
}

fn labels(backend: &'static str, topic: &str) -> [(&'static str, String); 2] {
    [(LABEL_BACKEND, backend.to_string()), (LABEL_TOPIC, topic.to_string())]
}

/// Adds metrics to a broker: see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct MetricsLayer {
    _private: (),
}

impl MetricsLayer {
    /// The metrics layer.
    pub fn new() -> Self {
        MetricsLayer::default()
    }
}

impl<B: Broker> Layer<B> for MetricsLayer {
    type Broker = Metered<B>;
    fn layer(&self, inner: B) -> Metered<B> {
        Metered { inner }
    }
}

/// A broker with metrics, made by [`MetricsLayer`].
#[derive(Debug)]
pub struct Metered<B> {
    inner: B,
}

impl<B> Metered<B> {
    /// The wrapped broker.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

#[async_trait]
impl<B: Broker> Broker for Metered<B> {
    delegate_broker!();

    async fn connect(&self) -> Result<()> {
        self.inner.connect().await
    }

    async fn disconnect(&self) -> Result<()> {
        self.inner.disconnect().await
    }

    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()> {
        let labels = labels(self.inner.name(), topic);
        let started = Instant::now();
        let result = self.inner.publish(topic, message, options).await;
        metrics::histogram!(PUBLISH_DURATION, &labels).record(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => metrics::counter!(PUBLISHED, &labels).increment(1),
            Err(_) => metrics::counter!(PUBLISH_ERRORS, &labels).increment(1),
        }
        result
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let metered = Arc::new(MeteredHandler {
            inner: handler,
            labels: labels(self.inner.name(), topic),
            auto_ack: options.auto_ack,
        });
        self.inner.subscribe(topic, metered, options).await
    }
}

struct MeteredHandler {
    inner: Arc<dyn Handler>,
    labels: [(&'static str, String); 2],
    auto_ack: bool,
}

impl MeteredHandler {
    /// Counts how the delivery ends: as the handler settled it, else as auto-ack will.
    fn count_settlement(&self, event: &Event, succeeded: bool) {
        let acked = match event.settlement() {
            Some(Settlement::Acked) => true,
            Some(Settlement::Nacked) => false,
            None if self.auto_ack => succeeded,
            None => return,
        };
        metrics::counter!(if acked { ACKED } else { NACKED }, &self.labels).increment(1);
    }
}

#[async_trait]
impl Handler for MeteredHandler {
    async fn handle(&self, event: Event) -> HandlerResult {
        metrics::counter!(DELIVERED, &self.labels).increment(1);
        if event.attempt() > 1 {
            metrics::counter!(REDELIVERED, &self.labels).increment(1);
        }
        let started = Instant::now();
        let outcome = AssertUnwindSafe(self.inner.handle(event.clone())).catch_unwind().await;
        metrics::histogram!(HANDLER_DURATION, &self.labels).record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(result) => {
                self.count_settlement(&event, result.is_ok());
                result
            }
            Err(panic) => {
                // The backend's run_handler turns the panic into a failure (a nack with auto-ack).
                self.count_settlement(&event, false);
                std::panic::resume_unwind(panic)
            }
        }
    }
}
