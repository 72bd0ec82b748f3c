//! The concurrency layer: measured over the memory backend, the number of handlers running at
//! once never exceeds the limit (and reaches it), per subscription, also when the backend below
//! is asked for far more concurrent deliveries.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::layers::{BrokerLayerExt, ConcurrencyLayer, Layer};
use broker_core::{
    Broker, Event, Handler, MemoryBroker, Message, PublishOptions, Result, SubscribeOptions, Subscriber, handler_fn,
};

/// Counts handlers running at once, and the highest count seen.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    done: AtomicUsize,
}

impl Gauge {
    fn handler(self: &Arc<Self>, hold: Duration) -> Arc<dyn Handler> {
        let gauge = Arc::clone(self);
        handler_fn(move |_event: Event| {
            let gauge = Arc::clone(&gauge);
            async move {
                let now = gauge.now.fetch_add(1, Ordering::SeqCst) + 1;
                gauge.max.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                gauge.now.fetch_sub(1, Ordering::SeqCst);
                gauge.done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    }

    async fn wait_for(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.done.load(Ordering::SeqCst) < n {
            assert!(tokio::time::Instant::now() < deadline, "only {} of {n} handled", self.done.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A layer below the concurrency layer that asks the backend for 64 concurrent deliveries, to show
/// that the limit is the layer's own semaphore and not the backend's.
#[derive(Debug)]
struct Greedy<B>(B);

struct GreedyLayer;

impl<B: Broker> Layer<B> for GreedyLayer {
    type Broker = Greedy<B>;
    fn layer(&self, inner: B) -> Greedy<B> {
        Greedy(inner)
    }
}

#[async_trait]
impl<B: Broker> Broker for Greedy<B> {
    fn init(&self, options: broker_core::BrokerOptions) -> Result<()> {
        self.0.init(options)
    }
    fn options(&self) -> broker_core::BrokerOptions {
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
        self.0.subscribe(topic, handler, options.with_concurrency(64)).await
    }
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn capabilities(&self) -> broker_core::Capabilities {
        self.0.capabilities()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_the_limit_of_handlers_run_at_once() {
    let broker = MemoryBroker::new().with_layer(ConcurrencyLayer::new(3).with_max_in_flight(6));
    broker.connect().await.unwrap();
    let gauge = Arc::new(Gauge::default());
    let sub =
        broker.subscribe("work", gauge.handler(Duration::from_millis(20)), SubscribeOptions::new()).await.unwrap();
    assert_eq!(sub.options().concurrency, 6, "the backend is asked for max_in_flight deliveries");
    for i in 0..30 {
        broker.publish("work", Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    gauge.wait_for(30).await;
    assert_eq!(gauge.max.load(Ordering::SeqCst), 3, "the limit is reached and never exceeded");
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_whatever_the_backend_is_asked_for_and_per_subscription() {
    let broker = MemoryBroker::new().with_layer(GreedyLayer).with_layer(ConcurrencyLayer::new(2));
    broker.connect().await.unwrap();
    let (a, b) = (Arc::new(Gauge::default()), Arc::new(Gauge::default()));
    broker.subscribe("a", a.handler(Duration::from_millis(20)), SubscribeOptions::new()).await.unwrap();
    broker.subscribe("b", b.handler(Duration::from_millis(20)), SubscribeOptions::new()).await.unwrap();
    for i in 0..20 {
        broker.publish("a", Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
        broker.publish("b", Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    a.wait_for(20).await;
    b.wait_for(20).await;
    assert_eq!(a.max.load(Ordering::SeqCst), 2);
    assert_eq!(b.max.load(Ordering::SeqCst), 2, "each subscription has its own limit");
    broker.disconnect().await.unwrap();
}

#[test]
fn limits_are_sane() {
    let layer = ConcurrencyLayer::new(0).with_max_in_flight(0);
    assert_eq!((layer.max_concurrent(), layer.max_in_flight()), (1, 1));
    let layer = ConcurrencyLayer::new(4).with_max_in_flight(2);
    assert_eq!(layer.max_in_flight(), 4, "never fewer in flight than running");
}
