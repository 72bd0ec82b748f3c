//! The NATS backend against real servers: raw async-nats clients on the other side, Go Micro's
//! envelope, connection errors, credentials, validation, slow consumers.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::codec;
use broker_core::{Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_nats::NatsBroker;
use futures::StreamExt;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// A round trip through the server on `raw`'s connection, so that its SUB is live: a request
/// nobody answers comes back as "no responders" once the server has read what came before.
async fn sync(raw: &async_nats::Client) {
    match tokio::time::timeout(WAIT, raw.request(raw.new_inbox(), "".into())).await {
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
        other => panic!("round trip to the server: {other:?}"),
    }
}

async fn connected(url: &str, options: BrokerOptions) -> NatsBroker {
    let broker = NatsBroker::with_options(options.with_addresses([url])).expect("valid options");
    broker.connect().await.expect("connect");
    broker
}

fn recorder() -> (Arc<dyn broker_core::Handler>, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        handler_fn(move |event: Event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
                Ok(())
            }
        }),
        rx,
    )
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(WAIT, rx.recv()).await.unwrap_or_else(|_| panic!("timed out waiting for {what}")).expect(what)
}

#[tokio::test]
async fn headers_reach_a_raw_nats_client_as_native_headers() {
    let Some(url) = support::shared_url("headers_reach_a_raw_nats_client") else { return };
    let broker = connected(&url, BrokerOptions::new()).await;
    let raw = async_nats::connect(&url).await.expect("raw client");
    let topic = support::topic("raw_headers");
    let mut sub = raw.subscribe(topic.clone()).await.expect("raw subscribe");
    sync(&raw).await;

    let message = Message::new("payload").with_header("X-Plain", "Keeps Its Case").with_header("x-ключ", "значение ✓");
    broker.publish(&topic, message, PublishOptions::new().with_header("from-options", "o")).await.expect("publish");
    let got = tokio::time::timeout(WAIT, sub.next()).await.expect("raw client receives").expect("a message");
    assert_eq!(got.payload.as_ref(), b"payload", "the body is the raw NATS payload");
    let headers = got.headers.expect("native NATS headers");
    assert_eq!(headers.get("X-Plain").map(|v| v.as_str()), Some("Keeps Its Case"));
    assert_eq!(headers.get("from-options").map(|v| v.as_str()), Some("o"));
    // A name NATS cannot carry travels percent-encoded, and the backend decodes it back.
    let encoded = format!("{}x-%D0%BA%D0%BB%D1%8E%D1%87", broker_nats::wire::ENCODED_NAME_PREFIX);
    assert_eq!(headers.get(encoded.as_str()).map(|v| v.as_str()), Some("значение ✓"));

    // And the other way: a raw client's headers reach a handler.
    let (handler, mut events) = recorder();
    let reverse = support::topic("raw_to_handler");
    let sub = broker.subscribe(&reverse, handler, SubscribeOptions::new()).await.expect("subscribe");
    let mut map = async_nats::HeaderMap::new();
    map.insert("Trace-Id", "abc");
    raw.publish_with_headers(reverse.clone(), map, "from raw".into()).await.expect("raw publish");
    raw.flush().await.expect("flush");
    let event = next(&mut events, "the raw client's message").await;
    assert_eq!(event.message().header("Trace-Id"), Some("abc"));
    assert_eq!(event.message().body(), b"from raw");
    sub.unsubscribe().await.expect("unsubscribe");
    broker.disconnect().await.expect("disconnect");
}

#[tokio::test]
async fn go_micro_envelope_is_read_and_written_and_garbage_never_reaches_the_handler() {
    let Some(url) = support::shared_url("go_micro_envelope") else { return };
    let broker = connected(&url, BrokerOptions::new().with_param("envelope", "go-micro")).await;
    assert!(!broker.capabilities().native_headers, "headers travel in the envelope");
    let raw = async_nats::connect(&url).await.expect("raw client");
    let topic = support::topic("go_micro");

    // Written: the whole payload is Go Micro's envelope, with Go Micro's event headers.
    let mut sub = raw.subscribe(topic.clone()).await.expect("raw subscribe");
    sync(&raw).await;
    broker.publish(&topic, Message::new(r#"{"id":1}"#).with_header("a", "b"), PublishOptions::new()).await.unwrap();
    let got = tokio::time::timeout(WAIT, sub.next()).await.expect("raw receives").expect("a message");
    assert!(got.headers.is_none(), "no native headers in Go Micro's format");
    let envelope = codec::decode_envelope(&got.payload).expect("a Go Micro envelope");
    assert_eq!(envelope.body(), br#"{"id":1}"#);
    assert_eq!(envelope.header("a"), Some("b"));
    assert_eq!(envelope.header(codec::MICRO_TOPIC), Some(topic.as_str()));
    assert!(envelope.header(codec::MICRO_ID).is_some());
    drop(sub);

    // Read: what a Go Micro service publishes reaches the handler decoded; garbage does not.
    let (handler, mut events) = recorder();
    let handle = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.expect("subscribe");
    raw.publish(topic.clone(), "{not an envelope".into()).await.unwrap();
    let go = r#"{"Header":{"Micro-Topic":"t","Content-Type":"application/json"},"Body":"eyJmb28iOjF9"}"#;
    raw.publish(topic.clone(), go.into()).await.unwrap();
    raw.flush().await.unwrap();
    let event = next(&mut events, "the Go Micro message").await;
    assert_eq!(event.message().body(), br#"{"foo":1}"#);
    assert_eq!(event.message().header("Content-Type"), Some("application/json"));
    assert!(tokio::time::timeout(Duration::from_millis(300), events.recv()).await.is_err(), "garbage is not handled");
    assert_eq!(broker.stats().codec_errors, 1, "the bad payload is counted");
    handle.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn publish_then_disconnect_loses_nothing() {
    let Some(url) = support::shared_url("publish_then_disconnect") else { return };
    let raw = async_nats::connect(&url).await.expect("raw client");
    let topic = support::topic("then_disconnect");
    let mut sub = raw.subscribe(topic.clone()).await.unwrap();
    sync(&raw).await;
    let broker = connected(&url, BrokerOptions::new()).await;
    for i in 0..1000 {
        broker.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    broker.disconnect().await.unwrap();
    for i in 0..1000 {
        let got = tokio::time::timeout(WAIT, sub.next()).await.expect("every message arrives").unwrap();
        assert_eq!(got.payload, format!("{i}").as_bytes());
    }
}

#[tokio::test]
async fn connecting_to_nothing_fails_clearly_and_in_time() {
    let port = support::free_port();
    let address = format!("nats://127.0.0.1:{port}");
    let broker = NatsBroker::with_options(
        BrokerOptions::new().with_addresses([address.clone()]).with_connect_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let error = broker.connect().await.expect_err("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(5), "bounded by the connect timeout");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.to_string().contains(&format!("127.0.0.1:{port}")), "names the address: {error}");
    assert!(std::error::Error::source(&error).is_some(), "keeps the client's error");
    let not = broker.publish("t", Message::new("x"), PublishOptions::new()).await.unwrap_err();
    assert_eq!(not.kind(), ErrorKind::NotConnected);
}

#[tokio::test]
async fn wrong_credentials_are_named_and_right_ones_work() {
    let Some(server) = support::OwnServer::start(&["--user", "ada", "--pass", "right-one"]).await else { return };
    let wrong = NatsBroker::with_options(
        BrokerOptions::new()
            .with_addresses([server.url()])
            .with_param("user", "ada")
            .with_param("password", "wrong-one")
            .with_connect_timeout(Duration::from_secs(3)),
    )
    .unwrap();
    assert!(!format!("{wrong:?}").contains("wrong-one"), "Debug hides the password");
    let error = wrong.connect().await.expect_err("wrong password");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.to_string().contains("authorization"), "says what is wrong: {error}");
    assert!(!error.to_string().contains("wrong-one"), "never prints the password: {error}");

    let in_url = format!("nats://ada:right-one@127.0.0.1:{}", server.port);
    let right = NatsBroker::with_options(BrokerOptions::new().with_addresses([in_url])).unwrap();
    assert!(!format!("{right:?}").contains("right-one"), "Debug hides a password in the address");
    right.connect().await.expect("credentials in the address");
    assert!(!right.address().contains("right-one"));
    right.disconnect().await.unwrap();
}

#[tokio::test]
async fn invalid_topics_and_queues_are_invalid_input() {
    let Some(url) = support::shared_url("invalid_topics") else { return };
    let broker = connected(&url, BrokerOptions::new()).await;
    for bad in ["", "a b", "a.*", "a.>", "a..b", &"x".repeat(256)] {
        let error = broker.publish(bad, Message::new("x"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{bad:?}: {error}");
        let (handler, _rx) = recorder();
        let error = broker.subscribe(bad, handler, SubscribeOptions::new()).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{bad:?}: {error}");
    }
    let (handler, _rx) = recorder();
    let error = broker.subscribe("ok", handler, SubscribeOptions::new().with_queue("a b")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    let error = broker
        .publish("ok", Message::new("x").with_header("bad", "line\r\nbreak"), PublishOptions::new())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_slow_core_consumer_is_counted_not_silent() {
    let Some(url) = support::shared_url("slow_consumer") else { return };
    let broker = connected(&url, BrokerOptions::new().with_param("buffer_size", "16")).await;
    let topic = support::topic("slow");
    let (release, gate) = tokio::sync::watch::channel(false);
    let handler = handler_fn(move |_event: Event| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok(())
        }
    });
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    for i in 0..500 {
        broker.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.stats().slow_consumer_events == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the dropped overflow must be reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = release.send(true);
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn jetstream_dead_letters_in_the_go_micro_envelope_and_terminates_garbage() {
    let Some(url) = support::shared_url("jetstream_go_micro") else { return };
    let broker =
        connected(&url, BrokerOptions::new().with_param("jetstream", "true").with_param("envelope", "go-micro")).await;
    let topic = support::topic("js_go_micro");
    let (dead_handler, mut dead) = recorder();
    let dlq = broker.subscribe(&format!("{topic}.dlq"), dead_handler, SubscribeOptions::new()).await.unwrap();
    let (tx, mut calls) = mpsc::unbounded_channel();
    let failing = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event.attempt());
            Err("always fails".into())
        }
    });
    let sub =
        broker.subscribe(&topic, failing, SubscribeOptions::new().with_queue("workers").with_max_redeliveries(1)).await;
    let sub = sub.unwrap();
    // Garbage published straight to the stream: terminated, counted, never handled.
    let raw = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    js.publish(topic.clone(), "garbage".into()).await.unwrap().await.unwrap();
    broker.publish(&topic, Message::new("poison"), PublishOptions::new()).await.unwrap();
    let letter = next(&mut dead, "the dead letter").await;
    assert_eq!(letter.message().body(), b"poison");
    assert_eq!(letter.message().header(broker_core::headers::DELIVERY_ATTEMPTS), Some("2"));
    assert!(letter.message().header(broker_core::headers::DEAD_LETTER_REASON).unwrap_or("").contains("always fails"));
    assert_eq!(next(&mut calls, "attempt 1").await, 1);
    assert_eq!(next(&mut calls, "attempt 2").await, 2);
    assert_eq!(broker.stats().codec_errors, 1);
    assert_eq!(broker.stats().dead_lettered, 1);
    sub.unsubscribe().await.unwrap();
    dlq.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

/// Makes a CA and a server certificate for 127.0.0.1 with the openssl command; `None` without it.
fn certificates(dir: &std::path::Path) -> Option<()> {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .ok()?;
    let ok = run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=micro-broker test CA",
    ]) && run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "server.ext",
    ]);
    ok.then_some(())
}

#[tokio::test]
async fn tls_options_reach_the_connection() {
    let dir = std::env::temp_dir().join(format!("broker-nats-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if certificates(&dir).is_none() {
        eprintln!("SKIP tls_options_reach_the_connection: openssl could not make certificates");
        return;
    }
    let cert = dir.join("server.pem").to_string_lossy().into_owned();
    let key = dir.join("server.key").to_string_lossy().into_owned();
    let Some(server) = support::OwnServer::start(&["--tls", "--tlscert", &cert, "--tlskey", &key]).await else {
        return;
    };
    let options = BrokerOptions::new().with_addresses([server.url()]).with_connect_timeout(Duration::from_secs(3));
    let trusted = NatsBroker::with_options(
        options.clone().with_tls(broker_core::TlsOptions::new().with_ca_file(dir.join("ca.pem"))),
    )
    .unwrap();
    assert!(trusted.capabilities().tls);
    trusted.connect().await.expect("TLS with the test CA");
    let topic = support::topic("tls");
    let (handler, mut events) = recorder();
    let sub = trusted.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    trusted.publish(&topic, Message::new("over TLS"), PublishOptions::new()).await.unwrap();
    assert_eq!(next(&mut events, "the message over TLS").await.message().body(), b"over TLS");
    sub.unsubscribe().await.unwrap();
    trusted.disconnect().await.unwrap();

    // Without the CA the server's certificate is not trusted: a clear connection error.
    let untrusted = NatsBroker::with_options(options.with_tls(broker_core::TlsOptions::new())).unwrap();
    let error = untrusted.connect().await.expect_err("an unknown CA");
    assert!(matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout), "{error}");
    assert!(error.to_string().contains(&format!("127.0.0.1:{}", server.port)), "{error}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debug_never_shows_secrets() {
    let broker = NatsBroker::with_options(
        BrokerOptions::new().with_addresses(["nats://ada:pw-in-url@127.0.0.1:4222"]).with_param("token", "tok-param"),
    );
    // A token with credentials in the address: the explicit parameter wins, neither is printed.
    let broker = broker.unwrap();
    let text = format!("{broker:?}");
    assert!(!text.contains("pw-in-url") && !text.contains("tok-param"), "{text}");
    assert!(!broker.address().contains("pw-in-url"));
}

/// Core disconnect: messages the client already holds for a subscription are still handled
/// (the server stops sending, the buffer drains), then the connection closes.
#[tokio::test]
async fn core_disconnect_handles_what_the_client_already_holds() {
    let Some(url) = support::shared_url("core_disconnect_drain") else { return };
    let broker = connected(&url, BrokerOptions::new()).await;
    let topic = support::topic("core_drain");
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let handler = handler_fn(move |_event: Event| {
        let counter = Arc::clone(&counter);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    });
    let _sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    for i in 0..5 {
        broker.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    // Let the messages reach the client's buffer before disconnecting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.disconnect().await.unwrap();
    assert_eq!(handled.load(std::sync::atomic::Ordering::SeqCst), 5, "every held message was handled");
}

/// JetStream disconnect: the acks of handled messages go out before the connection closes, so
/// the group's next member is not handed them again.
#[tokio::test]
async fn jetstream_disconnect_sends_the_acks_first() {
    let Some(url) = support::shared_url("jetstream_disconnect_acks") else { return };
    let options = BrokerOptions::new().with_param("jetstream", "true").with_param("ack_wait_ms", "1000");
    let broker = connected(&url, options.clone()).await;
    let topic = support::topic("js_acks");
    let group = SubscribeOptions::new().with_queue("ackers");
    let (handler, mut events) = recorder();
    let _sub = broker.subscribe(&topic, handler, group.clone()).await.unwrap();
    for i in 0..3 {
        broker.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    for _ in 0..3 {
        next(&mut events, "a message").await;
    }
    broker.disconnect().await.unwrap();

    let again = connected(&url, options).await;
    let (handler, mut later) = recorder();
    let sub = again.subscribe(&topic, handler, group).await.unwrap();
    // Past ack_wait: an unacknowledged message would be redelivered by now.
    let redelivered = tokio::time::timeout(Duration::from_millis(2500), later.recv()).await;
    assert!(redelivered.is_err(), "an acked message came back: {redelivered:?}");
    sub.unsubscribe().await.unwrap();
    again.disconnect().await.unwrap();
}

#[tokio::test]
async fn token_authentication() {
    let Some(server) = support::OwnServer::start(&["--auth", "the-token"]).await else { return };
    let options = BrokerOptions::new().with_addresses([server.url()]).with_connect_timeout(Duration::from_secs(3));
    let wrong = NatsBroker::with_options(options.clone().with_param("token", "not-it")).unwrap();
    let error = wrong.connect().await.expect_err("a wrong token");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.to_string().contains("authorization") && !error.to_string().contains("not-it"), "{error}");
    let none = NatsBroker::with_options(options.clone()).unwrap();
    assert_eq!(none.connect().await.expect_err("no token").kind(), ErrorKind::Connection);
    let right = NatsBroker::with_options(options.with_param("token", "the-token")).unwrap();
    right.connect().await.expect("the right token");
    right.disconnect().await.unwrap();
}

/// JetStream: when a queue-group member unsubscribes, the messages it had prefetched go back to
/// the group at once, not after `ack_wait` (30 s here).
#[tokio::test]
async fn jetstream_unsubscribe_returns_prefetched_messages_to_the_group() {
    let Some(url) = support::shared_url("jetstream_prefetched") else { return };
    let broker = connected(&url, BrokerOptions::new().with_param("jetstream", "true")).await;
    let topic = support::topic("js_prefetched");
    let group = SubscribeOptions::new().with_queue("members");
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let handled = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let first_member = {
        let handled = Arc::clone(&handled);
        handler_fn(move |event: Event| {
            let (handled, started_tx) = (Arc::clone(&handled), started_tx.clone());
            async move {
                let _ = started_tx.send(());
                tokio::time::sleep(Duration::from_millis(200)).await;
                handled.lock().unwrap().insert(event.message().body_str().unwrap_or("").to_string());
                Ok(())
            }
        })
    };
    let first = broker.subscribe(&topic, first_member, group.clone()).await.unwrap();
    for i in 0..20 {
        broker.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.unwrap();
    }
    next(&mut started, "the first member starts").await;
    first.unsubscribe().await.unwrap();
    let (handler, mut events) = recorder();
    let second = broker.subscribe(&topic, handler, group).await.unwrap();
    let mut rest: std::collections::HashSet<String> =
        (0..20).map(|i| i.to_string()).filter(|b| !handled.lock().unwrap().contains(b)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !rest.is_empty() {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("not returned to the group within 10 s: {rest:?}"))
            .unwrap();
        rest.remove(event.message().body_str().unwrap_or(""));
    }
    second.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}
