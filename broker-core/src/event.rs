//! [`Event`]: one delivery of a message to a handler, with its acknowledgement.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::message::Message;

/// How a backend settles a delivery. Implemented by each backend; called at most once per
/// delivery by [`Event`], which makes acking twice harmless.
#[async_trait]
pub trait Acknowledger: Send + Sync + 'static {
    /// The message was handled: the backend may forget it.
    async fn ack(&self) -> Result<()>;
    /// The message was not handled: the backend delivers it again where it can (or dead-letters
    /// it after `max_redeliveries`). `reason` says why, for logs and dead-letter headers.
    async fn nack(&self, reason: &str) -> Result<()>;
    /// Acks at once, without waiting, where the backend can (`Some`, what `ack()` would
    /// return); `None` (the default) leaves it to `ack()`. [`Event::ack`] tries this first, so a
    /// backend whose ack never waits (the in-memory one) saves the boxed future of `ack()` on
    /// every delivery.
    fn ack_now(&self) -> Option<Result<()>> {
        None
    }
}

/// The acknowledger of an event built without one: ack and nack do nothing (at-most-once backends).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAcknowledger;

#[async_trait]
impl Acknowledger for NoAcknowledger {
    async fn ack(&self) -> Result<()> {
        Ok(())
    }
    async fn nack(&self, _reason: &str) -> Result<()> {
        Ok(())
    }
    fn ack_now(&self) -> Option<Result<()>> {
        Some(Ok(()))
    }
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Acknowledged: handled.
    Acked,
    /// Negatively acknowledged: to be delivered again where the backend can.
    Nacked,
}

const PENDING: u8 = 0;
const ACKED: u8 = 1;
const NACKED: u8 = 2;

/// Generic over the acknowledger so that it lives in the event's own allocation: an
/// `Arc<EventInner<A>>` is built, then used as `Arc<EventInner<dyn Acknowledger>>` (one
/// allocation per delivery, not two).
struct EventInner<A: ?Sized> {
    topic: Arc<str>,
    message: Message,
    attempt: u32,
    error: Option<Error>,
    state: AtomicU8,
    acknowledger: A,
}

/// One delivery of a message on a topic, handed to a [`Handler`](crate::Handler).
///
/// Cloning is cheap and every clone shares the acknowledgement: the first `ack()` or `nack()`
/// settles the delivery, later calls do nothing and return `Ok`.
///
/// ```
/// # tokio_test_block_on(async {
/// use broker_core::{Event, Message};
/// let event = Event::builder("greetings", Message::new("hi")).build();
/// assert_eq!(event.topic(), "greetings");
/// event.ack().await.unwrap();
/// event.ack().await.unwrap(); // harmless
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct Event {
    inner: Arc<EventInner<dyn Acknowledger>>,
}

impl Event {
    /// Starts building an event; backends use this when a message arrives.
    pub fn builder(topic: impl Into<Arc<str>>, message: Message) -> EventBuilder {
        EventBuilder { topic: topic.into(), message, attempt: 1, error: None, acknowledger: NoAcknowledger }
    }

    /// The topic the message was published to.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.inner.message
    }

    /// Which delivery of this message this is: 1 for the first, 2 for the first redelivery, ...
    /// (where the backend knows; otherwise 1).
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// An error the backend attached to this delivery, as Go Micro's `Event.Error()`: for example
    /// why the previous attempt failed, on a redelivery.
    pub fn error(&self) -> Option<&Error> {
        self.inner.error.as_ref()
    }

    /// Acknowledges the message. Only the first settlement counts; later calls return `Ok`.
    pub async fn ack(&self) -> Result<()> {
        if !self.settle(ACKED) {
            return Ok(());
        }
        let acknowledger = &self.inner.acknowledger;
        match acknowledger.ack_now() {
            Some(done) => done,
            None => acknowledger.ack().await,
        }
    }

    /// Negatively acknowledges the message: it is delivered again where the backend can.
    pub async fn nack(&self) -> Result<()> {
        self.nack_with_reason("nacked by the handler").await
    }

    /// Like [`nack`](Self::nack), saying why (kept in logs and dead-letter headers).
    pub async fn nack_with_reason(&self, reason: &str) -> Result<()> {
        if !self.settle(NACKED) {
            return Ok(());
        }
        self.inner.acknowledger.nack(reason).await
    }

    /// How the delivery was settled so far, if it was.
    pub fn settlement(&self) -> Option<Settlement> {
        match self.inner.state.load(Ordering::Acquire) {
            ACKED => Some(Settlement::Acked),
            NACKED => Some(Settlement::Nacked),
            _ => None,
        }
    }

    /// Moves from pending to `to`; false if already settled.
    fn settle(&self, to: u8) -> bool {
        self.inner.state.compare_exchange(PENDING, to, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("topic", &self.topic())
            .field("headers", &self.message().headers)
            .field("body_len", &self.message().body.len())
            .field("attempt", &self.attempt())
            .field("settlement", &self.settlement())
            .finish()
    }
}

/// Builds an [`Event`]; see [`Event::builder`]. `A` is the acknowledger set so far.
pub struct EventBuilder<A = NoAcknowledger> {
    topic: Arc<str>,
    message: Message,
    attempt: u32,
    error: Option<Error>,
    acknowledger: A,
}

impl<A: Acknowledger> EventBuilder<A> {
    /// Sets the delivery attempt (1-based).
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// Attaches an error to the delivery.
    pub fn error(mut self, error: Error) -> Self {
        self.error = Some(error);
        self
    }

    /// Sets how the delivery is settled. Without one, ack and nack do nothing (at-most-once backends).
    pub fn acknowledger<B: Acknowledger>(self, acknowledger: B) -> EventBuilder<B> {
        EventBuilder {
            topic: self.topic,
            message: self.message,
            attempt: self.attempt,
            error: self.error,
            acknowledger,
        }
    }

    /// The event.
    pub fn build(self) -> Event {
        let inner: Arc<EventInner<A>> = Arc::new(EventInner {
            topic: self.topic,
            message: self.message,
            attempt: self.attempt,
            error: self.error,
            state: AtomicU8::new(PENDING),
            acknowledger: self.acknowledger,
        });
        Event { inner }
    }
}

impl<A> fmt::Debug for EventBuilder<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBuilder").field("topic", &self.topic).field("attempt", &self.attempt).finish()
    }
}

/// An acknowledger that records what it was asked, for the unit tests of this crate.
#[cfg(test)]
#[derive(Default, Clone)]
pub(crate) struct Recorder(pub(crate) Arc<std::sync::Mutex<Vec<String>>>);

#[cfg(test)]
#[async_trait]
impl Acknowledger for Recorder {
    async fn ack(&self) -> Result<()> {
        self.0.lock().unwrap().push("ack".into());
        Ok(())
    }
    async fn nack(&self, reason: &str) -> Result<()> {
        self.0.lock().unwrap().push(format!("nack: {reason}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_settlement_wins() {
        let rec = Recorder::default();
        let event = Event::builder("t", Message::new("x")).acknowledger(rec.clone()).build();
        let clone = event.clone();
        assert_eq!(event.settlement(), None);
        event.ack().await.unwrap();
        event.ack().await.unwrap();
        clone.nack().await.unwrap();
        assert_eq!(clone.settlement(), Some(Settlement::Acked));
        assert_eq!(*rec.0.lock().unwrap(), vec!["ack".to_string()]);
    }

    #[tokio::test]
    async fn nack_carries_reason() {
        let rec = Recorder::default();
        let event = Event::builder("t", Message::new("x")).acknowledger(rec.clone()).attempt(3).build();
        assert_eq!(event.attempt(), 3);
        event.nack_with_reason("db down").await.unwrap();
        event.ack().await.unwrap();
        assert_eq!(event.settlement(), Some(Settlement::Nacked));
        assert_eq!(*rec.0.lock().unwrap(), vec!["nack: db down".to_string()]);
    }

    #[tokio::test]
    async fn without_acknowledger_ack_is_a_no_op() {
        let event = Event::builder("t", Message::new("x")).error(Error::codec("bad")).attempt(0).build();
        assert_eq!(event.attempt(), 1);
        assert_eq!(event.error().map(|e| e.kind()), Some(crate::ErrorKind::Codec));
        event.nack().await.unwrap();
        assert_eq!(event.settlement(), Some(Settlement::Nacked));
        assert!(format!("{event:?}").contains("body_len: 1"));
    }
}
