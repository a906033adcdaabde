//! The switchboard variant of `bench rpc`: calls through the library's
//! [`RpcClient`] to an in-process echo [`Worker`] (or to an external
//! service), exactly as an application would make them.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use deadpool_lapin::lapin::Connection;

use super::Target;
use super::load::{Measured, Stop, drive};
use crate::amqp::Broker;
use crate::error::Result;
use crate::rpc::{Call, RpcClient, RpcOptions};
use crate::worker::{self, Worker};

/// A broker handle, an RPC client and, unless external, an echo worker.
pub(crate) struct SbRpc {
    broker: Broker,
    client: RpcClient,
    /// The worker's consumer connection: closing it stops the worker.
    worker_conn: Option<Connection>,
    service: Arc<str>,
    payload: Bytes,
    timeout: std::time::Duration,
}

impl SbRpc {
    /// Connects under the target's instance id, starts the worker (unless
    /// external) and the client.
    pub async fn start(t: &Target) -> Result<Self> {
        let mut amqp = t.amqp.clone();
        amqp.instance_id = t.instance.clone();
        let broker = Broker::connect(&amqp).await?;
        let worker_conn = match &t.service_settings {
            Some(svc) => {
                let conn = broker.dedicated_connection("worker").await?;
                Worker::start(
                    &broker,
                    &conn,
                    &t.service,
                    svc,
                    worker::echo(std::time::Duration::ZERO),
                )
                .await?;
                Some(conn)
            }
            None => None,
        };
        let options = RpcOptions {
            reply_mode: t.reply_mode,
            max_pending: t.max_pending,
            default_timeout: t.timeout,
            persistent: t.persistent,
        };
        let client = RpcClient::start(&broker, options).await?;
        Ok(Self {
            broker,
            client,
            worker_conn,
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
        drive(concurrency, stop, move || {
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

    /// Stops the worker and closes the publishing pool. The client's own
    /// connection stays open until the process ends: `RpcClient` has no
    /// close, and its router keeps the reply channel alive.
    pub async fn stop(self) {
        if let Some(conn) = self.worker_conn {
            let _ = conn.close(200, "bench done".into()).await;
        }
        drop(self.client);
        self.broker.close().await;
    }
}
