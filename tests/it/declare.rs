//! `serve` and `switchboard declare` declare every configured service's
//! queues, handler or not; a queue that exists with other arguments is an
//! error naming it, the argument and the way out.

use std::process::Output;

use switchboard::Error;
use switchboard::amqp::topology::{self, Entity};
use switchboard::management::Management;

use crate::common::{Ctx, ctx};

/// Runs `switchboard <args>` with the test's broker and prefix and the
/// settings file `toml`, as an operator would.
async fn switchboard(c: &Ctx, toml: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchboard.toml");
    std::fs::write(&file, toml).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&file)
        .args(args)
        .env("SWITCHBOARD__AMQP__URL", crate::common::amqp_url())
        .env("SWITCHBOARD__AMQP__PREFIX", &c.prefix)
        .env(
            "SWITCHBOARD__AMQP__INSTANCE_ID",
            format!("{}-cli", c.prefix),
        )
        .env("SWITCHBOARD__LOG__FILTER", "warn")
        .output()
        .await
        .unwrap()
}

/// Whether `queue` exists.
async fn exists(c: &Ctx, queue: &str) -> bool {
    crate::common::queue_consumers(&c.broker, queue)
        .await
        .is_some()
}

#[actix_rt::test]
async fn declare_prepares_every_service_of_the_file_and_exits() {
    let c = ctx("declare-cli").await;
    let toml =
        "[services.invoice]\ntimeout_ms = 20000\n\n[services.ledger]\nqueue_type = \"classic\"\n";
    let out = switchboard(&c, toml, &["declare"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = c.broker.names();
    for svc in ["invoice", "ledger"] {
        assert!(stdout.contains(&names.service_queue(svc)), "{stdout}");
        assert!(exists(&c, &names.service_queue(svc)).await, "{svc}");
        assert!(exists(&c, &names.dead_queue(svc)).await, "{svc}");
    }
    // Only the file's services: the demo services are not declared.
    assert!(!exists(&c, &names.service_queue("echo")).await);
    assert!(!exists(&c, &names.service_queue("slow")).await);
    // The arguments are switchboard's (read as operators see them).
    let api = Management::new(&c.settings).unwrap();
    let q = api
        .queue(&names.service_queue("invoice"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(q.arguments["x-queue-type"], "quorum");
    assert_eq!(q.arguments["x-delivery-limit"], 5);
    assert_eq!(q.arguments["x-dead-letter-exchange"], names.dead_exchange());
    assert_eq!(q.arguments["x-dead-letter-routing-key"], "invoice");
    // The events log, a stream with the retention of the settings.
    let log = api.queue(&names.events_log()).await.unwrap().unwrap();
    assert_eq!(log.arguments["x-queue-type"], "stream");
    assert_eq!(log.arguments["x-max-age"], "7D");
    assert_eq!(log.arguments["x-max-length-bytes"], 1_073_741_824u64);
    assert_eq!(
        log.arguments["x-stream-max-segment-size-bytes"],
        268_435_456u64
    );
    // Again: idempotent.
    let again = switchboard(&c, toml, &["declare"]).await;
    assert_eq!(again.status.code(), Some(0));
    c.cleanup(&["invoice", "ledger"]).await;
}

#[actix_rt::test]
async fn a_queue_declared_with_other_arguments_is_named_with_the_argument_and_the_way_out() {
    let c = ctx("declare-406").await;
    // Someone declared invoice with a delivery limit of 3 and ledger as a
    // classic queue.
    let ch = c.broker.channel().await.unwrap();
    let names = c.broker.names();
    let mut three = c.service();
    three.delivery_limit = 3;
    topology::declare_service(&ch, names, "invoice", &three)
        .await
        .unwrap();
    let mut classic = c.service();
    classic.queue_type = switchboard::settings::QueueType::Classic;
    topology::declare_service(&ch, names, "ledger", &classic)
        .await
        .unwrap();
    let _ = ch.close(200, "set up".into()).await;

    // The library: one error with both, each naming what differs.
    let mut services = std::collections::BTreeMap::new();
    for svc in ["invoice", "ledger", "fresh"] {
        services.insert(svc.to_owned(), c.service());
    }
    let err = topology::declare_services(&c.broker, &services)
        .await
        .unwrap_err();
    let Error::Topology(found) = &err else {
        panic!("not a mismatch: {err:?}");
    };
    assert_eq!(found.len(), 2, "{err}");
    let invoice = &found[0];
    assert_eq!(invoice.entity, Entity::Queue);
    assert_eq!(invoice.name, names.service_queue("invoice"));
    assert_eq!(invoice.argument.as_deref(), Some("x-delivery-limit"));
    assert_eq!(invoice.declared.as_deref(), Some("5"));
    assert_eq!(invoice.existing.as_deref(), Some("3"));
    assert_eq!(
        invoice.setting.as_deref(),
        Some("services.invoice.delivery_limit")
    );
    assert_eq!(found[1].name, names.service_queue("ledger"));
    assert_eq!(found[1].argument.as_deref(), Some("x-queue-type"));
    assert_eq!(found[1].existing.as_deref(), Some("classic"));
    // The services after a mismatch are declared all the same.
    assert!(exists(&c, &names.service_queue("fresh")).await);

    // The command: exit 1 and a message an operator can act on.
    let toml = "[services.invoice]\n";
    let out = switchboard(&c, toml, &["declare"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let queue = names.service_queue("invoice");
    for needed in [
        format!("queue {queue} exists with x-delivery-limit = 3"),
        "switchboard declares x-delivery-limit = 5".to_owned(),
        "set services.invoice.delivery_limit to 3".to_owned(),
        format!("rabbitmqctl delete_queue {queue}"),
    ] {
        assert!(stderr.contains(&needed), "no {needed:?} in: {stderr}");
    }
    // serve refuses to start on it, with the same message.
    let out = switchboard(
        &c,
        "[gateway]\nenabled = false\n[metrics]\nbind = \"\"\n[services.invoice]\n",
        &["serve"],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exists with x-delivery-limit = 3"),
        "{stderr}"
    );
    // With the setting matching the queue, it starts cleanly.
    let out = switchboard(&c, "[services.invoice]\ndelivery_limit = 3\n", &["declare"]).await;
    assert_eq!(out.status.code(), Some(0));
    c.cleanup(&["invoice", "ledger", "fresh"]).await;
}
