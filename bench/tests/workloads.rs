//! `switchboard bench`: every workload once, with tiny counts, against the
//! real RabbitMQ (SWITCHBOARD__AMQP__URL, or 127.0.0.1:5672). Only the
//! shape of the output is checked (every field, the call counts, no
//! errors): the timings are for docs/BENCHMARKS.md, never for assertions.
//!
//! Each run works under a prefix and instance id of its own
//! (`sbbench-<8 hex>`) and deletes the queues and exchanges it declared.

use clap::Parser;
use serde_json::Value;
use switchboard::settings::Settings;
use switchboard_bench::{BenchArgs, Line, Progress};

/// The command line of `switchboard bench`, to parse the flags as users give them.
#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    bench: BenchArgs,
}

fn args(line: &str) -> BenchArgs {
    Cmd::parse_from(std::iter::once("bench").chain(line.split_whitespace())).bench
}

const POINT_FIELDS: &[&str] = &[
    "kind",
    "workload",
    "variant",
    "profile",
    "reply_mode",
    "queue_type",
    "payload",
    "concurrency",
    "calls",
    "errors",
    "seconds",
    "calls_per_s",
    "p50_us",
    "p99_us",
    "max_us",
    "peak_rss_kib",
    "cpu_s",
    "main_cpu_s",
    "cpu_by_thread",
    "machine_cpu_s",
    "round",
];

const RATIO_FIELDS: &[&str] = &[
    "kind",
    "workload",
    "profile",
    "concurrency",
    "switchboard_calls_per_s",
    "raw_calls_per_s",
    "calls_per_s_ratio",
    "round_ratios",
    "median_round_ratio",
    "switchboard_p50_us",
    "raw_p50_us",
    "p50_ratio",
    "p99_ratio",
];

/// The broker tests use: SWITCHBOARD__AMQP__URL, or the local default.
fn amqp_url() -> String {
    std::env::var("SWITCHBOARD__AMQP__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Settings for one run: the test broker, a prefix of the test's own (the
/// run replaces it with its own unless `--external`), a short connect
/// timeout so that a missing broker fails at once.
fn settings() -> Settings {
    let prefix = format!(
        "t-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let env = [
        ("SWITCHBOARD__AMQP__URL", amqp_url()),
        ("SWITCHBOARD__AMQP__PREFIX", prefix.clone()),
        ("SWITCHBOARD__AMQP__INSTANCE_ID", format!("{prefix}-i")),
        ("SWITCHBOARD__AMQP__CONNECT_TIMEOUT_MS", "3000".into()),
    ];
    Settings::load_from(None, None, env.map(|(k, v)| (k.to_owned(), v)))
        .expect("test settings are valid")
}

/// Runs `line` and returns its lines as printed JSON, checking that what
/// was handed out as it came is what was returned.
async fn run(line: &str) -> Vec<Value> {
    let settings = settings();
    let mut seen = 0;
    let progress = Progress::hidden();
    let lines = switchboard_bench::execute(&settings, &args(line), &progress, &mut |_| seen += 1)
        .await
        .unwrap_or_else(|e| panic!("bench {line}: {e}"));
    assert_eq!(seen, lines.len(), "every line is handed out as measured");
    lines
        .iter()
        .map(|l| {
            let json = serde_json::to_string(l).unwrap();
            assert_eq!(&serde_json::from_str::<Line>(&json).unwrap(), l);
            serde_json::from_str(&json).unwrap()
        })
        .collect()
}

fn points(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["kind"] == "point").collect()
}

fn ratios(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["kind"] == "ratio").collect()
}

/// Every field present, `calls` calls made, none failed.
fn check_point(p: &Value, calls: u64) {
    for f in POINT_FIELDS {
        assert!(p.get(f).is_some(), "field {f} missing from {p}");
    }
    assert_eq!(p["calls"], calls, "{p}");
    assert_eq!(p["errors"], 0, "{p}");
    assert!(p["seconds"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["calls_per_s"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["p50_us"].as_u64().unwrap() <= p["p99_us"].as_u64().unwrap());
    assert!(p["p99_us"].as_u64().unwrap() <= p["max_us"].as_u64().unwrap());
    if cfg!(target_os = "linux") {
        assert!(p["peak_rss_kib"].as_u64().unwrap() > 0, "{p}");
    }
}

fn check_ratio(r: &Value) {
    for f in RATIO_FIELDS {
        assert!(r.get(f).is_some(), "field {f} missing from {r}");
    }
    assert!(r["calls_per_s_ratio"].as_f64().unwrap() > 0.0, "{r}");
}

fn concurrencies(points: &[&Value]) -> Vec<u64> {
    points
        .iter()
        .map(|p| p["concurrency"].as_u64().unwrap())
        .collect()
}

#[actix_rt::test]
async fn rpc_measures_each_concurrency() {
    let lines = run("rpc --calls 20 --warmup 2 --concurrency 1,4").await;
    let pts = points(&lines);
    assert_eq!(concurrencies(&pts), [1, 4]);
    for p in &pts {
        check_point(p, 20);
        assert_eq!(p["workload"], "rpc");
        assert_eq!(p["variant"], "switchboard");
        assert_eq!(p["profile"], "safe");
        assert_eq!(p["queue_type"], "quorum");
        assert_eq!(p["payload"], 256);
        let confirm = p["confirm_p50_us"]
            .as_u64()
            .expect("rpc points time the confirm");
        assert!(confirm <= p["max_us"].as_u64().unwrap(), "{p}");
    }
    assert!(ratios(&lines).is_empty());
}

/// The echo service served by two `switchboard serve` processes (the
/// binary `cargo test` built beside the test binaries): every call answered,
/// the points say how many processes served them.
#[actix_rt::test]
async fn rpc_with_worker_processes_calls_switchboard_serve_processes() {
    let lines = run("rpc --calls 40 --warmup 4 --concurrency 8 --worker-processes 0,2").await;
    let pts = points(&lines);
    assert_eq!(pts.len(), 2, "one point per count");
    for p in &pts {
        check_point(p, 40);
    }
    // 0: the in-process worker, and no such field.
    assert!(pts[0].get("worker_processes").is_none(), "{}", pts[0]);
    assert_eq!(pts[1]["worker_processes"], 2, "{}", pts[1]);
    // The raw reference has its own echo server.
    let settings = settings();
    let err = switchboard_bench::execute(
        &settings,
        &args("raw --calls 4 --worker-processes 1"),
        &Progress::hidden(),
        &mut |_| {},
    )
    .await
    .expect_err("raw refuses --worker-processes");
    assert!(err.to_string().contains("--worker-processes"), "{err}");
}

#[actix_rt::test]
async fn raw_measures_the_reference_with_direct_reply_to() {
    let lines =
        run("raw --calls 20 --warmup 2 --concurrency 1,4 --reply-mode direct --profile fast").await;
    let pts = points(&lines);
    assert_eq!(concurrencies(&pts), [1, 4]);
    for p in &pts {
        check_point(p, 20);
        assert_eq!(p["variant"], "raw");
        assert_eq!(p["reply_mode"], "direct");
        assert_eq!(p["queue_type"], "classic");
    }
}

#[actix_rt::test]
async fn compare_alternates_both_variants_and_gives_ratios() {
    let lines =
        run("compare --calls 20 --warmup 2 --concurrency 1,4 --profile safe,fast --rounds 2 --variants raw,switchboard").await;
    let pts = points(&lines);
    // 2 profiles x 2 rounds x 2 concurrencies x 2 variants.
    assert_eq!(pts.len(), 16);
    for p in &pts {
        check_point(p, 20);
    }
    let variants: Vec<&str> = pts.iter().map(|p| p["variant"].as_str().unwrap()).collect();
    // Round 1 runs raw first, round 2 switchboard first.
    assert_eq!(&variants[..4], ["raw", "switchboard", "raw", "switchboard"]);
    assert_eq!(
        &variants[4..8],
        ["switchboard", "raw", "switchboard", "raw"]
    );
    let rs = ratios(&lines);
    assert_eq!(rs.len(), 4, "one ratio per profile and concurrency");
    for r in &rs {
        check_ratio(r);
        assert_eq!(r["rounds"], 2);
        assert_eq!(r["round_ratios"].as_array().unwrap().len(), 2);
    }
}

#[actix_rt::test]
async fn compare_runs_the_plain_loop_in_a_process_of_its_own_and_gives_its_ratios() {
    let lines = run("compare --calls 20 --warmup 2 --concurrency 2 --rounds 2 \
         --variants plain,plain-guarantees,switchboard-waits,switchboard")
    .await;
    let pts = points(&lines);
    assert_eq!(pts.len(), 8, "4 variants x 2 rounds");
    for p in &pts {
        check_point(p, 20);
    }
    let variants: Vec<&str> = pts.iter().map(|p| p["variant"].as_str().unwrap()).collect();
    assert_eq!(
        &variants[..4],
        [
            "plain",
            "plain-guarantees",
            "switchboard-waits",
            "switchboard"
        ]
    );
    let rs = ratios(&lines);
    let of: Vec<&str> = rs.iter().map(|r| r["of"].as_str().unwrap()).collect();
    assert_eq!(
        of,
        [
            "switchboard / plain-guarantees",
            "switchboard / plain",
            "switchboard-waits / plain",
            "switchboard-waits / plain-guarantees"
        ]
    );
    for r in &rs {
        check_ratio(r);
        assert_eq!(r["round_ratios"].as_array().unwrap().len(), 2);
    }
}

#[actix_rt::test]
async fn events_reach_every_subscriber_in_every_variant() {
    let lines = run("events --events 20 --warmup 2 --rate 500 --subscribers 3").await;
    let pts = points(&lines);
    assert_eq!(pts.len(), 3);
    for p in &pts {
        check_point(p, 20);
        assert_eq!(p["workload"], "events");
        assert_eq!(p["concurrency"], 3);
        assert_eq!(p["deliveries"], 60, "{p}");
        assert_eq!(p["rate"], 500.0, "{p}");
    }
    let variants: Vec<&str> = pts.iter().map(|p| p["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["raw", "switchboard", "plain"]);
    let rs = ratios(&lines);
    assert_eq!(rs.len(), 2);
    for r in &rs {
        check_ratio(r);
    }
    assert!(rs[0].get("of").is_none(), "{}", rs[0]);
    assert_eq!(rs[1]["of"], "switchboard / plain");
}

#[actix_rt::test]
async fn events_saturated_with_an_events_log_on_every_exchange() {
    let lines = run(
        "events --saturated --events 50 --warmup 2 --subscribers 2 --rounds 2 \
         --variants switchboard,raw --events-log all",
    )
    .await;
    let pts = points(&lines);
    let variants: Vec<&str> = pts.iter().map(|p| p["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["switchboard", "raw", "raw", "switchboard"]);
    for p in &pts {
        check_point(p, 50);
        assert_eq!(p["deliveries"], 100, "{p}");
        assert!(p.get("rate").is_none(), "saturated: no rate asked for: {p}");
    }
    let rs = ratios(&lines);
    assert_eq!(rs.len(), 1);
    check_ratio(rs[0]);
    assert_eq!(rs[0]["round_ratios"].as_array().unwrap().len(), 2);
}

#[actix_rt::test]
async fn http_measures_every_variant_and_the_rpc_reference() {
    let lines = run("http --calls 10 --warmup 2 --concurrency 2 --workers 1 --wait 5").await;
    let pts = points(&lines);
    let variants: Vec<&str> = pts.iter().map(|p| p["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["sync", "accepted", "get", "bare", "switchboard"]);
    for p in &pts {
        check_point(p, 10);
        assert_eq!(p["concurrency"], 2);
    }
    for p in &pts[..4] {
        assert_eq!(p["workload"], "http");
        let per_call = p["requests_per_call"].as_f64().unwrap();
        // One request each, but `accepted`: a POST and at least one GET.
        if p["variant"] == "accepted" {
            assert!(per_call >= 2.0, "{p}");
        } else {
            assert_eq!(per_call, 1.0, "{p}");
        }
    }
    assert_eq!(pts[4]["workload"], "rpc");
    let rs = ratios(&lines);
    let of: Vec<&str> = rs.iter().map(|r| r["of"].as_str().unwrap()).collect();
    assert_eq!(of, ["sync / rpc", "accepted / sync", "get / bare"]);
    for r in &rs {
        check_ratio(r);
        assert_eq!(r["workload"], "http");
    }
}

#[actix_rt::test]
async fn notify_measures_every_style() {
    let lines = run("notify --calls 6 --warmup 0 --clients 3 --delay-ms 20 --workers 1").await;
    let pts = points(&lines);
    let styles: Vec<&str> = pts.iter().map(|p| p["variant"].as_str().unwrap()).collect();
    assert_eq!(
        styles,
        ["sync", "longpoll", "poll", "callback", "sse", "amqp"]
    );
    for p in &pts {
        check_point(p, 6);
        assert_eq!(p["workload"], "notify");
        assert_eq!(p["concurrency"], 3);
        let aware = |f: &str| p[f].as_u64().unwrap_or_else(|| panic!("{f} in {p}"));
        assert!(aware("aware_p50_us") <= aware("aware_p99_us"), "{p}");
        assert!(aware("aware_p99_us") <= aware("aware_max_us"), "{p}");
        let per_call = p["requests_per_call"].as_f64().unwrap();
        let least = match p["variant"].as_str().unwrap() {
            "sync" | "callback" | "amqp" => 1.0,
            _ => 2.0,
        };
        assert!(per_call >= least, "{p}");
    }
    assert!(ratios(&lines).is_empty());
}

#[actix_rt::test]
async fn pending_leaves_every_call_pending_and_reports_the_memory_it_takes() {
    let lines = run("pending --calls 30 --warmup 3 --concurrency 3").await;
    let pts = points(&lines);
    assert_eq!(pts.len(), 1);
    let p = &pts[0];
    check_point(p, 30);
    assert_eq!(p["workload"], "pending");
    let kib = |f: &str| p[f].as_u64().unwrap_or_else(|| panic!("{f} in {p}"));
    assert!(kib("rss_before_kib") > 0 && kib("rss_after_kib") > 0, "{p}");
    assert!(p["rss_per_call_bytes"].is_number(), "{p}");
    assert!(ratios(&lines).is_empty());
}

#[actix_rt::test]
async fn results_ends_every_call_and_reports_the_memory_left() {
    let lines = run("results --calls 12 --warmup 2 --concurrency 2 --result-bytes 100000").await;
    let pts = points(&lines);
    assert_eq!(pts.len(), 1);
    let p = &pts[0];
    check_point(p, 12);
    assert_eq!(p["workload"], "results");
    assert_eq!(p["payload"], 100000);
    let kib = |f: &str| p[f].as_u64().unwrap_or_else(|| panic!("{f} in {p}"));
    assert!(kib("rss_before_kib") > 0 && kib("rss_after_kib") > 0, "{p}");
    assert!(p["rss_per_call_bytes"].is_number(), "{p}");
    assert!(ratios(&lines).is_empty());
}

#[actix_rt::test]
async fn sse_reaches_every_client_next_to_the_amqp_reference() {
    let lines = run("sse --clients 5 --events 10 --warmup 2 --rate 200 --workers 1").await;
    let pts = points(&lines);
    let variants: Vec<&str> = pts.iter().map(|p| p["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["amqp", "sse"]);
    for p in &pts {
        check_point(p, 10);
        assert_eq!(p["workload"], "sse");
        assert_eq!(p["missing"], 0, "{p}");
    }
    assert_eq!(pts[0]["deliveries"], 10);
    assert_eq!(pts[1]["concurrency"], 5);
    assert_eq!(pts[1]["deliveries"], 50);
    let p50 = pts[1]["minus_amqp_p50_us"]
        .as_i64()
        .expect("a signed median");
    let p99 = pts[1]["minus_amqp_p99_us"].as_i64().expect("a signed p99");
    assert!(p50 <= p99, "{}", pts[1]);
    assert!(ratios(&lines).is_empty());
}
