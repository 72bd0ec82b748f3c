//! Two hosts: a publisher and a subscriber in two network namespaces made by this test (a veth
//! pair between them), finding each other through etcd, which runs in the publisher's namespace.
//! Nothing leaves the machine: the addresses exist only inside the test's namespaces.
//!
//! Needs root, `ip` (iproute2) and `etcd`; with `BROKER_TEST_REQUIRE=all` a missing one fails the
//! test, otherwise it is skipped with a message. The two hosts are this test binary run again
//! (`--ignored --exact two_hosts_child`) inside each namespace.
#![cfg(feature = "etcd")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use broker_core::{Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_http::HttpBroker;

const COUNT: usize = 50;

fn skip_or_fail(reason: &str) {
    if std::env::var("BROKER_TEST_REQUIRE").is_ok_and(|v| v == "all") {
        panic!("two-host test cannot run and BROKER_TEST_REQUIRE=all: {reason}");
    }
    eprintln!("SKIP http::two_hosts: {reason}");
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// The namespaces, the etcd process and the children; all removed or killed on drop.
struct Hosts {
    a: String,
    b: String,
    processes: Vec<Child>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run(&["ip", "netns", "delete", &self.a]);
        let _ = run(&["ip", "netns", "delete", &self.b]);
    }
}

/// Waits for the child to print a line holding `prefix`; returns the line from `prefix` on.
fn wait_for_line(child: &mut Child, prefix: &str, limit: Duration) -> Result<String, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        // libtest may print "test two_hosts_child ... " on the same line first. Read to the
        // end, so that the child never writes into a closed pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(at) = line.find(&prefix) {
                let _ = tx.send(line[at..].to_string());
            }
        }
    });
    rx.recv_timeout(limit).map_err(|_| format!("no line starting with the expected prefix within {limit:?}"))
}

#[test]
fn two_hosts_discover_each_other_through_etcd() {
    let missing: Vec<&str> = ["ip", "etcd"]
        .into_iter()
        .filter(|tool| {
            !Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
        })
        .collect();
    if !missing.is_empty() {
        return skip_or_fail(&format!("missing tools: {missing:?} (install iproute2 and etcd-server)"));
    }
    let pid = std::process::id();
    let net = pid % 200 + 20;
    let hosts = Hosts { a: format!("mb{pid}a"), b: format!("mb{pid}b"), processes: Vec::new() };
    let (veth_a, veth_b) = (format!("mb{}a", pid % 100_000), format!("mb{}b", pid % 100_000));
    let (ip_a, ip_b) = (format!("10.213.{net}.1"), format!("10.213.{net}.2"));
    if let Err(e) = run(&["ip", "netns", "add", &hosts.a]) {
        return skip_or_fail(&format!("cannot make a network namespace (needs root): {e}"));
    }
    let mut hosts = hosts;
    let (cidr_a, cidr_b) = (format!("{ip_a}/24"), format!("{ip_b}/24"));
    let setup = [
        vec!["ip", "netns", "add", &hosts.b],
        vec![
            "ip", "link", "add", &veth_a, "netns", &hosts.a, "type", "veth", "peer", "name", &veth_b, "netns", &hosts.b,
        ],
        vec!["ip", "-n", &hosts.a, "addr", "add", &cidr_a, "dev", &veth_a],
        vec!["ip", "-n", &hosts.b, "addr", "add", &cidr_b, "dev", &veth_b],
        vec!["ip", "-n", &hosts.a, "link", "set", &veth_a, "up"],
        vec!["ip", "-n", &hosts.b, "link", "set", &veth_b, "up"],
        vec!["ip", "-n", &hosts.a, "link", "set", "lo", "up"],
        vec!["ip", "-n", &hosts.b, "link", "set", "lo", "up"],
    ];
    for step in &setup {
        run(step).expect("namespace set-up");
    }

    // etcd on host A's veth address; its peer port only on A's loopback.
    let data = std::env::temp_dir().join(format!("mb-two-hosts-etcd-{pid}"));
    let etcd_url = format!("http://{ip_a}:2379");
    let etcd = Command::new("ip")
        .args(["netns", "exec", &hosts.a, "etcd", "--data-dir"])
        .arg(&data)
        .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
        .args(["--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
        .args(["--initial-cluster", "default=http://127.0.0.1:2380"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd in host A");
    hosts.processes.push(etcd);

    let me = std::env::current_exe().expect("test binary path");
    let topic = format!("two.hosts.{pid}");
    let child = |namespace: &str, role: &str, listen: &str| {
        Command::new("ip")
            .args(["netns", "exec", namespace])
            .arg(&me)
            .args(["--ignored", "--exact", "two_hosts_child", "--nocapture", "--test-threads=1"])
            .env("MB_TWO_HOSTS_ROLE", role)
            .env("MB_TWO_HOSTS_ETCD", &etcd_url)
            .env("MB_TWO_HOSTS_LISTEN", listen)
            .env("MB_TWO_HOSTS_TOPIC", &topic)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a host")
    };
    let mut subscriber = child(&hosts.b, "subscriber", &format!("{ip_b}:0"));
    let ready = wait_for_line(&mut subscriber, "MB_READY ", Duration::from_secs(60));
    hosts.processes.push(subscriber);
    let ready = ready.expect("the subscriber on host B registered");
    assert!(ready.contains(&format!(" {ip_b}:")), "host B registered its own address: {ready}");

    let mut publisher = child(&hosts.a, "publisher", &format!("{ip_a}:0"));
    let started = Instant::now();
    let status = loop {
        match publisher.try_wait().expect("publisher status") {
            Some(status) => break status,
            None if started.elapsed() > Duration::from_secs(60) => panic!("the publisher on host A did not finish"),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(status.success(), "publisher exited with {status}");
    let subscriber = hosts.processes.last_mut().expect("subscriber");
    let started = Instant::now();
    let status = loop {
        match subscriber.try_wait().expect("subscriber status") {
            Some(status) => break status,
            None if started.elapsed() > Duration::from_secs(60) => {
                panic!("the subscriber on host B did not get all messages")
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(status.success(), "subscriber exited with {status}: it received fewer than {COUNT} messages");
    let _ = std::fs::remove_dir_all(&data);
}

/// One host of the test above; does nothing unless run by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by two_hosts_discover_each_other_through_etcd inside a network namespace"]
async fn two_hosts_child() {
    let Ok(role) = std::env::var("MB_TWO_HOSTS_ROLE") else { return };
    let env = |key: &str| std::env::var(key).unwrap_or_else(|_| panic!("{key} is set by the parent test"));
    let options = BrokerOptions::new()
        .with_addresses([env("MB_TWO_HOSTS_LISTEN")])
        .with_connect_timeout(Duration::from_secs(30))
        .with_param("registry", "etcd")
        .with_param("registry_address", env("MB_TWO_HOSTS_ETCD"));
    let topic = env("MB_TWO_HOSTS_TOPIC");
    // etcd may still be starting: retry the connection for a while.
    let broker = HttpBroker::with_options(options).expect("options");
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = broker.connect().await {
        assert!(Instant::now() < deadline, "cannot connect: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match role.as_str() {
        "subscriber" => {
            let received = Arc::new(AtomicUsize::new(0));
            let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
            let count = Arc::clone(&received);
            let sub = broker
                .subscribe(
                    &topic,
                    handler_fn(move |_e: Event| {
                        if count.fetch_add(1, Ordering::SeqCst) + 1 == COUNT {
                            let _ = done_tx.send(());
                        }
                        async { Ok(()) }
                    }),
                    SubscribeOptions::new(),
                )
                .await
                .expect("subscribe");
            println!("MB_READY {} {}", sub.id().unwrap_or("?"), broker.address());
            tokio::time::timeout(Duration::from_secs(50), done.recv()).await.expect("all messages").expect("open");
            broker.disconnect().await.expect("disconnect");
            assert_eq!(received.load(Ordering::SeqCst), COUNT);
        }
        "publisher" => {
            for i in 0..COUNT {
                broker.publish(&topic, Message::new(format!("{i}")), PublishOptions::new()).await.expect("publish");
            }
            // disconnect() delivers what waits in the inbox before it returns.
            broker.disconnect().await.expect("all delivered before disconnect returned");
            assert_eq!(broker.stats().delivered, COUNT as u64);
        }
        other => panic!("unknown role {other}"),
    }
}
