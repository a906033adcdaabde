//! Callback delivery end to end: a call store in a temporary SQLite file, a
//! dispatcher, and a real HTTP receiver on a loopback port that records what
//! it gets and answers a scripted sequence of statuses.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use standardwebhooks::Webhook;
use switchboard::callbacks::{CallbackUrlError, Dispatcher, DispatcherHandle, MAX_IDLE, check_url};
use switchboard::calls::{
    CallRecord, CallStatus, CallStore, CallbackRecord, CallbackState, Inserted, NewCall,
    StoredResult, document,
};
use switchboard::settings::CallbackSettings;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::common::eventually;

pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How long any outcome may take to show in the store.
const PATIENCE: Duration = Duration::from_secs(15);

/// One request as the receiver got it.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

/// The receiver's state: what it got, what it answers next.
struct Script {
    got: Mutex<Vec<Received>>,
    statuses: Mutex<VecDeque<u16>>,
    then: u16,
    delay: Duration,
    /// `Retry-After` on the 429 and 503 answers, when set.
    retry_after: Mutex<Option<String>>,
}

/// A real HTTP server on 127.0.0.1:0.
pub(crate) struct Receiver {
    port: u16,
    script: Arc<Script>,
    server: actix_web::dev::ServerHandle,
}

impl Receiver {
    /// Answers `statuses` in order, then `then` for ever; each answer after
    /// `delay`.
    pub(crate) fn start(statuses: &[u16], then: u16, delay: Duration) -> Self {
        let script = Arc::new(Script {
            got: Mutex::new(Vec::new()),
            statuses: Mutex::new(statuses.iter().copied().collect()),
            then,
            delay,
            retry_after: Mutex::new(None),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let data = web::Data::from(script.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(receive))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Receiver {
            port,
            script,
            server: handle,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Answers 429 and 503 with `Retry-After: value` from now on.
    pub(crate) fn retry_after(&self, value: &str) {
        *self.script.retry_after.lock().unwrap() = Some(value.to_owned());
    }

    pub(crate) fn got(&self) -> Vec<Received> {
        self.script.got.lock().unwrap().clone()
    }

    pub(crate) async fn stop(self) {
        self.server.stop(false).await;
    }
}

async fn receive(req: HttpRequest, body: web::Bytes, script: web::Data<Script>) -> HttpResponse {
    let mut headers = HeaderMap::new();
    for (name, value) in req.headers() {
        headers.append(
            HeaderName::from_bytes(name.as_str().as_bytes()).unwrap(),
            HeaderValue::from_bytes(value.as_bytes()).unwrap(),
        );
    }
    script.got.lock().unwrap().push(Received {
        method: req.method().to_string(),
        path: req.path().to_owned(),
        headers,
        body: body.to_vec(),
    });
    let status = script
        .statuses
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(script.then);
    if !script.delay.is_zero() {
        tokio::time::sleep(script.delay).await;
    }
    let mut res = HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
    if matches!(status, 429 | 503)
        && let Some(v) = script.retry_after.lock().unwrap().clone()
    {
        res.insert_header(("retry-after", v));
    }
    res.finish()
}

/// A store in a fresh temporary directory (kept alive by the `TempDir`).
async fn temp_store() -> (TempDir, String, CallStore) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/calls.db?mode=rwc", dir.path().display());
    let store = CallStore::open(&url).await.unwrap();
    (dir, url, store)
}

/// Callback settings for tests: tiny backoffs, loopback allowed.
fn settings(max_attempts: u32) -> CallbackSettings {
    CallbackSettings {
        secret: SECRET.into(),
        max_attempts,
        initial_backoff_ms: 10,
        max_backoff_ms: 40,
        timeout_ms: 5_000,
        allow_private: true,
        concurrency: 4,
        circuit_failures: 0,
        circuit_pause_ms: 1,
    }
}

fn now_ms() -> i64 {
    i64::try_from(switchboard::amqp::wire::now_ms()).unwrap()
}

/// Stores a pending call with a callback to `url`, as the gateway does
/// when it answers `202`. Returns the call id.
async fn call_with_callback(store: &CallStore, url: &str) -> String {
    let id = format!("cb-{}", uuid::Uuid::new_v4().simple());
    let now = now_ms();
    let inserted = store
        .insert(&NewCall {
            id: id.clone(),
            caller: "anonymous".into(),
            service: "echo".into(),
            created_ms: now,
            deadline_ms: now + 30_000,
            published: true,
            idem_key: None,
            body_hash: None,
            traceparent: None,
            callback_url: Some(url.into()),
        })
        .await
        .unwrap();
    assert!(matches!(inserted, Inserted::New));
    id
}

/// What the gateway does: stores a call with a callback, then completes
/// it with the CloudEvent to deliver. Returns the call id, the event id
/// and the exact bytes.
async fn completed_call(store: &CallStore, url: &str) -> (String, String, Vec<u8>) {
    let id = call_with_callback(store, url).await;
    let now = now_ms();
    let event_id = format!("evt-{}", uuid::Uuid::new_v4().simple());
    let body = serde_json::to_vec(&serde_json::json!({
        "specversion": "1.0",
        "id": event_id,
        "source": "/switchboard",
        "type": "switchboard.call.completed",
        "subject": id,
        "datacontenttype": "application/json",
        "data": {"id": id, "status": "succeeded", "result": {"status": 200, "body": {"n": 1}}},
    }))
    .unwrap();
    let result = StoredResult {
        status: 200,
        content_type: "application/json".into(),
        body: br#"{"n":1}"#.to_vec(),
    };
    let done = store
        .complete(
            &id,
            CallStatus::Succeeded,
            Some(&result),
            now,
            Some((&event_id, &body)),
        )
        .await
        .unwrap();
    assert!(done);
    (id, event_id, body)
}

async fn callback_of(store: &CallStore, id: &str) -> CallbackRecord {
    call_of(store, id).await.callback.expect("a callback")
}

async fn call_of(store: &CallStore, id: &str) -> CallRecord {
    store.get(id).await.unwrap().expect("the call is stored")
}

/// Polls the store until the call's callback is in `state`.
async fn wait_for(store: &CallStore, id: &str, state: CallbackState) -> CallbackRecord {
    eventually(PATIENCE, &format!("callback of {id} {state:?}"), || {
        let store = store.clone();
        let id = id.to_owned();
        async move { callback_of(&store, &id).await.state == state }
    })
    .await;
    callback_of(store, id).await
}

/// Polls the store until the call's callback has had `n` attempts.
async fn wait_for_attempts(store: &CallStore, id: &str, n: u32) -> CallbackRecord {
    eventually(PATIENCE, &format!("{n} attempts at {id}"), || {
        let store = store.clone();
        let id = id.to_owned();
        async move { callback_of(&store, &id).await.attempts >= n }
    })
    .await;
    callback_of(store, id).await
}

/// Asserts that `r` is a delivery of `body` as event `event_id`, signed with
/// the test secret.
fn assert_signed_delivery(r: &Received, event_id: &str, body: &[u8]) {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hook");
    assert_eq!(r.body, body, "the exact stored bytes are sent");
    assert_eq!(r.headers["content-type"], "application/cloudevents+json");
    assert_eq!(r.headers["user-agent"], "switchboard");
    assert_eq!(r.headers["webhook-id"], event_id);
    Webhook::new(SECRET)
        .unwrap()
        .verify(&r.body, &r.headers)
        .expect("the signature verifies with the secret");
}

async fn stop(cancel: &CancellationToken, handle: &DispatcherHandle) {
    cancel.cancel();
    tokio::time::timeout(PATIENCE, handle.stopped())
        .await
        .expect("the dispatcher stops");
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One test's world: a store in a temporary file, a receiver answering a
/// script, and a dispatcher delivering from the store.
struct World {
    _dir: TempDir,
    store_url: String,
    store: CallStore,
    rx: Receiver,
    cancel: CancellationToken,
    d: DispatcherHandle,
}

impl World {
    /// The receiver answers `statuses`, then `then`, each after `delay`.
    async fn start(
        statuses: &[u16],
        then: u16,
        delay: Duration,
        settings: CallbackSettings,
    ) -> Self {
        let (dir, store_url, store) = temp_store().await;
        let rx = Receiver::start(statuses, then, delay);
        let cancel = CancellationToken::new();
        let d = Dispatcher::start(store.clone(), settings, cancel.clone());
        World {
            _dir: dir,
            store_url,
            store,
            rx,
            cancel,
            d,
        }
    }

    /// A call completed with a callback to the receiver, and the wake the
    /// gateway gives. Returns the call id, the event id and the bytes.
    async fn completed(&self) -> (String, String, Vec<u8>) {
        let call = completed_call(&self.store, &self.rx.url()).await;
        self.d.wake();
        call
    }

    async fn finish(self) {
        stop(&self.cancel, &self.d).await;
        self.rx.stop().await;
    }
}

#[actix_rt::test]
async fn a_callback_is_delivered_signed_on_the_first_try() {
    let w = World::start(&[], 200, Duration::ZERO, settings(5)).await;
    let (id, event_id, body) = w.completed().await;

    let cb = wait_for(&w.store, &id, CallbackState::Delivered).await;
    assert_eq!(cb.attempts, 1);
    assert_eq!(cb.last_error, None);
    let got = w.rx.got();
    assert_eq!(got.len(), 1);
    assert_signed_delivery(&got[0], &event_id, &body);
    let doc =
        serde_json::to_value(document::StatusDocument::of(&call_of(&w.store, &id).await)).unwrap();
    assert_eq!(doc["callback"]["state"], "delivered");
    assert_eq!(doc["callback"]["attempts"], 1);
    assert_eq!(count(&w.d.stats.delivered), 1);
    w.finish().await;
}

#[actix_rt::test]
async fn failed_attempts_are_retried_with_the_same_id_and_bytes() {
    let w = World::start(&[500, 500], 200, Duration::ZERO, settings(5)).await;
    let (id, event_id, body) = w.completed().await;

    let cb = wait_for(&w.store, &id, CallbackState::Delivered).await;
    assert_eq!(cb.attempts, 3);
    let got = w.rx.got();
    assert_eq!(got.len(), 3);
    for r in &got {
        assert_signed_delivery(r, &event_id, &body);
    }
    let s = &w.d.stats;
    assert_eq!(
        (
            count(&s.attempts),
            count(&s.retried),
            count(&s.delivered),
            count(&s.dead)
        ),
        (3, 2, 1, 0)
    );
    w.finish().await;
}

#[actix_rt::test]
async fn gone_is_dead_at_once() {
    let w = World::start(&[410], 200, Duration::ZERO, settings(5)).await;
    let (id, _, _) = w.completed().await;

    let cb = wait_for(&w.store, &id, CallbackState::Dead).await;
    assert_eq!(cb.attempts, 1);
    assert!(cb.last_error.as_deref().unwrap().contains("410"), "{cb:?}");
    assert_eq!(w.rx.got().len(), 1);
    w.finish().await;
}

#[actix_rt::test]
async fn a_callback_never_accepted_is_dead_after_max_attempts() {
    let w = World::start(&[], 500, Duration::ZERO, settings(3)).await;
    let (id, event_id, _) = w.completed().await;

    let cb = wait_for(&w.store, &id, CallbackState::Dead).await;
    assert_eq!(cb.attempts, 3);
    assert_eq!(cb.next_ms, None);
    let error = cb.last_error.expect("the dead letter says why");
    assert!(error.contains("500"), "{error}");
    // A dead letter stays: the status document shows it.
    let doc =
        serde_json::to_value(document::StatusDocument::of(&call_of(&w.store, &id).await)).unwrap();
    assert_eq!(doc["callback"]["state"], "dead");
    assert_eq!(doc["callback"]["last_error"], error.as_str());
    // Stopping waits for anything in flight: nothing more reaches the receiver.
    stop(&w.cancel, &w.d).await;
    let got = w.rx.got();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter()
            .all(|r| r.headers["webhook-id"] == event_id.as_str())
    );
    w.finish().await;
}

#[actix_rt::test]
async fn private_and_loopback_urls_are_refused_unless_allowed() {
    let strict = CallbackSettings {
        allow_private: false,
        ..settings(5)
    };
    let w = World::start(&[], 200, Duration::ZERO, strict).await;
    for url in [
        w.rx.url(),
        "http://localhost/".into(),
        "http://[::1]/".into(),
        "http://169.254.169.254/".into(),
    ] {
        assert_eq!(
            check_url(&url, false).await.unwrap_err(),
            CallbackUrlError::Forbidden,
            "{url}"
        );
        check_url(&url, true)
            .await
            .expect("allowed when configured");
    }

    // At delivery time too, for a literal and for a name that resolves to
    // loopback: dead at once, and nothing reaches the receiver.
    let (literal, _, _) = w.completed().await;
    let by_name = format!("http://localhost:{}/hook", w.rx.port);
    let (named, _, _) = completed_call(&w.store, &by_name).await;
    w.d.wake();
    for id in [&literal, &named] {
        let cb = wait_for(&w.store, id, CallbackState::Dead).await;
        assert_eq!(cb.attempts, 1);
        assert_eq!(
            cb.last_error.as_deref(),
            Some(CallbackUrlError::Forbidden.to_string().as_str())
        );
    }
    assert!(w.rx.got().is_empty());
    w.finish().await;
}

#[actix_rt::test]
async fn a_restarted_dispatcher_delivers_what_the_first_left_pending() {
    // A retry delay long enough that the first dispatcher is stopped before
    // the second attempt is due.
    let slow = CallbackSettings {
        initial_backoff_ms: 1_000,
        max_backoff_ms: 1_000,
        ..settings(5)
    };
    let w = World::start(&[500], 200, Duration::ZERO, slow.clone()).await;
    let (id, event_id, body) = w.completed().await;
    let cb = wait_for_attempts(&w.store, &id, 1).await;
    assert_eq!(cb.state, CallbackState::Pending);
    stop(&w.cancel, &w.d).await;
    w.store.close().await;

    // As after a restart: the store opened anew, another dispatcher.
    let store = CallStore::open(&w.store_url).await.unwrap();
    let cancel = CancellationToken::new();
    let second = Dispatcher::start(store.clone(), slow, cancel.clone());
    let cb = wait_for(&store, &id, CallbackState::Delivered).await;
    assert_eq!(cb.attempts, 2);
    let got = w.rx.got();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_signed_delivery(r, &event_id, &body);
    }
    assert_eq!(
        (count(&w.d.stats.delivered), count(&second.stats.delivered)),
        (0, 1)
    );
    stop(&cancel, &second).await;
    w.finish().await;
}

#[actix_rt::test]
async fn each_callback_is_delivered_once_under_bounded_concurrency() {
    // Slow answers: deliveries overlap, and the loop looks at the store
    // (where they are still due) while they are in flight.
    let s = CallbackSettings {
        concurrency: 2,
        ..settings(5)
    };
    let w = World::start(&[], 200, Duration::from_millis(100), s).await;
    let mut want = Vec::new();
    for _ in 0..8 {
        want.push(w.completed().await);
    }
    for (id, _, _) in &want {
        let cb = wait_for(&w.store, id, CallbackState::Delivered).await;
        assert_eq!(cb.attempts, 1, "{id} was attempted once");
    }
    let mut seen: Vec<String> =
        w.rx.got()
            .iter()
            .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
            .collect();
    seen.sort();
    let mut want: Vec<String> = want.into_iter().map(|(_, e, _)| e).collect();
    want.sort();
    assert_eq!(seen, want, "every callback exactly once");
    w.finish().await;
}

#[actix_rt::test]
async fn a_callback_without_a_body_is_recorded_dead() {
    let w = World::start(&[], 200, Duration::ZERO, settings(5)).await;
    let id = call_with_callback(&w.store, &w.rx.url()).await;
    // Completed without the bytes to deliver (a gateway bug).
    let done = w
        .store
        .complete(&id, CallStatus::Expired, None, now_ms(), None)
        .await
        .unwrap();
    assert!(done);
    w.d.wake();

    let cb = wait_for(&w.store, &id, CallbackState::Dead).await;
    assert_eq!(cb.attempts, 1);
    assert!(
        cb.last_error
            .as_deref()
            .unwrap()
            .contains("without a callback body"),
        "{cb:?}"
    );
    assert!(w.rx.got().is_empty());
    w.finish().await;
}

#[actix_rt::test]
async fn without_a_secret_nothing_is_delivered_and_callbacks_stay_pending() {
    let off = CallbackSettings {
        secret: String::new(),
        ..settings(5)
    };
    let w = World::start(&[], 200, Duration::ZERO, off).await;
    let (id, _, _) = w.completed().await;
    // Nothing can be observed to happen; give a disabled dispatcher the time
    // of one full idle period to do the wrong thing.
    tokio::time::sleep(MAX_IDLE + Duration::from_millis(200)).await;
    let cb = callback_of(&w.store, &id).await;
    assert_eq!((cb.state, cb.attempts), (CallbackState::Pending, 0));
    assert!(w.rx.got().is_empty());
    w.finish().await;
}
