//! The local registry across real processes: this test binary re-executes itself in a helper mode
//! (selected by an environment variable) to register or watch from another process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use broker_registry::{Action, LocalRegistry, Node, Registry, Service, WatchEvent, Watcher};
use futures::StreamExt;

const HELPER_ENV: &str = "BROKER_REGISTRY_TEST_HELPER";
const NAME: &str = "topic:cross-process";
const WAIT: Duration = Duration::from_secs(10);

fn node_service(id: &str) -> Service {
    Service::new(NAME, "ff.http.broadcast").with_node(
        Node::new(id, "127.0.0.1:4321")
            .with_metadata("pid", std::process::id().to_string())
            .with_metadata("secure", "false"),
    )
}

/// The helper: does nothing in a normal test run. With `BROKER_REGISTRY_TEST_HELPER` set to
/// `register|<dir>|<node id>|<ttl ms>` it registers the node, prints `REGISTERED`, then on a
/// `deregister` line deregisters it and prints `DEREGISTERED`. With `watch|<dir>|<node id>` it
/// prints `WATCHING`, then `SAW <id>` when that node is created.
#[test]
fn helper_process() {
    let Ok(spec) = std::env::var(HELPER_ENV) else { return };
    let parts: Vec<&str> = spec.split('|').collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let registry = LocalRegistry::with_dir(parts[1]).unwrap();
        match parts[0] {
            "register" => {
                let service = node_service(parts[2]);
                let ttl = Duration::from_millis(parts[3].parse().unwrap());
                registry.register(&service, ttl).await.unwrap();
                println!("REGISTERED");
                std::io::stdout().flush().unwrap();
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).unwrap();
                if line.trim() == "deregister" {
                    registry.deregister(&service).await.unwrap();
                    println!("DEREGISTERED");
                }
            }
            "watch" => {
                let mut watcher = registry.watch(Some(NAME)).await.unwrap();
                println!("WATCHING");
                std::io::stdout().flush().unwrap();
                let deadline = tokio::time::sleep(WAIT);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        event = watcher.next() => {
                            let event = event.unwrap().unwrap();
                            if event.action == Action::Create && event.service.nodes[0].id == parts[2] {
                                println!("SAW {}", event.service.nodes[0].id);
                                break;
                            }
                        }
                        () = &mut deadline => panic!("the helper saw nothing"),
                    }
                }
            }
            other => panic!("unknown helper mode {other}"),
        }
        std::io::stdout().flush().unwrap();
    });
}

/// A helper process and its stdout lines.
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Helper {
    fn spawn(spec: &str) -> Helper {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "helper_process", "--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Helper { child, stdin, lines }
    }

    /// Waits (bounded) for a line holding `prefix`; returns it from `prefix` on.
    async fn expect_line(&self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match self.lines.try_recv() {
                // libtest may print `test helper_process ... ` before our first line.
                Ok(line) if line.contains(prefix) => {
                    return line.split_at(line.find(prefix).unwrap_or_default()).1.to_owned();
                }
                Ok(_) => continue,
                Err(mpsc::TryRecvError::Empty) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => panic!("no {prefix:?} line from the helper: {e:?}"),
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn wait_success(mut self) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "helper failed: {status}");
                return;
            }
            assert!(std::time::Instant::now() < deadline, "helper did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Ends only the process this test started, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("broker-registry-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn next_event(watcher: &mut Watcher) -> WatchEvent {
    match tokio::time::timeout(WAIT, watcher.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("expected a watch event, got {other:?}"),
    }
}

fn spec(parts: &[&str], dir: &Path) -> String {
    let mut all = vec![parts[0].to_owned(), dir.to_str().unwrap().to_owned()];
    all.extend(parts[1..].iter().map(|p| p.to_string()));
    all.join("|")
}

#[tokio::test]
async fn another_process_registers_and_deregisters() {
    let dir = temp_dir("register");
    let registry = LocalRegistry::with_dir(&dir).unwrap();
    let mut watcher = registry.watch(Some(NAME)).await.unwrap();

    let mut helper = Helper::spawn(&spec(&["register", "child-node", "60000"], &dir));
    helper.expect_line("REGISTERED").await;
    let event = next_event(&mut watcher).await;
    assert_eq!(event.action, Action::Create);
    assert_eq!(event.service.nodes[0].id, "child-node");
    let child_pid = helper.child.id().to_string();
    assert_eq!(event.service.nodes[0].metadata.get("pid"), Some(&child_pid), "registered by the other process");

    let found = registry.get_service(NAME).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].version, "ff.http.broadcast");
    assert_eq!(found[0].nodes, event.service.nodes);

    helper.send("deregister");
    helper.expect_line("DEREGISTERED").await;
    let event = next_event(&mut watcher).await;
    assert_eq!((event.action, event.service.nodes[0].id.as_str()), (Action::Delete, "child-node"));
    assert!(registry.get_service(NAME).await.unwrap().is_empty());
    helper.wait_success();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_killed_process_expires_by_ttl() {
    let dir = temp_dir("killed");
    let registry = LocalRegistry::with_dir(&dir).unwrap();
    let mut watcher = registry.watch(None).await.unwrap();
    let helper = Helper::spawn(&spec(&["register", "doomed", "1000"], &dir));
    helper.expect_line("REGISTERED").await;
    assert_eq!(next_event(&mut watcher).await.action, Action::Create);
    drop(helper); // killed: no deregistration
    assert_eq!(registry.get_service(NAME).await.unwrap().len(), 1, "still there until its TTL");
    let started = std::time::Instant::now();
    let event = next_event(&mut watcher).await;
    assert_eq!((event.action, event.service.nodes[0].id.as_str()), (Action::Delete, "doomed"));
    assert!(started.elapsed() < Duration::from_secs(3), "expired on time: {:?}", started.elapsed());
    assert!(registry.get_service(NAME).await.unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn another_process_watches_what_we_register() {
    let dir = temp_dir("watch");
    let registry = LocalRegistry::with_dir(&dir).unwrap();
    let helper = Helper::spawn(&spec(&["watch", "parent-node"], &dir));
    helper.expect_line("WATCHING").await;
    registry.register(&node_service("parent-node"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(helper.expect_line("SAW").await, "SAW parent-node");
    helper.wait_success();
    std::fs::remove_dir_all(&dir).unwrap();
}
