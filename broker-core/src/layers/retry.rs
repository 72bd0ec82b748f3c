//! The retry and dead-letter layer: a failing message is tried again a bounded number of times,
//! then published to `<topic>.dlq` with the [`headers`] saying why,
//! on every backend.
//!
//! * On a backend **with** native redelivery ([`Capabilities::redelivery`](crate::Capabilities)),
//!   the layer defers to it: it passes `max_redeliveries` (the subscription's own, else the
//!   layer's bound) through, and the backend redelivers and dead-letters as it does natively.
//! * On a backend **without** it (or always, with [`RetryLayer::in_process`]), the layer retries
//!   in the wrapping handler: it calls the handler again, after an exponential backoff with
//!   jitter, up to `max_redeliveries` more times, with [`Event::attempt`] counting up and
//!   [`Event::error`] saying why the previous attempt failed. When every attempt failed it publishes
//!   the message to `<topic>.dlq` with [`DEAD_LETTER_REASON`](crate::headers::DEAD_LETTER_REASON)
//!   (the last error), [`DELIVERY_ATTEMPTS`](crate::headers::DELIVERY_ATTEMPTS) and
//!   [`ORIGINAL_TOPIC`](crate::headers::ORIGINAL_TOPIC), counts it in
//!   [`DEAD_LETTERED`](super::metrics::DEAD_LETTERED), and settles the delivery as handled. If
//!   that publish fails, the delivery fails (nacked) with the publish error.
//!
//! A handler attempt fails when it returns `Err` or panics (with auto-ack), or when it nacks its
//! event (with auto-ack off); an attempt that acked succeeded even if it then returned `Err`. With
//! auto-ack off, the layer acks the backend's delivery when an attempt acked or when the message
//! was dead-lettered, and nacks it when the dead letter could not be published. The retries of
//! one message hold its subscription's concurrency slot while they back off.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::time::Duration;
//! use broker_core::layers::{BrokerLayerExt, RetryLayer};
//! use broker_core::{handler_fn, headers, Broker, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions};
//!
//! let broker = MemoryBroker::new()
//!     .with_layer(RetryLayer::new(2).with_backoff(Duration::from_millis(1), Duration::from_millis(10)));
//! broker.connect().await?;
//! let (tx, mut dead) = tokio::sync::mpsc::unbounded_channel();
//! broker.subscribe("jobs.dlq", handler_fn(move |event: Event| {
//!     let tx = tx.clone();
//!     async move { tx.send(event.message().clone())?; Ok(()) }
//! }), SubscribeOptions::new()).await?;
//! broker.subscribe("jobs", handler_fn(|_event: Event| async { Err("the database is down".into()) }),
//!     SubscribeOptions::new()).await?;
//! broker.publish("jobs", Message::new("job-1"), PublishOptions::new()).await?;
//! let letter = dead.recv().await.unwrap();
//! assert_eq!(letter.header(headers::DELIVERY_ATTEMPTS), Some("3"));
//! assert!(letter.header(headers::DEAD_LETTER_REASON).unwrap().contains("the database is down"));
//! broker.disconnect().await?;
//! # Ok::<(), broker_core::Error>(())
//! # }).unwrap();
//! ```

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::{Layer, delegate_broker};
use crate::broker::{Broker, Handler, HandlerResult, Subscriber, run_handler};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, Settlement};
use crate::message::{Message, headers};
use crate::options::{PublishOptions, SubscribeOptions};

/// The default bound: 3 redeliveries (4 attempts in all).
pub const DEFAULT_MAX_REDELIVERIES: u32 = 3;
/// The default backoff before the first retry.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The default longest backoff.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Adds bounded retries and dead-lettering to a broker: see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryLayer {
    max_redeliveries: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    jitter: bool,
    in_process: bool,
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new(DEFAULT_MAX_REDELIVERIES)
    }
}

impl RetryLayer {
    /// At most `max_redeliveries` deliveries after the first (a subscription's own
    /// `max_redeliveries` wins), 100 ms backoff doubling up to 10 s, with jitter.
    pub fn new(max_redeliveries: u32) -> Self {
        RetryLayer {
            max_redeliveries,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            jitter: true,
            in_process: false,
        }
    }

    /// Sets the backoff before the first retry and the longest one (each retry doubles it).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Turns jitter on or off. With jitter (the default) each backoff is drawn uniformly between
    /// half of it and all of it, so that many failing consumers do not retry in lockstep.
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Retries in the wrapping handler and dead-letters from the layer even where the backend
    /// has native redelivery.
    pub fn in_process(mut self) -> Self {
        self.in_process = true;
        self
    }

    /// The bound on redeliveries.
    pub fn max_redeliveries(&self) -> u32 {
        self.max_redeliveries
    }

    /// How long to wait before retry number `retry` (0 for the first retry).
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        let full = self.initial_backoff.saturating_mul(factor).min(self.max_backoff);
        if self.jitter { full.mul_f64(0.5 + fastrand::f64() / 2.0) } else { full }
    }
}

impl<B: Broker> Layer<B> for RetryLayer {
    type Broker = Retrying<B>;
    fn layer(&self, inner: B) -> Retrying<B> {
        Retrying { inner: Arc::new(inner), policy: self.clone() }
    }
}

/// A broker with bounded retries and dead-lettering, made by [`RetryLayer`].
#[derive(Debug)]
pub struct Retrying<B> {
    inner: Arc<B>,
    policy: RetryLayer,
}

impl<B> Retrying<B> {
    /// The wrapped broker.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

#[async_trait]
impl<B: Broker> Broker for Retrying<B> {
    delegate_broker!();

    async fn connect(&self) -> Result<()> {
        self.inner.connect().await
    }

    async fn disconnect(&self) -> Result<()> {
        self.inner.disconnect().await
    }

    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()> {
        self.inner.publish(topic, message, options).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        mut options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let max_redeliveries = options.max_redeliveries.unwrap_or(self.policy.max_redeliveries);
        let native = self.inner.capabilities().redelivery;
        if native && !self.policy.in_process {
            options.max_redeliveries = Some(max_redeliveries);
            return self.inner.subscribe(topic, handler, options).await;
        }
        if !native {
            // The backend would reject it; the layer honours it instead.
            options.max_redeliveries = None;
        }
        let broker: Weak<dyn Broker> = Arc::downgrade(&self.inner) as Weak<dyn Broker>;
        let retrying = Arc::new(RetryingHandler {
            inner: handler,
            broker,
            policy: self.policy.clone(),
            max_redeliveries,
            auto_ack: options.auto_ack,
        });
        self.inner.subscribe(topic, retrying, options).await
    }
}

struct RetryingHandler {
    inner: Arc<dyn Handler>,
    /// Weak: the broker holds its subscriptions, which hold this handler.
    broker: Weak<dyn Broker>,
    policy: RetryLayer,
    max_redeliveries: u32,
    auto_ack: bool,
}

impl RetryingHandler {
    /// Runs one attempt on a copy of the delivery: `Ok(acked)` when it succeeded (and whether the
    /// handler acked it), `Err(reason)` when it failed.
    async fn attempt(&self, event: &Event, attempt: u32, previous: Option<&str>) -> std::result::Result<bool, String> {
        let mut builder = Event::builder(event.topic().to_string(), event.message().clone()).attempt(attempt);
        if let Some(reason) = previous {
            builder = builder.error(Error::new(ErrorKind::Handler, format!("the previous attempt failed: {reason}")));
        } else if let Some(error) = event.error() {
            builder = builder.error(Error::new(error.kind(), error.message()));
        }
        let this_try = builder.build();
        let outcome = run_handler(self.inner.as_ref(), this_try.clone(), self.auto_ack).await;
        match (this_try.settlement(), outcome) {
            (Some(Settlement::Acked), _) => Ok(true),
            (None, Ok(())) => Ok(false),
            (_, Err(error)) => Err(error.message().to_string()),
            (Some(Settlement::Nacked), Ok(())) => Err("nacked by the handler".to_string()),
        }
    }

    async fn dead_letter(&self, event: &Event, attempts: u32, reason: &str) -> Result<()> {
        let broker = self
            .broker
            .upgrade()
            .ok_or_else(|| Error::new(ErrorKind::Closed, "the broker is gone: cannot dead-letter the message"))?;
        let topic = event.topic();
        let message = event
            .message()
            .clone()
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::DELIVERY_ATTEMPTS, attempts.to_string())
            .with_header(headers::ORIGINAL_TOPIC, topic);
        broker.publish(&format!("{topic}.dlq"), message, PublishOptions::new()).await?;
        metrics::counter!(
            super::metrics::DEAD_LETTERED,
            super::metrics::LABEL_BACKEND => broker.name(),
            super::metrics::LABEL_TOPIC => topic.to_string()
        )
        .increment(1);
        Ok(())
    }
}

#[async_trait]
impl Handler for RetryingHandler {
    async fn handle(&self, event: Event) -> HandlerResult {
        let first = event.attempt();
        let mut reason = String::new();
        for retry in 0..=self.max_redeliveries {
            if retry > 0 {
                tokio::time::sleep(self.policy.backoff(retry - 1)).await;
            }
            let previous = (retry > 0).then_some(reason.as_str());
            match self.attempt(&event, first.saturating_add(retry), previous).await {
                Ok(acked) => {
                    // With auto-ack off, an attempt left unsettled leaves the delivery unsettled too.
                    if acked && !self.auto_ack {
                        event.ack().await?;
                    }
                    return Ok(());
                }
                Err(why) => reason = why,
            }
        }
        let attempts = first.saturating_add(self.max_redeliveries);
        match self.dead_letter(&event, attempts, &reason).await {
            Ok(()) => {
                if !self.auto_ack {
                    event.ack().await?;
                }
                Ok(())
            }
            Err(error) => {
                tracing::warn!(topic = event.topic(), %error, "retry layer: cannot publish the dead letter");
                if !self.auto_ack {
                    event.nack_with_reason(error.message()).await?;
                }
                Err(error.into())
            }
        }
    }
}
