//! Helpers of the broker-nats integration tests: the shared server's URL, and a nats-server of
//! the test's own (started and killed by PID, never by name).
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `BROKER_TEST_NATS_URL`, or `None` (the test is skipped) unless `BROKER_TEST_REQUIRE` asks for nats.
pub fn shared_url(test: &str) -> Option<String> {
    match std::env::var("BROKER_TEST_NATS_URL").ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        Some(url) => Some(url),
        None => {
            let required = std::env::var("BROKER_TEST_REQUIRE").is_ok_and(|v| {
                v.split(',').any(|i| i.trim().eq_ignore_ascii_case("all") || i.trim().eq_ignore_ascii_case("nats"))
            });
            assert!(!required, "BROKER_TEST_REQUIRE asks for nats but BROKER_TEST_NATS_URL is not set");
            eprintln!("SKIP {test}: BROKER_TEST_NATS_URL is not set");
            None
        }
    }
}

/// A topic of its own for one test.
pub fn topic(name: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("natstest.{name}.{}.{n}.{nanos}", std::process::id())
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// A nats-server of this test only, with JetStream and its own store directory.
pub struct OwnServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl OwnServer {
    /// Starts `nats-server -a 127.0.0.1 -p <free port> -js -sd <tmpdir> <extra>`; `None` (skip) when
    /// the binary is missing.
    pub async fn start(extra: &[&str]) -> Option<OwnServer> {
        if Command::new("nats-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            eprintln!("SKIP: nats-server is not installed");
            return None;
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("broker-nats-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("store directory");
        let mut server = OwnServer { child: None, port, dir, extra: extra.iter().map(|s| s.to_string()).collect() };
        server.spawn().await;
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "nats-server did not listen on {} within 10 s", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL, by its PID) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
