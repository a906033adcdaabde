//! The test harness: a broker check, a unique prefix per test, helpers.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_lapin::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use switchboard::Error;
use switchboard::amqp::Broker;
use switchboard::settings::{ServiceSettings, Settings};

/// The broker tests use: SWITCHBOARD__AMQP__URL, or the local default.
pub fn amqp_url() -> String {
    std::env::var("SWITCHBOARD__AMQP__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// One test's world: settings with its own prefix and instance id, and a
/// connected broker handle.
pub struct Ctx {
    pub prefix: String,
    pub settings: Settings,
    pub broker: Broker,
}

static REPORTED: Mutex<bool> = Mutex::new(false);

/// Settings for a test named `name`: a unique prefix and instance id.
pub fn settings_for(name: &str) -> Settings {
    let prefix = format!(
        "t-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let env = vec![
        ("SWITCHBOARD__AMQP__URL".to_string(), amqp_url()),
        ("SWITCHBOARD__AMQP__PREFIX".to_string(), prefix.clone()),
        (
            "SWITCHBOARD__AMQP__INSTANCE_ID".to_string(),
            format!("{prefix}-i"),
        ),
        (
            "SWITCHBOARD__AMQP__CONNECT_TIMEOUT_MS".to_string(),
            "3000".into(),
        ),
    ];
    Settings::load_from(None, None, env).expect("test settings are valid")
}

/// Connects for the test named `name`. If the broker does not answer, the
/// whole run stops at once with one message saying where it looked.
pub async fn ctx(name: &str) -> Ctx {
    let settings = settings_for(name);
    let broker = match Broker::connect(&settings.amqp).await {
        Ok(b) => b,
        Err(e @ Error::BrokerUnavailable { .. }) => no_broker(&e),
        Err(e) => panic!("broker set-up failed: {e}"),
    };
    Ctx {
        prefix: settings.amqp.prefix.clone(),
        settings,
        broker,
    }
}

fn no_broker(e: &Error) -> ! {
    let mut reported = REPORTED.lock().unwrap_or_else(|p| p.into_inner());
    if !*reported {
        *reported = true;
        // Straight to the process's stderr: the test harness captures
        // `eprintln!`, and this message must be seen.
        let msg = format!(
            "\n\nswitchboard tests need a RabbitMQ.\n  {e}\n  Tests looked at {} (set SWITCHBOARD__AMQP__URL to change it).\n\n",
            switchboard::amqp::broker::redact(&amqp_url())
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
    }
    std::process::exit(1)
}

impl Ctx {
    /// Service settings for tests: quorum by default, as in production.
    pub fn service(&self) -> ServiceSettings {
        ServiceSettings {
            concurrency: 64,
            timeout_ms: 10_000,
            ..ServiceSettings::default()
        }
    }

    /// Deletes what the test declared under its prefix.
    pub async fn cleanup(&self, services: &[&str]) {
        let Ok(ch) = self.broker.channel().await else {
            return;
        };
        let names = self.broker.names();
        let q = QueueDeleteOptions::default();
        for s in services {
            let _ = ch.queue_delete(names.service_queue(s).into(), q).await;
            let _ = ch.queue_delete(names.dead_queue(s).into(), q).await;
        }
        let _ = ch
            .queue_delete(names.reply_queue(self.broker.instance_id()).into(), q)
            .await;
        for x in [
            names.requests_exchange(),
            names.dead_exchange(),
            names.events_exchange(),
        ] {
            let _ = ch
                .exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = ch.close(200, "cleanup".into()).await;
    }
}

/// Waits until `cond` holds, checking on every tick, failing after `limit`.
/// For conditions observable only by looking (counters); never a fixed sleep.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
