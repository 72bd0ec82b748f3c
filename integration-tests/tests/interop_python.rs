//! Interop with other languages' clients: a message we publish is read, headers included, by
//! Python's pika (AMQP) and confluent-kafka (Kafka, with its own modern librdkafka), run from
//! `integration-tests/interop/*.py` with the interpreter in `BROKER_TEST_PYTHON`
//! (`scripts/services/python-clients.sh` makes a virtualenv with them and prints that variable).
//! For the grpc backend, which has no server, the peer is Python's grpcio with stubs that
//! Google's protoc (grpcio-tools) generates from Go Micro's proto (`interop/broker.proto`): it
//! calls our subscriber, and serves the calls of our publisher, with the registry entries of Go
//! Micro's gRPC broker.
//!
//! Without `BROKER_TEST_PYTHON`, or without the backend's server, a test prints `SKIP` and
//! passes, unless `BROKER_TEST_REQUIRE` asks for it (`all`, or a list naming `python`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use std::sync::Arc;

use broker_core::{Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_grpc::GrpcBroker;
use broker_kafka as _;
use broker_rabbitmq as _;
use broker_registry::{MemoryRegistry, Node, Registry, Service};
use integration_tests::servers::{self, ENV_REQUIRE};
use integration_tests::support::unique_topic;
use serde_json::Value;

/// How long a Python client may take to print a line.
const LINE_WAIT: Duration = Duration::from_secs(40);

/// The interpreter from `BROKER_TEST_PYTHON`, or `None` (skip) unless required.
fn python(test: &str) -> Option<String> {
    match std::env::var("BROKER_TEST_PYTHON").ok().filter(|v| !v.trim().is_empty()) {
        Some(path) => Some(path),
        None if servers::required("python") => {
            panic!(
                "{test}: {ENV_REQUIRE} asks for the Python clients but BROKER_TEST_PYTHON is not set (run scripts/services/python-clients.sh)"
            )
        }
        None => {
            eprintln!("SKIP {test}: BROKER_TEST_PYTHON is not set");
            None
        }
    }
}

/// The server of `backend` and the Python interpreter, or `None` when the test is skipped.
async fn prerequisites(backend: &str, test: &str) -> Option<(String, String)> {
    let url = servers::server_or_skip(backend).await??;
    Some((url, python(test)?))
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop").join(name)
}

/// A Python client running one of the interop scripts, killed when dropped.
struct PythonClient {
    child: Child,
    lines: Option<BufReader<ChildStdout>>,
}

impl PythonClient {
    fn start(python: &str, script_name: &str, args: &[&str]) -> PythonClient {
        let mut child = Command::new(python)
            .arg(script(script_name))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} {script_name}: {e}"));
        let lines = child.stdout.take().map(BufReader::new);
        PythonClient { child, lines }
    }

    /// The next line the script prints (blocking read on a worker thread, bounded).
    async fn line(&mut self, what: &str) -> String {
        let mut reader = self.lines.take().expect("stdout is read by one call at a time");
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let n = reader.read_line(&mut line);
            (reader, n, line)
        });
        let (reader, n, line) = tokio::time::timeout(LINE_WAIT, read)
            .await
            .unwrap_or_else(|_| panic!("{what}: the Python client printed nothing within {LINE_WAIT:?}"))
            .expect("reader thread");
        self.lines = Some(reader);
        let n = n.unwrap_or_else(|e| panic!("{what}: reading the Python client's output: {e}"));
        assert!(n > 0, "{what}: the Python client exited without printing (its stderr is above)");
        line.trim_end().to_string()
    }
}

impl Drop for PythonClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_reads_what_we_publish_to_rabbitmq_headers_included() {
    let Some((url, python)) = prerequisites("rabbitmq", "pika_reads_what_we_publish_to_rabbitmq").await else {
        return;
    };
    let broker = broker_core::from_name("rabbitmq", BrokerOptions::new().with_addresses([url.as_str()])).unwrap();
    broker.connect().await.unwrap(); // declares the exchange `micro` that pika binds to
    let topic = unique_topic("interop.pika");
    let mut reader = PythonClient::start(&python, "amqp_read.py", &[&url, "micro", &topic]);
    assert_eq!(reader.line("pika binding its queue").await, "READY");

    let message = Message::new("hello pika").with_header("Content-Type", "text/plain").with_header("Order-Id", "42");
    broker.publish(&topic, message, PublishOptions::new()).await.unwrap();

    let seen: Value = serde_json::from_str(&reader.line("pika reading the message").await).unwrap();
    assert_eq!(seen["routing_key"], topic.as_str());
    assert_eq!(seen["body"], "hello pika");
    assert_eq!(seen["content_type"], "text/plain");
    assert_eq!(seen["delivery_mode"], 2, "persistent");
    assert_eq!(seen["headers"]["Order-Id"], "42", "headers: {}", seen["headers"]);
    assert_eq!(seen["headers"]["Content-Type"], "text/plain");
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_kafka_reads_what_we_publish_to_kafka_headers_and_key_included() {
    let Some((url, python)) = prerequisites("kafka", "confluent_kafka_reads_what_we_publish_to_kafka").await else {
        return;
    };
    let broker = broker_core::from_name("kafka", BrokerOptions::new().with_addresses([url.as_str()])).unwrap();
    broker.connect().await.unwrap();
    let topic = unique_topic("interop.confluent");
    let message =
        Message::new("hello confluent").with_header("Content-Type", "text/plain").with_header("Order-Id", "42");
    // Awaits the delivery report: the record is stored before the reader starts.
    broker.publish(&topic, message, PublishOptions::new().with_ordering_key("customer-7")).await.unwrap();

    let mut reader = PythonClient::start(&python, "kafka_read.py", &[&url, &topic]);
    let seen: Value = serde_json::from_str(&reader.line("confluent-kafka reading the record").await).unwrap();
    assert_eq!(seen["topic"], topic.as_str());
    assert_eq!(seen["value"], "hello confluent", "the raw body as the record value");
    assert_eq!(seen["key"], "customer-7", "the ordering key as the record key");
    let headers: Vec<(String, String)> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| (pair[0].as_str().unwrap().to_string(), pair[1].as_str().unwrap_or_default().to_string()))
        .collect();
    assert!(headers.contains(&("Order-Id".into(), "42".into())), "record headers: {headers:?}");
    assert!(headers.contains(&("Content-Type".into(), "text/plain".into())), "record headers: {headers:?}");
    broker.disconnect().await.unwrap();
}

/// The Python peer of the grpc tests: no server needed, only the interpreter.
fn grpc_python(test: &str) -> Option<String> {
    python(test)
}

/// One call of `grpc_peer.py` (publish / garbage): what it printed.
async fn grpc_peer_call(python: &str, args: &[&str]) -> String {
    let mut peer = PythonClient::start(python, "grpc_peer.py", args);
    peer.line(&format!("grpc_peer.py {}", args.join(" "))).await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_publishes_to_our_grpc_subscriber_with_go_micros_registry_entry() {
    let Some(python) = grpc_python("grpcio_publishes_to_our_grpc_subscriber") else { return };
    let registry = Arc::new(MemoryRegistry::new());
    let broker = GrpcBroker::with_registry(BrokerOptions::new(), registry.clone()).unwrap();
    broker.connect().await.unwrap();
    let topic = unique_topic("interop.grpcio.sub");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            if event.message().body() == b"fail" {
                return Err("refused on purpose".into());
            }
            tx.send(event.message().clone())?;
            Ok(())
        }
    });
    let sub = broker.subscribe(&topic, handler.clone(), SubscribeOptions::new()).await.unwrap();
    let queued = broker.subscribe(&topic, handler, SubscribeOptions::new().with_queue("workers")).await.unwrap();

    // The registry entries, as Go Micro's gRPC broker writes and reads them.
    let services = registry.get_service(&format!("topic:{topic}")).await.unwrap();
    let versions: Vec<&str> = services.iter().map(|s| s.version.as_str()).collect();
    assert_eq!(versions, ["ff.grpc.broadcast", "workers"], "{services:?}");
    let node = &services[0].nodes[0];
    assert_eq!(services[0].nodes.len(), 1);
    assert_eq!(Some(node.id.as_str()), sub.id());
    assert!(node.id.starts_with("broker-") && node.id.contains('.'), "Go Micro's broker-<uuid>.<uuid>: {}", node.id);
    assert_eq!(node.address, broker.address());
    assert_eq!(node.metadata, [("secure".to_string(), "false".to_string())].into());
    assert!(services[0].metadata.is_none() && services[0].endpoints.is_none());

    // An independent client calls /Broker/Publish with the node id from the registry.
    let address = node.address.clone();
    let said = grpc_peer_call(
        &python,
        &["publish", &address, &topic, &node.id, "hello", "Content-Type=text/plain", "trace=abc"],
    )
    .await;
    assert_eq!(said, "ok");
    let got = tokio::time::timeout(LINE_WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(got.body(), b"hello");
    assert_eq!(got.header("Content-Type"), Some("text/plain"));
    assert_eq!(got.header("trace"), Some("abc"));

    // What our subscriber refuses, with the status that says why.
    let said = grpc_peer_call(&python, &["publish", &address, &topic, "broker-nobody.none", "x"]).await;
    assert!(said.starts_with("error NOT_FOUND"), "{said}");
    let said = grpc_peer_call(&python, &["publish", &address, "", &node.id, "x"]).await;
    assert!(said.starts_with("error INVALID_ARGUMENT"), "{said}");
    let said = grpc_peer_call(&python, &["publish", &address, &topic, &node.id, "fail"]).await;
    assert!(said.starts_with("error INTERNAL") && said.contains("refused on purpose"), "{said}");
    let said = grpc_peer_call(&python, &["garbage", &address]).await;
    assert!(said.starts_with("error INTERNAL"), "a body that is not a Message: {said}");
    // And it still serves afterwards.
    let said = grpc_peer_call(&python, &["publish", &address, &topic, &node.id, "again"]).await;
    assert_eq!(said, "ok");
    assert_eq!(tokio::time::timeout(LINE_WAIT, rx.recv()).await.unwrap().unwrap().body(), b"again");

    queued.unsubscribe().await.unwrap();
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_grpc_publisher_reaches_a_grpcio_server_found_in_the_registry() {
    let Some(python) = grpc_python("our_grpc_publisher_reaches_a_grpcio_server") else { return };
    let mut server = PythonClient::start(&python, "grpc_peer.py", &["serve"]);
    let listening = server.line("grpcio server starting").await;
    let port = listening.strip_prefix("listening ").unwrap_or_else(|| panic!("{listening}"));
    let address = format!("127.0.0.1:{port}");

    // A Go Micro gRPC-broker subscriber's entries: one broadcast node, one queue group node.
    let registry = Arc::new(MemoryRegistry::new());
    let topic = unique_topic("interop.grpcio.pub");
    let broadcast = Node::new("broker-go.broadcast", address.clone()).with_metadata("secure", "false");
    let grouped = Node::new("broker-go.grouped", address.clone()).with_metadata("secure", "false");
    for (version, node) in [("ff.grpc.broadcast", broadcast), ("emails", grouped)] {
        let service = Service::new(format!("topic:{topic}"), version).with_node(node);
        registry.register(&service, std::time::Duration::from_secs(60)).await.unwrap();
    }

    let broker = GrpcBroker::with_registry(BrokerOptions::new(), registry).unwrap();
    broker.connect().await.unwrap();
    let body: Vec<u8> = vec![0, 255, b'h', b'i', 10];
    let message =
        Message::new(body.clone()).with_header("Content-Type", "application/octet-stream").with_header("trace", "abc");
    let report = broker.publish_confirmed(&topic, message, PublishOptions::new()).await.unwrap();
    let mut delivered = report.delivered.clone();
    delivered.sort();
    assert_eq!(delivered, ["broker-go.broadcast", "broker-go.grouped"], "{report:?}");

    let mut ids = Vec::new();
    for _ in 0..2 {
        let seen: Value = serde_json::from_str(&server.line("the grpcio server receiving").await).unwrap();
        assert_eq!(seen["topic"], topic.as_str());
        assert_eq!(seen["body"], hex(&body), "the body byte for byte");
        assert_eq!(seen["header"]["trace"], "abc");
        assert_eq!(seen["header"]["Content-Type"], "application/octet-stream");
        ids.push(seen["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(ids, ["broker-go.broadcast", "broker-go.grouped"], "each call names the node it is for");
    broker.disconnect().await.unwrap();
}
