//! How long [`Cache::get_service`] takes over the `local` registry once its watch runs (answered
//! from memory), in rounds of 2,000 lookups of one registered service.
//!
//! `cargo run --release -p broker-registry --example cache_latency`
//!
//! Written to rule the lookup in or out as the cause of the http backend's added latency over the
//! local registry (BENCHMARKS.md): it answers in about 170 ns (p99 about 200 ns) here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_registry::{Cache, LocalRegistry, Node, Service, SharedRegistry};

const LOOKUPS: usize = 2_000;

#[tokio::main]
async fn main() -> broker_registry::Result<()> {
    let dir = std::env::temp_dir().join(format!("micro-broker-cache-latency-{}", std::process::id()));
    let registry: SharedRegistry = Arc::new(LocalRegistry::with_dir(&dir)?);
    let mut service = Service::new("topic:latency", "ff.http.broadcast");
    service.nodes.push(Node::new("node-1", "127.0.0.1:1"));
    registry.register(&service, Duration::from_secs(60)).await?;
    let cache = Cache::new(Arc::clone(&registry));
    for round in 0..5 {
        let mut samples = Vec::with_capacity(LOOKUPS);
        for _ in 0..LOOKUPS {
            let started = Instant::now();
            let found = cache.get_service("topic:latency").await?;
            samples.push(started.elapsed());
            assert_eq!(found.len(), 1, "the registered service");
        }
        samples.sort();
        println!(
            "round {round}: watching {}, p50 {:?}, p99 {:?}, max {:?}",
            cache.is_watching(),
            samples[LOOKUPS / 2],
            samples[LOOKUPS * 99 / 100],
            samples[LOOKUPS - 1]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
