//! Fault tests: the server is killed (SIGKILL, by PID) and restarted in the middle of 10,000
//! publishes. Each test starts its OWN `redis-server` on a free port with `--appendonly yes
//! --appendfsync always` in a temporary directory, never the shared server. Skipped when
//! `redis-server` is not installed (unless `BROKER_TEST_REQUIRE` asks for redis).
//!
//! - Streams: every message whose `publish()` returned `Ok` is delivered (at least once), and
//!   delivery resumes after the server returns. Publishes during the outage fail; the publisher
//!   retries them.
//! - Pub/Sub: at most once. Publishes during the outage fail (never hang), the subscription comes
//!   back by itself, and what it received is a subset of what was published.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_core::{Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_redis::RedisBroker;

const TOTAL: usize = 10_000;
const KILL_AT: usize = 3_000;
/// Bound of every wait in these tests (generous: the machine may be loaded).
const WAIT: Duration = Duration::from_secs(60);

/// A redis-server of this test, on its own port and directory.
struct Server {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<tokio::process::Child>,
}

impl Server {
    async fn start() -> Option<Server> {
        if std::process::Command::new("redis-server").arg("--version").output().is_err() {
            let require = std::env::var("BROKER_TEST_REQUIRE").unwrap_or_default();
            assert!(
                !require.split(',').any(|r| matches!(r.trim(), "all" | "redis" | "redis-streams")),
                "BROKER_TEST_REQUIRE asks for redis but redis-server is not installed"
            );
            eprintln!("SKIP: redis-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = Server { port, dir: tempfile::tempdir().unwrap(), child: None };
        server.spawn().await;
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--save", "", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(Ok(mut conn)) =
                    tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await
                {
                    if let Ok(Ok(_)) = tokio::time::timeout(
                        Duration::from_secs(1),
                        redis::cmd("PING").query_async::<String>(&mut conn),
                    )
                    .await
                    {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not come up", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL by PID, and wait for the process to be gone.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill redis-server");
            tokio::time::timeout(WAIT, child.wait()).await.expect("redis-server exits").expect("wait");
        }
    }
}

/// Publishes `TOTAL` numbered messages, retrying each failed publish (bounded); kills and
/// restarts the server when `KILL_AT` were published. Returns the numbers whose publish
/// returned `Ok`, the number of failed attempts, and when the server was back.
async fn publish_through_restart(
    broker: &dyn Broker,
    server: &mut Server,
    topic: &str,
) -> (Vec<usize>, usize, Instant) {
    let mut ok = Vec::with_capacity(TOTAL);
    let mut failures = 0;
    let mut back = Instant::now();
    for i in 0..TOTAL {
        if i == KILL_AT {
            server.kill().await;
            // Publishing while the server is down fails, bounded by publish_timeout: never hangs.
            let started = Instant::now();
            let err = broker.publish(topic, Message::new(format!("down-{i}")), PublishOptions::new()).await;
            assert!(err.is_err(), "a publish with the server down must fail");
            assert!(started.elapsed() < WAIT, "a publish with the server down returns");
            failures += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.spawn().await;
            back = Instant::now();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match broker.publish(topic, Message::new(i.to_string()), PublishOptions::new()).await {
                Ok(()) => {
                    if i == KILL_AT {
                        eprintln!("publishing resumed {:?} after the server came back", back.elapsed());
                    }
                    ok.push(i);
                    break;
                }
                Err(e) => {
                    failures += 1;
                    assert!(Instant::now() < deadline, "publish {i} kept failing for {WAIT:?}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    (ok, failures, back)
}

type Times = Arc<Mutex<Vec<Instant>>>;
type Seen = Arc<Mutex<HashSet<usize>>>;

fn recorder() -> (Arc<dyn broker_core::Handler>, Seen, Arc<AtomicUsize>, Times) {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let deliveries = Arc::new(AtomicUsize::new(0));
    let times: Times = Arc::default();
    let (s, d, t) = (Arc::clone(&seen), Arc::clone(&deliveries), Arc::clone(&times));
    let handler = handler_fn(move |event: Event| {
        let (s, d, t) = (Arc::clone(&s), Arc::clone(&d), Arc::clone(&t));
        async move {
            t.lock().unwrap().push(Instant::now());
            if let Some(n) = event.message().body_str().and_then(|b| b.parse::<usize>().ok()) {
                s.lock().unwrap().insert(n);
            }
            d.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    (handler, seen, deliveries, times)
}

fn options(url: String) -> BrokerOptions {
    BrokerOptions::default()
        .with_addresses([url])
        .with_connect_timeout(Duration::from_secs(2))
        .with_publish_timeout(Duration::from_secs(2))
        .with_drain_timeout(Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_survive_server_restart_mid_stream() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let Some(mut server) = Server::start().await else { return };
    let broker = RedisBroker::streams(options(server.url())).unwrap();
    broker.connect().await.unwrap();
    let topic = "faults.streams";
    let (handler, seen, deliveries, times) = recorder();
    let sub = broker.subscribe(topic, handler, SubscribeOptions::new().with_queue("workers")).await.unwrap();

    let (ok, failures, back) = publish_through_restart(&broker, &mut server, topic).await;
    assert!(failures >= 1, "publishes during the outage returned errors");

    // Delivery resumes after the server's return: a delivery happens after it (measured, printed;
    // bounded by WAIT rather than asserted against a time, as the machine may be loaded).
    let deadline = back + WAIT;
    let resumed = loop {
        if let Some(first) = times.lock().unwrap().iter().find(|t| **t >= back) {
            break first.duration_since(back);
        }
        assert!(Instant::now() < deadline, "delivery did not resume after the server came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("redis-streams: delivery resumed {resumed:?} after the server came back");

    // Every message whose publish returned Ok is delivered (duplicates allowed: at least once).
    let deadline = Instant::now() + WAIT;
    loop {
        let missing: Vec<usize> = {
            let seen = seen.lock().unwrap();
            ok.iter().copied().filter(|n| !seen.contains(n)).collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages never delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "redis-streams: {} published Ok, {failures} failed attempts retried, {} deliveries",
        ok.len(),
        deliveries.load(Ordering::SeqCst)
    );
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_reports_loss_and_resubscribes_after_restart() {
    let Some(mut server) = Server::start().await else { return };
    let broker = RedisBroker::pubsub(options(server.url())).unwrap();
    broker.connect().await.unwrap();
    let topic = "faults.pubsub";
    let (handler, seen, _deliveries, _times) = recorder();
    let sub = broker.subscribe(topic, handler, SubscribeOptions::new()).await.unwrap();

    let (ok, failures, _back) = publish_through_restart(&broker, &mut server, topic).await;
    assert!(failures >= 1, "publishes during the outage returned errors");
    assert_eq!(ok.len(), TOTAL);

    // The subscription comes back by itself: a probe published after the restart arrives.
    let deadline = Instant::now() + WAIT;
    let probe = TOTAL + 1;
    loop {
        broker.publish(topic, Message::new(probe.to_string()), PublishOptions::new()).await.unwrap_or(());
        tokio::time::sleep(Duration::from_millis(100)).await;
        if seen.lock().unwrap().contains(&probe) {
            break;
        }
        assert!(Instant::now() < deadline, "the Pub/Sub subscription did not come back after the restart");
    }
    // At most once: nothing that was not published arrives; what was published while the
    // subscription was reconnecting may be missing (documented).
    let seen = seen.lock().unwrap().clone();
    let lost = ok.iter().filter(|n| !seen.contains(n)).count();
    assert!(seen.iter().all(|n| *n < TOTAL || *n == probe));
    eprintln!("redis Pub/Sub: {lost} of {} messages lost around the restart (at most once)", ok.len());
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    server.kill().await;
}
