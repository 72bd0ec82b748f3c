//! The retry and dead-letter layer: in process over a backend without redelivery (a memory
//! broker that declares none and so rejects `max_redeliveries`), and deferring to the memory
//! backend's native redelivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::layers::{BrokerLayerExt, RetryLayer};
use broker_core::{
    Broker, BrokerOptions, Capabilities, ErrorKind, Event, Handler, MemoryBroker, Message, PublishOptions, Result,
    SubscribeOptions, Subscriber, handler_fn, headers,
};
use tokio::sync::mpsc;

/// A memory broker that declares no redelivery, and holds subscriptions to that.
#[derive(Debug, Default)]
struct NoRedelivery(MemoryBroker);

#[async_trait]
impl Broker for NoRedelivery {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        self.0.init(options)
    }
    fn options(&self) -> BrokerOptions {
        self.0.options()
    }
    fn address(&self) -> String {
        self.0.address()
    }
    async fn connect(&self) -> Result<()> {
        self.0.connect().await
    }
    async fn disconnect(&self) -> Result<()> {
        self.0.disconnect().await
    }
    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()> {
        self.0.publish(topic, message, options).await
    }
    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        self.capabilities().check_subscribe(self.name(), &options)?;
        self.0.subscribe(topic, handler, options).await
    }
    fn name(&self) -> &'static str {
        "no-redelivery"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { redelivery: false, ..self.0.capabilities() }
    }
}

const WAIT: Duration = Duration::from_secs(10);

fn fast(max_redeliveries: u32) -> RetryLayer {
    RetryLayer::new(max_redeliveries).with_backoff(Duration::from_millis(2), Duration::from_millis(20))
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("in time").expect("open")
}

async fn quiet<T: std::fmt::Debug>(rx: &mut mpsc::UnboundedReceiver<T>) {
    if let Ok(extra) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("nothing more expected, got {extra:?}");
    }
}

/// Subscribes a recorder of dead letters to `<topic>.dlq` on `broker`.
async fn dead_letters(broker: &dyn Broker, topic: &str) -> (Box<dyn Subscriber>, mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sub = broker
        .subscribe(
            &format!("{topic}.dlq"),
            handler_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    tx.send(event.message().clone())?;
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    (sub, rx)
}

#[tokio::test]
async fn without_native_redelivery_the_layer_retries_then_dead_letters() {
    let broker = NoRedelivery::default().with_layer(fast(3));
    broker.connect().await.unwrap();
    let (_dlq, mut dead) = dead_letters(&broker, "jobs").await;
    let (tx, mut attempts) = mpsc::unbounded_channel();
    broker
        .subscribe(
            "jobs",
            handler_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    tx.send((event.attempt(), event.error().map(|e| e.to_string())))?;
                    Err("the database is down".into())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    broker.publish("jobs", Message::new("job-1").with_header("k", "v"), PublishOptions::new()).await.unwrap();

    let letter = next(&mut dead).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next(&mut attempts).await);
    }
    quiet(&mut attempts).await;
    quiet(&mut dead).await;
    assert_eq!(seen.iter().map(|(a, _)| *a).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(seen[0].1, None);
    assert!(seen[1].1.as_deref().unwrap_or_default().contains("the database is down"), "{seen:?}");
    assert_eq!(letter.body(), b"job-1");
    assert_eq!(letter.header("k"), Some("v"));
    assert!(letter.header(headers::DEAD_LETTER_REASON).unwrap_or_default().contains("the database is down"));
    assert_eq!(letter.header(headers::DELIVERY_ATTEMPTS), Some("4"));
    assert_eq!(letter.header(headers::ORIGINAL_TOPIC), Some("jobs"));
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn fails_twice_then_succeeds_exactly_once() {
    let broker = NoRedelivery::default().with_layer(fast(3));
    broker.connect().await.unwrap();
    let (_dlq, mut dead) = dead_letters(&broker, "flaky").await;
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut done) = mpsc::unbounded_channel();
    let counted = Arc::clone(&calls);
    broker
        .subscribe(
            "flaky",
            handler_fn(move |event: Event| {
                let (tx, calls) = (tx.clone(), Arc::clone(&counted));
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        return Err("not yet".into());
                    }
                    tx.send(event.attempt())?;
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    broker.publish("flaky", Message::new("x"), PublishOptions::new()).await.unwrap();
    assert_eq!(next(&mut done).await, 3, "succeeds on the third attempt");
    quiet(&mut done).await;
    quiet(&mut dead).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn the_subscriptions_own_bound_wins_and_is_not_passed_to_a_backend_without_redelivery() {
    let broker = NoRedelivery::default().with_layer(fast(5));
    broker.connect().await.unwrap();
    let (_dlq, mut dead) = dead_letters(&broker, "bounded").await;
    let sub = broker
        .subscribe(
            "bounded",
            handler_fn(|_e: Event| async { Err("no".into()) }),
            SubscribeOptions::new().with_max_redeliveries(1),
        )
        .await
        .expect("the layer honours max_redeliveries the backend cannot");
    assert_eq!(sub.options().max_redeliveries, None);
    broker.publish("bounded", Message::new("x"), PublishOptions::new()).await.unwrap();
    assert_eq!(next(&mut dead).await.header(headers::DELIVERY_ATTEMPTS), Some("2"));
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn with_auto_ack_off_the_handlers_nack_is_a_failure_and_the_delivery_is_acked_at_the_end() {
    let broker = NoRedelivery::default().with_layer(fast(3));
    broker.connect().await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut got) = mpsc::unbounded_channel();
    let counted = Arc::clone(&calls);
    broker
        .subscribe(
            "manual",
            handler_fn(move |event: Event| {
                let (tx, calls) = (tx.clone(), Arc::clone(&counted));
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        event.nack().await?;
                    } else {
                        event.ack().await?;
                    }
                    tx.send(event.attempt())?;
                    Ok(())
                }
            }),
            SubscribeOptions::new().with_auto_ack(false),
        )
        .await
        .unwrap();
    broker.publish("manual", Message::new("x"), PublishOptions::new()).await.unwrap();
    assert_eq!(next(&mut got).await, 1);
    assert_eq!(next(&mut got).await, 2);
    quiet(&mut got).await;
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn with_native_redelivery_the_layer_defers_to_the_backend() {
    let broker = MemoryBroker::new().with_layer(fast(2));
    broker.connect().await.unwrap();
    let (_dlq, mut dead) = dead_letters(broker.inner(), "native").await;
    let (tx, mut attempts) = mpsc::unbounded_channel();
    let sub = broker
        .subscribe(
            "native",
            handler_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    tx.send(event.attempt())?;
                    Err("always".into())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    assert_eq!(sub.options().max_redeliveries, Some(2), "the layer's bound is passed through");
    broker.publish("native", Message::new("x"), PublishOptions::new()).await.unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(letter.header(headers::DELIVERY_ATTEMPTS), Some("3"));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut attempts).await);
    }
    quiet(&mut attempts).await;
    assert_eq!(seen, vec![1, 2, 3]);
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_failed_dead_letter_publish_fails_the_delivery() {
    // The topic is 255 bytes long, so `<topic>.dlq` is not a valid topic: the publish fails.
    let topic = "t".repeat(255);
    let broker = MemoryBroker::new().with_layer(fast(0).in_process());
    broker.connect().await.unwrap();
    let (tx, mut got) = mpsc::unbounded_channel();
    broker
        .subscribe(
            &topic,
            handler_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    tx.send(event.clone())?;
                    Err("fails".into())
                }
            }),
            SubscribeOptions::new().with_max_redeliveries(0).with_auto_ack(false),
        )
        .await
        .unwrap();
    broker.publish(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    // The layer could not dead-letter, so it nacks the backend's delivery; memory then
    // dead-letters it natively after max_redeliveries(0), finds no subscriber there, and counts it.
    assert_eq!(next(&mut got).await.attempt(), 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.inner().dropped() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(broker.inner().dropped(), 1, "the delivery failed and was given up by the backend");
    quiet(&mut got).await;
    broker.disconnect().await.unwrap();
}

#[test]
fn backoff_doubles_up_to_the_bound_with_jitter_below_it() {
    let plain =
        RetryLayer::new(5).with_backoff(Duration::from_millis(10), Duration::from_millis(50)).with_jitter(false);
    let waits: Vec<u128> = (0..5).map(|n| plain.backoff(n).as_millis()).collect();
    assert_eq!(waits, vec![10, 20, 40, 50, 50]);
    assert_eq!(plain.backoff(u32::MAX), Duration::from_millis(50));
    let jittered = plain.clone().with_jitter(true);
    for n in 0..50 {
        let wait = jittered.backoff(n % 4);
        let full = plain.backoff(n % 4);
        assert!(wait <= full && wait >= full / 2, "{wait:?} within [{:?}, {full:?}]", full / 2);
    }
    assert_eq!(RetryLayer::default().max_redeliveries(), 3);
}

#[tokio::test]
async fn the_broker_is_delegated() {
    let broker = NoRedelivery::default().with_layer(RetryLayer::default());
    assert_eq!(broker.name(), "no-redelivery");
    assert!(!broker.capabilities().redelivery);
    assert!(broker.address().starts_with("memory://"));
    let err = broker.publish("x", Message::new("x"), PublishOptions::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotConnected);
}
