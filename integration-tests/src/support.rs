//! What the cases share: unique topics, bounded waits, inboxes that collect deliveries, and
//! small wrappers that turn a broker error into a failure message that says what was being done.
//!
//! Every wait is bounded ([`WAIT`] for a message, [`CALL`] for a broker call), so a broken backend
//! fails the case instead of hanging the suite.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use broker_core::{
    Broker, ErrorKind, Event, Handler, Message, PublishOptions, SubscribeOptions, Subscriber, handler_fn,
};
use tokio::sync::mpsc;

/// How long a case waits for the next expected delivery before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// How long one broker call (connect, publish, subscribe, unsubscribe, disconnect) may take before
/// the case fails.
pub const CALL: Duration = Duration::from_secs(30);

/// How long a case watches for deliveries that must not happen (duplicates, redeliveries, messages
/// after unsubscribe) before it concludes there are none.
pub const QUIET: Duration = Duration::from_millis(400);

/// A topic no other case (nor another run of the suite) uses: `conformance.<case>.<pid>.<n>.<nanos>`.
///
/// ```
/// let a = integration_tests::unique_topic("round_trip");
/// let b = integration_tests::unique_topic("round_trip");
/// assert!(a.starts_with("conformance.round_trip."));
/// assert_ne!(a, b);
/// broker_core::validate_topic(&a).unwrap();
/// ```
pub fn unique_topic(case: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let case: String =
        case.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    format!("conformance.{case}.{}.{n}.{nanos}", std::process::id())
}

/// Awaits `future`, failing the case if it takes longer than [`CALL`].
///
/// # Panics
///
/// When `future` does not finish in time; the message names `what`.
pub async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CALL, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {CALL:?}"),
    }
}

/// Awaits a broker call that must succeed, failing the case with `what` and the error otherwise.
///
/// # Panics
///
/// When the call fails or does not finish within [`CALL`].
pub async fn must<T>(what: &str, future: impl Future<Output = broker_core::Result<T>>) -> T {
    match bounded(what, future).await {
        Ok(value) => value,
        Err(error) => panic!("{what} failed: {error} (kind {:?})", error.kind()),
    }
}

/// Awaits a broker call that must fail with `kind`, failing the case otherwise. Returns the error.
///
/// # Panics
///
/// When the call succeeds, fails with another kind, or does not finish within [`CALL`].
pub async fn must_fail<T: Debug>(
    what: &str,
    kind: ErrorKind,
    future: impl Future<Output = broker_core::Result<T>>,
) -> broker_core::Error {
    match bounded(what, future).await {
        Ok(value) => panic!("{what} succeeded ({value:?}) but must fail with {kind:?}"),
        Err(error) => {
            assert_eq!(error.kind(), kind, "{what} must fail with {kind:?}, got: {error}");
            error
        }
    }
}

/// Publishes `message` on `topic` with default options; fails the case if that fails.
pub async fn publish(broker: &dyn Broker, topic: &str, message: Message) {
    must(&format!("publish to {topic}"), broker.publish(topic, message, PublishOptions::new())).await;
}

/// Subscribes `handler` to `topic`; fails the case if that fails.
pub async fn subscribe(
    broker: &dyn Broker,
    topic: &str,
    handler: Arc<dyn Handler>,
    options: SubscribeOptions,
) -> Box<dyn Subscriber> {
    must(&format!("subscribe to {topic}"), broker.subscribe(topic, handler, options)).await
}

/// Unsubscribes every subscription, then disconnects: the end of every case.
pub async fn finish(broker: &dyn Broker, subscriptions: Vec<Box<dyn Subscriber>>) {
    for subscription in subscriptions {
        must(&format!("unsubscribe from {}", subscription.topic()), subscription.unsubscribe()).await;
    }
    must("disconnect", broker.disconnect()).await;
}

/// Receives what handlers send, with bounded waits. Made by [`inbox`], [`recorder`] and friends.
#[derive(Debug)]
pub struct Inbox<T> {
    rx: mpsc::UnboundedReceiver<T>,
    name: String,
}

/// A channel whose sending half handlers use, and whose receiving half the case reads.
pub fn inbox<T>(name: impl Into<String>) -> (mpsc::UnboundedSender<T>, Inbox<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Inbox { rx, name: name.into() })
}

impl<T> Inbox<T> {
    /// The next item, waiting at most [`WAIT`].
    ///
    /// # Panics
    ///
    /// When nothing arrives in time; the message names the inbox and `what` was expected.
    pub async fn next(&mut self, what: &str) -> T {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("{}: the handler side is gone while waiting for {what}", self.name),
            Err(_) => panic!("{}: nothing arrived within {WAIT:?} while waiting for {what}", self.name),
        }
    }

    /// The next `n` items, waiting at most [`WAIT`] for each (so a slow but moving backend passes
    /// and a stuck one fails).
    ///
    /// # Panics
    ///
    /// When an item does not arrive in time; the message says how many did.
    pub async fn take(&mut self, n: usize, what: &str) -> Vec<T> {
        let mut items = Vec::with_capacity(n);
        while items.len() < n {
            match tokio::time::timeout(WAIT, self.rx.recv()).await {
                Ok(Some(item)) => items.push(item),
                Ok(None) => panic!("{}: the handler side is gone after {} of {n} {what}", self.name, items.len()),
                Err(_) => {
                    panic!("{}: only {} of {n} {what} arrived (nothing more within {WAIT:?})", self.name, items.len())
                }
            }
        }
        items
    }

    /// Up to `n` items, waiting at most [`WAIT`] for each; returns early with what arrived when
    /// nothing more comes in time (for cases that then report exactly what is missing).
    pub async fn gather(&mut self, n: usize) -> Vec<T> {
        let mut items = Vec::with_capacity(n);
        while items.len() < n {
            match tokio::time::timeout(WAIT, self.rx.recv()).await {
                Ok(Some(item)) => items.push(item),
                Ok(None) | Err(_) => break,
            }
        }
        items
    }

    /// Everything that arrives within `window`.
    pub async fn collect_for(&mut self, window: Duration) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + window;
        let mut items = Vec::new();
        while let Ok(Some(item)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            items.push(item);
        }
        items
    }

    /// Asserts that nothing arrives within `window`.
    ///
    /// # Panics
    ///
    /// When something arrives; the message says `why` nothing should have.
    pub async fn assert_quiet(&mut self, window: Duration, why: &str)
    where
        T: Debug,
    {
        let extra = self.collect_for(window).await;
        assert!(extra.is_empty(), "{}: {} unexpected deliveries ({why}): {extra:?}", self.name, extra.len());
    }
}

/// A handler that sends every event it gets to the returned inbox, and returns `Ok`.
pub fn recorder(name: impl Into<String>) -> (Arc<dyn Handler>, Inbox<Event>) {
    let (tx, inbox) = inbox(name);
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            // The case may have stopped listening; that is not the handler's failure.
            let _ = tx.send(event);
            Ok(())
        }
    });
    (handler, inbox)
}

/// A handler that sends each event's body as text, tagged with `tag`, and returns `Ok`.
pub fn tagged_recorder<K: Clone + Send + Sync + 'static>(
    tag: K,
    tx: mpsc::UnboundedSender<(K, String)>,
) -> Arc<dyn Handler> {
    handler_fn(move |event: Event| {
        let tx = tx.clone();
        let tag = tag.clone();
        async move {
            let _ = tx.send((tag, body_text(&event)));
            Ok(())
        }
    })
}

/// The body of `event` as text (lossy for bytes that are not UTF-8).
pub fn body_text(event: &Event) -> String {
    String::from_utf8_lossy(event.message().body()).into_owned()
}

/// The numbered message bodies `prefix-0` .. `prefix-{n-1}`.
pub fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// How many times each item occurs.
pub fn counts<T: Ord + Clone, I: IntoIterator<Item = T>>(items: I) -> BTreeMap<T, usize> {
    let mut map = BTreeMap::new();
    for item in items {
        *map.entry(item).or_insert(0) += 1;
    }
    map
}

/// Asserts that `received` holds each of `expected` exactly once, and nothing else.
///
/// # Panics
///
/// Naming up to ten missing, duplicated and unexpected items.
#[track_caller]
pub fn assert_exactly_once(received: &[String], expected: &[String], who: &str) {
    let got = counts(received.iter().cloned());
    let missing: Vec<&String> = expected.iter().filter(|id| !got.contains_key(*id)).collect();
    let duplicated: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
    let wanted: std::collections::HashSet<&String> = expected.iter().collect();
    let unexpected: Vec<&String> = got.keys().filter(|id| !wanted.contains(id)).collect();
    assert!(
        missing.is_empty() && duplicated.is_empty() && unexpected.is_empty(),
        "{who}: expected each of {} messages exactly once; {} missing (first: {:?}), {} duplicated (first: {:?}), \
         {} unexpected (first: {:?})",
        expected.len(),
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>(),
        duplicated.len(),
        duplicated.iter().take(10).collect::<Vec<_>>(),
        unexpected.len(),
        unexpected.iter().take(10).collect::<Vec<_>>(),
    );
}

/// Groups `items` by key.
pub fn group_by<K: Eq + Hash, V>(items: impl IntoIterator<Item = (K, V)>) -> HashMap<K, Vec<V>> {
    let mut map: HashMap<K, Vec<V>> = HashMap::new();
    for (k, v) in items {
        map.entry(k).or_default().push(v);
    }
    map
}

/// Polls `condition` every 10 ms until it holds, at most [`WAIT`].
///
/// # Panics
///
/// When it does not hold in time; the message names `what`.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {WAIT:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
