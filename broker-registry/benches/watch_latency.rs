//! How fast a new node is noticed: the local registry's watch (requirement: within 50 ms) and the
//! cache over the memory and local registries, each over many repetitions, every sample bounded
//! by a timeout. A benchmark, not a test: timings on a shared machine are reported, not asserted.
//!
//! `cargo bench -p broker-registry --bench watch_latency` prints p50 / p90 / p99 / max and the
//! share of samples within 50 ms.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_registry::{Action, Cache, LocalRegistry, MemoryRegistry, Node, Registry, Service, SharedRegistry, Watcher};
use futures::StreamExt;

const LIMIT: Duration = Duration::from_millis(50);
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("broker-registry-latency-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn service(name: &str, id: &str) -> Service {
    Service::new(name, "ff.http.broadcast").with_node(Node::new(id, "127.0.0.1:1").with_metadata("secure", "false"))
}

/// Prints the statistics and the share within [`LIMIT`].
fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    let within = samples.iter().filter(|s| **s <= LIMIT).count();
    println!(
        "{what}: n={} p50={:?} p90={:?} p99={:?} max={:?} within 50ms: {within}/{}",
        samples.len(),
        pct(50),
        pct(90),
        pct(99),
        samples[samples.len() - 1],
        samples.len()
    );
}

/// Time from the start of `register` in one registry handle until another handle's watcher sees
/// the Create.
async fn watch_latency(writer: &LocalRegistry, watcher: &mut Watcher, name: &str, reps: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(reps);
    for i in 0..reps {
        let id = format!("node-{i}");
        let started = Instant::now();
        writer.register(&service(name, &id), Duration::from_secs(60)).await.unwrap();
        loop {
            let event = tokio::time::timeout(SAMPLE_TIMEOUT, watcher.next()).await.unwrap().unwrap().unwrap();
            if event.action == Action::Create && event.service.nodes[0].id == id {
                break;
            }
        }
        samples.push(started.elapsed());
        // Keep the directory small and vary the gap between registrations.
        writer.deregister(&service(name, &id)).await.unwrap();
        tokio::time::sleep(Duration::from_millis((i % 7) as u64)).await;
    }
    samples
}

async fn local_watch() {
    let dir = temp_dir("inotify");
    // Two handles on one directory, as two processes would have.
    let writer = LocalRegistry::with_dir(&dir).unwrap();
    let reader = LocalRegistry::with_dir(&dir).unwrap();
    let mut all = reader.watch(None).await.unwrap();
    let samples = watch_latency(&writer, &mut all, "topic:latency", 200).await;
    report("local watch (inotify), all services", samples);
    let mut one = reader.watch(Some("topic:latency-one")).await.unwrap();
    let samples = watch_latency(&writer, &mut one, "topic:latency-one", 100).await;
    report("local watch (inotify), one service", samples);
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn local_watch_polling() {
    let dir = temp_dir("poll");
    let writer = LocalRegistry::with_dir(&dir).unwrap();
    let reader = LocalRegistry::with_dir(&dir).unwrap().poll_only(broker_registry::local::DEFAULT_POLL_INTERVAL);
    let mut watcher = reader.watch(None).await.unwrap();
    let samples = watch_latency(&writer, &mut watcher, "topic:latency-poll", 100).await;
    report("local watch (10 ms polling fallback)", samples);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A node registered after a first (empty) lookup shows up in the cache, with a `changes()` bump.
async fn cache_latency(registry: SharedRegistry, what: &str) {
    let cache = Cache::new(registry.clone());
    let deadline = Instant::now() + SAMPLE_TIMEOUT;
    while !cache.is_watching() {
        assert!(Instant::now() < deadline, "the cache never started watching");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut changes = cache.changes();
    let mut samples = Vec::new();
    for i in 0..60 {
        let name = format!("topic:cache-latency-{i}");
        assert!(cache.get_service(&name).await.unwrap().is_empty());
        changes.borrow_and_update();
        let started = Instant::now();
        registry.register(&service(&name, "late"), Duration::from_secs(60)).await.unwrap();
        loop {
            tokio::time::timeout(SAMPLE_TIMEOUT, changes.changed()).await.unwrap().unwrap();
            let found = cache.get_service(&name).await.unwrap();
            if found.first().is_some_and(|s| s.nodes[0].id == "late") {
                break;
            }
        }
        samples.push(started.elapsed());
        registry.deregister(&service(&name, "late")).await.unwrap();
    }
    report(what, samples);
}

async fn cache_over_memory() {
    cache_latency(Arc::new(MemoryRegistry::new()), "cache over memory").await;
}

async fn cache_over_local() {
    let dir = temp_dir("cache");
    cache_latency(Arc::new(LocalRegistry::with_dir(&dir).unwrap()), "cache over local").await;
    std::fs::remove_dir_all(&dir).unwrap();
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        local_watch().await;
        local_watch_polling().await;
        cache_over_memory().await;
        cache_over_local().await;
    });
}
