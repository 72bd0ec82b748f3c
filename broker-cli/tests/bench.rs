//! Smoke tests of `broker bench`: it runs, exits 0 and ends with one JSON line saying nothing was
//! lost. Never about speed: no figure is asserted, only that the figures are there.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one run may take before the test fails.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `broker bench ARGS` (selection variables cleared) and returns its last stdout line as JSON.
fn bench(args: &[&str]) -> serde_json::Value {
    bench_with(&[], args)
}

/// [`bench`] with environment variables `env` set.
fn bench_with(env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
    command.arg("bench").args(args).envs(env.iter().copied());
    for var in ["MICRO_BROKER", "MICRO_BROKER_ADDRESS", "MICRO_REGISTRY", "MICRO_REGISTRY_ADDRESS"] {
        command.env_remove(var);
    }
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("`broker bench {}` did not finish within {LIMIT:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "`broker bench {}` failed:\n{stdout}\n{stderr}", args.join(" "));
    let last = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(json["lost"], 0, "{last}");
    assert_eq!(json["count"], 200, "{last}");
    for figure in ["publish_msgs_per_s", "e2e_msgs_per_s", "p50_us", "p99_us", "p999_us"] {
        assert!(json[figure].as_f64().is_some(), "{figure} missing: {last}");
    }
    // The table comes before the JSON line.
    assert!(stdout.contains("publish msg/s"), "{stdout}");
    json
}

#[test]
fn memory_bench_loses_nothing() {
    let json = bench(&["--broker", "memory", "--count", "200"]);
    assert_eq!(json["broker"], "memory");
}

#[test]
fn http_bench_loses_nothing() {
    let json = bench(&["--broker", "http", "--count", "200"]);
    assert_eq!(json["broker"], "http");
}

#[test]
fn memory_baseline_reports_ratios() {
    let json = bench(&["--broker", "memory", "--count", "200", "--subscribers", "2", "--baseline", "--rounds", "2"]);
    assert_eq!(json["raw"]["lost"], 0, "{json}");
    assert_eq!(json["raw"]["runs"], 2, "{json}");
    assert!(json["ratio"]["e2e"]["median"].as_f64().is_some(), "{json}");
}

#[test]
fn calibration_runs_raw_against_raw() {
    let json = bench(&["--broker", "memory", "--count", "200", "--baseline", "--rounds", "2", "--calibrate"]);
    assert_eq!(json["calibration"], true, "{json}");
    assert_eq!(json["runs"], 2, "{json}");
    assert_eq!(json["raw"]["runs"], 2, "{json}");
    assert!(json["ratio"]["e2e"]["median"].as_f64().is_some(), "{json}");
}

#[test]
fn raw_floor_delivers_through_the_contract() {
    // The raw http pair then posts Go Micro envelopes and hands each decoded one to a handler:
    // a body that did not decode would be answered 400, and never recorded.
    let json =
        bench_with(&[("BENCH_RAW_FLOOR", "1")], &["--broker", "http", "--count", "200", "--baseline", "--rounds", "1"]);
    assert_eq!(json["raw_floor"], true, "{json}");
    assert_eq!(json["raw"]["lost"], 0, "{json}");
    assert_eq!(json["raw"]["runs"], 1, "{json}");
    // The memory floor: its events carry the one topic.
    let json = bench_with(&[("BENCH_RAW_FLOOR", "1")], &["--broker", "memory", "--count", "200", "--baseline"]);
    assert_eq!(json["raw_floor"], true, "{json}");
    assert_eq!(json["raw"]["lost"], 0, "{json}");
}

#[test]
fn raw_floor_is_refused_where_there_is_none() {
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["bench", "--broker", "memory", "--topics", "2", "--count", "10", "--baseline", "--rounds", "1"])
        .env("BENCH_RAW_FLOOR", "1")
        .output()
        .expect("the broker binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("BENCH_RAW_FLOOR=1 with memory: one topic only"), "{stderr}");
    // Refused before any run: no round was printed.
    assert!(!stderr.contains("round 1"), "{stderr}");
}

#[test]
fn calibration_needs_a_baseline() {
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["bench", "--broker", "memory", "--count", "10", "--calibrate"])
        .output()
        .expect("the broker binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--baseline"), "{stderr}");
}

#[test]
fn latency_mode_and_queue_groups_run() {
    let json = bench(&["--broker", "memory", "--count", "200", "--latency", "--subscribers", "3", "--queue", "q"]);
    assert_eq!(json["latency_mode"], true);
}
