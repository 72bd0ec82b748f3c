//! How soon a message published before its subscriber existed reaches that subscriber, once it
//! registers (Go Micro: not until the next publish of the topic). Target: ≤ 50 ms.
//!
//! `cargo bench -p broker-http --bench backlog` — publisher and subscriber are separate brokers
//! sharing a registry; each round publishes 10 messages to a fresh topic, waits 100 ms, then
//! subscribes, and measures from `subscribe()` returning to the 10th delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_http::HttpBroker;
use broker_registry::{LocalRegistry, MemoryRegistry, SharedRegistry};

const ROUNDS: usize = 30;
const BACKLOG: usize = 10;

async fn measure(name: &str, registry: SharedRegistry) {
    let publisher = HttpBroker::with_registry(BrokerOptions::new(), Arc::clone(&registry)).expect("options");
    let subscriber = HttpBroker::with_registry(BrokerOptions::new(), Arc::clone(&registry)).expect("options");
    publisher.connect().await.expect("connect");
    subscriber.connect().await.expect("connect");
    let mut samples = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let topic = format!("bench.backlog.{}.{round}", std::process::id());
        for i in 0..BACKLOG {
            publisher.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.expect("publish");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = subscriber
            .subscribe(
                &topic,
                handler_fn(move |_e: Event| {
                    let _ = tx.send(Instant::now());
                    async { Ok(()) }
                }),
                SubscribeOptions::new(),
            )
            .await
            .expect("subscribe");
        let registered = Instant::now();
        let mut last = registered;
        for _ in 0..BACKLOG {
            last = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("delivered").expect("open");
        }
        samples.push(last.duration_since(registered));
        sub.unsubscribe().await.expect("unsubscribe");
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "registry {name:6}: backlog of {BACKLOG} delivered after the subscriber registered: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms ({ROUNDS} rounds)",
        ms(samples[ROUNDS / 2]),
        ms(samples[ROUNDS * 9 / 10]),
        ms(samples[ROUNDS - 1])
    );
    publisher.disconnect().await.expect("disconnect");
    subscriber.disconnect().await.expect("disconnect");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        measure("memory", Arc::new(MemoryRegistry::new())).await;
        let dir = std::env::temp_dir().join(format!("mb-bench-local-{}", std::process::id()));
        let local: SharedRegistry = Arc::new(LocalRegistry::with_dir(&dir).expect("local registry"));
        measure("local", local).await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}
