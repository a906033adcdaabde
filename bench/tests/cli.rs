//! The `switchboard-bench` binary as `switchboard bench` runs it, against
//! the real RabbitMQ (SWITCHBOARD__AMQP__URL, or 127.0.0.1:5672): JSON
//! lines on stdout and nothing else, no progress drawn when stderr is not a
//! terminal, exit status 2 and a message naming the flag on bad input.

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    let url = std::env::var("SWITCHBOARD__AMQP__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(args)
        .env("SWITCHBOARD__AMQP__URL", url)
        .env("SWITCHBOARD__AMQP__CONNECT_TIMEOUT_MS", "3000")
        .env_remove("SWITCHBOARD_CONFIG")
        .output()
        .expect("switchboard-bench runs")
}

#[test]
fn stdout_has_one_json_line_per_point_and_stderr_no_progress() {
    let out = bench(&[
        "rpc",
        "--calls",
        "10",
        "--warmup",
        "2",
        "--concurrency",
        "1,2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 on stdout");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, concurrency) in lines.iter().zip([1, 2]) {
        assert_eq!(line["kind"], "point", "{line}");
        assert_eq!(line["workload"], "rpc", "{line}");
        assert_eq!(line["concurrency"], concurrency, "{line}");
        assert_eq!(line["calls"], 10, "{line}");
        assert_eq!(line["errors"], 0, "{line}");
    }
    // Not a terminal: no bar, no cursor movement, no colour.
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

#[test]
fn a_bad_flag_value_fails_with_its_name_and_prints_no_line() {
    let out = bench(&["rpc", "--duration", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--duration: must be positive"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn help_lists_every_workload() {
    let out = bench(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for workload in [
        "rpc", "raw", "compare", "events", "http", "sse", "notify", "pending", "results",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(workload)),
            "{workload} missing from:\n{help}"
        );
    }
}
