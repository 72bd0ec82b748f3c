//! The HTTP backend's own behaviour: the endpoint's answers to bad input, and each of the fixes to
//! Go Micro's design (inbox flush, bounds, statuses, retries, timeouts, failover, confirmed publish).
//! The contract itself is held by the conformance suite in `integration-tests`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use broker_core::{
    Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, Subscriber, handler_fn,
};
use broker_http::{HttpBroker, wire};
use broker_registry::{MemoryRegistry, Node, Service, SharedRegistry};
use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}.{}.{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

async fn broker_with(registry: &SharedRegistry, params: &[(&str, &str)]) -> HttpBroker {
    let mut options = BrokerOptions::new().with_drain_timeout(Duration::from_secs(5));
    for (k, v) in params {
        options = options.with_param(*k, *v);
    }
    let broker = HttpBroker::with_registry(options, Arc::clone(registry)).expect("valid options");
    broker.connect().await.expect("connect");
    broker
}

fn registry() -> SharedRegistry {
    Arc::new(MemoryRegistry::new())
}

/// A subscriber that forwards bodies to a channel.
async fn collect(
    broker: &HttpBroker,
    topic: &str,
    options: SubscribeOptions,
) -> (Box<dyn Subscriber>, mpsc::UnboundedReceiver<Bytes>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sub = broker
        .subscribe(
            topic,
            handler_fn(move |e: Event| {
                let tx = tx.clone();
                async move {
                    tx.send(e.message().body.clone())?;
                    Ok(())
                }
            }),
            options,
        )
        .await
        .expect("subscribe");
    (sub, rx)
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<Bytes>) -> Bytes {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("a message within the wait").expect("channel open")
}

/// The one node registered for `topic` (legacy dialect).
async fn node_of(registry: &SharedRegistry, topic: &str) -> Node {
    let services = registry.get_service(&format!("topic:{topic}")).await.expect("lookup");
    services.into_iter().flat_map(|s| s.nodes).next().expect("a registered node")
}

/// Sends raw bytes and returns the status code of the answer. Writes and reads at once: an
/// endpoint may answer (413) and close before the whole request is sent, which is the point.
async fn raw_status(address: &str, request: &[u8]) -> u16 {
    let stream = TcpStream::connect(address).await.expect("connect to the endpoint");
    let (mut stream, mut writer) = stream.into_split();
    let request = request.to_vec();
    let writing = tokio::spawn(async move {
        // A write cut short by the endpoint's early answer is expected.
        let _ = writer.write_all(&request).await;
        writer
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await
    .expect("an answer in time");
    writing.abort();
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line in {text:?}"))
}

fn post(path_and_query: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut request = format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_rejects_bad_input_and_keeps_working() {
    let registry = registry();
    let broker = broker_with(&registry, &[("secret", "s3cret")]).await;
    let topic = unique("garbage");
    let (_sub, mut rx) = collect(&broker, &topic, SubscribeOptions::new()).await;
    let node = node_of(&registry, &topic).await;
    let address = node.address.as_str();
    let ok_body = wire::encode(&topic, &Message::new("good"), wire::Dialect::Legacy);
    let secret = "X-Micro-Broker-Secret: s3cret\r\n";
    let path = format!("/_sub?id={}", node.id);

    let get = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{secret}\r\n");
    assert_eq!(raw_status(address, get.as_bytes()).await, 405, "wrong method");
    assert_eq!(raw_status(address, &post(&path, &ok_body, "")).await, 401, "no secret");
    assert_eq!(
        raw_status(address, &post(&path, &ok_body, "X-Micro-Broker-Secret: nope\r\n")).await,
        401,
        "wrong secret"
    );
    assert_eq!(raw_status(address, &post(&path, b"{broken", secret)).await, 400, "broken JSON");
    assert_eq!(raw_status(address, &post(&path, b"null", secret)).await, 400, "JSON null");
    let bad_base64 = format!(r#"{{"Header":{{":topic":"{topic}"}},"Body":"%%%"}}"#);
    assert_eq!(raw_status(address, &post(&path, bad_base64.as_bytes(), secret)).await, 400, "bad base64");
    assert_eq!(raw_status(address, &post(&path, br#"{"Header":{},"Body":""}"#, secret)).await, 400, "missing topic");
    assert_eq!(raw_status(address, &post("/_sub?id=nobody", &ok_body, secret)).await, 404, "unknown id");
    // 50 MB announced: refused from the header, before any of the body is sent.
    let huge =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\nConnection: close\r\n{secret}\r\n");
    assert_eq!(raw_status(address, huge.as_bytes()).await, 413, "50 MB body");
    // Chunked, no length: refused once the limit is crossed.
    let mut chunked =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n{secret}\r\n")
            .into_bytes();
    let chunk = vec![b'a'; 1024 * 1024];
    for _ in 0..5 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw_status(address, &chunked).await, 413, "5 MiB chunked body");
    assert!(rx.try_recv().is_err(), "nothing bad reached the handler");

    // The endpoint still delivers the next good message, from a raw client and from a publisher.
    assert_eq!(raw_status(address, &post(&path, &ok_body, secret)).await, 200);
    assert_eq!(recv(&mut rx).await, "good");
    broker.publish(&topic, Message::new("after"), PublishOptions::new()).await.unwrap();
    assert_eq!(recv(&mut rx).await, "after");
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix1_backlog_is_flushed_when_a_subscriber_appears() {
    let registry = registry();
    let publisher = broker_with(&registry, &[]).await;
    let subscriber = broker_with(&registry, &[]).await;
    let topic = unique("backlog");
    for i in 0..3 {
        publisher.publish(&topic, Message::new(format!("early-{i}")), PublishOptions::new()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    let (_sub, mut rx) = collect(&subscriber, &topic, SubscribeOptions::new()).await;
    let mut got: Vec<Bytes> = Vec::new();
    for _ in 0..3 {
        got.push(recv(&mut rx).await);
    }
    got.sort();
    assert_eq!(got, vec!["early-0", "early-1", "early-2"], "no further publish was needed");
    eprintln!("backlog of 3 delivered {:?} after the subscriber registered", started.elapsed());
    publisher.disconnect().await.unwrap();
    subscriber.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix2_inbox_is_bounded_with_reject_or_drop_oldest() {
    let registry = registry();
    let rejecting = broker_with(&registry, &[("inbox_max_messages", "5")]).await;
    let topic = unique("bounded");
    for i in 0..5 {
        rejecting.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    let err = rejecting.publish(&topic, Message::new("6th"), PublishOptions::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overflow);
    assert!(err.to_string().contains("inbox") && err.to_string().contains(&topic), "{err}");

    let dropping = broker_with(&registry, &[("inbox_max_messages", "5"), ("inbox_overflow", "drop_oldest")]).await;
    let topic = unique("dropping");
    for i in 0..8 {
        dropping.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    assert_eq!(dropping.stats().inbox_dropped, 3);
    let (_sub, mut rx) = collect(&dropping, &topic, SubscribeOptions::new()).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(recv(&mut rx).await);
    }
    got.sort();
    assert_eq!(got, vec!["3", "4", "5", "6", "7"], "the oldest three were the ones dropped");
    // Bytes bound: one message larger than the topic's byte limit is refused outright.
    let small = broker_with(&registry, &[("inbox_max_bytes", "100")]).await;
    let err = small.publish(&unique("bytes"), Message::new(vec![0u8; 200]), PublishOptions::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overflow);
    for b in [rejecting, dropping, small] {
        b.disconnect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix2_inbox_policy_wait_holds_the_publisher_until_there_is_room() {
    let registry = registry();
    let wait = [("inbox_max_messages", "5"), ("inbox_max_bytes", "100000"), ("inbox_overflow", "wait")];
    // Nobody takes the messages: the 6th publish waits out its publish timeout, then fails with
    // Timeout naming the inbox; nothing was dropped.
    let options = BrokerOptions::new().with_publish_timeout(Duration::from_millis(200));
    let options = wait.iter().fold(options, |o, (k, v)| o.with_param(*k, *v));
    let short = HttpBroker::with_registry(options, Arc::clone(&registry)).unwrap();
    short.connect().await.unwrap();
    let topic = unique("waiting-out");
    for i in 0..5 {
        short.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    let err = short.publish(&topic, Message::new("6th"), PublishOptions::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("publish timeout") && err.to_string().contains(&topic), "{err}");
    assert_eq!(short.stats().inbox_dropped, 0);
    // A message that can never fit is refused at once, as under `reject`.
    let huge = short.publish(&topic, Message::new(vec![0u8; 200_000]), PublishOptions::new()).await.unwrap_err();
    assert_eq!(huge.kind(), ErrorKind::Overflow, "{huge}");

    // With the default publish timeout: a publish waits until a subscriber takes messages, and a
    // publish dropped while it waits leaves nothing behind.
    let publisher = Arc::new(broker_with(&registry, &wait).await);
    let subscriber = broker_with(&registry, &[]).await;
    let topic = unique("waiting");
    for i in 0..5 {
        publisher.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    let cancelled = publisher.publish(&topic, Message::new("cancelled"), PublishOptions::new());
    assert!(tokio::time::timeout(Duration::from_millis(100), cancelled).await.is_err(), "it waited for room");
    let waiting = tokio::spawn({
        let (publisher, topic) = (Arc::clone(&publisher), topic.clone());
        async move { publisher.publish(&topic, Message::new("waited"), PublishOptions::new()).await }
    });
    let (_sub, mut rx) = collect(&subscriber, &topic, SubscribeOptions::new()).await;
    waiting.await.unwrap().expect("room was made once the subscriber took messages");
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(recv(&mut rx).await);
    }
    got.sort();
    assert_eq!(got, vec!["0", "1", "2", "3", "4", "waited"]);
    publisher.disconnect().await.unwrap();
    assert!(rx.try_recv().is_err(), "the cancelled publish was not delivered");
    assert_eq!(publisher.stats().inbox_dropped, 0);
    subscriber.disconnect().await.unwrap();
    short.disconnect().await.unwrap();
}

/// A fake subscriber node: answers each POST with the next status of `statuses` (then 200),
/// after `delay`; counts requests and the most that were open at once.
struct FakeNode {
    address: String,
    requests: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
}

async fn fake_node(statuses: Vec<u16>, delay: Duration) -> FakeNode {
    fake_node_with_delays(statuses, Vec::new(), delay).await
}

/// [`fake_node`] whose request n waits `delays[n]` (then `delay`) before it answers.
async fn fake_node_with_delays(statuses: Vec<u16>, delays: Vec<Duration>, delay: Duration) -> FakeNode {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let requests = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(statuses);
    let delays = Arc::new(delays);
    let (r, o, m) = (Arc::clone(&requests), Arc::clone(&open), Arc::clone(&max_open));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (r, o, m) = (Arc::clone(&r), Arc::clone(&o), Arc::clone(&m));
            let (statuses, delays) = (Arc::clone(&statuses), Arc::clone(&delays));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    let (r, o, m) = (Arc::clone(&r), Arc::clone(&o), Arc::clone(&m));
                    let (statuses, delays) = (Arc::clone(&statuses), Arc::clone(&delays));
                    async move {
                        let n = r.fetch_add(1, Ordering::SeqCst);
                        let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(*delays.get(n).unwrap_or(&delay)).await;
                        o.fetch_sub(1, Ordering::SeqCst);
                        let mut response = hyper::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = hyper::StatusCode::from_u16(*statuses.get(n).unwrap_or(&200)).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    FakeNode { address, requests, max_open }
}

async fn register_fake(registry: &SharedRegistry, topic: &str, version: &str, id: &str, address: &str) {
    let service = Service {
        name: format!("topic:{topic}"),
        version: version.to_string(),
        metadata: None,
        endpoints: None,
        nodes: vec![Node {
            id: id.to_string(),
            address: address.to_string(),
            metadata: HashMap::from([("secure".into(), "false".into())]),
        }],
    };
    registry.register(&service, Duration::from_secs(60)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix3_non_2xx_is_a_failed_delivery_and_is_retried() {
    let registry = registry();
    let broker = broker_with(&registry, &[]).await;
    let topic = unique("statuses");
    let node = fake_node(vec![500, 503], Duration::ZERO).await;
    register_fake(&registry, &topic, "ff.http.broadcast", "fake-1", &node.address).await;
    let report = broker.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert_eq!(report.delivered, vec!["fake-1".to_string()], "{report:?}");
    assert_eq!(node.requests.load(Ordering::SeqCst), 3, "500 and 503 were retried, 200 ended it");

    // A 4xx is a refusal for good: counted, reported, not retried.
    let topic = unique("refused");
    let refusing = fake_node(vec![400, 400, 400], Duration::ZERO).await;
    register_fake(&registry, &topic, "ff.http.broadcast", "fake-2", &refusing.address).await;
    let report = broker.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert!(report.delivered.is_empty() && report.failed.len() == 1, "{report:?}");
    assert!(report.failed[0].1.contains("400"), "{report:?}");
    assert_eq!(refusing.requests.load(Ordering::SeqCst), 1);
    assert_eq!(broker.stats().delivery_dropped, 1);
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix4_handler_error_makes_the_publisher_retry_bounded() {
    let registry = registry();
    let broker = broker_with(&registry, &[("max_attempts", "4")]).await;
    let topic = unique("flaky");
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let (tx, mut rx) = mpsc::unbounded_channel();
    broker
        .subscribe(
            &topic,
            handler_fn(move |e: Event| {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                async move {
                    tx.send(e.attempt())?;
                    if n < 2 { Err("not yet".into()) } else { Ok(()) }
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    let report = broker.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert_eq!(report.delivered.len(), 1, "{report:?}");
    let attempts: Vec<u32> = (0..3).map(|_| rx.try_recv().unwrap()).collect();
    assert_eq!(attempts, vec![1, 2, 3]);

    // Always failing: given up after max_attempts, counted, reported.
    let topic = unique("hopeless");
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    broker
        .subscribe(
            &topic,
            handler_fn(move |_e: Event| {
                seen.fetch_add(1, Ordering::SeqCst);
                async { Err("always".into()) }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    let report = broker.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(report.failed.len() == 1 && report.failed[0].1.contains("always"), "{report:?}");
    assert_eq!(broker.stats().delivery_dropped, 1);
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix5_requests_time_out_and_concurrency_is_bounded() {
    let registry = registry();
    let broker = broker_with(&registry, &[("request_timeout_ms", "200"), ("max_attempts", "2")]).await;
    let topic = unique("silent");
    // A node that accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    register_fake(&registry, &topic, "ff.http.broadcast", "silent-1", &silent).await;
    let report = broker.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert!(report.failed.len() == 1 && report.failed[0].1.contains("no answer within"), "{report:?}");

    let bounded = broker_with(&registry, &[("max_in_flight", "3")]).await;
    let topic = unique("paced");
    let slow = fake_node(vec![], Duration::from_millis(50)).await;
    register_fake(&registry, &topic, "ff.http.broadcast", "slow-1", &slow.address).await;
    for i in 0..30 {
        bounded.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    tokio::time::timeout(WAIT, async {
        while slow.requests.load(Ordering::SeqCst) < 30 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("all 30 delivered");
    let max_open = slow.max_open.load(Ordering::SeqCst);
    assert!((1..=3).contains(&max_open), "at most max_in_flight requests at once, saw {max_open}");
    broker.disconnect().await.unwrap();
    bounded.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix6_queue_group_fails_over_to_another_node() {
    let registry = registry();
    let broker = broker_with(&registry, &[]).await;
    let topic = unique("failover");
    // A dead node (nothing listens there any more) and a live one in the same group.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
    register_fake(&registry, &topic, "workers", "dead-1", &dead).await;
    let (_sub, mut rx) = collect(&broker, &topic, SubscribeOptions::new().with_queue("workers")).await;
    for i in 0..20 {
        broker.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(recv(&mut rx).await);
    }
    assert_eq!(got.len(), 20);
    assert_eq!(broker.stats().delivery_dropped, 0);
    broker.disconnect().await.unwrap();
}

/// A queue group's node that failed once (here: no answer within the request timeout) is hidden
/// for a moment only, not until its next registration (up to `register_interval`, 30 s, during
/// which a group with no other node got nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix6_a_group_node_that_failed_once_is_tried_again_soon() {
    let registry = registry();
    let broker = broker_with(&registry, &[("request_timeout_ms", "200")]).await;
    let topic = unique("stalled-once");
    let node = fake_node_with_delays(vec![], vec![Duration::from_secs(2)], Duration::ZERO).await;
    register_fake(&registry, &topic, "workers", "only-1", &node.address).await;
    // Waits up to the publish timeout (10 s) for the outcome.
    let report = broker.publish_confirmed(&topic, Message::new("1"), PublishOptions::new()).await.unwrap();
    assert_eq!(report.delivered, vec!["only-1".to_string()], "{report:?}");
    let report = broker.publish_confirmed(&topic, Message::new("2"), PublishOptions::new()).await.unwrap();
    assert_eq!(report.delivered, vec!["only-1".to_string()], "{report:?}");
    assert_eq!(node.requests.load(Ordering::SeqCst), 3, "the timed-out request, its retry, the second message");
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix8_confirmed_publish_says_who_got_it() {
    let registry = registry();
    let broker = broker_with(&registry, &[]).await;
    let topic = unique("confirmed");
    let (_a, mut rx_a) = collect(&broker, &topic, SubscribeOptions::new()).await;
    let (_b, mut rx_b) = collect(&broker, &topic, SubscribeOptions::new().with_queue("g")).await;
    let report = broker.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert_eq!(report.delivered.len(), 2, "{report:?}");
    assert!(report.failed.is_empty() && report.pending == 0, "{report:?}");
    let ids: Vec<String> = registry
        .get_service(&format!("topic:{topic}"))
        .await
        .unwrap()
        .into_iter()
        .flat_map(|s| s.nodes)
        .map(|n| n.id)
        .collect();
    for id in &report.delivered {
        assert!(ids.contains(id), "{id} is one of {ids:?}");
    }
    assert_eq!(recv(&mut rx_a).await, "x");
    assert_eq!(recv(&mut rx_b).await, "x");
    // Nobody subscribed: after the publish timeout, the report says it is still waiting.
    let impatient = HttpBroker::with_registry(
        BrokerOptions::new().with_publish_timeout(Duration::from_millis(200)),
        Arc::clone(&registry),
    )
    .unwrap();
    impatient.connect().await.unwrap();
    let lonely =
        impatient.publish_confirmed(&unique("lonely"), Message::new("x"), PublishOptions::new()).await.unwrap();
    assert!(lonely.delivered.is_empty() && lonely.pending == 1, "{lonely:?}");
    impatient.disconnect().await.unwrap();
    assert_eq!(impatient.stats().inbox_dropped, 1, "the waiting message was discarded at disconnect, counted");
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_dialect_round_trip_and_registry_layout() {
    let registry = registry();
    let broker = broker_with(&registry, &[("dialect", "current")]).await;
    let topic = unique("today");
    let (_b, mut rx_b) = collect(&broker, &topic, SubscribeOptions::new()).await;
    let (_q, mut rx_q) = collect(&broker, &topic, SubscribeOptions::new().with_queue("g")).await;
    let services = registry.get_service("micro.http.broker").await.unwrap();
    let ours: Vec<&Service> =
        services.iter().filter(|s| s.nodes.iter().any(|n| n.metadata.get("topic") == Some(&topic))).collect();
    assert_eq!(ours.len(), 2, "{services:?}");
    for service in &ours {
        let node = &service.nodes[0];
        assert!(node.id.starts_with(&format!("{topic}-")), "{node:?}");
        assert_eq!(node.metadata.get("broker").map(String::as_str), Some("http"));
        assert_eq!(node.metadata.get("secure").map(String::as_str), Some("false"));
    }
    broker.publish(&topic, Message::new("hi").with_header("Micro-Id", "1"), PublishOptions::new()).await.unwrap();
    assert_eq!(recv(&mut rx_b).await, "hi");
    assert_eq!(recv(&mut rx_q).await, "hi");
    // A Go Micro publisher POSTs Go's body to "/" with the node's id: one POST per subscription.
    let body = format!(r#"{{"Header":{{"Micro-Topic":"{topic}","Micro-Id":"1"}},"Body":"Z28="}}"#);
    for service in &ours {
        let node = &service.nodes[0];
        assert_eq!(raw_status(&node.address, &post(&format!("/?id={}", node.id), body.as_bytes(), "")).await, 200);
    }
    assert_eq!(recv(&mut rx_b).await, "go");
    assert_eq!(recv(&mut rx_q).await, "go");
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_registry_layout_is_go_micros() {
    let registry = registry();
    let broker = broker_with(&registry, &[]).await;
    let topic = unique("layout");
    let (sub, _rx) = collect(&broker, &topic, SubscribeOptions::new().with_queue("emails")).await;
    let services = registry.get_service(&format!("topic:{topic}")).await.unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].version, "emails");
    let node = &services[0].nodes[0];
    assert!(node.id.starts_with("broker-") && node.id.matches('.').count() == 1, "{node:?}");
    assert_eq!(node.address, broker.address());
    assert_eq!(sub.id(), Some(node.id.as_str()));
    assert_eq!(node.metadata, HashMap::from([("secure".to_string(), "false".to_string())]));
    sub.unsubscribe().await.unwrap();
    assert!(registry.get_service(&format!("topic:{topic}")).await.unwrap().iter().all(|s| s.nodes.is_empty()));
    broker.disconnect().await.unwrap();
}

/// Drops from the inbox are a metric too (`broker_inbox_dropped_total`, labelled by backend and
/// topic), read here through a recorder.
#[test]
fn inbox_drops_are_a_metric() {
    use broker_core::layers::metrics::INBOX_DROPPED;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let topic = unique("metric");
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let registry = registry();
            let broker =
                broker_with(&registry, &[("inbox_max_messages", "2"), ("inbox_overflow", "drop_oldest")]).await;
            for i in 0..5 {
                broker.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
            }
            assert_eq!(broker.stats().inbox_dropped, 3);
            broker.disconnect().await.unwrap();
        });
    });
    let dropped: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key().name() == INBOX_DROPPED && key.key().labels().any(|l| l.key() == "topic" && l.value() == topic)
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum();
    // 3 dropped by the policy, 2 discarded at disconnect (nobody subscribed).
    assert_eq!(dropped, 5);
}
