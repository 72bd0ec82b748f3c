//! The grpc backend's own behaviour beyond the conformance suite: bad input gets a typed error or
//! status and never a hang, failed deliveries are reported, and the shared secret is checked.

use std::sync::Arc;
use std::time::Duration;

use broker_core::{Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_grpc::proto::{self, Empty};
use broker_grpc::{GrpcBroker, SECRET_METADATA};
use broker_registry::{MemoryRegistry, Node, Registry, Service};
use tonic::codegen::http::uri::PathAndQuery;
use tonic_prost::ProstCodec;

fn topic(what: &str) -> String {
    format!("grpc.test.{what}.{}", uuid::Uuid::new_v4().simple())
}

async fn connected(registry: &Arc<MemoryRegistry>, options: BrokerOptions) -> GrpcBroker {
    let broker = GrpcBroker::with_registry(options, registry.clone()).unwrap();
    broker.connect().await.unwrap();
    broker
}

/// A subscriber that forwards what it gets.
async fn subscriber(
    broker: &GrpcBroker,
    topic: &str,
) -> (Box<dyn broker_core::Subscriber>, tokio::sync::mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            tx.send(event.message().clone())?;
            Ok(())
        }
    });
    (broker.subscribe(topic, handler, SubscribeOptions::new()).await.unwrap(), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_node_is_reported_within_the_timeouts() {
    let registry = Arc::new(MemoryRegistry::new());
    let topic = topic("unreachable");
    // A queue group whose only node listens nowhere (port 1 on loopback refuses at once).
    let service = Service::new(format!("topic:{topic}"), "workers")
        .with_node(Node::new("broker-gone.1", "127.0.0.1:1").with_metadata("secure", "false"));
    registry.register(&service, Duration::from_secs(60)).await.unwrap();
    let options = BrokerOptions::new()
        .with_param("request_timeout_ms", "500")
        .with_param("max_attempts", "2")
        .with_publish_timeout(Duration::from_secs(1));
    let broker = connected(&registry, options).await;
    // Bounded by the publish timeout; the outer bound only turns a hang into a failure.
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        broker.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()),
    )
    .await
    .expect("publish_confirmed returns within its publish timeout")
    .unwrap();
    // The group's only node is hidden for a second after it refused: the message waits in the
    // inbox (or, on a slow machine, was tried again and given up on: max_attempts 2), never
    // "delivered".
    assert!(report.delivered.is_empty() && report.pending + report.failed.len() == 1, "{report:?}");
    // disconnect ends it, counted once: discarded from the inbox, or given up after its last
    // attempt (when the node's hiding ended first); the broker itself had nothing go wrong.
    broker.disconnect().await.unwrap();
    let stats = broker.stats();
    assert_eq!(stats.inbox_dropped + stats.delivery_dropped, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broadcast_node_is_given_up_on_with_the_reason() {
    let registry = Arc::new(MemoryRegistry::new());
    let topic = topic("unreachable_broadcast");
    let service = Service::new(format!("topic:{topic}"), "ff.grpc.broadcast")
        .with_node(Node::new("broker-gone.2", "127.0.0.1:1").with_metadata("secure", "false"));
    registry.register(&service, Duration::from_secs(60)).await.unwrap();
    let options = BrokerOptions::new().with_param("request_timeout_ms", "500").with_param("max_attempts", "2");
    let broker = connected(&registry, options).await;
    let report = broker.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, "broker-gone.2");
    assert!(report.failed[0].1.contains("unreachable") && report.failed[0].1.contains("2 attempts"), "{report:?}");
    assert_eq!(broker.stats().delivery_dropped, 1);
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_fails_at_publish() {
    let registry = Arc::new(MemoryRegistry::new());
    let broker = connected(&registry, BrokerOptions::new().with_param("max_message_bytes", "1024")).await;
    let error =
        broker.publish(&topic("oversized"), Message::new(vec![0u8; 2000]), PublishOptions::new()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    assert!(error.to_string().contains("max_message_bytes"), "{error}");
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_with_a_smaller_limit_refuses_and_the_publisher_says_so() {
    let registry = Arc::new(MemoryRegistry::new());
    let small = connected(&registry, BrokerOptions::new().with_param("max_message_bytes", "1024")).await;
    let topic = topic("smaller_limit");
    let (_sub, _rx) = subscriber(&small, &topic).await;
    let publisher = connected(&registry, BrokerOptions::new()).await;
    let report =
        publisher.publish_confirmed(&topic, Message::new(vec![7u8; 4096]), PublishOptions::new()).await.unwrap();
    assert!(report.delivered.is_empty(), "{report:?}");
    assert_eq!(report.failed.len(), 1, "refused for good, not retried: {report:?}");
    assert!(
        report.failed[0].1.contains("OutOfRange") || report.failed[0].1.contains("ResourceExhausted"),
        "{report:?}"
    );
    publisher.disconnect().await.unwrap();
    small.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_secret_is_checked() {
    let registry = Arc::new(MemoryRegistry::new());
    let subscriber_broker = connected(&registry, BrokerOptions::new().with_param("secret", "s3cret")).await;
    let topic = topic("secret");
    let (_sub, mut rx) = subscriber(&subscriber_broker, &topic).await;

    let wrong = connected(&registry, BrokerOptions::new().with_param("secret", "guess")).await;
    let report = wrong.publish_confirmed(&topic, Message::new("no"), PublishOptions::new()).await.unwrap();
    assert!(report.failed.len() == 1 && report.failed[0].1.contains("Unauthenticated"), "{report:?}");

    let right = connected(&registry, BrokerOptions::new().with_param("secret", "s3cret")).await;
    let report = right.publish_confirmed(&topic, Message::new("yes"), PublishOptions::new()).await.unwrap();
    assert_eq!(report.delivered.len(), 1, "{report:?}");
    assert_eq!(rx.recv().await.unwrap().body(), b"yes");
    for broker in [wrong, right, subscriber_broker] {
        broker.disconnect().await.unwrap();
    }
}

/// A raw tonic client (no broker) against our server: the method path, the statuses, the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_raw_calls_with_typed_statuses() {
    let registry = Arc::new(MemoryRegistry::new());
    let broker = connected(&registry, BrokerOptions::new().with_param("secret", "s3cret")).await;
    let topic = topic("raw");
    let (sub, mut rx) = subscriber(&broker, &topic).await;
    let node_id = sub.id().unwrap().to_string();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.address()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let call = |path: &'static str, message: proto::Message, secret: Option<&str>| {
        let mut client = tonic::client::Grpc::new(channel.clone());
        let mut request = tonic::Request::new(message);
        if let Some(secret) = secret {
            request.metadata_mut().insert(SECRET_METADATA, secret.parse().unwrap());
        }
        async move {
            client.ready().await.unwrap();
            client
                .unary::<proto::Message, Empty, _>(request, PathAndQuery::from_static(path), ProstCodec::default())
                .await
                .map(|_| ())
        }
    };
    let message = |topic: &str, id: &str| proto::Message {
        topic: topic.to_string(),
        id: id.to_string(),
        header: [("k".to_string(), "v".to_string())].into(),
        body: bytes::Bytes::from_static(b"raw"),
    };
    call("/Broker/Publish", message(&topic, &node_id), Some("s3cret")).await.unwrap();
    let got = rx.recv().await.unwrap();
    assert_eq!((got.body(), got.header("k")), (&b"raw"[..], Some("v")));

    let code = |r: Result<(), tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(call("/Broker/Publish", message(&topic, &node_id), None).await), tonic::Code::Unauthenticated);
    assert_eq!(code(call("/Broker/Publish", message(&topic, "nobody"), Some("s3cret")).await), tonic::Code::NotFound);
    assert_eq!(
        code(call("/Broker/Publish", message("", &node_id), Some("s3cret")).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(call("/broker.Broker/Publish", message(&topic, &node_id), Some("s3cret")).await),
        tonic::Code::Unimplemented
    );
    broker.disconnect().await.unwrap();
}

#[tokio::test]
async fn bad_options_are_typed_errors() {
    let unknown = GrpcBroker::with_options(BrokerOptions::new().with_param("dialect", "current")).unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::Unsupported);
    let tls = GrpcBroker::with_options(BrokerOptions::new().with_tls(broker_core::TlsOptions::new())).unwrap_err();
    // Without the feature TLS is unsupported; with it, empty options lack a CA to trust.
    assert_eq!(tls.kind(), if cfg!(feature = "tls") { ErrorKind::InvalidInput } else { ErrorKind::Unsupported });
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let broker =
        GrpcBroker::with_registry(BrokerOptions::new().with_addresses([address]), Arc::new(MemoryRegistry::new()))
            .unwrap();
    assert_eq!(broker.connect().await.unwrap_err().kind(), ErrorKind::Connection);
    let not_connected = broker.publish("t", Message::new("x"), PublishOptions::new()).await.unwrap_err();
    assert_eq!(not_connected.kind(), ErrorKind::NotConnected);
}
