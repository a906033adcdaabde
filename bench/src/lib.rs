//! switchboard-bench: the load generator of `switchboard bench`, in the
//! spirit of RabbitMQ's PerfTest, with the references it is compared with
//! in the same run (a raw-lapin loop, a raw fanout, a bare actix-web
//! handler). Every measured point is one JSON line ([`Line`]).
//!
//! A crate beside the library, not in it: it uses switchboard's public API
//! only (the broker handle, the RPC client, workers, events, the gateway's
//! start and the wire conventions), so the library's users compile none of
//! it. The `switchboard-bench` binary is what `switchboard bench` runs.
//!
//! Every run works under names of its own (`sbbench-<8 hex>`) and deletes
//! what it declared when it ends (`env`).
//!
//! # Layout
//! - [`execute`]: runs one workload, hands each line out as it is measured.
//! - `args`: the command line ([`BenchArgs`], [`Workload`]) and `--help`.
//! - `env`: the run's names and their clean-up; the rpc variants' `Target`.
//! - workloads, each with its flags:
//!   - `rpc`: `bench rpc`'s side, `RpcClient` calls to an echo `Worker`
//!     (or to `switchboard serve` processes: `procs`);
//!   - `raw`: the reference on bare lapin, client and echo server;
//!   - `plain`: the tutorials' RPC loop (requester here, responder a
//!     process of its own), with and without switchboard's guarantees;
//!   - `compare`: rpc, raw and plain side by side, alternating, with ratio
//!     lines;
//!   - `events`: CloudEvents through a fanout, both variants;
//!   - `http`: the gateway in this process, and its references;
//!   - `sse`: SSE clients next to an AMQP subscriber;
//!   - `notify`: how soon a client learns that a call has ended, per style;
//!   - `pending`: the gateway's memory per pending call;
//!   - `results`: the gateway's memory after calls with large results.
//! - shared pieces: `load` (keeps N calls in flight; a point's warm-up and
//!   measured phases), `report` (the lines, histograms, ratios), `probe`
//!   (RSS and CPU readings), `rig` (the in-process gateway and the HTTP
//!   client thread), `progress` (bars on a terminal's stderr).
//! - `error`: [`BenchError`].

mod args;
mod compare;
mod env;
mod error;
mod events;
mod http;
mod load;
mod notify;
mod pending;
mod plain;
mod probe;
mod procs;
mod progress;
mod raw;
mod report;
mod results;
mod rig;
mod rpc;
mod sse;

use switchboard::settings::Settings;
use tracing::info;

pub use args::{BenchArgs, Workload};
pub use compare::{CompareArgs, Variant};
pub use error::{BenchError, Result};
pub use events::EventsArgs;
pub use http::{HttpArgs, HttpVariant};
pub use load::LoadArgs;
pub use notify::{NotifyArgs, NotifyStyle};
pub use pending::PendingArgs;
pub use plain::{ResponderArgs, run_responder};
pub use progress::{LogWriter, Progress};
pub use report::{Line, Point, Ratio};
pub use results::ResultsArgs;
pub use rpc::{Profile, QueueTypeArg, ReplyModeArg, RpcArgs};
pub use sse::SseArgs;

use env::Env;
use probe::Probe;

/// Runs the workload named by `args` against the broker of `settings`;
/// hands each line to `on_line` as soon as it is measured (with the
/// progress bars off the screen), and returns them all. Must run on an
/// actix system (callers and actors are local tasks).
pub async fn execute(
    settings: &Settings,
    args: &BenchArgs,
    progress: &Progress,
    on_line: &mut dyn FnMut(&Line),
) -> Result<Vec<Line>> {
    let probe = Probe::new(args.broker_pid);
    let mut env = Env::start(settings, args.workload.external()).await?;
    info!(prefix = %env.amqp.prefix, instance = %env.amqp.instance_id, "bench run");
    let mut out = Out {
        lines: Vec::new(),
        on_line,
        progress,
    };
    let result = match &args.workload {
        Workload::Rpc(a) => {
            compare::run(&mut env, a, &[Variant::Switchboard], 1, &probe, &mut out).await
        }
        Workload::Raw(a) => compare::run(&mut env, a, &[Variant::Raw], 1, &probe, &mut out).await,
        Workload::Compare(c) => {
            let mut variants = c.variants.clone();
            variants.dedup();
            compare::run(
                &mut env,
                &c.rpc,
                &variants,
                c.rounds.max(1),
                &probe,
                &mut out,
            )
            .await
        }
        Workload::PlainResponder(_) => Err(BenchError::Setup {
            workload: "plain-responder",
            reason: "runs on a runtime of its own: plain::run_responder".into(),
        }),
        Workload::Events(e) => events::run(&mut env, e, &probe, &mut out).await,
        Workload::Http(h) => http::run(&mut env, h, &probe, &mut out).await,
        Workload::Notify(n) => notify::run(&mut env, n, &probe, &mut out).await,
        Workload::Sse(a) => sse::run(&mut env, a, &probe, &mut out).await,
        Workload::Pending(a) => pending::run(&mut env, a, &probe, &mut out).await,
        Workload::Results(a) => results::run(&mut env, a, &probe, &mut out).await,
    };
    env.cleanup().await;
    result.map(|()| out.lines)
}

/// Where a workload's lines and progress go.
pub(crate) struct Out<'a> {
    /// Every line so far, returned by [`execute`].
    lines: Vec<Line>,
    /// The caller's handler, called at once for each line.
    on_line: &'a mut dyn FnMut(&Line),
    progress: &'a Progress,
}

impl Out<'_> {
    /// Hands `line` to the caller (with the bars off the screen) and keeps it.
    pub fn emit(&mut self, line: Line) {
        let on_line = &mut self.on_line;
        self.progress.suspend(|| on_line(&line));
        self.lines.push(line);
    }

    /// Where the workload's phases show their progress.
    pub fn progress(&self) -> &Progress {
        self.progress
    }
}
