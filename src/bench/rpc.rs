//! The switchboard variant of `bench rpc`: calls through the library's
//! [`RpcClient`] to an in-process echo [`Worker`] (or to an external
//! service), exactly as an application would make them.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Target;
use super::load::{Measured, Stop, drive};
use crate::amqp::Broker;
use crate::error::Result;
use crate::rpc::{Call, RpcClient, RpcOptions};
use crate::worker::{self, Worker, WorkerHandle};

/// How long a stopping worker may take to settle its last requests.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// A broker handle, an RPC client and, unless external, an echo worker.
pub(crate) struct SbRpc {
    broker: Broker,
    client: RpcClient,
    /// The in-process echo worker, unless external.
    worker: Option<WorkerHandle>,
    /// Calls started, to let the worker settle them all before it stops.
    started: Rc<Cell<u64>>,
    service: Arc<str>,
    payload: Bytes,
    timeout: Duration,
}

impl SbRpc {
    /// Connects under the target's instance id, starts the worker (unless
    /// external) and the client.
    pub async fn start(t: &Target) -> Result<Self> {
        let mut amqp = t.amqp.clone();
        amqp.instance_id = t.instance.clone();
        let broker = Broker::connect(&amqp).await?;
        let worker = match &t.service_settings {
            Some(svc) => {
                Some(Worker::start(&broker, &t.service, svc, worker::echo(Duration::ZERO)).await?)
            }
            None => None,
        };
        let options = RpcOptions {
            reply_mode: t.reply_mode,
            max_pending: t.max_pending,
            default_timeout: t.timeout,
            persistent: t.persistent,
            orphans: None,
        };
        let client = RpcClient::start(&broker, options).await?;
        Ok(Self {
            broker,
            client,
            worker,
            started: Rc::default(),
            service: t.service.as_str().into(),
            payload: t.payload.clone(),
            timeout: t.timeout,
        })
    }

    /// Measures calls at `concurrency` until `stop`.
    pub async fn drive(&self, concurrency: usize, stop: Stop) -> Measured {
        let client = self.client.clone();
        let service = self.service.clone();
        let payload = self.payload.clone();
        let timeout = self.timeout;
        let started = self.started.clone();
        drive(concurrency, stop, move || {
            started.set(started.get() + 1);
            let client = client.clone();
            let call = Call::new(service.as_ref(), payload.clone()).timeout(timeout);
            let expected = payload.len();
            async move {
                // `call` is `send` then `wait`: split to time the confirm.
                let pending = client.send(call).await.map_err(|e| e.to_string())?;
                let sent = Instant::now();
                let reply = pending.wait().await.map_err(|e| e.to_string())?;
                super::check_reply(reply.status, reply.body.len(), expected).map(|()| sent)
            }
        })
        .await
    }

    /// Stops the worker once it has settled every request (a caller has its
    /// reply before the worker's ack is sent), and closes the publishing
    /// pool and the client.
    pub async fn stop(self) {
        if let Some(handle) = self.worker {
            let settled = || {
                let s = &handle.stats;
                [&s.replied, &s.requeued, &s.dead_lettered, &s.expired]
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .sum::<u64>()
            };
            let deadline = Instant::now() + SETTLE_LIMIT;
            while settled() < self.started.get() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            handle.drain(Duration::ZERO).await;
        }
        self.client.close().await;
        self.broker.close().await;
    }
}
