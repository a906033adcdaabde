//! The broker vhost's clients are trusted peers, each with the permissions
//! of its role: the `rabbitmqctl set_permissions` lines of docs/SECURITY.md
//! are applied as written, in a vhost of this test's own, and must let a
//! gateway, a foreign worker and a subscriber do their work, and nothing of
//! the others'.

use std::time::Duration;

use deadpool_lapin::lapin::{
    self, BasicProperties, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use futures_util::StreamExt;
use reqwest::StatusCode;
use switchboard::amqp::Broker;
use switchboard::settings::{QueueType, ServiceSettings, Settings};

use crate::common::{amqp_url, management_url};

const SECURITY: &str = include_str!("../../../docs/SECURITY.md");

/// One `rabbitmqctl set_permissions -p switchboard USER 'C' 'W' 'R'` line.
#[derive(Debug)]
struct Permission {
    user: String,
    configure: String,
    write: String,
    read: String,
}

/// The permission lines of docs/SECURITY.md.
fn documented() -> Vec<Permission> {
    SECURITY
        .lines()
        .filter_map(|l| l.strip_prefix("rabbitmqctl set_permissions -p switchboard "))
        .map(|rest| {
            let (user, regexes) = rest.split_once(' ').unwrap();
            let quoted: Vec<&str> = regexes.split('\'').skip(1).step_by(2).collect();
            let [configure, write, read] = quoted.as_slice() else {
                panic!("three quoted regexes expected: {rest}");
            };
            Permission {
                user: user.to_owned(),
                configure: (*configure).to_owned(),
                write: (*write).to_owned(),
                read: (*read).to_owned(),
            }
        })
        .collect()
}

/// The management API as an administrator (the test broker's guest).
struct Admin {
    http: reqwest::Client,
}

impl Admin {
    async fn put(&self, path: &str, body: serde_json::Value) {
        let res = self
            .http
            .put(format!("{}/api/{path}", management_url()))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "PUT {path}: {}", res.status());
    }

    async fn delete(&self, path: &str) {
        let _ = self
            .http
            .delete(format!("{}/api/{path}", management_url()))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
}

/// The test broker's URL for `user` in `vhost`.
fn url_of(user: &str, password: &str, vhost: &str) -> String {
    let mut u = url::Url::parse(&amqp_url()).unwrap();
    u.set_username(user).unwrap();
    u.set_password(Some(password)).unwrap();
    u.set_path(&format!("/{}", enc(vhost)));
    u.to_string()
}

/// Whether `attempt` on a fresh channel of `conn` is refused by the broker
/// (the channel is closed with 403 ACCESS_REFUSED).
async fn refused<F, Fut>(conn: &Connection, attempt: F) -> bool
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<(), lapin::Error>>,
{
    let ch = conn.create_channel().await.unwrap();
    let result = attempt(ch).await;
    match result {
        Ok(()) => false,
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("ACCESS_REFUSED") || text.contains("403"),
                "{text}"
            );
            true
        }
    }
}

/// Starts consuming `queue`.
async fn consume(ch: lapin::Channel, queue: &str) -> Result<(), lapin::Error> {
    ch.basic_consume(
        queue.into(),
        "snoop".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map(|_| ())
}

/// Publishes with a confirm, so that a refusal is seen.
async fn publish(ch: lapin::Channel, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default().with_correlation_id("forged".into()),
    )
    .await?
    .await?;
    Ok(())
}

#[actix_rt::test]
async fn the_documented_vhost_permissions_serve_calls_and_refuse_forgery() {
    let perms = documented();
    let users: Vec<&str> = perms.iter().map(|p| p.user.as_str()).collect();
    assert_eq!(users, ["sb-gateway", "sb-invoice-worker", "sb-subscriber"]);
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let vhost = format!("t-sec-perm-{tag}");
    let admin = Admin {
        http: reqwest::Client::new(),
    };
    admin
        .put(&format!("vhosts/{}", enc(&vhost)), serde_json::json!({}))
        .await;
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    admin
        .put(&format!("permissions/{}/guest", enc(&vhost)), all)
        .await;
    let password = format!("pw-{tag}");
    for p in &perms {
        let user = format!("{}-{tag}", p.user);
        admin
            .put(
                &format!("users/{}", enc(&user)),
                serde_json::json!({"password": password, "tags": ""}),
            )
            .await;
        admin
            .put(
                &format!("permissions/{}/{}", enc(&vhost), enc(&user)),
                serde_json::json!({"configure": p.configure, "write": p.write, "read": p.read}),
            )
            .await;
    }
    let result = run_roles(&vhost, tag, &password).await;
    for p in &perms {
        admin.delete(&format!("users/{}-{tag}", enc(&p.user))).await;
    }
    // Its queues and exchanges go with it.
    admin.delete(&format!("vhosts/{}", enc(&vhost))).await;
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The three roles at work in `vhost`; `Err` says what failed (cleanup
/// runs in any case).
async fn run_roles(vhost: &str, tag: &str, password: &str) -> Result<(), String> {
    let settings = |user: &str, instance: &str| {
        let mut s = Settings::load_from(None, None, Vec::new()).unwrap();
        s.amqp.url = url_of(&format!("{user}-{tag}"), password, vhost);
        s.amqp.instance_id = instance.into();
        s.amqp.connect_timeout_ms = 5000;
        s.services.clear();
        for name in ["invoice", "ledger"] {
            s.services.insert(
                name.into(),
                ServiceSettings {
                    queue_type: QueueType::Classic,
                    timeout_ms: 10_000,
                    ..ServiceSettings::default()
                },
            );
        }
        s
    };
    // The gateway as `serve` runs it: connects, declares every service,
    // starts the gateway (reply queue, dead-letter watch, event relay).
    let dir = tempfile::tempdir().unwrap();
    let mut gw_settings = settings("sb-gateway", "gw-1");
    gw_settings.gateway.store_url = format!("sqlite://{}/calls.db?mode=rwc", dir.path().display());
    gw_settings.gateway.default_wait_s = 10;
    let broker = Broker::connect(&gw_settings.amqp)
        .await
        .map_err(|e| format!("the gateway's user cannot connect and declare: {e}"))?;
    switchboard::app::declare_services(&broker, &gw_settings)
        .await
        .map_err(|e| format!("the gateway's user cannot declare the services: {e}"))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gateway = switchboard::gateway::start(
        &gw_settings,
        &broker,
        listener,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .map_err(|e| format!("the gateway's user cannot start the gateway: {e}"))?;
    let base = format!("http://{}", gateway.addr);
    let outcome = with_gateway(vhost, tag, password, &base).await;
    gateway.stop().await;
    broker.close().await;
    outcome
}

async fn with_gateway(vhost: &str, tag: &str, password: &str, base: &str) -> Result<(), String> {
    // The foreign worker of `invoice`: consumes, replies, acks.
    let worker = Connection::connect(
        &url_of(&format!("sb-invoice-worker-{tag}"), password, vhost),
        Default::default(),
    )
    .await
    .map_err(|e| format!("the worker cannot connect: {e}"))?;
    let ch = worker.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare("sb.svc.invoice".into(), passive, FieldTable::default())
        .await
        .map_err(|e| format!("the worker cannot check its queue: {e}"))?;
    let mut requests = ch
        .basic_consume(
            "sb.svc.invoice".into(),
            "foreign-invoice-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("the worker cannot consume its queue: {e}"))?;
    let replying = ch.clone();
    let served = tokio::spawn(async move {
        while let Some(Ok(d)) = requests.next().await {
            let (Some(reply_to), Some(id)) = (
                d.properties.reply_to().clone(),
                d.properties.correlation_id().clone(),
            ) else {
                continue;
            };
            let published = replying
                .basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    br#"{"invoiced":true}"#,
                    BasicProperties::default()
                        .with_correlation_id(id)
                        .with_content_type("application/json".into()),
                )
                .await;
            if published.is_err() {
                return false;
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
        true
    });

    // The subscriber: a server-named queue bound to the events.
    let sub = Connection::connect(
        &url_of(&format!("sb-subscriber-{tag}"), password, vhost),
        Default::default(),
    )
    .await
    .map_err(|e| format!("the subscriber cannot connect: {e}"))?;
    let sch = sub.create_channel().await.unwrap();
    let temporary = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let q = sch
        .queue_declare("".into(), temporary, FieldTable::default())
        .await
        .map_err(|e| format!("the subscriber cannot declare its queue: {e}"))?;
    sch.queue_bind(
        q.name().clone(),
        "sb.events".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("the subscriber cannot bind its queue: {e}"))?;
    let mut events = sch
        .basic_consume(
            q.name().clone(),
            "subscriber".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("the subscriber cannot consume: {e}"))?;

    // A call through the gateway, answered by the worker; a 202 call whose
    // lifecycle events the subscriber sees.
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{base}/v1/services/invoice/calls"))
        .body("{}")
        .send()
        .await
        .unwrap();
    if res.status() != StatusCode::OK {
        return Err(format!("the call was answered {}", res.status()));
    }
    let res = http
        .post(format!("{base}/v1/services/invoice/calls"))
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    if res.status() != StatusCode::ACCEPTED {
        return Err(format!("the async call was answered {}", res.status()));
    }
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .map_err(|_| "the subscriber saw no event".to_owned())?;
    if !matches!(event, Some(Ok(_))) {
        return Err(format!("the subscriber's stream ended: {event:?}"));
    }

    // What each may not do.
    let checks: Vec<(&str, bool)> = vec![
        (
            "the worker publishes an event",
            refused(&worker, |ch| publish(ch, "sb.events", "")).await,
        ),
        (
            "the worker calls a service past the gateway",
            refused(&worker, |ch| publish(ch, "sb.requests", "ledger")).await,
        ),
        (
            "the worker reads another service's queue",
            refused(&worker, |ch| consume(ch, "sb.svc.ledger")).await,
        ),
        (
            "the worker declares a queue",
            refused(&worker, |ch| async move {
                ch.queue_declare(
                    "sb.svc.mine".into(),
                    Default::default(),
                    FieldTable::default(),
                )
                .await
                .map(|_| ())
            })
            .await,
        ),
        (
            "the subscriber publishes an event",
            refused(&sub, |ch| publish(ch, "sb.events", "")).await,
        ),
        (
            "the subscriber forges a reply",
            refused(&sub, |ch| publish(ch, "", "sb.reply.gw-1")).await,
        ),
        (
            "the subscriber reads a service's queue",
            refused(&sub, |ch| consume(ch, "sb.svc.invoice")).await,
        ),
    ];
    let _ = worker.close(200, "done".into()).await;
    let _ = sub.close(200, "done".into()).await;
    let _ = served.await;
    let allowed: Vec<&str> = checks
        .iter()
        .filter(|(_, refused)| !refused)
        .map(|(what, _)| *what)
        .collect();
    if allowed.is_empty() {
        Ok(())
    } else {
        Err(format!("not refused: {allowed:?}"))
    }
}

/// A deployment whose users were given permissions before
/// `sb.events.types` existed (the gateway's line as it was): a process
/// running workers is refused that exchange, and its cancellation watch
/// reads the whole events fanout instead, hearing cancellations as before.
#[actix_rt::test]
async fn a_worker_refused_the_events_by_type_exchange_still_hears_cancellations() {
    use switchboard::amqp::wire;
    use switchboard::events::{self, CloudEvent};
    use switchboard::worker::CancelWatch;

    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let vhost = format!("t-sec-types-{tag}");
    let admin = Admin {
        http: reqwest::Client::new(),
    };
    admin
        .put(&format!("vhosts/{}", enc(&vhost)), serde_json::json!({}))
        .await;
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    admin
        .put(&format!("permissions/{}/guest", enc(&vhost)), all)
        .await;
    let user = format!("sb-old-{tag}");
    let password = format!("pw-{tag}");
    admin
        .put(
            &format!("users/{}", enc(&user)),
            serde_json::json!({"password": password, "tags": ""}),
        )
        .await;
    let old =
        r"^(sb\.(requests|dead|events|events\.log|svc\..+|reply\.w-1|deadwatch\.w-1)|amq\.gen-.*)$";
    admin
        .put(
            &format!("permissions/{}/{}", enc(&vhost), enc(&user)),
            serde_json::json!({"configure": old, "write": old, "read": old}),
        )
        .await;
    let result = async {
        let mut s = Settings::load_from(None, None, Vec::new()).unwrap();
        s.amqp.url = url_of(&user, &password, &vhost);
        s.amqp.instance_id = "w-1".into();
        s.amqp.connect_timeout_ms = 5000;
        let broker = Broker::connect(&s.amqp)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let watch = CancelWatch::shared(&broker)
            .await
            .map_err(|e| format!("the watch does not start: {e}"))?;
        let filtered = watch.filtered();
        let event = CloudEvent::new(wire::EVENT_CALL_CANCELLED, "test", serde_json::json!({}))
            .with_subject("gone");
        events::publish(&broker, &event)
            .await
            .map_err(|e| format!("cannot publish: {e}"))?;
        // Polled with a deadline, not `eventually`: a panic here would
        // leave the user and the vhost behind.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !watch.is_cancelled("gone") && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let heard = watch.is_cancelled("gone");
        drop(watch);
        broker.close().await;
        match (filtered, heard) {
            (false, true) => Ok(()),
            (true, _) => Err("the watch says it is bound by type, which was refused".to_owned()),
            (false, false) => Err("the cancellation was not heard".to_owned()),
        }
    }
    .await;
    admin.delete(&format!("users/{}", enc(&user))).await;
    // Its queues and exchanges go with it.
    admin.delete(&format!("vhosts/{}", enc(&vhost))).await;
    if let Err(e) = result {
        panic!("{e}");
    }
}
