//! `bench rpc --worker-processes N`: the echo service served by N
//! `switchboard serve` processes (worker only: no gateway) instead of a
//! worker in the bench's process, as a deployment scales its workers out.
//!
//! Each child gets its settings from the environment alone (the bench's own
//! `SWITCHBOARD*` variables and settings file are not passed on, so it serves
//! exactly the run's service): the broker of the run, its prefix, an
//! instance id the run hands out, the service's queue arguments, and a
//! metrics endpoint on an ephemeral loopback port. The run waits until the
//! service queue has N consumers, and stops the children with SIGTERM (as a
//! pod is stopped) at its end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchboard::amqp::{Broker, topology};
use switchboard::lapin::options::QueueDeclareOptions;
use switchboard::lapin::types::FieldTable;
use switchboard::settings::{QueueType, ServiceSettings};
use tracing::{info, warn};

use crate::env::Target;
use crate::error::{BenchError, Result};

/// How long the children may take to consume.
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a child may take to stop after SIGTERM (it drains its handlers
/// for `shutdown.grace_ms`, set below) before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// Between two looks at the queue's consumers or a child's exit.
const POLL: Duration = Duration::from_millis(100);

/// The running `switchboard serve` children.
pub(crate) struct WorkerProcesses {
    children: Vec<Child>,
}

/// The `switchboard` binary beside this one (`cargo build` puts both in
/// `target/<profile>/`), or one directory up from a test binary (in
/// `target/<profile>/deps/`).
fn switchboard_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().map_err(BenchError::io("this binary's path"))?;
    let name = format!("switchboard{}", std::env::consts::EXE_SUFFIX);
    let bin = me.with_file_name(&name);
    let up = me
        .parent()
        .filter(|dir| dir.ends_with("deps"))
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(&name));
    if bin.exists() {
        Ok(bin)
    } else if let Some(up) = up.filter(|b| b.exists()) {
        Ok(up)
    } else {
        Err(BenchError::Setup {
            workload: "rpc",
            reason: format!(
                "--worker-processes runs {}, which is not built: cargo build --bin switchboard \
                 (with the same profile as this bench)",
                bin.display()
            ),
        })
    }
}

impl WorkerProcesses {
    /// Starts one child per instance id of `t.worker_processes`, serving
    /// `t.service` with `svc`'s queue arguments, and waits until each
    /// consumes its queue.
    pub async fn start(t: &Target, svc: &ServiceSettings, broker: &Broker) -> Result<Self> {
        let bin = switchboard_binary()?;
        // Declared first, as the children will (same arguments), so that
        // looking at its consumers never meets a missing queue.
        let ch = broker.channel().await?;
        topology::declare_service(&ch, &t.names, &t.service, svc).await?;
        let _ = ch.close(200, "declared".into()).await;
        let service = t.service.to_uppercase();
        let mut procs = Self {
            children: Vec::new(),
        };
        for instance in &t.worker_processes {
            let mut cmd = Command::new(&bin);
            cmd.arg("serve").stdin(Stdio::null()).stdout(Stdio::null());
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("SWITCHBOARD") {
                    cmd.env_remove(k);
                }
            }
            let a = &t.amqp;
            let queue_type = match svc.queue_type {
                QueueType::Quorum => "quorum",
                QueueType::Classic => "classic",
            };
            let s = |key: &str| format!("SWITCHBOARD__SERVICES__{service}__{key}");
            cmd.env("SWITCHBOARD__AMQP__URL", &a.url)
                .env("SWITCHBOARD__AMQP__PREFIX", t.names.prefix())
                .env("SWITCHBOARD__AMQP__INSTANCE_ID", instance)
                .env("SWITCHBOARD__GATEWAY__ENABLED", "false")
                // Each child's /metrics on a port of its own.
                .env("SWITCHBOARD__METRICS__BIND", "127.0.0.1:0")
                .env("SWITCHBOARD__SHUTDOWN__GRACE_MS", "5000")
                .env("SWITCHBOARD__LOG__FILTER", "warn")
                .env(s("HANDLER"), "echo")
                .env(s("QUEUE_TYPE"), queue_type)
                .env(s("CONCURRENCY"), svc.concurrency.to_string())
                .env(s("DELIVERY_LIMIT"), svc.delivery_limit.to_string())
                .env(s("TIMEOUT_MS"), svc.timeout_ms.to_string());
            for (key, value) in [
                ("TLS_CA_FILE", &a.tls_ca_file),
                ("TLS_CERT_FILE", &a.tls_cert_file),
                ("TLS_KEY_FILE", &a.tls_key_file),
                ("TLS_SERVER_NAME", &a.tls_server_name),
            ] {
                if !value.is_empty() {
                    cmd.env(format!("SWITCHBOARD__AMQP__{key}"), value);
                }
            }
            match cmd.spawn() {
                Ok(child) => procs.children.push(child),
                Err(e) => {
                    procs.stop().await;
                    return Err(BenchError::io("a switchboard serve process")(e));
                }
            }
        }
        if let Err(e) = procs.consuming(t, broker).await {
            procs.stop().await;
            return Err(e);
        }
        info!(processes = procs.children.len(), service = %t.service, "worker processes consume");
        Ok(procs)
    }

    /// Waits until the service queue has a consumer per child; fails when a
    /// child exits or after [`START_LIMIT`].
    async fn consuming(&mut self, t: &Target, broker: &Broker) -> Result<()> {
        let queue = t.names.service_queue(&t.service);
        let want = self.children.len() as u32;
        let deadline = Instant::now() + START_LIMIT;
        let mut seen = 0;
        loop {
            for c in &mut self.children {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(BenchError::Setup {
                        workload: "rpc",
                        reason: format!("a worker process exited at start ({status})"),
                    });
                }
            }
            // A passive declare: the queue's consumers.
            if let Ok(ch) = broker.channel().await {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                if let Ok(q) = ch
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    seen = q.consumer_count();
                    let _ = ch.close(200, "looked".into()).await;
                }
            }
            if seen >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup {
                    workload: "rpc",
                    reason: format!(
                        "{queue} has {seen} consumers after {START_LIMIT:?}, {want} expected"
                    ),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGTERM to every child, waits for each up to [`STOP_LIMIT`],
    /// and kills those still running.
    pub async fn stop(mut self) {
        for c in &self.children {
            // The child's pid, from the Child this run spawned.
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) with a pid of our own child and a signal.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + STOP_LIMIT;
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                    _ => {
                        warn!(pid = c.id(), "a worker process did not stop: killed");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}
