//! HTTPS between brokers (feature `tls`): a subscriber serving a certificate is registered as
//! `"secure": "true"`, publishers reach it over https only, and a publisher that does not trust
//! its certificate fails instead of falling back to clear text.
#![cfg(feature = "tls")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use broker_core::{Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions, TlsOptions, handler_fn};
use broker_http::HttpBroker;
use broker_registry::{MemoryRegistry, SharedRegistry};

fn openssl(args: &[&str], dir: &Path) {
    let status =
        Command::new("openssl").args(args).current_dir(dir).stderr(Stdio::null()).status().expect("openssl runs");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the openssl command:
/// returns (CA certificate, server certificate, server key).
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_between_brokers() {
    let dir = std::env::temp_dir().join(format!("mb-tls-{}", std::process::id()));
    let (ca, cert, key) = certificates(&dir);
    let registry: SharedRegistry = Arc::new(MemoryRegistry::new());
    let serving = TlsOptions::new().with_client_cert(&cert, &key).with_ca_file(&ca);
    let subscriber = HttpBroker::with_registry(BrokerOptions::new().with_tls(serving), Arc::clone(&registry)).unwrap();
    subscriber.connect().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let topic = format!("tls.{}", std::process::id());
    subscriber
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

    // A publisher trusting the CA delivers over https.
    let trusting = TlsOptions::new().with_ca_file(&ca);
    let publisher = HttpBroker::with_registry(BrokerOptions::new().with_tls(trusting), Arc::clone(&registry)).unwrap();
    publisher.connect().await.unwrap();
    let report = publisher.publish_confirmed(&topic, Message::new("secret"), PublishOptions::new()).await.unwrap();
    assert_eq!(report.delivered, vec![node.id.clone()], "{report:?}");
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap(), "secret");

    // A publisher without TLS settings refuses to send in clear text to a secure node.
    let plain = HttpBroker::with_registry(
        BrokerOptions::new().with_publish_timeout(Duration::from_secs(3)),
        Arc::clone(&registry),
    )
    .unwrap();
    plain.connect().await.unwrap();
    let report = plain.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert!(report.delivered.is_empty() && report.failed[0].1.contains("https"), "{report:?}");

    // A publisher trusting another CA fails the handshake: never delivered, never clear text.
    let (other_ca, _, _) = certificates(&dir.join("other"));
    let distrusting = HttpBroker::with_registry(
        BrokerOptions::new()
            .with_publish_timeout(Duration::from_secs(3))
            .with_param("max_attempts", "2")
            .with_tls(TlsOptions::new().with_ca_file(&other_ca)),
        Arc::clone(&registry),
    )
    .unwrap();
    distrusting.connect().await.unwrap();
    let report = distrusting.publish_confirmed(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    assert!(report.delivered.is_empty(), "{report:?}");
    assert!(rx.try_recv().is_err(), "nothing reached the handler");

    for broker in [subscriber, publisher, plain, distrusting] {
        let _ = broker.disconnect().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
