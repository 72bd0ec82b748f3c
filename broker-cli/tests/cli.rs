//! Runs the real `broker` binary. Every run has a time limit: a hang fails the test instead of
//! blocking the suite.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long one run of the binary may take before the test fails.
const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The single `broker: ...` error line; fails if stderr is not exactly that one line.
    fn error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr, got: {self:#?}");
        assert!(lines[0].starts_with("broker: "), "expected `broker: <error>`, got: {self:#?}");
        lines[0]
    }
}

/// The environment variables that select backend and registry: cleared for every run, so that
/// the defaults are tested (the http backend over the `local` registry).
const SELECTION_VARS: &[&str] = &["MICRO_BROKER", "MICRO_BROKER_ADDRESS", "MICRO_REGISTRY", "MICRO_REGISTRY_ADDRESS"];

/// `broker` with `args`, the selection variables and `RUST_LOG` (logs on stderr) cleared, then
/// `env` set.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
    command.args(args);
    for var in SELECTION_VARS {
        command.env_remove(var);
    }
    command.env_remove("RUST_LOG");
    command.envs(env.iter().copied());
    command
}

/// A topic no other test (or run of this test) uses.
fn unique_topic(what: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("cli-test.{what}.{}.{nanos}", std::process::id())
}

/// Runs `broker ARGS` with the selection variables cleared, then `env` set, `stdin` fed (or closed).
fn broker(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Run {
    let mut command = command(args, env);
    command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("the broker binary starts");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(bytes).expect("write stdin");
        // Dropping the pipe closes it: the end of the body.
    }
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let status = wait_with_limit(&mut child, args, LIMIT);
    Run {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        elapsed: started.elapsed(),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn wait_with_limit(child: &mut Child, args: &[&str], limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for broker") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`broker {}` did not finish within {limit:?}", args.join(" "));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn linked_backends() -> Vec<String> {
    let run = broker(&["list", "--json"], &[], None);
    assert!(run.status.success(), "{run:#?}");
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("list --json prints JSON");
    value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|entry| entry["name"].as_str().expect("a name").to_string())
        .collect()
}

/// A `broker` running in the background, whose standard error lines the test reads as they come.
struct Background {
    child: Child,
    args: Vec<String>,
    stderr_lines: mpsc::Receiver<String>,
    stdout: Option<JoinHandle<String>>,
}

impl Background {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = command(args, env);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("the broker binary starts");
        let stdout = drain(child.stdout.take().expect("stdout is piped"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, stderr_lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Background { child, args: args.iter().map(|a| a.to_string()).collect(), stderr_lines, stdout: Some(stdout) }
    }

    /// The next line on its standard error, within `limit`.
    fn stderr_line(&mut self, limit: Duration) -> String {
        match self.stderr_lines.recv_timeout(limit) {
            Ok(line) => line,
            Err(e) => {
                let _ = self.child.kill();
                panic!("`broker {}` wrote no line on stderr within {limit:?} ({e})", self.args.join(" "));
            }
        }
    }

    /// Waits for it to exit; returns its status, its standard output and its remaining stderr lines.
    fn finish(mut self) -> (ExitStatus, String, Vec<String>) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let status = wait_with_limit(&mut self.child, &args, LIMIT);
        let stdout = self.stdout.take().map(|h| h.join().expect("stdout reader")).unwrap_or_default();
        let rest = self.stderr_lines.iter().collect();
        (status, stdout, rest)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks the line `broker sub` prints over http, `broker: subscribed to "T" as node N, listening
/// on ADDR`, and returns the node id.
fn assert_node_line(line: &str, topic: &str) -> String {
    let prefix = format!("broker: subscribed to \"{topic}\" as node ");
    let rest = line.strip_prefix(&prefix).unwrap_or_else(|| panic!("expected {prefix:?}..., got {line:?}"));
    let (node, address) = rest.split_once(", listening on ").unwrap_or_else(|| panic!("{line}"));
    assert!(node.starts_with("broker-") && node.contains('.'), "a registry node id: {line}");
    let address: std::net::SocketAddr = address.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
    assert!(address.ip().is_loopback() && address.port() != 0, "{line}");
    node.to_string()
}

#[test]
fn list_shows_memory_and_http_with_their_capabilities() {
    let run = broker(&["list"], &[], None);
    assert!(run.status.success(), "{run:#?}");
    let memory = run.stdout.lines().find(|l| l.starts_with("memory ")).unwrap_or_else(|| panic!("{run:#?}"));
    assert!(memory.contains("capabilities: ") && memory.contains("queue_groups"), "{memory}");
    let http = run.stdout.lines().find(|l| l.starts_with("http ")).unwrap_or_else(|| panic!("{run:#?}"));
    assert!(http.contains("capabilities: ") && http.contains("queue_groups"), "{http}");

    let run = broker(&["list", "--json"], &[], None);
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    for name in ["memory", "http"] {
        let entry = value.as_array().and_then(|a| a.iter().find(|e| e["name"] == name)).expect("listed");
        assert!(entry["description"].as_str().is_some_and(|d| !d.is_empty()), "{entry}");
        assert!(entry["capabilities"].as_array().is_some_and(|c| c.iter().any(|n| n == "queue_groups")), "{entry}");
    }
}

#[test]
fn unknown_backend_fails_and_lists_the_linked_ones() {
    let run = broker(&["pub", "t", "x"], &[("MICRO_BROKER", "nosuch")], None);
    assert_eq!(run.code(), Some(1), "{run:#?}");
    let line = run.error_line();
    let linked = linked_backends().join(", ");
    assert!(line.contains("\"nosuch\"") && line.contains(&format!("linked backends: {linked}")), "{line}");

    // The flag does the same, and wins over the environment.
    let run = broker(&["--broker", "nosuch", "sub", "t"], &[("MICRO_BROKER", "memory")], None);
    assert_eq!(run.code(), Some(1), "{run:#?}");
    assert!(run.error_line().contains("\"nosuch\""), "{run:#?}");
}

#[test]
fn known_but_unlinked_backend_names_the_feature_that_links_it() {
    let linked = linked_backends();
    let Some(known) = micro_broker::KNOWN_BACKENDS.iter().find(|k| !linked.iter().any(|name| name == k.name)) else {
        eprintln!("SKIP known_but_unlinked_backend: every known backend is linked into this build");
        return;
    };
    let run = broker(&["pub", "t", "x"], &[("MICRO_BROKER", known.name)], None);
    assert_eq!(run.code(), Some(1), "{run:#?}");
    let line = run.error_line();
    assert!(line.contains("not linked"), "{line}");
    assert!(line.contains(&format!("feature \"{}\"", known.facade_feature)), "{line}");
    assert!(line.contains(known.crate_name), "{line}");
}

#[test]
fn header_without_equals_is_a_usage_error() {
    let run = broker(&["pub", "t", "x", "-H", "no-equals-sign"], &[], None);
    assert_eq!(run.code(), Some(2), "{run:#?}");
    let line = run.error_line();
    assert!(line.contains("no-equals-sign") && line.contains("KEY=VALUE"), "{line}");
}

#[test]
fn sub_with_nothing_published_times_out_quickly() {
    let run = broker(&["sub", "nobody.publishes.here", "--timeout", "1"], &[("MICRO_BROKER", "memory")], None);
    assert_eq!(run.code(), Some(3), "{run:#?}");
    assert!(run.elapsed < Duration::from_secs(5), "took {:?}", run.elapsed);
    assert!(run.stdout.is_empty(), "{run:#?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "the subscription, then the error: {run:#?}");
    assert!(lines[0].starts_with("broker: subscribed to \"nobody.publishes.here\" over memory"), "{run:#?}");
    assert!(lines[1].contains("timed out after 1s") && lines[1].contains("received 0 messages"), "{run:#?}");
}

#[test]
fn sub_over_http_says_its_node_and_address() {
    let topic = unique_topic("sub-node-line");
    let run = broker(&["sub", &topic, "--timeout", "1"], &[], None);
    assert_eq!(run.code(), Some(3), "{run:#?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "the node line, then the timeout: {run:#?}");
    assert_node_line(lines[0], &topic);
    assert!(lines[1].starts_with("broker: timed out after 1s"), "{run:#?}");
}

#[test]
fn pub_and_sub_in_two_processes_over_http() {
    // The README's two terminals: `broker sub` (the email service), then `broker pub` (the user service).
    let topic = unique_topic("two-processes");
    let mut sub = Background::start(&["sub", &topic, "--count", "2", "--timeout", "30"], &[]);
    assert_node_line(&sub.stderr_line(Duration::from_secs(20)), &topic);

    let run =
        broker(&["pub", &topic, r#"{"id":1,"email":"ada@example.com"}"#, "-H", "trace=abc", "-n", "2"], &[], None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert_eq!(run.stderr, format!("published 2 messages to \"{topic}\" over http\n"), "{run:#?}");

    let (status, stdout, stderr) = sub.finish();
    assert!(status.success(), "{status:?} {stdout} {stderr:?}");
    let line = format!(
        r#"{{"topic":"{topic}","headers":{{"trace":"abc"}},"body":"{{\"id\":1,\"email\":\"ada@example.com\"}}"}}"#
    );
    assert_eq!(stdout, format!("{line}\n{line}\n"), "{stderr:?}");
    assert!(stderr.is_empty(), "{stderr:?}");
}

#[test]
fn interrupted_sub_leaves_the_registry() {
    let topic = unique_topic("interrupted");
    let mut sub = Background::start(&["sub", &topic, "--queue", "q"], &[]);
    let line = sub.stderr_line(Duration::from_secs(20));
    assert!(line.starts_with(&format!("broker: subscribed to \"{topic}\" (queue q) as node ")), "{line}");
    let interrupted = Command::new("kill").args(["-INT", &sub.child.id().to_string()]).status().expect("kill runs");
    assert!(interrupted.success());
    let (status, stdout, stderr) = sub.finish();
    assert_eq!(status.code(), Some(130), "{stderr:?}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr, [format!("broker: interrupted by SIGINT after 0 messages on topic \"{topic}\"; unsubscribed")]);

    // It left the registry: a publisher finds no subscriber (instead of retrying a dead node).
    let run = broker(&["pub", &topic, "x"], &[], None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert!(run.stderr.contains("found no subscriber"), "{run:#?}");
    assert!(run.elapsed < Duration::from_secs(5), "took {:?}", run.elapsed);
}

#[test]
fn pub_over_memory_succeeds() {
    let memory = [("MICRO_BROKER", "memory")];
    let run = broker(&["pub", "user.registered", r#"{"id":1}"#, "-H", "trace=abc", "--count", "3"], &memory, None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert!(run.stderr.contains("published 3 messages"), "{run:#?}");

    // The body from standard input, with `-` and with no body argument; any bytes.
    for args in [&["pub", "t", "-"][..], &["pub", "t"][..]] {
        let run = broker(args, &memory, Some(b"\xff\x00binary"));
        assert_eq!(run.code(), Some(0), "{run:#?}");
        assert!(run.stderr.contains("published 1 message "), "{run:#?}");
    }

    // Addresses are accepted (the memory backend has no use for them).
    let run = broker(&["--broker-address", "a:1, b:2", "pub", "t", "x"], &memory, None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
}

#[test]
fn pub_over_http_with_no_subscriber_says_the_message_was_discarded() {
    let topic = unique_topic("nobody");
    let run = broker(&["pub", &topic, "x"], &[], None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines[0], format!("published 1 message to \"{topic}\" over http"), "{run:#?}");
    assert!(lines[1].starts_with(&format!("note: 1 message(s) found no subscriber of \"{topic}\"")), "{run:#?}");
}

#[test]
fn bad_topic_is_one_error_line() {
    let run = broker(&["pub", "has space", "x"], &[], None);
    assert_eq!(run.code(), Some(1), "{run:#?}");
    assert!(run.error_line().contains("invalid input"), "{run:#?}");
}

/// The welcome-email lines of a demo run, checked to be one per user, `users` of them.
fn assert_welcomed_once_each(run: &Run, users: usize) {
    let mut welcomed: Vec<&str> =
        run.stdout.lines().filter(|l| l.starts_with("email-service: sent welcome email to ")).collect();
    assert!(welcomed.contains(&"email-service: sent welcome email to ada@example.com (user 1)"), "{run:#?}");
    assert_eq!(welcomed.len(), users, "{run:#?}");
    welcomed.sort_unstable();
    welcomed.dedup();
    assert_eq!(welcomed.len(), users, "{run:#?}");
}

#[test]
fn demo_over_http_runs_two_processes_and_delivers_the_backlog() {
    // The README's main command: the default backend, http, over the default registry, local.
    let run = broker(&["demo"], &[], None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert!(run.stderr.is_empty(), "{run:#?}");
    let summary = "demo: published 10 (5 before the email service started), delivered 10 (5 of them from that backlog): \
                   all 10 users welcomed exactly once";
    assert_eq!(run.stdout.lines().last(), Some(summary), "{run:#?}");
    assert_welcomed_once_each(&run, 10);

    // The email service is another process, and subscribed after the backlog was published.
    let started = run.stdout.lines().position(|l| l.starts_with("demo: started the email service (pid "));
    let backlog_published = run.stdout.lines().position(|l| l.contains("(user 5), published the event"));
    assert!(backlog_published < started && started.is_some(), "{run:#?}");
    let pid_after = |prefix: &str| {
        let rest = run.stdout.lines().find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_string()));
        rest.and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse::<u32>().ok()))
    };
    let (user_service, email_service) = (pid_after("is this process (pid "), pid_after("the email service (pid "));
    assert!(user_service.is_some() && email_service.is_some() && user_service != email_service, "{run:#?}");
    let subscribed = run.stdout.lines().find(|l| l.starts_with("email-service: subscribed to user.registered."));
    assert!(subscribed.is_some_and(|l| l.contains("(queue email-service) as node broker-")), "{run:#?}");
}

#[test]
fn demo_over_http_with_more_users() {
    let run = broker(&["demo", "--users", "25"], &[], None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert!(
        run.stdout.contains(
            "demo: published 25 (13 before the email service started), delivered 25 (13 of them from that backlog): \
             all 25 users welcomed exactly once"
        ),
        "{run:#?}"
    );
}

#[test]
fn demo_over_http_refuses_the_in_process_registry() {
    let run = broker(&["demo"], &[("MICRO_REGISTRY", "memory")], None);
    assert_eq!(run.code(), Some(1), "{run:#?}");
    assert!(run.error_line().contains("MICRO_REGISTRY=memory is seen by one process only"), "{run:#?}");
    assert!(run.elapsed < Duration::from_secs(5), "took {:?}", run.elapsed);
}

#[test]
fn demo_over_memory_runs_in_one_process() {
    let memory = [("MICRO_BROKER", "memory")];
    let run = broker(&["demo"], &memory, None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert!(run.stdout.lines().next().is_some_and(|l| l.contains("both services in this process")), "{run:#?}");
    assert_eq!(
        run.stdout.lines().last(),
        Some("demo: published 10, delivered 10: all 10 users welcomed exactly once"),
        "{run:#?}"
    );
    assert_welcomed_once_each(&run, 10);

    let run = broker(&["demo", "--users", "25"], &memory, None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert!(run.stdout.contains("demo: published 25, delivered 25: all 25 users welcomed exactly once"), "{run:#?}");
}

#[test]
fn rust_log_shows_the_librarys_diagnostics_on_stderr() {
    let memory = [("MICRO_BROKER", "memory")];
    let quiet = broker(&["demo", "--users", "1"], &memory, None);
    assert_eq!((quiet.code(), quiet.stderr.as_str()), (Some(0), ""), "{quiet:#?}");

    // The two-process demo over http: the publisher's HTTP client logs at debug level.
    let logged = broker(&["demo", "--users", "1"], &[("RUST_LOG", "debug")], None);
    assert_eq!(logged.code(), Some(0), "{logged:#?}");
    assert!(logged.stderr.lines().any(|line| line.contains("DEBUG")), "{logged:#?}");
    assert!(!logged.stderr.contains('\u{1b}'), "no colour codes when stderr is no terminal: {logged:#?}");
    assert!(!logged.stdout.contains("DEBUG"), "logs stay off stdout: {logged:#?}");

    let bad = broker(&["demo", "--users", "1"], &[("RUST_LOG", "x=[")], None);
    assert_eq!(bad.code(), Some(0), "{bad:#?}");
    assert!(bad.stderr.starts_with("broker: ignoring RUST_LOG ("), "{bad:#?}");
}

#[test]
fn the_email_service_role_is_hidden() {
    let run = broker(&["demo", "--help"], &[], None);
    assert!(run.status.success(), "{run:#?}");
    assert!(!run.stdout.contains("--role") && !run.stdout.contains("--run-id"), "{}", run.stdout);
}

#[test]
fn pub_sub_and_demo_over_grpc() {
    // Built with the feature `grpc` (scripts/test does): the peer-to-peer gRPC backend, like http
    // over the default registry (local), the subscriber and the publisher in two processes.
    if !linked_backends().iter().any(|name| name == "grpc") {
        eprintln!("SKIP pub_sub_and_demo_over_grpc: grpc is not linked (build broker-cli with --features grpc)");
        return;
    }
    let env = [("MICRO_BROKER", "grpc")];
    let topic = unique_topic("grpc-two-processes");
    let mut sub = Background::start(&["sub", &topic, "--count", "2", "--timeout", "30"], &env);
    let line = sub.stderr_line(Duration::from_secs(20));
    assert!(line.starts_with(&format!("broker: subscribed to \"{topic}\" over grpc at 127.0.0.1:")), "{line}");

    let run = broker(&["pub", &topic, "hello", "-H", "trace=abc", "-n", "2"], &env, None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert_eq!(run.stderr, format!("published 2 messages to \"{topic}\" over grpc\n"), "{run:#?}");
    let (status, stdout, stderr) = sub.finish();
    assert!(status.success(), "{status:?} {stdout} {stderr:?}");
    let expected = format!(r#"{{"topic":"{topic}","headers":{{"trace":"abc"}},"body":"hello"}}"#);
    assert_eq!(stdout, format!("{expected}\n{expected}\n"), "{stderr:?}");

    // The demo: half of the events wait in the user service's inbox until the email service
    // registers. With the outbox's diagnostics (failed deliveries, retries) on stderr, shown if
    // it fails: once, on CI, it delivered nothing in 10 s, and said nothing of why.
    let run =
        broker(&["demo"], &[("MICRO_BROKER", "grpc"), ("RUST_LOG", "broker_registry=debug,broker_grpc=debug")], None);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    let summary = "demo: published 10 (5 before the email service started), delivered 10 (5 of them from that backlog): \
                   all 10 users welcomed exactly once";
    assert_eq!(run.stdout.lines().last(), Some(summary), "{run:#?}");
    assert_welcomed_once_each(&run, 10);

    let run = broker(&["demo"], &[("MICRO_BROKER", "grpc"), ("MICRO_REGISTRY", "memory")], None);
    assert_eq!(run.code(), Some(1), "{run:#?}");
    assert!(run.error_line().contains("MICRO_REGISTRY=memory is seen by one process only"), "{run:#?}");
}

/// The server backends linked into this binary, with their test server's URL from
/// `BROKER_TEST_<BACKEND>_URL` (`redis-streams` uses Redis's). A linked backend without one is
/// skipped, or fails the test when `BROKER_TEST_REQUIRE=all` (as in CI).
fn linked_server_backends(test: &str) -> Vec<(String, String)> {
    let require_all = std::env::var("BROKER_TEST_REQUIRE").is_ok_and(|v| v.split(',').any(|i| i.trim() == "all"));
    let mut found = Vec::new();
    for name in linked_backends() {
        let family = if name == "redis-streams" { "redis" } else { name.as_str() };
        if matches!(family, "memory" | "http" | "grpc") {
            continue;
        }
        let var = format!("BROKER_TEST_{}_URL", family.to_ascii_uppercase().replace('-', "_"));
        match std::env::var(&var).ok().filter(|v| !v.trim().is_empty()) {
            Some(url) => found.push((name, url)),
            None if require_all => panic!("{test}: {name} is linked and BROKER_TEST_REQUIRE=all, but {var} is not set"),
            None => eprintln!("SKIP {test} over {name}: {var} is not set"),
        }
    }
    found
}

#[test]
fn pub_sub_and_demo_over_every_linked_server_backend() {
    for (name, url) in linked_server_backends("pub_sub_and_demo_over_every_linked_server_backend") {
        let env = [("MICRO_BROKER", name.as_str()), ("MICRO_BROKER_ADDRESS", url.as_str())];
        let topic = unique_topic(&format!("server-{name}"));
        let mut sub = Background::start(&["sub", &topic, "--count", "2", "--timeout", "40"], &env);
        let line = sub.stderr_line(Duration::from_secs(40));
        assert!(line.starts_with(&format!("broker: subscribed to \"{topic}\" ")), "{name}: {line}");
        assert!(!line.contains("guest:guest"), "{name}: the password is hidden: {line}");

        let run = broker(&["pub", &topic, "hello", "-H", "trace=abc", "-n", "2"], &env, None);
        assert_eq!(run.code(), Some(0), "{name}: {run:#?}");
        let (status, stdout, stderr) = sub.finish();
        assert!(status.success(), "{name}: {status:?} {stdout} {stderr:?}");
        let expected = format!(r#"{{"topic":"{topic}","headers":{{"trace":"abc"}},"body":"hello"}}"#);
        assert_eq!(stdout, format!("{expected}\n{expected}\n"), "{name}: {stderr:?}");

        let run = broker(&["demo", "--timeout", "30"], &env, None);
        assert_eq!(run.code(), Some(0), "{name}: {run:#?}");
        assert!(
            run.stdout.lines().last().is_some_and(|l| l.ends_with("all 10 users welcomed exactly once")),
            "{name}: {run:#?}"
        );
        assert_welcomed_once_each(&run, 10);
        eprintln!("pub/sub and demo over {name}: ok");
    }
}
