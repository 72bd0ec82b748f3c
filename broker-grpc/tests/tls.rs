//! TLS between gRPC brokers (feature `tls`), as the http backend's: a subscriber serving a
//! certificate is registered as `"secure": "true"`, publishers reach it over TLS only (ALPN h2),
//! the shared secret still applies, and a peer that does not trust the certificate, or speaks
//! plain HTTP/2, fails with a typed error instead of a hang or clear text.
#![cfg(feature = "tls")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use broker_core::{Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions, TlsOptions, handler_fn};
use broker_grpc::proto::{self, Empty};
use broker_grpc::{GrpcBroker, SECRET_METADATA};
use broker_registry::{MemoryRegistry, SharedRegistry};
use tonic::codegen::http::uri::PathAndQuery;
use tonic_prost::ProstCodec;

fn openssl(args: &[&str], dir: &Path) {
    let status =
        Command::new("openssl").args(args).current_dir(dir).stderr(Stdio::null()).status().expect("openssl runs");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the openssl command (as
/// broker-http's TLS test does): returns (CA certificate, server certificate, server key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca =
        vec!["req", "-x509", "-days", "1", "-subj", "/CN=micro-broker test CA", "-keyout", "ca.key", "-out", "ca.pem"];
    ca.extend(ec);
    openssl(&ca, dir);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"];
    csr.extend(ec);
    openssl(&csr, dir);
    std::fs::write(dir.join("ext.cnf"), "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
            .into_iter()
            .chain(["-extfile", "ext.cnf", "-out", "server.pem"])
            .collect::<Vec<_>>(),
        dir,
    );
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

/// Bounds every step: a failure must come back as an error, never as a hang.
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future).await.unwrap_or_else(|_| panic!("{what} hung"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_between_grpc_brokers() {
    let dir = std::env::temp_dir().join(format!("mb-grpc-tls-{}", uuid::Uuid::new_v4().simple()));
    let (ca, cert, key) = certificates(&dir);
    let registry: SharedRegistry = Arc::new(MemoryRegistry::new());
    let with_secret = |options: BrokerOptions| options.with_param("secret", "s3cret");
    let serving = TlsOptions::new().with_client_cert(&cert, &key).with_ca_file(&ca);
    let subscriber =
        GrpcBroker::with_registry(with_secret(BrokerOptions::new().with_tls(serving)), Arc::clone(&registry)).unwrap();
    subscriber.connect().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let topic = format!("grpc.tls.{}", uuid::Uuid::new_v4().simple());
    let subscription = subscriber
        .subscribe(
            &topic,
            handler_fn(move |e: Event| {
                let tx = tx.clone();
                async move {
                    tx.send(e.message().body.clone())?;
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    let node = registry.get_service(&format!("topic:{topic}")).await.unwrap().remove(0).nodes.remove(0);
    assert_eq!(node.metadata.get("secure").map(String::as_str), Some("true"));

    // A publisher trusting the CA delivers over TLS, with the shared secret.
    let trusting = TlsOptions::new().with_ca_file(&ca);
    let publisher =
        GrpcBroker::with_registry(with_secret(BrokerOptions::new().with_tls(trusting)), Arc::clone(&registry)).unwrap();
    publisher.connect().await.unwrap();
    let report =
        bounded("publish over TLS", publisher.publish_confirmed(&topic, Message::new("secret"), PublishOptions::new()))
            .await
            .unwrap();
    assert_eq!(report.delivered, vec![node.id.clone()], "{report:?}");
    assert_eq!(bounded("delivery", rx.recv()).await.unwrap(), "secret");

    // insecure_skip_verify (tests only) delivers without the CA.
    let skipping = GrpcBroker::with_registry(
        with_secret(BrokerOptions::new().with_tls(TlsOptions::new().with_insecure_skip_verify(true))),
        Arc::clone(&registry),
    )
    .unwrap();
    skipping.connect().await.unwrap();
    let report = bounded(
        "publish skipping verification",
        skipping.publish_confirmed(&topic, Message::new("skip"), PublishOptions::new()),
    )
    .await
    .unwrap();
    assert_eq!(report.delivered, vec![node.id.clone()], "{report:?}");
    assert_eq!(bounded("delivery", rx.recv()).await.unwrap(), "skip");

    // A publisher without TLS options refuses to send in clear text to a secure node.
    let plain = GrpcBroker::with_registry(
        with_secret(BrokerOptions::new().with_publish_timeout(Duration::from_secs(3))),
        Arc::clone(&registry),
    )
    .unwrap();
    plain.connect().await.unwrap();
    let report = bounded("plain publish", plain.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()))
        .await
        .unwrap();
    assert!(report.delivered.is_empty(), "{report:?}");
    assert!(report.failed.iter().any(|(_, reason)| reason.contains("TLS")), "{report:?}");

    // A publisher trusting another CA fails the handshake: never delivered, never clear text.
    let (other_ca, _, _) = certificates(&dir.join("other"));
    let distrusting = GrpcBroker::with_registry(
        with_secret(
            BrokerOptions::new()
                .with_publish_timeout(Duration::from_secs(3))
                .with_param("max_attempts", "2")
                .with_param("request_timeout_ms", "1000")
                .with_tls(TlsOptions::new().with_ca_file(&other_ca)),
        ),
        Arc::clone(&registry),
    )
    .unwrap();
    distrusting.connect().await.unwrap();
    let report =
        bounded("distrusting publish", distrusting.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()))
            .await
            .unwrap();
    assert!(report.delivered.is_empty(), "{report:?}");
    assert!(
        report.failed.iter().any(|(_, reason)| reason.to_lowercase().contains("certificate")),
        "the handshake failure is named: {report:?}"
    );

    // A plain HTTP/2 client calling the TLS endpoint gets a status, not a hang.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", subscriber.address()))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    let mut client = tonic::client::Grpc::new(channel);
    let mut request = tonic::Request::new(proto::Message {
        topic: topic.clone(),
        id: node.id.clone(),
        header: Default::default(),
        body: bytes::Bytes::from_static(b"clear text"),
    });
    request.metadata_mut().insert(SECRET_METADATA, "s3cret".parse().unwrap());
    let answer = bounded("plain HTTP/2 call", async {
        client.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        client
            .unary::<proto::Message, Empty, _>(
                request,
                PathAndQuery::from_static(proto::PUBLISH_PATH),
                ProstCodec::default(),
            )
            .await
    })
    .await;
    let status = answer.expect_err("a TLS endpoint does not answer clear text");
    assert_ne!(status.code(), tonic::Code::Ok);
    assert!(rx.try_recv().is_err(), "nothing else reached the handler: {:?}", rx.try_recv());

    subscription.unsubscribe().await.unwrap();
    for broker in [subscriber, publisher, skipping, plain, distrusting] {
        let _ = broker.disconnect().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_options_are_checked() {
    let mut half = TlsOptions::new().with_insecure_skip_verify(true);
    half.cert_file = Some("cert.pem".into());
    let err = GrpcBroker::with_options(BrokerOptions::new().with_tls(half)).unwrap_err();
    assert_eq!(err.kind(), broker_core::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("key_file"), "{err}");
    let no_trust = GrpcBroker::with_options(BrokerOptions::new().with_tls(TlsOptions::new())).unwrap_err();
    assert!(no_trust.to_string().contains("ca_file"), "{no_trust}");
}

#[tokio::test]
async fn unreadable_certificate_fails_connect() {
    let options = BrokerOptions::new().with_param("registry", "memory").with_tls(
        TlsOptions::new()
            .with_client_cert("/nonexistent/cert.pem", "/nonexistent/key.pem")
            .with_insecure_skip_verify(true),
    );
    let broker = GrpcBroker::with_options(options).unwrap();
    let err = broker.connect().await.unwrap_err();
    assert_eq!(err.kind(), broker_core::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
}
