//! Resident memory with a stalled subscriber: 1,000,000 messages published to a topic whose only
//! subscriber's handler never returns, over the http backend (its per-topic inbox, default
//! 10,000 messages, reject policy) and the memory backend (its per-subscription buffer, default
//! 1,024 messages). What does not fit is refused to the publisher with a typed error (`Overflow`
//! for http, `Timeout` for memory, whose publish waits up to `publish_timeout` for room), so the
//! resident set stays near its start however many messages are published.
//!
//! `cargo bench -p broker-http --bench stalled` prints, per backend: accepted / refused publishes
//! (by error kind), VmRSS before and after, and VmHWM (peak) of the process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Broker, BrokerOptions, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_http::HttpBroker;
use broker_registry::{MemoryRegistry, SharedRegistry};
use futures::StreamExt;

const MESSAGES: usize = 1_000_000;
const BODY: usize = 256;
/// Publishes in flight at once.
const WINDOW: usize = 256;

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn flood(name: &str, publisher: &dyn Broker, subscriber: &dyn Broker, bound: &str) {
    let topic = format!("bench.stalled.{name}.{}", std::process::id());
    // The handler never returns: everything published after the first message waits or is refused.
    let stall = handler_fn(|_e: Event| async {
        std::future::pending::<()>().await;
        Ok(())
    });
    let sub = subscriber.subscribe(&topic, stall, SubscribeOptions::new()).await.expect("subscribe");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (rss_before, _) = memory_kib();
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
    let started = Instant::now();
    let outcomes: Vec<Result<(), broker_core::ErrorKind>> =
        futures::stream::iter(0..MESSAGES)
            .map(|_| {
                let (topic, body) = (&topic, body.clone());
                async move {
                    publisher.publish(topic, Message::new(body), PublishOptions::new()).await.map_err(|e| e.kind())
                }
            })
            .buffer_unordered(WINDOW)
            .collect()
            .await;
    let elapsed = started.elapsed();
    let (rss_after, peak) = memory_kib();
    let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for kind in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        *refused.entry(format!("{kind:?}")).or_default() += 1;
    }
    println!(
        "{name:6}: {MESSAGES} publishes of {BODY} B to a stalled subscriber in {:.1} s: accepted {accepted}, refused {refused:?}; \
         bound {bound}; VmRSS {:.1} MiB before, {:.1} MiB after; VmHWM (process peak so far) {:.1} MiB",
        elapsed.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        peak as f64 / 1024.0,
    );
    drop(sub);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        // memory: publish waits up to publish_timeout for room, then Timeout; 10 ms keeps the run short.
        let memory = MemoryBroker::with_options(BrokerOptions::new().with_publish_timeout(Duration::from_millis(10)))
            .expect("options");
        memory.connect().await.expect("connect");
        flood("memory", &memory, &memory, "1,024 messages per subscription (buffer_size)").await;
        let _ = tokio::time::timeout(Duration::from_secs(1), memory.disconnect()).await;

        let registry: SharedRegistry = Arc::new(MemoryRegistry::new());
        let options = BrokerOptions::new().with_drain_timeout(Duration::from_secs(1));
        let publisher = HttpBroker::with_registry(options.clone(), Arc::clone(&registry)).expect("options");
        let subscriber = HttpBroker::with_registry(options, Arc::clone(&registry)).expect("options");
        publisher.connect().await.expect("connect");
        subscriber.connect().await.expect("connect");
        flood("http", &publisher, &subscriber, "10,000 messages / 64 MiB per topic inbox (inbox_max_*), reject").await;
        let _ = tokio::time::timeout(Duration::from_secs(2), publisher.disconnect()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), subscriber.disconnect()).await;
    });
}
