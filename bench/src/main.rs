//! The `switchboard-bench` binary, which `switchboard bench` runs: parses
//! the command line, loads the settings as `switchboard` does, logs to
//! stderr (around the progress bars), and prints every measured line as
//! JSON on stdout as soon as it is measured.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use switchboard::settings::{LogFormat, LogSettings, Settings};
use switchboard_bench::{BenchArgs, Line, Progress};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

/// Measure switchboard's throughput and latency against RabbitMQ, next to
/// the same workloads written directly on lapin; one JSON line per
/// measured point.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Settings file (TOML) over the defaults; SWITCHBOARD__SECTION__KEY
    /// environment variables override both.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    bench: BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let switchboard_bench::Workload::PlainResponder(args) = &cli.bench.workload {
        // A plain program: no settings, no actix, no logs but errors.
        return match switchboard_bench::run_responder(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchboard-bench plain-responder: {e}");
                ExitCode::from(2)
            }
        };
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("switchboard bench: {e}");
            return ExitCode::from(2);
        }
    };
    let progress = Progress::on_stderr();
    init_logs(&settings.log, &progress);
    let mut print = |line: &Line| match serde_json::to_string(line) {
        Ok(json) => println!("{json}"),
        Err(e) => tracing::error!(error = %e, "a line could not be written"),
    };
    let run = switchboard_bench::execute(&settings, &cli.bench, &progress, &mut print);
    match actix_rt::System::new().block_on(run) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// Log lines on stderr as `switchboard` writes them (`RUST_LOG`, else
/// `log.filter`; `log.format`), written with the progress bars off the
/// screen, coloured only on a terminal. Spans are not exported: a benchmark measures the library, not a
/// collector.
fn init_logs(log: &LogSettings, progress: &Progress) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // As `switchboard`: the library turns returned messages into errors
        // the caller sees; lapin's copy of each at WARN is noise.
        .add_directive(
            "lapin::returned_messages=error"
                .parse()
                .expect("a constant, valid directive"),
        );
    // Colours only for a terminal (the writer hides it from the layer).
    let lines = fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(progress.stderr_writer());
    let lines = match log.format {
        LogFormat::Human => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init();
}
