//! The command line: `serve`, `declare`, `asyncapi`, `call`, `publish`,
//! `tail`, `bench`, `status`, `health`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use switchboard::amqp::Broker;
use switchboard::events::{self, CloudEvent, SubscribeOptions, Subscription};
use switchboard::rpc::{Call, RpcClient, RpcOptions};
use switchboard::settings::{ReplyMode, Settings};
use switchboard::{Error, app, management, telemetry};

/// switchboard: synchronous calls, asynchronous messaging and everything in
/// between, over RabbitMQ.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Settings file (TOML) over the defaults; SWITCHBOARD__SECTION__KEY
    /// environment variables override both.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Declare every configured service's queues, run the workers of those
    /// that have a handler, and the HTTP gateway.
    Serve,
    /// Declare the exchanges and every configured service's queues (as
    /// `serve` does at start), print them and exit: for deployments where an
    /// operator prepares the broker. Exits 0 when declared (or already there
    /// as declared), 1 if a queue or exchange exists with other arguments
    /// (each is named, with the argument and how to resolve it), 2 on a
    /// failure (bad settings, broker unreachable).
    Declare,
    /// Print the AsyncAPI 3.0 document of the AMQP side for these settings:
    /// every service's queues, operations and messages, the replies and the
    /// events exchange (the contract a worker in another language follows;
    /// the gateway serves the same at /asyncapi.json).
    Asyncapi,
    /// Call a service and print its reply; exits 1 on an error status, 2 on
    /// a failure (timeout, no such service, broker unreachable).
    Call {
        /// The service's name.
        service: String,
        /// The payload (JSON by default; see --content-type).
        payload: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Content type of the payload.
        #[arg(long, default_value = "application/json")]
        content_type: String,
    },
    /// Publish a CloudEvent of TYPE with JSON DATA to the events exchange.
    Publish {
        /// The event type, e.g. `orders.created`.
        r#type: String,
        /// The event's data, as JSON.
        data: String,
        /// The event's subject.
        #[arg(long)]
        subject: Option<String>,
        /// The event's source.
        #[arg(long, default_value = "switchboard-cli")]
        source: String,
    },
    /// Print events as they arrive, one JSON line each.
    Tail {
        /// Only events whose type starts with this.
        #[arg(long = "type")]
        type_prefix: Option<String>,
        /// Subscribe durably under this name: events published while away wait.
        #[arg(long)]
        durable: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Measure throughput and latency; one JSON line per measured point
    /// (`switchboard bench --help` lists the workloads). Runs the
    /// `switchboard-bench` binary built beside this one.
    #[command(disable_help_flag = true)]
    Bench {
        /// The workload and its flags, handed to `switchboard-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Show each configured service's queue depth, consumers, message rates
    /// and dead letters, read from RabbitMQ's management API
    /// (`[management]` settings). Exits 1 if a service has no consumer, 2 if
    /// the API cannot be read.
    Status {
        /// Print JSON (one array of services) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check that this process's HTTP endpoint answers `GET /healthz`: the
    /// gateway's address, or `metrics.bind` when the gateway is disabled.
    /// Exits 0 when healthy, 1 otherwise (a container health check).
    Health {
        /// Check this URL instead (e.g. http://127.0.0.1:8080/healthz).
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
    },
}

/// Entry point: parse, load settings, run on the actix runtime.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { args } = cli.command {
        // The bench loads the settings and sets up its logs itself.
        return bench(cli.config.as_deref(), args);
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match telemetry::init(&settings.log, &settings.otel) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    let export_timeout = Duration::from_millis(settings.otel.timeout_ms);
    let system = actix::System::new();
    let code = system.block_on(run(cli.command, settings));
    // The spans of the last calls are still queued: send them before exiting.
    telemetry.shutdown(export_timeout);
    code
}

async fn run(command: Command, settings: Settings) -> ExitCode {
    let result = match command {
        Command::Serve => app::serve(settings, app::shutdown_signal())
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Declare => declare(settings).await,
        Command::Asyncapi => {
            let doc = switchboard::asyncapi::document(&settings);
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Call {
            service,
            payload,
            timeout,
            content_type,
        } => call(settings, service, payload, timeout, content_type).await,
        Command::Publish {
            r#type,
            data,
            subject,
            source,
        } => publish(settings, r#type, data, subject, source).await,
        Command::Tail {
            type_prefix,
            durable,
            count,
        } => tail(settings, type_prefix, durable, count).await,
        Command::Bench { .. } => {
            unreachable!("`bench` runs switchboard-bench before the settings load")
        }
        Command::Status { json } => Ok(status(settings, json).await),
        Command::Health { url, timeout } => Ok(health(settings, url, timeout).await),
    };
    result.unwrap_or_else(|e| {
        eprintln!("switchboard: {e}");
        ExitCode::from(2)
    })
}

async fn declare(settings: Settings) -> Result<ExitCode, Error> {
    let names = switchboard::amqp::Names::new(settings.amqp.prefix.clone());
    match app::declare(&settings).await {
        Ok(()) => {}
        Err(e @ Error::Topology(_)) => {
            eprintln!("switchboard: {e}");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e),
    }
    for (name, svc) in &settings.services {
        let served_by = if svc.handler.is_some() {
            "served by switchboard serve"
        } else {
            "served elsewhere"
        };
        println!(
            "{name}: queue {} bound to {} with key {name}, dead letters to {} ({served_by})",
            names.service_queue(name),
            names.requests_exchange(),
            names.dead_queue(name),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The binary `switchboard bench` runs, built beside this one by `cargo
/// build` at the workspace root (as cargo runs `cargo-<name>` for `cargo
/// <name>`).
const BENCH_BIN: &str = "switchboard-bench";

/// Where `switchboard-bench` is expected: next to the executable `exe`.
fn bench_path(exe: &Path) -> PathBuf {
    exe.with_file_name(format!("{BENCH_BIN}{}", std::env::consts::EXE_SUFFIX))
}

/// What to tell a user whose `switchboard-bench` is not at `path`.
fn bench_missing(path: &Path) -> String {
    format!(
        "switchboard: `switchboard bench` runs {BENCH_BIN}, which is not built: \
         expected at {}. Build it with `cargo build --release` at the workspace \
         root (it builds both binaries), or `cargo build --release -p switchboard-bench`",
        path.display()
    )
}

/// `switchboard bench ARGS`: runs `switchboard-bench ARGS` in place of this
/// process (its JSON lines, progress, exit status and signals are its own),
/// with `--config`, when given, passed on as `SWITCHBOARD_CONFIG`.
fn bench(config: Option<&Path>, args: Vec<OsString>) -> ExitCode {
    let path = match std::env::current_exe() {
        Ok(exe) => bench_path(&exe),
        Err(e) => {
            eprintln!("switchboard: cannot find this executable's directory: {e}");
            return ExitCode::from(2);
        }
    };
    if !path.is_file() {
        eprintln!("{}", bench_missing(&path));
        return ExitCode::from(2);
    }
    let mut command = std::process::Command::new(&path);
    command.args(args);
    if let Some(config) = config {
        command.env("SWITCHBOARD_CONFIG", config);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Its usage lines then read `switchboard bench ...`.
        let e = command.arg0("switchboard bench").exec();
        eprintln!("switchboard: cannot run {}: {e}", path.display());
        ExitCode::from(2)
    }
    #[cfg(not(unix))]
    match command.status() {
        Ok(status) => ExitCode::from(status.code().map_or(2, |c| c as u8)),
        Err(e) => {
            eprintln!("switchboard: cannot run {}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

async fn call(
    settings: Settings,
    service: String,
    payload: String,
    timeout: f64,
    content_type: String,
) -> Result<ExitCode, Error> {
    if !(timeout.is_finite() && timeout > 0.0) {
        eprintln!("switchboard: --timeout must be a positive number of seconds");
        return Ok(ExitCode::from(2));
    }
    let broker = Broker::connect(&settings.amqp).await?;
    // A one-shot caller uses direct reply-to: no reply queue is left behind,
    // and it never shares the serving process's reply queue.
    let mut options = RpcOptions::from(&settings.rpc);
    options.reply_mode = ReplyMode::Direct;
    let client = RpcClient::start(&broker, options).await?;
    let call = Call::new(service, payload.into_bytes())
        .content_type(content_type)
        .timeout(Duration::from_secs_f64(timeout));
    let reply = client.call(call).await?;
    println!("{}", reply.body_text());
    if reply.is_error() {
        eprintln!("switchboard: the service answered {}", reply.status);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn publish(
    settings: Settings,
    ty: String,
    data: String,
    subject: Option<String>,
    source: String,
) -> Result<ExitCode, Error> {
    let data: serde_json::Value = match serde_json::from_str(&data) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("switchboard: DATA is not JSON: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let broker = Broker::connect(&settings.amqp).await?;
    let mut event = CloudEvent::new(ty, source, data);
    event.subject = subject;
    events::publish(&broker, &event).await?;
    println!("{}", event.id);
    Ok(ExitCode::SUCCESS)
}

async fn tail(
    settings: Settings,
    type_prefix: Option<String>,
    durable: Option<String>,
    count: Option<u64>,
) -> Result<ExitCode, Error> {
    let broker = Broker::connect(&settings.amqp).await?;
    let mut sub = Subscription::start(
        &broker,
        SubscribeOptions {
            durable_name: durable,
            type_prefix,
        },
    )
    .await?;
    let mut seen = 0u64;
    let stop = app::shutdown_signal();
    tokio::pin!(stop);
    loop {
        if count.is_some_and(|c| seen >= c) {
            break;
        }
        tokio::select! {
            _ = &mut stop => break,
            next = sub.recv() => match next {
                Some(Ok(event)) => {
                    seen += 1;
                    println!("{}", serde_json::to_string(&event).unwrap_or_default());
                }
                Some(Err(e)) => return Err(e),
                None => break,
            },
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(settings: Settings, json: bool) -> ExitCode {
    let rows = match management::status(&settings).await {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
    } else {
        print!("{}", management::render_table(&rows));
    }
    let idle: Vec<&str> = rows
        .iter()
        .filter(|r| !r.is_served())
        .map(|r| r.service.as_str())
        .collect();
    if idle.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("switchboard: no consumer for: {}", idle.join(", "));
        ExitCode::from(1)
    }
}

/// The `/healthz` URL of this process's HTTP endpoint, per the settings.
fn health_url(settings: &Settings) -> Option<String> {
    let bind = if settings.gateway.enabled {
        &settings.gateway.bind
    } else {
        &settings.metrics.bind
    };
    let mut addr: std::net::SocketAddr = bind.parse().ok()?;
    // A server on every address answers on loopback too.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Some(format!("http://{addr}/healthz"))
}

async fn health(settings: Settings, url: Option<String>, timeout: f64) -> ExitCode {
    let Some(url) = url.or_else(|| health_url(&settings)) else {
        eprintln!(
            "switchboard: no HTTP endpoint to check (gateway disabled and metrics.bind empty)"
        );
        return ExitCode::from(1);
    };
    let timeout = Duration::from_secs_f64(if timeout.is_finite() && timeout > 0.0 {
        timeout
    } else {
        3.0
    });
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(1);
        }
    };
    match client.get(&url).send().await {
        Ok(res) if res.status().is_success() => {
            println!("ok {url}");
            ExitCode::SUCCESS
        }
        Ok(res) => {
            eprintln!("switchboard: {url} answered {}", res.status());
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("switchboard: {url}: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::{Cli, Command, bench_missing, bench_path};

    #[test]
    fn the_bench_binary_is_looked_for_next_to_this_one() {
        let exe = Path::new("/opt/sb/target/release/switchboard");
        let expected = format!("switchboard-bench{}", std::env::consts::EXE_SUFFIX);
        assert_eq!(
            bench_path(exe),
            Path::new("/opt/sb/target/release").join(expected)
        );
    }

    #[test]
    fn a_missing_bench_binary_says_where_and_how_to_build_it() {
        let msg = bench_missing(Path::new("/opt/sb/target/debug/switchboard-bench"));
        assert!(
            msg.contains("/opt/sb/target/debug/switchboard-bench"),
            "{msg}"
        );
        assert!(msg.contains("cargo build --release"), "{msg}");
    }

    /// Everything after `bench` goes to switchboard-bench untouched, `--help`
    /// and flags included; `--config` before it is switchboard's.
    #[test]
    fn bench_hands_every_argument_on() {
        let cli = Cli::parse_from([
            "switchboard",
            "--config",
            "my.toml",
            "bench",
            "compare",
            "--calls",
            "5",
            "--help",
        ]);
        assert_eq!(cli.config.as_deref(), Some(Path::new("my.toml")));
        let Command::Bench { args } = cli.command else {
            panic!("not the bench command: {:?}", cli.command);
        };
        assert_eq!(args, ["compare", "--calls", "5", "--help"]);
        let cli = Cli::parse_from(["switchboard", "bench", "--help"]);
        let Command::Bench { args } = cli.command else {
            panic!("not the bench command");
        };
        assert_eq!(args, ["--help"]);
    }
}
