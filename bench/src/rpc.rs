//! `bench rpc`: its flags ([`RpcArgs`], shared by `raw`, `compare` and
//! `http`'s rpc reference), and the switchboard variant: calls through the
//! library's [`RpcClient`] to an in-process echo [`Worker`] (or to an
//! external service), exactly as an application would make them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::amqp::Broker;
use switchboard::rpc::{Call, RpcClient, RpcOptions};
use switchboard::worker::{self, Worker, WorkerHandle};

use crate::env::{Target, check_reply};
use crate::error::Result;
use crate::load::{LoadArgs, Measured, Stop, drive};
use crate::procs::WorkerProcesses;
use crate::progress::Tally;

pub(crate) const RPC_HELP: &str = "\
Profiles:
  safe  the service queue as configured (services.echo.queue_type, quorum by
        default), persistent requests, publisher confirms, manual acks
  fast  transient requests and a classic service queue (still confirmed and
        acked; replies stay persistent, as switchboard's worker sends them)

Each point: --warmup calls (not recorded), then --calls calls (or --duration
seconds) with --concurrency calls in flight, every caller a task on the actix
arbiter. A call counts as an error unless its reply has status 200 and the
request's body.";

/// Flags of `bench rpc` and `bench raw`.
#[derive(Debug, Clone, clap::Args)]
pub struct RpcArgs {
    /// How long each point lasts.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Size of each request's JSON payload in bytes (at least 10); the echo
    /// sends it back.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Calls in flight; a comma-separated list gives one point per value.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<usize>,
    /// Where replies come back: the client's durable reply queue, or RabbitMQ
    /// direct reply-to.
    #[arg(long, value_enum, default_value_t = ReplyModeArg::Auto)]
    pub reply_mode: ReplyModeArg,
    /// Delivery guarantees; a comma-separated list gives points for each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "safe")]
    pub profile: Vec<Profile>,
    /// The service queue's type, instead of the profile's (safe: the
    /// service's setting; fast: classic).
    #[arg(long, value_enum)]
    pub queue_type: Option<QueueTypeArg>,
    /// Call a service served by another process (`switchboard serve`) under
    /// the configured prefix, instead of an in-process echo worker. Only the
    /// run's reply queues are declared and deleted.
    #[arg(long)]
    pub external: bool,
    /// Serve the echo service with this many `switchboard serve` processes
    /// (worker only, no gateway), started by the run under its prefix and
    /// stopped after their points, instead of a worker in this process: how
    /// throughput grows with worker processes. A comma-separated list gives
    /// points for each (0: the in-process worker). `switchboard` must be
    /// built beside this binary. `bench rpc` only.
    #[arg(long, value_delimiter = ',')]
    pub worker_processes: Vec<usize>,
    /// The service to call with --external (it must echo the request).
    #[arg(long, default_value = "echo")]
    pub service: String,
    /// Deadline of each call in seconds (also its AMQP expiration).
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// `--reply-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplyModeArg {
    /// The library's default: direct reply-to for calls whose caller waits
    /// (`switchboard-waits`), the durable reply queue for the others (the
    /// raw reference: the queue).
    Auto,
    /// The client's durable reply queue.
    Queue,
    /// RabbitMQ direct reply-to.
    Direct,
}

/// `--profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Configured queue type, persistent requests, confirms, manual acks.
    Safe,
    /// Classic queue, transient requests, confirms, manual acks.
    Fast,
}

/// `--queue-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueTypeArg {
    /// Replicated, counts deliveries.
    Quorum,
    /// Single node.
    Classic,
}

impl Profile {
    /// The point's `profile`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Profile::Safe => "safe",
            Profile::Fast => "fast",
        }
    }
}

/// How long a stopping worker may take to settle its last requests.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// A broker handle, an RPC client and, unless external, an echo worker.
pub(crate) struct SbRpc {
    broker: Broker,
    client: RpcClient,
    /// The in-process echo worker, unless external or served by processes.
    worker: Option<WorkerHandle>,
    /// The `switchboard serve` processes of `--worker-processes`.
    processes: Option<WorkerProcesses>,
    service: Arc<str>,
    payload: Bytes,
    timeout: Duration,
    /// Calls as `RpcClient::call` makes them (the caller waits in memory),
    /// not as `send` does.
    caller_waits: bool,
}

impl SbRpc {
    /// Connects under the target's instance id, starts the worker (unless
    /// external) and the client, whose calls say whether their caller
    /// waits in memory (`caller_waits`).
    pub async fn start(t: &Target, caller_waits: bool) -> Result<Self> {
        let mut amqp = t.amqp.clone();
        amqp.instance_id = t.instance.clone();
        let broker = Broker::connect(&amqp).await?;
        let (worker, processes) = match &t.service_settings {
            Some(svc) if !t.worker_processes.is_empty() => {
                match WorkerProcesses::start(t, svc, &broker).await {
                    Ok(p) => (None, Some(p)),
                    Err(e) => {
                        broker.close().await;
                        return Err(e);
                    }
                }
            }
            Some(svc) => (
                Some(Worker::start(&broker, &t.service, svc, worker::echo(Duration::ZERO)).await?),
                None,
            ),
            None => (None, None),
        };
        let options = RpcOptions {
            reply_mode: t.reply_mode,
            max_pending: t.max_pending,
            default_timeout: t.timeout,
            persistent: t.persistent,
            orphans: None,
            progress: None,
        };
        let client = RpcClient::start(&broker, options).await?;
        Ok(Self {
            broker,
            client,
            worker,
            processes,
            service: t.service.as_str().into(),
            payload: t.payload.clone(),
            timeout: t.timeout,
            caller_waits,
        })
    }

    /// Measures calls at `concurrency` until `stop`.
    pub async fn drive(&self, concurrency: usize, stop: Stop, tally: Tally) -> Measured {
        let client = self.client.clone();
        let service = self.service.clone();
        let payload = self.payload.clone();
        let timeout = self.timeout;
        let waits = self.caller_waits;
        drive(concurrency, stop, tally, move || {
            let client = client.clone();
            let call = Call::new(service.as_ref(), payload.clone()).timeout(timeout);
            let expected = payload.len();
            async move {
                // `call` is `send_waiting` then `wait`: split to time the confirm.
                let pending = if waits {
                    client.send_waiting(call).await
                } else {
                    client.send(call).await
                };
                let pending = pending.map_err(|e| e.to_string())?;
                let sent = Instant::now();
                let reply = pending.wait().await.map_err(|e| e.to_string())?;
                check_reply(reply.status, reply.body.len(), expected).map(|()| sent)
            }
        })
        .await
    }

    /// Stops the worker once it has settled the requests it runs (a caller
    /// has its reply before the worker's ack is sent), and closes the
    /// publishing pool and the client.
    pub async fn stop(self) {
        if let Some(handle) = self.worker {
            handle.drain(SETTLE_LIMIT).await;
        }
        if let Some(processes) = self.processes {
            processes.stop().await;
        }
        self.client.close().await;
        self.broker.close().await;
    }
}
