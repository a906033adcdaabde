//! Callers never meet: an idempotency key is scoped to the caller that sent
//! it all the way to the worker, a service a token may not call looks like
//! one that does not exist, and a token can be kept as its digest.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use switchboard::settings::{Settings, TokenSettings};

use super::{ALICE, BOB, problem, two_callers};
use crate::common::gateway;

/// Issue 13, finding 1: caller A's key used to swallow caller B's call (the
/// worker deduplicated on the bare key, so B got a 202 that expired).
#[actix_rt::test]
async fn one_idempotency_key_used_by_two_callers_runs_two_calls() {
    let gw = gateway("sec-idem", two_callers).await;
    let call = |token: &'static str, body: &'static str| {
        gw.post("count")
            .bearer_auth(token)
            .header("idempotency-key", "order-10449")
            .header("prefer", "wait=5")
            .body(body)
            .send()
    };
    let a = call(ALICE, r#"{"from":"alice"}"#).await.unwrap();
    assert_eq!(a.status(), StatusCode::OK);
    let a_id = a.headers()["call-id"].to_str().unwrap().to_owned();
    assert_eq!(a.text().await.unwrap(), r#"{"from":"alice"}"#);

    // Bob, same key, another body: his own call runs and he gets his own
    // answer; nothing tells him the key was used by someone else.
    let b = call(BOB, r#"{"from":"bob"}"#).await.unwrap();
    assert_eq!(b.status(), StatusCode::OK);
    let b_id = b.headers()["call-id"].to_str().unwrap().to_owned();
    assert_ne!(a_id, b_id);
    assert_eq!(b.text().await.unwrap(), r#"{"from":"bob"}"#);
    assert_eq!(gw.counted.load(Ordering::SeqCst), 2, "both calls ran");

    // The worker saw two message ids, neither the bare key, each naming
    // its caller (what an operator sees on the broker).
    let seen: BTreeMap<String, u32> = gw.processed.lock().unwrap().clone().into_iter().collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert!(!seen.contains_key("order-10449"), "{seen:?}");
    assert!(seen.keys().any(|k| k.starts_with("alice:")), "{seen:?}");
    assert!(seen.keys().any(|k| k.starts_with("bob:")), "{seen:?}");
    assert!(seen.keys().all(|k| k.len() <= 255), "{seen:?}");

    // Each caller's repeat is still its own call, run once.
    for (token, id, body) in [
        (ALICE, &a_id, r#"{"from":"alice"}"#),
        (BOB, &b_id, r#"{"from":"bob"}"#),
    ] {
        let again = call(token, body).await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(again.headers()["call-id"], id.as_str());
        assert_eq!(again.text().await.unwrap(), body);
    }
    assert_eq!(gw.counted.load(Ordering::SeqCst), 2, "repeats ran nothing");
    gw.cleanup().await;
}

/// Issue 13, finding 7: a restricted token learnt which services exist
/// (403 for those it may not call, 404 for the others).
#[actix_rt::test]
async fn a_restricted_token_gets_the_404_of_a_service_that_does_not_exist() {
    let gw = gateway("sec-404", two_callers).await;
    let answer = |service: &'static str| gw.post(service).bearer_auth(ALICE).body("{}").send();
    // `slow` exists (bob may call it); `nosuch` does not.
    let forbidden = answer("slow").await.unwrap();
    let absent = answer("nosuch").await.unwrap();
    let names = |res: &reqwest::Response| {
        let mut n: Vec<String> = res
            .headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .filter(|k| k != "date" && k != "content-length")
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&forbidden), names(&absent));
    let forbidden = problem(forbidden, 404).await;
    let absent = problem(absent, 404).await;
    assert_eq!(
        forbidden.to_string().replace("slow", "X"),
        absent.to_string().replace("nosuch", "X")
    );
    // Bob may call it, so it does exist.
    let res = gw
        .post("slow")
        .bearer_auth(BOB)
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    gw.gate.add_permits(1);
    gw.cleanup().await;
}

/// A token kept in the settings as its SHA-256 digest authenticates as the
/// token itself does, and the plain token is nowhere in the settings.
#[actix_rt::test]
async fn a_token_kept_as_its_digest_authenticates() {
    let digest = format!("{:x}", Sha256::digest(ALICE.as_bytes()));
    let gw = gateway("sec-sha", |s: &mut Settings| {
        two_callers(s);
        s.gateway.tokens.insert(
            "alice".into(),
            TokenSettings::digest(&digest.to_uppercase(), &["echo"]),
        );
    })
    .await;
    assert!(!format!("{:?}", gw.ctx.settings).contains(ALICE));
    let res = gw
        .post("echo")
        .bearer_auth(ALICE)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The digest itself is no token.
    let res = gw
        .post("echo")
        .bearer_auth(&digest)
        .body("{}")
        .send()
        .await
        .unwrap();
    problem(res, 401).await;
    gw.cleanup().await;
}

fn load(toml: &str) -> Result<Settings, String> {
    Settings::load_from(None, Some(toml), Vec::new()).map_err(|e| e.to_string())
}

#[test]
fn tokens_are_checked_at_start_up_naming_the_callers() {
    let digest = format!("{:x}", Sha256::digest(b"shared-token-0123456789"));
    // Two callers, one token: the second would silently win.
    let err = load(
        "[gateway.tokens.alice]\ntoken = \"shared-token-0123456789\"\nservices = [\"*\"]\n\
         [gateway.tokens.bob]\ntoken = \"shared-token-0123456789\"\nservices = [\"*\"]\n",
    )
    .unwrap_err();
    assert!(
        err.contains("gateway.tokens.alice") && err.contains("gateway.tokens.bob"),
        "{err}"
    );
    assert!(!err.contains("shared-token"), "{err}");
    // The same token once plain and once as its digest.
    let err = load(&format!(
        "[gateway.tokens.alice]\ntoken = \"shared-token-0123456789\"\nservices = [\"*\"]\n\
         [gateway.tokens.bob]\ntoken_sha256 = \"{digest}\"\nservices = [\"*\"]\n"
    ))
    .unwrap_err();
    assert!(
        err.contains("gateway.tokens.alice") && err.contains("gateway.tokens.bob"),
        "{err}"
    );
    // A token that is another caller's digest: whoever reads the digest
    // could present it.
    let err = load(&format!(
        "[gateway.tokens.alice]\ntoken = \"{digest}\"\nservices = [\"*\"]\n\
         [gateway.tokens.bob]\ntoken_sha256 = \"{digest}\"\nservices = [\"*\"]\n"
    ))
    .unwrap_err();
    assert!(
        err.contains("gateway.tokens.alice") && err.contains("gateway.tokens.bob"),
        "{err}"
    );
    // Exactly one of token and token_sha256.
    for entry in [
        format!("token = \"a-long-enough-token-1\"\ntoken_sha256 = \"{digest}\""),
        String::new(),
    ] {
        let err = load(&format!(
            "[gateway.tokens.ops]\n{entry}\nservices = [\"*\"]\n"
        ))
        .unwrap_err();
        assert!(err.contains("gateway.tokens.ops"), "{err}");
        assert!(err.contains("token_sha256"), "{err}");
    }
    // A digest is 64 hex digits.
    let err =
        load("[gateway.tokens.ops]\ntoken_sha256 = \"abc\"\nservices = [\"*\"]\n").unwrap_err();
    assert!(err.contains("gateway.tokens.ops.token_sha256"), "{err}");
    // Caller names end up in logs, metrics and message ids.
    let err =
        load("[gateway.tokens.\"a:b\"]\ntoken = \"a-long-enough-token-1\"\nservices = [\"*\"]\n")
            .unwrap_err();
    assert!(err.contains("gateway.tokens.a:b"), "{err}");
    // From the environment too.
    let s = Settings::load_from(
        None,
        None,
        [
            (
                "SWITCHBOARD__GATEWAY__TOKENS__OPS__TOKEN_SHA256",
                digest.as_str(),
            ),
            ("SWITCHBOARD__GATEWAY__TOKENS__OPS__SERVICES", "*"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .unwrap();
    assert!(s.gateway.tokens["ops"].token.is_none());
}
