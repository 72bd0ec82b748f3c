//! `broker bench`: throughput, latency, memory and loss of one backend, and with `--baseline` the
//! ratio to the raw client library doing the same work with the same settings.
//!
//! One run: S subscribers (each subscribed to every one of T topics, broadcast or in `--queue`)
//! are set up and probed until each of them receives; then P publishers send `--count` messages
//! of `--size` bytes, message `i` to topic `i % T`, each publisher keeping up to `--window`
//! publishes in flight (one at a time, waiting for delivery, with `--latency`). Every body
//! carries its sequence number and its send time, so that each subscriber counts what it got
//! (duplicates apart) and the publish→handler latency goes into a histogram.
//!
//! Figures: publish msgs/s (sends completed, publisher flushed), end-to-end msgs/s (first send
//! to last receive, per message published), p50/p99/p99.9 latency, the process's peak RSS
//! (`VmHWM`), messages lost (expected deliveries never seen before `--idle-timeout` without
//! progress) and duplicates. The same driver ([`drive`]) feeds our broker and the raw clients.
//!
//! `--baseline` runs ours and the raw client back to back, `--rounds` times, alternating which
//! goes first, and reports ours/raw per round as min/median/max.

use std::collections::HashMap;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Args;
use futures::StreamExt;
use micro_broker::{BoxError, Broker, Event, Handler, Message, PublishOptions, SubscribeOptions, handler_fn};
use tokio::sync::Notify;

use crate::cli::{BrokerArgs, parse_seconds};
use crate::commands::publish::parse_header as parse_param;
use crate::error::CliError;

mod http;
#[cfg(feature = "kafka")]
mod kafka;
mod memory;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
#[cfg(feature = "redis")]
mod redis;

/// Bytes at the start of every body: sequence number, then send time (ns since the run's epoch).
const HEADER_BYTES: usize = 16;
/// The sequence number of a readiness probe (not counted).
const PROBE: u64 = u64::MAX;

/// Arguments of `broker bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Body size in bytes (at least 16: sequence number and send time).
    #[arg(long, value_name = "BYTES", default_value_t = 16, value_parser = clap::value_parser!(u64).range(16..=64 * 1024 * 1024))]
    size: u64,
    /// Messages to publish (in total, over all publishers).
    #[arg(short = 'n', long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Publishing tasks.
    #[arg(long, value_name = "P", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    publishers: u64,
    /// Subscribers (each one subscribes to every topic).
    #[arg(long, value_name = "S", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    subscribers: u64,
    /// The subscribers join this queue group (each message to one of them) [default: broadcast].
    #[arg(short, long, value_name = "GROUP")]
    queue: Option<String>,
    /// Number of topics; message i goes to topic i % T.
    #[arg(long, value_name = "T", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    topics: u64,
    /// Publishes in flight per publisher.
    #[arg(long, value_name = "W", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    window: u64,
    /// Handlers of one subscription running at once (our SubscribeOptions::concurrency; the
    /// raw RabbitMQ baseline uses it as its prefetch).
    #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=65_535))]
    concurrency: u64,
    /// Latency mode: one message at a time, the next sent once the previous one was delivered.
    #[arg(long)]
    latency: bool,
    /// A backend parameter, KEY=VALUE (repeat for more), e.g. jetstream=true.
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// Also run the raw client library doing the same work, and print ours/raw.
    #[arg(long)]
    baseline: bool,
    /// With --baseline: the raw client on both sides (raw against raw), so that the ratio and its
    /// spread show how far this machine's noise alone moves a ratio that should be 1.
    #[arg(long, requires = "baseline")]
    calibrate: bool,
    /// Rounds of ours + raw with --baseline (interleaved, alternating which goes first).
    #[arg(long, value_name = "R", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
    /// Give up waiting for deliveries after this long without progress; what is missing then is lost.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
    idle_timeout: Duration,
}

/// What one run does (the same for ours and for the raw client).
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub(crate) backend: String,
    pub(crate) size: usize,
    pub(crate) count: u64,
    pub(crate) publishers: usize,
    pub(crate) subscribers: usize,
    pub(crate) queue: Option<String>,
    pub(crate) topics: Vec<String>,
    pub(crate) window: usize,
    pub(crate) concurrency: usize,
    pub(crate) latency: bool,
    pub(crate) idle_timeout: Duration,
    /// The backend's addresses (`--broker-address`), empty for its default.
    #[cfg_attr(
        not(any(feature = "nats", feature = "redis", feature = "rabbitmq", feature = "kafka")),
        allow(dead_code)
    )]
    pub(crate) addresses: Vec<String>,
    pub(crate) params: Vec<(String, String)>,
}

impl Workload {
    /// Deliveries expected: every message once per subscriber, or once with a queue group.
    fn expected(&self) -> u64 {
        if self.queue.is_some() { self.count } else { self.count * self.subscribers as u64 }
    }

    /// The recorder slot of subscriber `s`: its own, or the group's single slot.
    pub(crate) fn slot(&self, s: usize) -> usize {
        if self.queue.is_some() { 0 } else { s }
    }

    fn slots(&self) -> usize {
        if self.queue.is_some() { 1 } else { self.subscribers }
    }

    #[cfg_attr(
        not(any(feature = "nats", feature = "redis", feature = "rabbitmq", feature = "kafka")),
        allow(dead_code)
    )]
    pub(crate) fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The first address, or `default`.
    #[cfg_attr(
        not(any(feature = "nats", feature = "redis", feature = "rabbitmq", feature = "kafka")),
        allow(dead_code)
    )]
    pub(crate) fn address_or(&self, default: &str) -> String {
        self.addresses.first().cloned().unwrap_or_else(|| default.to_string())
    }
}

/// Latencies in nanoseconds, log-linear buckets (64 per power of two: under 1.6 % error).
pub(crate) struct Histogram {
    buckets: Vec<AtomicU64>,
}

const SUB_BUCKETS: u64 = 64;

impl Histogram {
    fn new() -> Self {
        Histogram { buckets: (0..(2 * SUB_BUCKETS + 64 * SUB_BUCKETS)).map(|_| AtomicU64::new(0)).collect() }
    }

    fn index(value: u64) -> usize {
        if value < 2 * SUB_BUCKETS {
            return value as usize;
        }
        let msb = 63 - u64::from(value.leading_zeros());
        let shift = msb - 6;
        (2 * SUB_BUCKETS + (msb - 7) * SUB_BUCKETS + ((value >> shift) & (SUB_BUCKETS - 1))) as usize
    }

    /// The lowest value of bucket `index`.
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < 2 * SUB_BUCKETS {
            return index;
        }
        let msb = (index - 2 * SUB_BUCKETS) / SUB_BUCKETS + 7;
        let sub = (index - 2 * SUB_BUCKETS) % SUB_BUCKETS;
        (1 << msb) | (sub << (msb - 6))
    }

    fn record(&self, value: u64) {
        if let Some(bucket) = self.buckets.get(Self::index(value)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `q` quantile (0..=1) in nanoseconds; `None` when nothing was recorded.
    fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::value(index));
            }
        }
        None
    }
}

/// What the subscribers saw, shared by every subscriber task of one run.
pub(crate) struct Recorder {
    epoch: Instant,
    /// One bit per sequence number per slot.
    seen: Vec<Vec<AtomicU64>>,
    ready: Vec<AtomicBool>,
    received: AtomicU64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    foreign: AtomicU64,
    last_ns: AtomicU64,
    latency: Histogram,
    notify: Notify,
    notify_each: bool,
}

impl Recorder {
    fn new(workload: &Workload) -> Self {
        let words = workload.count.div_ceil(64) as usize;
        Recorder {
            epoch: Instant::now(),
            seen: (0..workload.slots()).map(|_| (0..words).map(|_| AtomicU64::new(0)).collect()).collect(),
            ready: (0..workload.slots()).map(|_| AtomicBool::new(false)).collect(),
            received: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            latency: Histogram::new(),
            notify: Notify::new(),
            notify_each: workload.latency,
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A body of `size` bytes for message `seq`, stamped now.
    pub(crate) fn body(&self, seq: u64, size: usize) -> Bytes {
        let mut body = BytesMut::with_capacity(size);
        body.extend_from_slice(&seq.to_le_bytes());
        body.extend_from_slice(&self.now_ns().to_le_bytes());
        body.resize(size.max(HEADER_BYTES), b'x');
        body.freeze()
    }

    /// Records one delivery to subscriber slot `slot` (called by every subscriber, ours or raw).
    pub(crate) fn record(&self, slot: usize, body: &[u8]) {
        let now = self.now_ns();
        let (Some(seq), Some(sent)) = (read_u64(body, 0), read_u64(body, 8)) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if seq == PROBE {
            if let Some(ready) = self.ready.get(slot) {
                ready.store(true, Ordering::Release);
            }
            return;
        }
        let Some(word) = self.seen.get(slot).and_then(|words| words.get((seq / 64) as usize)) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let bit = 1u64 << (seq % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            self.unique.fetch_add(1, Ordering::Relaxed);
            self.latency.record(now.saturating_sub(sent));
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        self.last_ns.fetch_max(now, Ordering::Relaxed);
        if self.notify_each {
            self.notify.notify_waiters();
        }
    }

    fn all_ready(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::Acquire))
    }

    /// Waits until `target` distinct deliveries were seen, or `idle` passed without progress.
    async fn wait_unique(&self, target: u64, idle: Duration) -> bool {
        let mut last = self.unique.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            let notified = self.notify.notified();
            let now = self.unique.load(Ordering::Relaxed);
            if now >= target {
                return true;
            }
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= idle {
                return false;
            }
            let wait = if self.notify_each { Duration::from_millis(20) } else { Duration::from_millis(2) };
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }
}

fn read_u64(body: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = body.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// How a run publishes: our broker, or a raw client. `topic` indexes [`Workload::topics`].
pub(crate) trait Sink: Send + Sync + 'static {
    /// Sends one message; done when the client says it is sent (confirmed, where it confirms).
    fn send(&self, topic: usize, body: Bytes) -> impl Future<Output = Result<(), BoxError>> + Send;
    /// After the last send: makes sure everything sent has left the process.
    fn flush(&self) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    publish_secs: f64,
    e2e_secs: f64,
    count: u64,
    expected: u64,
    unique: u64,
    duplicates: u64,
    foreign: u64,
    retries: u64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
}

impl Outcome {
    fn publish_rate(&self) -> f64 {
        self.count as f64 / self.publish_secs.max(1e-9)
    }
    fn e2e_rate(&self) -> f64 {
        self.count as f64 / self.e2e_secs.max(1e-9)
    }
    fn delivery_rate(&self) -> f64 {
        self.unique as f64 / self.e2e_secs.max(1e-9)
    }
    fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.unique)
    }
}

/// Probes until every subscriber receives, then publishes the workload and waits for delivery.
pub(crate) async fn drive<S: Sink>(
    sink: Arc<S>,
    workload: &Workload,
    recorder: &Arc<Recorder>,
) -> Result<Outcome, BoxError> {
    let last_topic = workload.topics.len() - 1;
    let probe_deadline = Instant::now() + Duration::from_secs(30);
    while !recorder.all_ready() {
        if Instant::now() > probe_deadline {
            return Err("the subscribers received no probe within 30 s: they are not subscribed".into());
        }
        let probe = recorder.body(PROBE, workload.size);
        sink.send(last_topic, probe).await?;
        sink.flush().await?;
        let probe_wait = Instant::now() + Duration::from_millis(100);
        while !recorder.all_ready() && Instant::now() < probe_wait {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Let stray probes drain before timing starts.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let progress = Progress::start(workload.expected(), Arc::clone(recorder));
    let retries = Arc::new(AtomicU64::new(0));
    let start = recorder.now_ns();
    let per = workload.count / workload.publishers as u64;
    let mut tasks = Vec::new();
    for p in 0..workload.publishers as u64 {
        let from = p * per;
        let to = if p + 1 == workload.publishers as u64 { workload.count } else { from + per };
        let (sink, recorder, retries) = (Arc::clone(&sink), Arc::clone(recorder), Arc::clone(&retries));
        let (topics, size, window, latency) =
            (workload.topics.len() as u64, workload.size, workload.window, workload.latency);
        let fanout = if workload.queue.is_some() { 1 } else { workload.subscribers as u64 };
        let idle = workload.idle_timeout;
        tasks.push(tokio::spawn(async move {
            if latency {
                for seq in from..to {
                    send_retrying(sink.as_ref(), (seq % topics) as usize, recorder.body(seq, size), &retries).await?;
                    sink.flush().await?;
                    if !recorder.wait_unique((seq + 1 - from) * fanout, idle).await {
                        return Err::<(), BoxError>(format!("message {seq} was not delivered").into());
                    }
                }
                return Ok(());
            }
            let sends = futures::stream::iter(from..to)
                .map(|seq| {
                    let (sink, recorder, retries) = (&sink, &recorder, &retries);
                    async move {
                        send_retrying(sink.as_ref(), (seq % topics) as usize, recorder.body(seq, size), retries).await
                    }
                })
                .buffer_unordered(window);
            futures::pin_mut!(sends);
            while let Some(sent) = sends.next().await {
                sent?;
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| format!("a publisher failed: {e}"))??;
    }
    sink.flush().await?;
    let published = recorder.now_ns();
    // Incomplete after the idle timeout: what is missing counts as lost.
    let _complete = recorder.wait_unique(workload.expected(), workload.idle_timeout).await;
    progress.finish();
    // The last delivery (or, if none came after it, the end of publishing).
    let end = recorder.last_ns.load(Ordering::Relaxed).max(published);
    let us = |q| recorder.latency.quantile(q).map(|ns| (ns as f64 / 100.0).round() / 10.0);
    Ok(Outcome {
        publish_secs: (published - start) as f64 / 1e9,
        e2e_secs: (end - start) as f64 / 1e9,
        count: workload.count,
        expected: workload.expected(),
        unique: recorder.unique.load(Ordering::Relaxed),
        duplicates: recorder.duplicates.load(Ordering::Relaxed),
        foreign: recorder.foreign.load(Ordering::Relaxed),
        retries: retries.load(Ordering::Relaxed),
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
    })
}

/// Sends, retrying a refused send (backpressure: a full inbox, a broker busy) for up to 30 s.
async fn send_retrying<S: Sink>(sink: &S, topic: usize, body: Bytes, retries: &AtomicU64) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut backoff = Duration::from_millis(1);
    loop {
        match sink.send(topic, body.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// The progress bar on standard error (drawn only when it is a terminal).
struct Progress {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(expected: u64, recorder: Arc<Recorder>) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            indicatif::ProgressBar::new(expected)
        } else {
            indicatif::ProgressBar::hidden()
        };
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} delivered ({per_sec})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        let ticking = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                ticking.set_position(recorder.unique.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Progress { bar, ticker }
    }

    fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Our broker as a [`Sink`].
struct Ours {
    broker: Arc<dyn Broker>,
    topics: Vec<String>,
}

impl Sink for Ours {
    async fn send(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
        let topic = self.topics.get(topic).ok_or("no such topic")?;
        Ok(self.broker.publish(topic, Message::new(body), PublishOptions::default()).await?)
    }
}

/// One run over our broker: `--broker` with its addresses and `--param`s.
async fn run_ours(broker_args: &BrokerArgs, workload: &Workload) -> Result<Outcome, BoxError> {
    let build = || -> Result<Arc<dyn Broker>, BoxError> {
        let mut options = broker_args.options();
        for (key, value) in &workload.params {
            options = options.with_param(key.as_str(), value.as_str());
        }
        Ok(micro_broker::from_name(&workload.backend, options)?)
    };
    // Publisher and subscribers are separate brokers (connections, http servers), except for
    // `memory`, whose messages stay inside one broker.
    let publisher = build()?;
    let subscriber = if workload.backend == "memory" { Arc::clone(&publisher) } else { build()? };
    publisher.connect().await?;
    if !Arc::ptr_eq(&publisher, &subscriber) {
        subscriber.connect().await?;
    }
    let recorder = Arc::new(Recorder::new(workload));
    let mut subscriptions = Vec::new();
    let result = async {
        for s in 0..workload.subscribers {
            for topic in &workload.topics {
                let handler = recording_handler(&recorder, workload.slot(s));
                let mut options = SubscribeOptions::new().with_concurrency(workload.concurrency);
                if let Some(queue) = &workload.queue {
                    options = options.with_queue(queue.as_str());
                }
                subscriptions.push(subscriber.subscribe(topic, handler, options).await?);
            }
        }
        let sink = Arc::new(Ours { broker: Arc::clone(&publisher), topics: workload.topics.clone() });
        drive(sink, workload, &recorder).await
    }
    .await;
    for subscription in subscriptions {
        let _ = subscription.unsubscribe().await;
    }
    let _ = publisher.disconnect().await;
    if !Arc::ptr_eq(&publisher, &subscriber) {
        let _ = subscriber.disconnect().await;
    }
    #[cfg(feature = "redis")]
    if workload.backend == "redis-streams" {
        let _ = redis::delete_streams(workload).await;
    }
    #[cfg(feature = "nats")]
    if workload.backend == "nats" {
        let _ = nats::delete_our_stream(workload).await;
    }
    result
}

/// One run of the raw client library for `workload.backend`.
async fn run_raw(workload: &Workload) -> Result<Outcome, BoxError> {
    let recorder = Arc::new(Recorder::new(workload));
    match workload.backend.as_str() {
        "memory" => memory::run(workload, recorder).await,
        "http" => http::run(workload, recorder).await,
        #[cfg(feature = "nats")]
        "nats" => nats::run(workload, recorder).await,
        #[cfg(feature = "redis")]
        "redis" => redis::run_pubsub(workload, recorder).await,
        #[cfg(feature = "redis")]
        "redis-streams" => redis::run_streams(workload, recorder).await,
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => rabbitmq::run(workload, recorder).await,
        #[cfg(feature = "kafka")]
        "kafka" => kafka::run(workload, recorder).await,
        other => Err(format!("no raw baseline for the backend {other:?} in this build").into()),
    }
}

/// `BENCH_RAW_LIKE_OURS=1`: a diagnosis, not a baseline. The raw clients then copy one habit of
/// ours each (nats: a flush after every publish; redis-streams: each XACK awaited before the next
/// entry; memory: a task per delivery), so that the ratio shows how much of the gap that habit is.
pub(crate) fn raw_like_ours() -> bool {
    std::env::var("BENCH_RAW_LIKE_OURS").is_ok_and(|v| v.trim() == "1")
}

/// `BENCH_RAW_FLOOR=1`: a diagnosis, not a baseline. The raw baselines of memory (one topic),
/// nats (core and JetStream), redis, redis-streams and http then also do, per message, what any
/// implementation of our contract and of the backend's wire format has to do on top of the
/// client: the publish made of a [`Message`] and [`PublishOptions`] and run as a boxed future
/// (as `async_trait` boxes `Broker::publish`); the wire format where it is not the bare body
/// (redis Pub/Sub and http: Go Micro's envelope, encoded and decoded by [`micro_broker::codec`],
/// http with its topic header); each delivery an [`Event`] given to the same recording handler
/// as ours through [`micro_broker::run_handler`] (its boxed future, the panic guard, the ack),
/// before the raw ack where there is one. ours / floor is then what our implementations add;
/// floor / raw what the contract and the wire format cost (BENCHMARKS.md).
pub(crate) fn raw_floor() -> bool {
    std::env::var("BENCH_RAW_FLOOR").is_ok_and(|v| v.trim() == "1")
}

/// Where [`raw_floor`] has no floor, the reason; checked before any run.
fn raw_floor_refusal(workload: &Workload) -> Option<&'static str> {
    if !matches!(workload.backend.as_str(), "memory" | "nats" | "redis" | "redis-streams" | "http") {
        return Some(
            "BENCH_RAW_FLOOR=1 has a floor for memory, nats (core and JetStream), redis, redis-streams and http only",
        );
    }
    // The memory baseline's channels carry bodies only: its events get the one topic there is.
    (workload.backend == "memory" && workload.topics.len() != 1)
        .then_some("BENCH_RAW_FLOOR=1 with memory: one topic only (--topics 1)")
}

/// The handler of every subscription of ours (and of the raw floor, [`raw_floor`]): records the
/// delivery in `slot`.
fn recording_handler(recorder: &Arc<Recorder>, slot: usize) -> Arc<dyn Handler> {
    let recorder = Arc::clone(recorder);
    handler_fn(move |event: Event| {
        recorder.record(slot, event.message().body());
        async { Ok(()) }
    })
}

/// The delivery side of [`raw_floor`]: one subscriber's handler, run as ours run theirs.
pub(crate) struct Floor {
    handler: Arc<dyn Handler>,
}

impl Floor {
    pub(crate) fn new(recorder: &Arc<Recorder>, slot: usize) -> Self {
        Floor { handler: recording_handler(recorder, slot) }
    }

    /// The events' topics, by the name a message arrives with (made once, cloned per event).
    pub(crate) fn topics(names: impl IntoIterator<Item = String>) -> HashMap<String, Arc<str>> {
        names.into_iter().map(|name| (name.clone(), name.into())).collect()
    }

    /// One delivery as the contract makes it: an event of `topic` handed to the handler.
    pub(crate) async fn deliver(&self, topic: &Arc<str>, message: Message) {
        let event = Event::builder(Arc::clone(topic), message).build();
        let _ = micro_broker::run_handler(self.handler.as_ref(), event, true).await;
    }
}

/// The publish side of [`raw_floor`]: `send` of a [`Message`] (made here, with its
/// [`PublishOptions`], as ours' caller makes them) run as a boxed future, as `Broker::publish` is.
pub(crate) async fn publish_as_contract<'a, F, Fut>(body: Bytes, send: F) -> Result<(), BoxError>
where
    F: FnOnce(Message) -> Fut + Send + 'a,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'a,
{
    let (message, options) = (Message::new(body), PublishOptions::default());
    let publish: std::pin::Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>> = Box::pin(async move {
        let _options = options;
        send(message).await
    });
    publish.await
}

/// Parses the arguments, runs, prints the table and the JSON line.
pub(crate) fn run(broker_args: &BrokerArgs, args: BenchArgs) -> Result<(), CliError> {
    let backend = broker_args.backend_name();
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    // The first segment is unique to this process: nats JetStream makes a stream per first
    // segment (`bench….>`), which must not capture the core-NATS runs of later processes.
    let prefix = format!("bench{:x}{nonce:x}", std::process::id());
    let workload = Workload {
        backend: backend.clone(),
        size: usize::try_from(args.size).map_err(|_| CliError::Failed("--size is too large".into()))?,
        count: args.count,
        publishers: args.publishers as usize,
        subscribers: args.subscribers as usize,
        queue: args.queue.clone(),
        topics: (0..args.topics).map(|t| format!("{prefix}.t{t}")).collect(),
        window: if args.latency { 1 } else { args.window as usize },
        concurrency: args.concurrency as usize,
        latency: args.latency,
        idle_timeout: args.idle_timeout,
        addresses: broker_args.options().addresses,
        params: args.params.clone(),
    };
    if args.latency && args.publishers != 1 {
        return Err(CliError::Failed("--latency sends one message at a time: use it with --publishers 1".into()));
    }
    if args.baseline && raw_floor() {
        if let Some(refusal) = raw_floor_refusal(&workload) {
            return Err(CliError::Failed(refusal.into()));
        }
    }
    let rounds = if args.baseline { args.rounds } else { 1 };
    let label = |is_raw: bool| side_names(args.calibrate)[usize::from(is_raw)];
    let results = crate::block_on(async {
        let mut ours = Vec::new();
        let mut raw = Vec::new();
        for round in 0..rounds {
            let run_one = |raw_first: bool| {
                // Topics of their own for every run: nothing left by one run reaches the next.
                let mut workload = workload.clone();
                let tag = if raw_first { "raw" } else { "ours" };
                workload.topics = workload.topics.iter().map(|t| format!("{t}.r{round}{tag}")).collect();
                let raw_run = raw_first || args.calibrate;
                async move { if raw_run { run_raw(&workload).await } else { run_ours(broker_args, &workload).await } }
            };
            let order: &[bool] = if !args.baseline {
                &[false]
            } else if round % 2 == 0 {
                &[false, true]
            } else {
                &[true, false]
            };
            for &is_raw in order {
                let outcome = run_one(is_raw).await.map_err(|e| {
                    let what = if args.calibrate {
                        label(is_raw)
                    } else if is_raw {
                        "the raw baseline"
                    } else {
                        "our"
                    };
                    CliError::Failed(format!("{what} run failed: {e}"))
                })?;
                eprintln!("{}", round_line(round, label(is_raw), &outcome));
                if is_raw { raw.push(outcome) } else { ours.push(outcome) }
            }
        }
        Ok::<_, CliError>((ours, raw))
    })??;
    let (ours, raw) = results;
    let report = Report {
        workload: &workload,
        ours: &ours,
        raw: &raw,
        calibration: args.calibrate,
        peak_rss_kib: peak_rss_kib(),
    };
    print!("{}", report.table());
    println!("{}", report.json());
    Ok(())
}

/// The names of the two sides of a run: ours and raw, or (`--calibrate`) two runs of raw.
fn side_names(calibration: bool) -> [&'static str; 2] {
    if calibration { ["raw A", "raw B"] } else { ["ours", "raw"] }
}

fn round_line(round: u64, side: &str, o: &Outcome) -> String {
    format!(
        "round {} {:5}: publish {:>10.0} msg/s, e2e {:>10.0} msg/s, p99 {} µs, lost {}, dup {}",
        round + 1,
        side,
        o.publish_rate(),
        o.e2e_rate(),
        o.p99_us.map_or("-".into(), |v| format!("{v:.0}")),
        o.lost(),
        o.duplicates
    )
}

/// `VmHWM` of this process in KiB (peak resident set), where /proc has it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// min, median, max.
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    Some((sorted[0], median, sorted[sorted.len() - 1]))
}

fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    spread(&values.collect::<Vec<_>>()).map(|(_, m, _)| m)
}

struct Report<'a> {
    workload: &'a Workload,
    ours: &'a [Outcome],
    raw: &'a [Outcome],
    /// `--calibrate`: `ours` holds runs of the raw client too.
    calibration: bool,
    peak_rss_kib: Option<u64>,
}

impl Report<'_> {
    fn ratios(&self, f: impl Fn(&Outcome) -> f64) -> Option<(f64, f64, f64)> {
        let per_round: Vec<f64> = self.ours.iter().zip(self.raw).map(|(o, r)| f(o) / f(r)).collect();
        spread(&per_round)
    }

    fn added_p99(&self) -> Option<(f64, f64, f64)> {
        let per_round: Vec<f64> =
            self.ours.iter().zip(self.raw).filter_map(|(o, r)| Some(o.p99_us? - r.p99_us?)).collect();
        spread(&per_round)
    }

    fn summary(outcomes: &[Outcome]) -> serde_json::Value {
        let m = |f: &dyn Fn(&Outcome) -> Option<f64>| median(outcomes.iter().filter_map(f));
        serde_json::json!({
            "publish_msgs_per_s": m(&|o| Some(o.publish_rate().round())),
            "e2e_msgs_per_s": m(&|o| Some(o.e2e_rate().round())),
            "deliveries_per_s": m(&|o| Some(o.delivery_rate().round())),
            "p50_us": m(&|o| o.p50_us),
            "p99_us": m(&|o| o.p99_us),
            "p999_us": m(&|o| o.p999_us),
            "lost": outcomes.iter().map(Outcome::lost).sum::<u64>(),
            "duplicates": outcomes.iter().map(|o| o.duplicates).sum::<u64>(),
            "foreign": outcomes.iter().map(|o| o.foreign).sum::<u64>(),
            "publish_retries": outcomes.iter().map(|o| o.retries).sum::<u64>(),
            "runs": outcomes.len(),
        })
    }

    fn json(&self) -> String {
        let w = self.workload;
        let mut value = serde_json::json!({
            "broker": w.backend,
            "size": w.size,
            "count": w.count,
            "publishers": w.publishers,
            "subscribers": w.subscribers,
            "queue": w.queue,
            "topics": w.topics.len(),
            "window": w.window,
            "concurrency": w.concurrency,
            "latency_mode": w.latency,
            "params": w.params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "peak_rss_kib": self.peak_rss_kib,
        });
        // What kind of run this was, where it is not the plain ours-against-raw (`calibration`:
        // the top-level figures are then those of raw A, and the ratio raw A / raw B).
        let baseline = !self.raw.is_empty();
        let flags = [
            ("raw_like_ours", baseline && raw_like_ours()),
            ("raw_floor", baseline && raw_floor()),
            ("calibration", self.calibration),
        ];
        if let Some(object) = value.as_object_mut() {
            for (flag, _) in flags.iter().filter(|(_, set)| *set) {
                object.insert((*flag).into(), true.into());
            }
        }
        let ours = Self::summary(self.ours);
        if let (Some(object), Some(fields)) = (value.as_object_mut(), ours.as_object()) {
            for (key, field) in fields {
                object.insert(key.clone(), field.clone());
            }
            if !self.raw.is_empty() {
                let s = |v: Option<(f64, f64, f64)>| {
                    let r = |x: f64| (x * 1000.0).round() / 1000.0;
                    v.map(|(min, med, max)| serde_json::json!({"min": r(min), "median": r(med), "max": r(max)}))
                };
                object.insert("raw".into(), Self::summary(self.raw));
                object.insert(
                    "ratio".into(),
                    serde_json::json!({
                        "publish": s(self.ratios(Outcome::publish_rate)),
                        "e2e": s(self.ratios(Outcome::e2e_rate)),
                        "p99": s(self.ratios(|o| o.p99_us.unwrap_or(f64::NAN))),
                        "added_p99_us": s(self.added_p99()),
                    }),
                );
            }
        }
        value.to_string()
    }

    fn table(&self) -> String {
        let w = self.workload;
        let mut out = format!(
            "broker {} · {} B × {} msgs · {} publisher(s) × window {} · {} subscriber(s){} · {} topic(s){}\n",
            w.backend,
            w.size,
            w.count,
            w.publishers,
            w.window,
            w.subscribers,
            w.queue.as_deref().map(|q| format!(" in queue {q}")).unwrap_or_default(),
            w.topics.len(),
            if w.latency { " · latency mode" } else { "" }
        );
        let fmt_us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let row = |name: &str, o: &[Outcome]| {
            let m = |f: &dyn Fn(&Outcome) -> Option<f64>| median(o.iter().filter_map(f));
            format!(
                "{:<6} {:>14.0} {:>14.0} {:>9} {:>9} {:>9} {:>6} {:>6}\n",
                name,
                m(&|o| Some(o.publish_rate())).unwrap_or(0.0),
                m(&|o| Some(o.e2e_rate())).unwrap_or(0.0),
                fmt_us(m(&|o| o.p50_us)),
                fmt_us(m(&|o| o.p99_us)),
                fmt_us(m(&|o| o.p999_us)),
                o.iter().map(Outcome::lost).sum::<u64>(),
                o.iter().map(|o| o.duplicates).sum::<u64>(),
            )
        };
        out.push_str(&format!(
            "{:<6} {:>14} {:>14} {:>9} {:>9} {:>9} {:>6} {:>6}\n",
            "", "publish msg/s", "e2e msg/s", "p50 µs", "p99 µs", "p99.9 µs", "lost", "dup"
        ));
        let [ours_name, raw_name] = side_names(self.calibration);
        out.push_str(&row(ours_name, self.ours));
        if !self.raw.is_empty() {
            out.push_str(&row(raw_name, self.raw));
            let f = |v: Option<(f64, f64, f64)>, unit: &str| {
                v.map_or("-".into(), |(a, b, c)| format!("{b:.3}{unit} (min {a:.3}, max {c:.3})"))
            };
            out.push_str(&format!(
                "{ours_name}/{raw_name} over {} round(s): publish {} · e2e {} · added p99 {}\n",
                self.ours.len().min(self.raw.len()),
                f(self.ratios(Outcome::publish_rate), ""),
                f(self.ratios(Outcome::e2e_rate), ""),
                self.added_p99().map_or("-".into(), |(a, b, c)| format!("{b:.0} µs (min {a:.0}, max {c:.0})")),
            ));
        }
        if let Some(kib) = self.peak_rss_kib {
            out.push_str(&format!("peak RSS (VmHWM, whole process): {:.1} MiB\n", kib as f64 / 1024.0));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        assert!((p50 / 50_000_000.0 - 1.0).abs() < 0.02, "{p50}");
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((p99 / 99_000_000.0 - 1.0).abs() < 0.02, "{p99}");
        for v in [0u64, 1, 127, 128, 129, 1 << 20, u64::MAX / 2] {
            let back = Histogram::value(Histogram::index(v));
            assert!(back <= v && (v - back) as f64 <= v as f64 / 60.0, "{v} -> {back}");
        }
    }

    #[test]
    fn recorder_counts_duplicates_and_probes() {
        let workload = Workload {
            backend: "memory".into(),
            size: 16,
            count: 10,
            publishers: 1,
            subscribers: 2,
            queue: None,
            topics: vec!["t".into()],
            window: 1,
            concurrency: 1,
            latency: false,
            idle_timeout: Duration::from_secs(1),
            addresses: Vec::new(),
            params: Vec::new(),
        };
        let r = Recorder::new(&workload);
        r.record(0, &r.body(PROBE, 16));
        assert!(!r.all_ready());
        r.record(1, &r.body(PROBE, 16));
        assert!(r.all_ready());
        r.record(0, &r.body(3, 16));
        r.record(0, &r.body(3, 16));
        r.record(1, &r.body(3, 64));
        r.record(1, b"short");
        assert_eq!(r.unique.load(Ordering::Relaxed), 2);
        assert_eq!(r.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(r.foreign.load(Ordering::Relaxed), 1);
        assert_eq!(spread(&[3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
    }
}
