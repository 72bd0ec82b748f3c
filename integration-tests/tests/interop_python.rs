//! Interop with other languages' clients: a message we publish is read, headers included, by
//! Python's pika (AMQP) and confluent-kafka (Kafka, with its own modern librdkafka), run from
//! `integration-tests/interop/*.py` with the interpreter in `BROKER_TEST_PYTHON`
//! (`scripts/services/python-clients.sh` makes a virtualenv with both and prints that variable).
//!
//! Without `BROKER_TEST_PYTHON`, or without the backend's server, a test prints `SKIP` and
//! passes, unless `BROKER_TEST_REQUIRE` asks for it (`all`, or a list naming `python`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use broker_core::{Broker, BrokerOptions, Message, PublishOptions};
use broker_kafka as _;
use broker_rabbitmq as _;
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
