//! The call store, on SQLite (a temporary file) and on PostgreSQL
//! (`SWITCHBOARD_TEST_POSTGRES_URL`, by default the local server's `test`
//! database, which only serves to reach the server).
//!
//! Each test gets databases of its own: a SQLite file in a temporary
//! directory, and a PostgreSQL database created for it (`sbt_<random>`)
//! and dropped after it. PostgreSQL is required, as RabbitMQ is: a test
//! fails when none answers, unless `SWITCHBOARD_TEST_POSTGRES_URL=skip`
//! says to leave the PostgreSQL half out (a note on stderr says so).

use std::sync::Mutex;

use switchboard::calls::{
    CallStatus, CallStore, CallbackOutcome, CallbackRecord, CallbackState, Inserted, NewCall,
    StoredResult,
};
use tempfile::TempDir;

const POSTGRES_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The server to test on; `None` when told to skip PostgreSQL.
fn postgres_url() -> Option<url::Url> {
    let url =
        std::env::var("SWITCHBOARD_TEST_POSTGRES_URL").unwrap_or_else(|_| POSTGRES_DEFAULT.into());
    if url == "skip" {
        let mut noted = NOTED.lock().unwrap_or_else(|p| p.into_inner());
        if !*noted {
            *noted = true;
            // Straight to the process's stderr: the harness captures eprintln.
            let msg = "\nnote: SWITCHBOARD_TEST_POSTGRES_URL=skip: the PostgreSQL half of the store tests is left out\n";
            let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
        }
        return None;
    }
    Some(url::Url::parse(&url).expect("SWITCHBOARD_TEST_POSTGRES_URL is a valid URL"))
}

static NOTED: Mutex<bool> = Mutex::new(false);

/// A database of a test's own on the server of `base`, and its URL.
struct Database {
    /// Connected to `base`'s database, to drop this one.
    admin: sqlx::PgPool,
    name: String,
    url: String,
}

impl Database {
    async fn create(base: &url::Url) -> Self {
        let admin = sqlx::PgPool::connect(base.as_str())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no PostgreSQL answers at {}:{} ({e}); start it, or set SWITCHBOARD_TEST_POSTGRES_URL (to `skip` to leave these tests out)",
                    base.host_str().unwrap_or("?"),
                    base.port().unwrap_or(5432)
                )
            });
        let name = format!("sbt_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        let mut url = base.clone();
        url.set_path(&name);
        Database {
            admin,
            name,
            url: url.into(),
        }
    }

    async fn drop(self) {
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await
        .unwrap();
        self.admin.close().await;
    }
}

/// One store under test and what keeps it alive.
struct Backend {
    name: &'static str,
    store: CallStore,
    /// The SQLite file's directory.
    dir: Option<TempDir>,
    /// The PostgreSQL database, dropped at the end.
    database: Option<Database>,
}

impl Backend {
    async fn done(self) {
        self.store.close().await;
        if let Some(db) = self.database {
            db.drop().await;
        }
    }
}

/// SQLite in a temporary file and PostgreSQL in a database of the test's
/// own, both fresh.
async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}/calls.db?mode=rwc", dir.path().display());
    let mut all = vec![Backend {
        name: "sqlite",
        store: CallStore::open(&sqlite).await.unwrap(),
        dir: Some(dir),
        database: None,
    }];
    let Some(base) = postgres_url() else {
        return all;
    };
    let db = Database::create(&base).await;
    all.push(Backend {
        name: "postgres",
        store: CallStore::open(&db.url).await.unwrap(),
        dir: None,
        database: Some(db),
    });
    all
}

/// A prefix of this test's own for ids, callers and keys.
fn prefix(test: &str) -> String {
    format!(
        "st-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A published call with no key and no callback; times are chosen by tests.
fn call(id: &str, caller: &str, created_ms: i64, deadline_ms: i64) -> NewCall {
    NewCall {
        id: id.into(),
        caller: caller.into(),
        service: "echo".into(),
        created_ms,
        deadline_ms,
        published: true,
        idem_key: None,
        body_hash: None,
        traceparent: None,
        callback_url: None,
    }
}

fn reply(body: &[u8]) -> StoredResult {
    StoredResult {
        status: 201,
        content_type: "application/json".into(),
        body: body.to_vec(),
    }
}

async fn insert_new(store: &CallStore, c: &NewCall) {
    let inserted = store.insert(c).await.unwrap();
    assert!(matches!(inserted, Inserted::New), "{} is new", c.id);
}

/// The stored callback of a stored call.
async fn callback_of(store: &CallStore, id: &str) -> CallbackRecord {
    let call = store.get(id).await.unwrap().expect("stored");
    call.callback.expect("a callback")
}

#[actix_rt::test]
async fn a_call_reads_back_as_stored() {
    for b in backends().await {
        let p = prefix("roundtrip");
        let (a, z) = (format!("{p}-a"), format!("{p}-z"));
        let full = NewCall {
            published: false,
            idem_key: Some(format!("{p}-key")),
            body_hash: Some("e3b0c442".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            callback_url: Some("https://example.com/hook?x=1".into()),
            ..call(
                &a,
                &format!("{p}-caller"),
                1_700_000_000_123,
                1_700_000_030_123,
            )
        };
        insert_new(&b.store, &full).await;
        let got = b.store.get(&a).await.unwrap().expect("stored");
        assert_eq!(got.id, a, "{}", b.name);
        assert_eq!(got.caller, full.caller);
        assert_eq!(got.service, "echo");
        assert_eq!(got.status, CallStatus::Pending);
        assert_eq!(got.created_ms, 1_700_000_000_123);
        assert_eq!(got.completed_ms, None);
        assert_eq!(got.deadline_ms, 1_700_000_030_123);
        assert!(!got.published);
        assert_eq!(got.idem_key, full.idem_key);
        assert_eq!(got.body_hash, full.body_hash);
        assert_eq!(got.traceparent, full.traceparent);
        assert_eq!(got.result, None);
        assert_eq!(
            got.callback,
            Some(CallbackRecord {
                url: "https://example.com/hook?x=1".into(),
                state: CallbackState::Waiting,
                attempts: 0,
                next_ms: None,
                last_error: None,
                event_id: None,
                body: None,
                history: Vec::new(),
            })
        );
        b.store.mark_published(&a).await.unwrap();
        assert!(b.store.get(&a).await.unwrap().unwrap().published);

        // The bare minimum reads back with its absences.
        insert_new(&b.store, &call(&z, &format!("{p}-caller"), 1, 2)).await;
        let got = b.store.get(&z).await.unwrap().unwrap();
        assert_eq!(
            (got.idem_key, got.callback, got.traceparent),
            (None, None, None)
        );
        assert!(
            b.store
                .get(&format!("{p}-unknown"))
                .await
                .unwrap()
                .is_none()
        );

        b.store.delete(&a).await.unwrap();
        assert!(b.store.get(&a).await.unwrap().is_none(), "{}", b.name);
        b.done().await;
    }
}

#[actix_rt::test]
async fn a_reused_idempotency_key_returns_the_existing_call() {
    for b in backends().await {
        let p = prefix("idem");
        let (caller, other_caller, key) = (
            format!("{p}-caller"),
            format!("{p}-other"),
            format!("{p}-key"),
        );
        let (first, second, third) = (format!("{p}-1"), format!("{p}-2"), format!("{p}-3"));
        let keyed = |id: &str, who: &str, hash: &str| NewCall {
            idem_key: Some(key.clone()),
            body_hash: Some(hash.into()),
            ..call(id, who, 10, 20)
        };
        insert_new(&b.store, &keyed(&first, &caller, "hash-1")).await;
        match b
            .store
            .insert(&keyed(&second, &caller, "hash-2"))
            .await
            .unwrap()
        {
            Inserted::Existing(existing) => {
                assert_eq!(existing.id, first, "{}", b.name);
                assert_eq!(existing.body_hash.as_deref(), Some("hash-1"));
            }
            Inserted::New => panic!("{}: the key was already used", b.name),
        }
        assert!(b.store.get(&second).await.unwrap().is_none());
        let found = b.store.by_idempotency_key(&caller, &key).await.unwrap();
        assert_eq!(found.map(|c| c.id), Some(first.clone()));

        // The same key from another caller is another call.
        insert_new(&b.store, &keyed(&third, &other_caller, "hash-1")).await;
        // Calls without a key never conflict.
        let (n1, n2) = (format!("{p}-n1"), format!("{p}-n2"));
        insert_new(&b.store, &call(&n1, &caller, 10, 20)).await;
        insert_new(&b.store, &call(&n2, &caller, 10, 20)).await;

        b.done().await;
    }
}

#[actix_rt::test]
async fn a_call_completes_only_once() {
    for b in backends().await {
        let p = prefix("complete");
        let (with_cb, without_cb) = (format!("{p}-cb"), format!("{p}-plain"));
        let caller = format!("{p}-caller");
        insert_new(
            &b.store,
            &NewCall {
                callback_url: Some("https://example.com/hook".into()),
                ..call(&with_cb, &caller, 100, 200)
            },
        )
        .await;
        insert_new(&b.store, &call(&without_cb, &caller, 100, 200)).await;

        let event = br#"{"specversion":"1.0"}"#;
        let done = b
            .store
            .complete(
                &with_cb,
                CallStatus::Succeeded,
                Some(&reply(b"{\"ok\":true}")),
                150,
                Some(("evt-1", event)),
            )
            .await
            .unwrap();
        assert!(done, "{}", b.name);
        let again = b
            .store
            .complete(&with_cb, CallStatus::Expired, None, 160, None)
            .await
            .unwrap();
        assert!(!again, "{}: a second completion changes nothing", b.name);
        let got = b.store.get(&with_cb).await.unwrap().unwrap();
        assert_eq!(got.status, CallStatus::Succeeded);
        assert_eq!(got.completed_ms, Some(150));
        assert_eq!(got.result, Some(reply(b"{\"ok\":true}")));
        let cb = got.callback.unwrap();
        assert_eq!(cb.state, CallbackState::Pending);
        assert_eq!(cb.next_ms, Some(150));
        assert_eq!(cb.event_id.as_deref(), Some("evt-1"));
        assert_eq!(cb.body.as_deref(), Some(&event[..]));

        // Attempts are counted; the state follows the outcome.
        b.store
            .record_callback(
                &with_cb,
                &CallbackOutcome::Retry {
                    next_ms: 170,
                    error: "the receiver answered 503".into(),
                },
            )
            .await
            .unwrap();
        let cb = callback_of(&b.store, &with_cb).await;
        assert_eq!(
            (cb.state, cb.attempts, cb.next_ms),
            (CallbackState::Pending, 1, Some(170))
        );
        b.store
            .record_callback(
                &with_cb,
                &CallbackOutcome::Dead {
                    error: "gone".into(),
                },
            )
            .await
            .unwrap();
        let cb = callback_of(&b.store, &with_cb).await;
        assert_eq!(
            (cb.state, cb.attempts, cb.next_ms, cb.last_error.as_deref()),
            (CallbackState::Dead, 2, None, Some("gone"))
        );

        // A call without a callback completes without one.
        assert!(
            b.store
                .complete(
                    &without_cb,
                    CallStatus::Failed,
                    Some(&reply(b"x")),
                    150,
                    None
                )
                .await
                .unwrap()
        );
        let got = b.store.get(&without_cb).await.unwrap().unwrap();
        assert_eq!((got.status, got.callback), (CallStatus::Failed, None));

        b.done().await;
    }
}

#[actix_rt::test]
async fn a_call_without_a_callback_ends_in_one_statement_that_returns_it() {
    for b in backends().await {
        let p = prefix("plain");
        let caller = format!("{p}-caller");
        let plain = format!("{p}-plain");
        let with_cb = format!("{p}-cb");
        insert_new(
            &b.store,
            &NewCall {
                idem_key: Some(format!("{p}-key")),
                body_hash: Some("hash".into()),
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                ..call(&plain, &caller, 100, 200)
            },
        )
        .await;
        insert_new(
            &b.store,
            &NewCall {
                callback_url: Some("https://example.com/hook".into()),
                ..call(&with_cb, &caller, 100, 200)
            },
        )
        .await;
        assert!(
            b.store
                .record_progress(&plain, 0.5, Some("half"), 120)
                .await
                .unwrap()
        );

        let ended = b
            .store
            .complete_plain(&plain, CallStatus::Failed, Some(reply(b"no")), 150)
            .await
            .unwrap()
            .expect("a pending call without a callback is ended");
        // What it returns is the call as the store now holds it.
        let stored = b.store.get(&plain).await.unwrap().unwrap();
        assert_eq!(ended, stored, "{}", b.name);
        assert_eq!(stored.status, CallStatus::Failed);
        assert_eq!(stored.completed_ms, Some(150));
        assert_eq!(stored.result, Some(reply(b"no")));
        assert_eq!(
            stored.progress.as_ref().unwrap().note.as_deref(),
            Some("half")
        );

        // Once only: an ended call is not ended again, nor changed.
        let again = b
            .store
            .complete_plain(&plain, CallStatus::Expired, None, 160)
            .await
            .unwrap();
        assert!(again.is_none(), "{}: ended twice", b.name);
        assert_eq!(b.store.get(&plain).await.unwrap().unwrap(), stored);
        // A call with a callback is left to `complete` (its delivery body
        // is made from the call first): untouched.
        let cb = b
            .store
            .complete_plain(&with_cb, CallStatus::Succeeded, Some(reply(b"{}")), 150)
            .await
            .unwrap();
        assert!(cb.is_none(), "{}: a call with a callback", b.name);
        let got = b.store.get(&with_cb).await.unwrap().unwrap();
        assert_eq!((got.status, got.result), (CallStatus::Pending, None));
        // An unknown call.
        let unknown = b
            .store
            .complete_plain(&format!("{p}-none"), CallStatus::Succeeded, None, 150)
            .await
            .unwrap();
        assert!(unknown.is_none());

        // Many at once (they share transactions): each gets its own call.
        let ids: Vec<String> = (0..64).map(|i| format!("{p}-many-{i}")).collect();
        for id in &ids {
            insert_new(&b.store, &call(id, &caller, 100, 200)).await;
        }
        let ends = futures_util::future::join_all(ids.iter().enumerate().map(|(i, id)| {
            b.store.complete_plain(
                id,
                CallStatus::Succeeded,
                Some(reply(id.as_bytes())),
                1_000 + i as i64,
            )
        }))
        .await;
        for ((i, id), end) in ids.iter().enumerate().zip(ends) {
            let end = end.unwrap().expect("ended");
            assert_eq!(&end.id, id);
            assert_eq!(end.result, Some(reply(id.as_bytes())));
            assert_eq!(end.completed_ms, Some(1_000 + i as i64));
            assert_eq!(b.store.get(id).await.unwrap().unwrap(), end, "{}", b.name);
        }

        b.done().await;
    }
}

#[actix_rt::test]
async fn overdue_lists_pending_calls_past_their_deadline() {
    for b in backends().await {
        let p = prefix("overdue");
        let caller = format!("{p}-caller");
        let (late, early, ended) = (
            format!("{p}-late"),
            format!("{p}-early"),
            format!("{p}-ended"),
        );
        // Times far in the past, so that no real call of another test is
        // overdue at `now` = 2 000 ms.
        insert_new(&b.store, &call(&late, &caller, 500, 1_000)).await;
        insert_new(&b.store, &call(&early, &caller, 500, 3_000)).await;
        insert_new(&b.store, &call(&ended, &caller, 500, 1_000)).await;
        assert!(
            b.store
                .complete(&ended, CallStatus::Succeeded, Some(&reply(b"1")), 900, None)
                .await
                .unwrap()
        );
        let overdue = b.store.overdue(2_000, 1_000_000).await.unwrap();
        assert!(overdue.contains(&late), "{}", b.name);
        assert!(!overdue.contains(&early), "{}", b.name);
        assert!(!overdue.contains(&ended), "{}", b.name);
        b.done().await;
    }
}

#[actix_rt::test]
async fn purge_keeps_pending_calls_and_unsettled_callbacks() {
    for b in backends().await {
        let p = prefix("purge");
        let caller = format!("{p}-caller");
        let id = |s: &str| format!("{p}-{s}");
        let with_cb = |s: &str| NewCall {
            callback_url: Some("https://example.com/hook".into()),
            ..call(&id(s), &caller, 500, 10_000)
        };
        let s = &b.store;
        // Still pending: kept.
        insert_new(s, &call(&id("pending"), &caller, 500, 10_000)).await;
        insert_new(s, &with_cb("pending-cb")).await;
        // Ended long ago, nothing to deliver: purged.
        insert_new(s, &call(&id("old"), &caller, 500, 10_000)).await;
        assert!(
            s.complete(
                &id("old"),
                CallStatus::Succeeded,
                Some(&reply(b"1")),
                1_000,
                None
            )
            .await
            .unwrap()
        );
        // Ended long ago, callback still to deliver: kept.
        insert_new(s, &with_cb("undelivered")).await;
        assert!(
            s.complete(
                &id("undelivered"),
                CallStatus::Succeeded,
                Some(&reply(b"1")),
                1_000,
                Some(("e1", b"{}"))
            )
            .await
            .unwrap()
        );
        // Ended long ago, callback delivered or dead: purged.
        for (name, outcome) in [
            ("delivered", CallbackOutcome::Delivered),
            (
                "dead",
                CallbackOutcome::Dead {
                    error: "gone".into(),
                },
            ),
        ] {
            insert_new(s, &with_cb(name)).await;
            assert!(
                s.complete(
                    &id(name),
                    CallStatus::Succeeded,
                    Some(&reply(b"1")),
                    1_000,
                    Some(("e", b"{}"))
                )
                .await
                .unwrap()
            );
            s.record_callback(&id(name), &outcome).await.unwrap();
        }
        // Ended after the cut-off: kept.
        insert_new(s, &call(&id("recent"), &caller, 500, 10_000)).await;
        assert!(
            s.complete(&id("recent"), CallStatus::Failed, None, 5_000, None)
                .await
                .unwrap()
        );

        assert_eq!(s.purge(2_000).await.unwrap(), 3, "{}", b.name);
        for (name, kept) in [
            ("pending", true),
            ("pending-cb", true),
            ("old", false),
            ("undelivered", true),
            ("delivered", false),
            ("dead", false),
            ("recent", true),
        ] {
            assert_eq!(
                s.get(&id(name)).await.unwrap().is_some(),
                kept,
                "{}: {name}",
                b.name
            );
        }
        b.done().await;
    }
}

#[actix_rt::test]
async fn unpublished_calls_are_dropped_and_their_key_starts_afresh() {
    for b in backends().await {
        let p = prefix("unpub");
        let caller = format!("{p}-caller");
        let key = format!("{p}-key");
        let (lost, kept, retry) = (
            format!("{p}-lost"),
            format!("{p}-kept"),
            format!("{p}-retry"),
        );
        let keyed = |id: &str| NewCall {
            published: false,
            idem_key: Some(key.clone()),
            ..call(id, &caller, 10, 20)
        };
        insert_new(&b.store, &keyed(&lost)).await;
        insert_new(&b.store, &call(&kept, &caller, 10, 20)).await;

        // Stored at 10: younger than the grace at 5, another gateway may
        // still be waiting for its confirm.
        assert_eq!(b.store.drop_unpublished(5).await.unwrap(), 0, "{}", b.name);
        assert_eq!(
            b.store.drop_unpublished(100).await.unwrap(),
            1,
            "{}",
            b.name
        );
        assert!(b.store.get(&lost).await.unwrap().is_none());
        assert!(b.store.get(&kept).await.unwrap().is_some());
        // The caller never got a 202 for it: the same key makes a new call.
        insert_new(&b.store, &keyed(&retry)).await;
        // Published calls are never dropped, nor pending ones once published.
        b.store.mark_published(&retry).await.unwrap();
        assert_eq!(
            b.store.drop_unpublished(100).await.unwrap(),
            0,
            "{}",
            b.name
        );
        assert!(b.store.get(&retry).await.unwrap().is_some());
        b.done().await;
    }
}

#[actix_rt::test]
async fn stores_opened_at_once_on_a_fresh_database_all_open() {
    // Gateways started together on a new database race to create the
    // schema; every one of them must open.
    for b in backends().await {
        let fresh_db = match &b.database {
            Some(_) => Some(Database::create(&postgres_url().unwrap()).await),
            None => None,
        };
        let fresh_url = match (&fresh_db, &b.dir) {
            (Some(db), _) => db.url.clone(),
            (None, Some(dir)) => format!("sqlite://{}/fresh.db?mode=rwc", dir.path().display()),
            (None, None) => unreachable!("every backend is a file or a database"),
        };
        let opened =
            futures_util::future::join_all((0..8).map(|_| CallStore::open(&fresh_url))).await;
        for store in opened {
            let store = store.unwrap_or_else(|e| panic!("{}: {e}", b.name));
            assert!(store.ping().await);
            store.close().await;
        }
        if let Some(db) = fresh_db {
            db.drop().await;
        }
        b.done().await;
    }
}

/// Another handle on `b`'s store, as a second gateway would open it.
async fn same_store(b: &Backend) -> CallStore {
    let url = match (&b.database, &b.dir) {
        (Some(db), _) => db.url.clone(),
        (None, Some(dir)) => format!("sqlite://{}/calls.db?mode=rwc", dir.path().display()),
        (None, None) => unreachable!("every backend is a file or a database"),
    };
    CallStore::open(&url).await.unwrap()
}

#[actix_rt::test]
async fn a_due_callback_is_claimed_by_one_gateway_of_two_until_its_lease_ends() {
    for b in backends().await {
        let p = prefix("lease");
        let a = b.store.clone().for_instance(&format!("{p}-a"));
        let other = same_store(&b).await.for_instance(&format!("{p}-b"));
        let id = format!("{p}-call");
        insert_new(
            &a,
            &NewCall {
                callback_url: Some("https://example.com/hook".into()),
                ..call(&id, "c", 10, 1_000_000)
            },
        )
        .await;
        a.complete(
            &id,
            CallStatus::Succeeded,
            Some(&reply(b"{}")),
            100,
            Some(("ev", b"{}")),
        )
        .await
        .unwrap();

        // Both dispatchers look at once: one of them gets it.
        let (mine, theirs) = futures_util::join!(
            a.claim_due_callbacks(200, 10, 60_000),
            other.claim_due_callbacks(200, 10, 60_000)
        );
        let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
        assert_eq!(mine.len() + theirs.len(), 1, "{}: claimed once", b.name);
        let (holder, taker) = if mine.len() == 1 {
            (&a, &other)
        } else {
            (&other, &a)
        };
        // While the lease runs, nobody else (nor the holder) claims it again.
        assert!(
            taker
                .claim_due_callbacks(30_000, 10, 90_000)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            holder
                .claim_due_callbacks(30_000, 10, 90_000)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            taker.next_callback_ms().await.unwrap(),
            Some(60_000),
            "{}: due again when the lease ends",
            b.name
        );
        // Its holder died mid-delivery: once the lease ran out, another takes over.
        let taken = taker
            .claim_due_callbacks(60_001, 10, 120_000)
            .await
            .unwrap();
        assert_eq!(taken.len(), 1, "{}", b.name);
        assert_eq!(taken[0].id, id);
        // That one died too and came back under its instance id: it ends
        // the leases in its name at start, so the callback is due at once.
        assert!(
            holder
                .claim_due_callbacks(70_000, 10, 130_000)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(taker.release_own_leases().await.unwrap(), 1, "{}", b.name);
        assert_eq!(holder.release_own_leases().await.unwrap(), 0);
        let taken = taker
            .claim_due_callbacks(70_000, 10, 130_000)
            .await
            .unwrap();
        assert_eq!(taken.len(), 1, "{}", b.name);
        taker
            .record_attempt(
                &id,
                &CallbackOutcome::Delivered,
                Some((60_002, 5, Some(200))),
            )
            .await
            .unwrap();
        for s in [&a, &other] {
            assert!(
                s.claim_due_callbacks(i64::MAX - 1, 10, i64::MAX)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
        assert_eq!(callback_of(&a, &id).await.state, CallbackState::Delivered);
        other.close().await;
        b.done().await;
    }
}

#[actix_rt::test]
async fn a_silent_gateway_is_adopted_by_exactly_one_and_its_calls_wait_for_the_drain() {
    use switchboard::calls::instances::SILENT_AFTER;
    for b in backends().await {
        let p = prefix("adopt");
        let (ia, ib, idead) = (format!("{p}-a"), format!("{p}-b"), format!("{p}-dead"));
        let a = b.store.clone().for_instance(&ia);
        let bb = same_store(&b).await.for_instance(&ib);
        let dead = same_store(&b).await.for_instance(&idead);
        for s in [&a, &bb, &dead] {
            let me = s.instance().unwrap().to_owned();
            s.heartbeat(&format!("q.reply.{me}"), &format!("q.deadwatch.{me}"))
                .await
                .unwrap();
        }
        // A call of the dead gateway, past its deadline, its reply unread.
        let late = format!("{p}-late");
        insert_new(&dead, &call(&late, "c", 10, 20)).await;
        // Alive: nobody adopts it; its overdue call is expired as before.
        assert!(
            a.claim_silent(SILENT_AFTER).await.unwrap().is_none(),
            "{}",
            b.name
        );
        assert_eq!(a.overdue(1_000, 10).await.unwrap(), vec![late.clone()]);

        dead.mark_gone().await.unwrap();
        // Silent, not drained: no one expires its call.
        for s in [&a, &bb] {
            assert!(s.overdue(1_000, 10).await.unwrap().is_empty(), "{}", b.name);
        }
        let (x, y) =
            futures_util::join!(a.claim_silent(SILENT_AFTER), bb.claim_silent(SILENT_AFTER));
        let claims: Vec<_> = [x.unwrap(), y.unwrap()].into_iter().flatten().collect();
        assert_eq!(claims.len(), 1, "{}: adopted by exactly one", b.name);
        assert_eq!(claims[0].id, idead);
        assert_eq!(claims[0].reply_queue, format!("q.reply.{idead}"));
        let (adopter, bystander) = if a.still_adopted(&idead).await.unwrap() {
            (&a, &bb)
        } else {
            (&bb, &a)
        };
        assert!(
            bystander
                .claim_silent(SILENT_AFTER)
                .await
                .unwrap()
                .is_none()
        );
        assert!(adopter.overdue(1_000, 10).await.unwrap().is_empty());

        // Drained once by its adopter: the adopter's sweeper may expire it.
        adopter.mark_drained(&idead).await.unwrap();
        assert_eq!(
            adopter.overdue(1_000, 10).await.unwrap(),
            vec![late.clone()]
        );
        assert!(bystander.overdue(1_000, 10).await.unwrap().is_empty());
        // Not let go while it has a pending call.
        assert_eq!(adopter.pending_of(&idead).await.unwrap(), 1);
        adopter
            .complete(&late, CallStatus::Expired, None, 1_000, None)
            .await
            .unwrap();
        assert_eq!(adopter.pending_of(&idead).await.unwrap(), 0);
        assert!(
            !bystander.release(&idead, SILENT_AFTER).await.unwrap(),
            "only its adopter"
        );
        assert!(
            adopter.release(&idead, SILENT_AFTER).await.unwrap(),
            "{}",
            b.name
        );
        assert!(!adopter.still_adopted(&idead).await.unwrap());

        // A gateway that comes back withdraws a claim on it.
        dead.heartbeat("q.r", "q.d").await.unwrap();
        dead.mark_gone().await.unwrap();
        assert!(a.claim_silent(SILENT_AFTER).await.unwrap().is_some());
        dead.heartbeat("q.r", "q.d").await.unwrap();
        assert!(!a.still_adopted(&idead).await.unwrap(), "{}", b.name);
        for s in [bb, dead] {
            s.close().await;
        }
        b.done().await;
    }
}

#[actix_rt::test]
async fn the_adoptions_of_an_adopter_that_dies_are_claimed_again() {
    use switchboard::calls::instances::SILENT_AFTER;
    for b in backends().await {
        let p = prefix("readopt");
        let x = b.store.clone().for_instance(&format!("{p}-x"));
        let y = same_store(&b).await.for_instance(&format!("{p}-y"));
        let dead = same_store(&b).await.for_instance(&format!("{p}-dead"));
        for s in [&x, &y, &dead] {
            s.heartbeat("q.r", "q.d").await.unwrap();
        }
        dead.mark_gone().await.unwrap();
        let claimed = x.claim_silent(SILENT_AFTER).await.unwrap();
        assert_eq!(claimed.map(|s| s.id), dead.instance().map(str::to_owned));
        // While X lives, Y leaves its adoption alone.
        assert!(
            y.claim_silent(SILENT_AFTER).await.unwrap().is_none(),
            "{}",
            b.name
        );
        // X dies too: Y claims both X and what X had adopted.
        x.mark_gone().await.unwrap();
        let mut taken = Vec::new();
        while let Some(s) = y.claim_silent(SILENT_AFTER).await.unwrap() {
            taken.push(s.id);
            assert!(taken.len() <= 2, "{}: claimed again: {taken:?}", b.name);
        }
        taken.sort();
        let mut expected = vec![format!("{p}-dead"), format!("{p}-x")];
        expected.sort();
        assert_eq!(taken, expected, "{}", b.name);
        assert!(y.still_adopted(&format!("{p}-dead")).await.unwrap());
        assert!(!x.still_adopted(&format!("{p}-dead")).await.unwrap());
        // An adoption withdrawn (its adopter failed) is claimed again.
        y.withdraw(&format!("{p}-dead")).await.unwrap();
        assert!(!y.still_adopted(&format!("{p}-dead")).await.unwrap());
        let again = y.claim_silent(SILENT_AFTER).await.unwrap();
        assert_eq!(again.map(|s| s.id), Some(format!("{p}-dead")), "{}", b.name);
        for s in [y, dead] {
            s.close().await;
        }
        b.done().await;
    }
}

/// The URL of backend `b`'s store.
fn url_of(b: &Backend) -> String {
    match (&b.database, &b.dir) {
        (Some(db), _) => db.url.clone(),
        (None, Some(dir)) => format!("sqlite://{}/calls.db?mode=rwc", dir.path().display()),
        (None, None) => unreachable!("every backend is a file or a database"),
    }
}

/// An end that no message tells again (expired, cancelled) is flagged as
/// owed by the instance that stored it, until its event is recorded as
/// published; an end by a reply is not; a store made before the flag's
/// column gets it when it opens, its calls kept.
#[actix_rt::test]
async fn an_end_no_message_tells_again_is_owed_by_its_instance_until_published() {
    for b in backends().await {
        let p = prefix("owed");
        // A store as made before the column: dropped, with its index.
        sqlx::any::install_default_drivers();
        let raw = sqlx::AnyPool::connect(&url_of(&b)).await.unwrap();
        sqlx::query("DROP INDEX IF EXISTS sb_calls_end_event_pending")
            .execute(&raw)
            .await
            .unwrap();
        sqlx::query("ALTER TABLE sb_calls DROP COLUMN end_event_pending")
            .execute(&raw)
            .await
            .unwrap();
        let old = call(&format!("{p}-old"), "c", 1, 10_000);
        insert_new(&b.store, &old).await;
        raw.close().await;
        let me = format!("{p}-a");
        let store = same_store(&b).await.for_instance(&me);
        assert_eq!(
            store.get(&old.id).await.unwrap().unwrap().status,
            CallStatus::Pending,
            "{}: the older store's call is kept",
            b.name
        );

        let ids: Vec<String> = (0..4).map(|i| format!("{p}-{i}")).collect();
        for id in &ids {
            insert_new(&store, &call(id, "c", 1, 10_000)).await;
        }
        store
            .complete_plain(&ids[0], CallStatus::Expired, None, 100)
            .await
            .unwrap()
            .unwrap();
        assert!(
            store
                .complete(&ids[1], CallStatus::Cancelled, None, 200, None)
                .await
                .unwrap()
        );
        store
            .complete_plain(&ids[2], CallStatus::Succeeded, Some(reply(b"{}")), 300)
            .await
            .unwrap()
            .unwrap();
        // Without an instance (a tool): nobody to owe it.
        b.store
            .complete_plain(&ids[3], CallStatus::Expired, None, 400)
            .await
            .unwrap()
            .unwrap();
        let owed = |before| {
            let store = store.clone();
            let me = me.clone();
            async move {
                store
                    .owed_end_events(&me, before, 100)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(c, stored_here)| (c.id, c.status, stored_here))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            owed(1000).await,
            [
                (ids[0].clone(), CallStatus::Expired, true),
                (ids[1].clone(), CallStatus::Cancelled, true)
            ],
            "{}",
            b.name
        );
        assert_eq!(owed(150).await.len(), 1, "{}: ended before", b.name);
        assert!(
            store
                .owed_end_events("another", 1000, 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(store.owed_end_event(&ids[1]).await.unwrap().is_some());
        assert!(store.owed_end_event(&ids[2]).await.unwrap().is_none());

        store.end_event_published(&ids[1]).await.unwrap();
        assert_eq!(owed(1000).await.len(), 1, "{}", b.name);
        assert!(store.owed_end_event(&ids[1]).await.unwrap().is_none());
        store.end_event_published(&ids[0]).await.unwrap();
        assert!(owed(1000).await.is_empty(), "{}", b.name);
        store.close().await;
        b.done().await;
    }
}
