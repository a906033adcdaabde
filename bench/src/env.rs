//! A run's world: its names under a prefix of its own ([`Env`]), what it
//! declared (deleted when it ends), and the [`Target`] each rpc variant
//! sets itself up from; the echo payload and the check of its reply.
//!
//! A run works under names of its own: the prefix `sbbench-<8 hex>` (unless
//! `--external`, which must meet the serving process's names) and instance
//! ids `sbbench-<8 hex>-<n>-<role>`, so it never meets a serving
//! `switchboard serve`.

use std::time::Duration;

use bytes::Bytes;
use switchboard::amqp::{Broker, Names};
use switchboard::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use switchboard::settings::{AmqpSettings, QueueType, ReplyMode, ServiceSettings, Settings};
use tracing::debug;

use crate::compare::Variant;
use crate::error::{BenchError, Result};
use crate::report::Labels;
use crate::rpc::{Profile, QueueTypeArg, ReplyModeArg, RpcArgs};

/// The run's names, and what it declared, to delete at the end.
pub(crate) struct Env {
    /// The broker settings under the run's prefix and instance id.
    pub amqp: AmqpSettings,
    /// The configured settings (services, rpc bounds).
    pub settings: Settings,
    /// Whether the service is another process's (nothing of its is deleted).
    external: bool,
    /// Declares the shared exchanges at start ([`Broker::connect`]);
    /// deletes everything at the end.
    admin: Broker,
    /// Instance ids handed out (their reply queues are deleted).
    instances: Vec<String>,
    /// Services whose queues the run declared.
    pub services: Vec<String>,
    /// Exchanges of the raw references.
    pub exchanges: Vec<String>,
    /// Other queues the run declared (the bench gateway's dead-letter watch).
    pub queues: Vec<String>,
}

impl Env {
    /// Connects under a prefix (unless `external`) and instance id of the
    /// run's own.
    pub async fn start(settings: &Settings, external: bool) -> Result<Self> {
        let run_id = format!(
            "sbbench-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut amqp = settings.amqp.clone();
        if !external {
            amqp.prefix = run_id.clone();
        }
        amqp.instance_id = run_id;
        let admin = Broker::connect(&amqp).await?;
        Ok(Self {
            amqp,
            settings: settings.clone(),
            external,
            admin,
            instances: Vec::new(),
            services: Vec::new(),
            exchanges: Vec::new(),
            queues: Vec::new(),
        })
    }

    /// The configured `echo` service's settings (queue type, delivery
    /// limit), for a service of the run's own.
    pub fn echo_settings(&self) -> ServiceSettings {
        self.settings
            .services
            .get("echo")
            .cloned()
            .unwrap_or_default()
    }

    /// The names under the run's prefix.
    pub fn names(&self) -> Names {
        self.admin.names().clone()
    }

    /// A new instance id for `role`, remembered for clean-up.
    pub fn instance(&mut self, role: &str) -> String {
        let id = format!(
            "{}-{}-{role}",
            self.amqp.instance_id,
            self.instances.len() + 1
        );
        self.instances.push(id.clone());
        id
    }

    /// What `variant` needs to set itself up for one profile, its service
    /// served by `processes` `switchboard serve` processes (0: in this
    /// process, or external).
    pub fn target(
        &mut self,
        variant: Variant,
        profile: Profile,
        processes: usize,
        a: &RpcArgs,
    ) -> Result<Target> {
        if !(a.timeout.is_finite() && a.timeout > 0.0) {
            return Err(BenchError::flag("--timeout", "must be a positive number"));
        }
        let configured = self.echo_settings();
        let queue_type = match (a.queue_type, profile) {
            (Some(QueueTypeArg::Quorum), _) => QueueType::Quorum,
            (Some(QueueTypeArg::Classic), _) | (None, Profile::Fast) => QueueType::Classic,
            (None, Profile::Safe) => configured.queue_type,
        };
        let qt_name = match queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        let (service, service_settings) = if self.external {
            (a.service.clone(), None)
        } else {
            let mut service = format!("{}-{}-{qt_name}", variant.name(), profile.name());
            if processes > 0 {
                // A queue of its own for each count of worker processes.
                service.push_str(&format!("-{processes}p"));
            }
            self.services.push(service.clone());
            let svc = ServiceSettings {
                queue_type,
                timeout_ms: (a.timeout * 1000.0) as u64,
                ..configured
            };
            (service, Some(svc))
        };
        let worker_processes = if processes == 0 {
            Vec::new()
        } else if self.external {
            return Err(BenchError::flag(
                "--worker-processes",
                "serves a service of the run's own: not with --external",
            ));
        } else if !matches!(variant, Variant::Switchboard | Variant::SwitchboardWaits) {
            return Err(BenchError::flag(
                "--worker-processes",
                "bench rpc only (the raw reference has its own echo server)",
            ));
        } else {
            (0..processes).map(|_| self.instance("worker")).collect()
        };
        let payload = json_payload(a.payload);
        Ok(Target {
            amqp: self.amqp.clone(),
            url: self.amqp.first_node().to_owned(),
            names: self.names(),
            instance: self.instance(variant.name()),
            service,
            service_settings,
            reply_mode: match a.reply_mode {
                ReplyModeArg::Auto => ReplyMode::Auto,
                ReplyModeArg::Queue => ReplyMode::Queue,
                ReplyModeArg::Direct => ReplyMode::Direct,
            },
            persistent: profile == Profile::Safe,
            max_pending: self.settings.rpc.max_pending,
            labels: Labels {
                profile: profile.name(),
                reply_mode: match a.reply_mode {
                    ReplyModeArg::Auto => "auto",
                    ReplyModeArg::Queue => "queue",
                    ReplyModeArg::Direct => "direct",
                },
                queue_type: if self.external { "external" } else { qt_name },
                payload: payload.len(),
                worker_processes: (processes > 0).then_some(processes),
            },
            worker_processes,
            payload,
            timeout: Duration::from_secs_f64(a.timeout),
        })
    }

    /// Deletes the run's queues and exchanges (only its reply queues when the
    /// service is external), and closes the broker handle.
    pub async fn cleanup(self) {
        let names = self.admin.names().clone();
        let mut queues: Vec<String> = Vec::new();
        for s in &self.services {
            queues.push(names.service_queue(s));
            queues.push(names.dead_queue(s));
        }
        for i in &self.instances {
            queues.push(names.reply_queue(i));
        }
        queues.extend(self.queues.iter().cloned());
        let mut exchanges = self.exchanges.clone();
        if !self.external {
            // Declared by the gateway's event hub (and `serve`).
            queues.push(names.events_log());
            exchanges.extend([
                names.requests_exchange(),
                names.dead_exchange(),
                names.events_exchange(),
                // Declared by the workers' cancellation watch.
                names.events_types_exchange(),
            ]);
        }
        let mut channel = self.admin.channel().await.ok();
        for q in &queues {
            let Some(ch) = channel.as_ref() else { break };
            if let Err(e) = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                // A queue never declared (direct reply-to) may close the channel.
                debug!(queue = %q, error = %e, "queue not deleted");
                channel = self.admin.channel().await.ok();
            }
        }
        for x in &exchanges {
            let Some(ch) = channel.as_ref() else { break };
            if let Err(e) = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await
            {
                debug!(exchange = %x, error = %e, "exchange not deleted");
                channel = self.admin.channel().await.ok();
            }
        }
        if let Some(ch) = channel {
            let _ = ch.close(200, "bench done".into()).await;
        }
        self.admin.close().await;
    }
}

/// Everything a variant needs to set itself up.
pub(crate) struct Target {
    /// Broker settings (url, pool) under the run's prefix.
    pub amqp: AmqpSettings,
    /// The broker's URL.
    pub url: String,
    /// Names under the run's prefix.
    pub names: Names,
    /// This variant's instance id (its reply queue's name).
    pub instance: String,
    /// The service called.
    pub service: String,
    /// How to declare and serve it (in-process, or by the processes
    /// below); `None` when external.
    pub service_settings: Option<ServiceSettings>,
    /// Instance ids of the `switchboard serve` processes that serve it
    /// (`--worker-processes`); empty: a worker in this process.
    pub worker_processes: Vec<String>,
    pub reply_mode: ReplyMode,
    /// Persistent requests (`safe`) or transient (`fast`).
    pub persistent: bool,
    /// Bound on pending calls of switchboard's client.
    pub max_pending: usize,
    /// The request body.
    pub payload: Bytes,
    /// Each call's deadline.
    pub timeout: Duration,
    /// How the points are labelled.
    pub labels: Labels,
}

/// A JSON body of `size` bytes (at least 10): `{"pad":"xxx..."}`.
pub fn json_payload(size: usize) -> Bytes {
    let pad = "x".repeat(size.saturating_sub(10));
    Bytes::from(format!("{{\"pad\":\"{pad}\"}}"))
}

/// A reply is right when its status is 200 and it echoes the request's body.
pub(crate) fn check_reply(status: u16, len: usize, expected: usize) -> Result<(), String> {
    if status != 200 {
        return Err(format!("reply status {status}"));
    }
    if len != expected {
        return Err(format!("reply of {len} bytes, expected {expected}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn payloads_have_the_size_asked_for() {
        for size in [10, 11, 256, 4096] {
            let p = super::json_payload(size);
            assert_eq!(p.len(), size);
            assert!(serde_json::from_slice::<serde_json::Value>(&p).is_ok());
        }
        assert_eq!(super::json_payload(0).len(), 10);
    }

    #[test]
    fn a_reply_is_right_only_with_status_200_and_the_same_length() {
        assert_eq!(super::check_reply(200, 5, 5), Ok(()));
        assert!(super::check_reply(500, 5, 5).is_err());
        assert!(super::check_reply(200, 4, 5).is_err());
    }
}
