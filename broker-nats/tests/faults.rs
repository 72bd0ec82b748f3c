//! Server failures mid-stream, against a nats-server of the test's own (started and killed by PID;
//! never the shared server): JetStream loses nothing across a restart, core NATS reports its loss
//! window with errors and never hangs.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_core::{Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_nats::NatsBroker;

const N: usize = 10_000;
const KILL_AT: usize = 3_000;

#[derive(Default)]
struct Received {
    seen: Mutex<HashSet<usize>>,
    deliveries: AtomicUsize,
}

impl Received {
    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn recording(received: &Arc<Received>) -> Arc<dyn broker_core::Handler> {
    let received = Arc::clone(received);
    handler_fn(move |event: Event| {
        let received = Arc::clone(&received);
        async move {
            let i: usize = event.message().body_str().unwrap_or("").parse()?;
            received.deliveries.fetch_add(1, Ordering::SeqCst);
            received.seen.lock().unwrap().insert(i);
            Ok(())
        }
    })
}

/// Waits (bounded) until `published` reaches `at`, kills the server, waits 1 s, starts it again,
/// and returns when it listens again.
async fn kill_and_restart(server: &mut support::OwnServer, published: &AtomicUsize, at: usize) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    while published.load(Ordering::SeqCst) < at {
        assert!(Instant::now() < deadline, "the publisher did not reach {at} messages");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart().await;
    Instant::now()
}

/// JetStream: 10,000 messages published while the server is killed and restarted all arrive. The
/// publisher retries a failed publish with the same `Nats-Msg-Id`, so the stream stores each once;
/// duplicates can only come from redeliveries of messages whose ack was lost (documented), and
/// delivery resumes within 5 s of the server's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_delivers_every_message_across_a_server_restart() {
    let Some(mut server) = support::OwnServer::start(&[]).await else { return };
    let options = BrokerOptions::new()
        .with_addresses([server.url()])
        .with_param("jetstream", "true")
        .with_param("ack_wait_ms", "2000")
        .with_publish_timeout(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(5))
        .with_drain_timeout(Duration::from_secs(5));
    let broker = Arc::new(NatsBroker::with_options(options).unwrap());
    broker.connect().await.unwrap();
    let topic = format!("faults.jetstream.{}", std::process::id());
    let received = Arc::new(Received::default());
    let sub = broker
        .subscribe(&topic, recording(&received), SubscribeOptions::new().with_queue("workers").with_concurrency(4))
        .await
        .unwrap();

    let published = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (broker, topic, published, errors) =
            (Arc::clone(&broker), topic.clone(), Arc::clone(&published), Arc::clone(&errors));
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            for i in 0..N {
                let message = Message::new(i.to_string()).with_header("Nats-Msg-Id", format!("{topic}-{i}"));
                loop {
                    let started = Instant::now();
                    match broker.publish(&topic, message.clone(), PublishOptions::new()).await {
                        Ok(()) => break,
                        Err(error) => {
                            assert!(started.elapsed() < Duration::from_secs(5), "a publish must not hang: {error}");
                            assert!(
                                matches!(error.kind(), ErrorKind::Timeout | ErrorKind::Connection | ErrorKind::Backend),
                                "{error}"
                            );
                            errors.fetch_add(1, Ordering::SeqCst);
                            assert!(Instant::now() < deadline, "the server did not come back for the publisher");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                published.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let back = kill_and_restart(&mut server, &published, KILL_AT).await;
    let at_return = received.distinct();
    let resume_deadline = back + Duration::from_secs(5);
    while received.distinct() <= at_return {
        assert!(Instant::now() < resume_deadline, "delivery did not resume within 5 s of the server's return");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    publisher.await.expect("the publisher finishes");
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.distinct() < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} distinct messages arrived ({} deliveries)",
            received.distinct(),
            received.deliveries.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = received.seen.lock().unwrap().clone();
    assert_eq!(seen, (0..N).collect::<HashSet<_>>(), "every message, none missing");
    eprintln!(
        "jetstream restart: {} publish errors retried, {} deliveries for {N} messages",
        errors.load(Ordering::SeqCst),
        received.deliveries.load(Ordering::SeqCst)
    );
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

/// Core NATS: while the server is away, publishes fail (each within its publish timeout: never a
/// hang), what is delivered is delivered once, and after the server's return delivery resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_reports_the_loss_window_and_never_hangs() {
    let Some(mut server) = support::OwnServer::start(&[]).await else { return };
    let publish_timeout = Duration::from_millis(300);
    let options = BrokerOptions::new()
        .with_addresses([server.url()])
        .with_publish_timeout(publish_timeout)
        .with_drain_timeout(Duration::from_secs(5));
    let broker = Arc::new(NatsBroker::with_options(options).unwrap());
    broker.connect().await.unwrap();
    let topic = format!("faults.core.{}", std::process::id());
    let received = Arc::new(Received::default());
    let sub = broker.subscribe(&topic, recording(&received), SubscribeOptions::new()).await.unwrap();

    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (broker, topic, published) = (Arc::clone(&broker), topic.clone(), Arc::clone(&published));
        tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in 0..N {
                let started = Instant::now();
                if let Err(error) = broker.publish(&topic, Message::new(i.to_string()), PublishOptions::new()).await {
                    assert!(matches!(error.kind(), ErrorKind::Timeout | ErrorKind::Connection), "{error}");
                    failed.push(i);
                }
                assert!(started.elapsed() < publish_timeout + Duration::from_secs(2), "publish {i} hung");
                published.fetch_add(1, Ordering::SeqCst);
            }
            failed
        })
    };
    kill_and_restart(&mut server, &published, KILL_AT).await;
    let failed = publisher.await.expect("the publisher finishes");
    assert!(!failed.is_empty(), "publishing while the server was down must report errors");

    // After the server's return, a fresh message arrives (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut probe = N;
    while !received.seen.lock().unwrap().contains(&probe) {
        assert!(Instant::now() < deadline, "delivery did not resume after the server came back");
        probe += 1;
        let _ = broker.publish(&topic, Message::new(probe.to_string()), PublishOptions::new()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deliveries = received.deliveries.load(Ordering::SeqCst);
    let distinct = received.distinct();
    assert_eq!(deliveries, distinct, "core NATS never delivers a message twice");
    eprintln!(
        "core restart: {} of {N} publishes failed (first {:?}, last {:?}); {distinct} messages delivered",
        failed.len(),
        failed.first(),
        failed.last()
    );
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}
