//! The call store: calls that must outlive the HTTP request that made them
//! (every `202`, every call with an idempotency key), their results and the
//! state of their callbacks.
//!
//! Public: a tool or an application beside the gateway opens the same store
//! ([`CallStore::open`]) to read calls and their callbacks.
//!
//! One portable SQL dialect through sqlx's `Any` driver: an embedded SQLite
//! file by default, PostgreSQL by URL, so that several gateways can later
//! share one store without a rewrite. Times are milliseconds since the Unix
//! epoch (`BIGINT`), bodies are bytes.
//!
//! # Layout
//! - this file: [`CallStore`], [`CallRecord`], [`NewCall`].
//! - `batch`: group commit of the frequent writes.
//! - [`document`]: the status document and result JSON of DESIGN.md.
//! - `tracker`: the life of a stored call (completion, events, callbacks,
//!   the dead-letter watch and the deadline sweeper).
//! - `finished`: the documents of recently finished calls, kept in memory.
//! - `here`: the calls this gateway accepted and has not seen end.
//! - [`instances`]: the gateways sharing the store (liveness, adoption of a
//!   silent one's queues) and the leases on callback deliveries.
//! - `adopt`: a live gateway draining the queues of a dead one.

pub(crate) mod adopt;
mod batch;
pub mod document;
mod finished;
mod here;
pub mod instances;
pub(crate) mod metrics;
pub(crate) mod tracker;

use std::str::FromStr;

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Connection, Row};

use crate::error::{Error, Result};
use batch::{Arg, Stmt};

/// Where a call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallStatus {
    /// No reply yet.
    Pending,
    /// Replied with a status below 400.
    Succeeded,
    /// Replied with 400 or above, or dead-lettered.
    Failed,
    /// No reply within the service's timeout.
    Expired,
    /// Cancelled by its caller before it ended.
    Cancelled,
}

impl CallStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Pending => "pending",
            CallStatus::Succeeded => "succeeded",
            CallStatus::Failed => "failed",
            CallStatus::Expired => "expired",
            CallStatus::Cancelled => "cancelled",
        }
    }

    /// Succeeded or failed by the reply's status.
    pub fn of_reply(status: u16) -> Self {
        if status < 400 {
            CallStatus::Succeeded
        } else {
            CallStatus::Failed
        }
    }

    /// Whether the call has ended.
    pub fn is_terminal(self) -> bool {
        self != CallStatus::Pending
    }
}

impl FromStr for CallStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => CallStatus::Pending,
            "succeeded" => CallStatus::Succeeded,
            "failed" => CallStatus::Failed,
            "expired" => CallStatus::Expired,
            "cancelled" => CallStatus::Cancelled,
            other => {
                return Err(Error::UnknownStored {
                    what: "call status",
                    value: other.to_owned(),
                });
            }
        })
    }
}

/// Where a callback delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallbackState {
    /// The call has not ended yet: nothing to deliver.
    Waiting,
    /// Due for (another) attempt at `next_ms`.
    Pending,
    /// Delivered (a 2xx answer).
    Delivered,
    /// Given up (attempts exhausted or 410 Gone): kept as a dead letter.
    Dead,
}

impl CallbackState {
    fn as_str(self) -> &'static str {
        match self {
            CallbackState::Waiting => "waiting",
            CallbackState::Pending => "pending",
            CallbackState::Delivered => "delivered",
            CallbackState::Dead => "dead",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "waiting" => CallbackState::Waiting,
            "pending" => CallbackState::Pending,
            "delivered" => CallbackState::Delivered,
            "dead" => CallbackState::Dead,
            other => {
                return Err(Error::UnknownStored {
                    what: "callback state",
                    value: other.to_owned(),
                });
            }
        })
    }
}

/// A reply as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResult {
    /// The reply's `x-status`.
    pub status: u16,
    /// The reply's content type.
    pub content_type: String,
    /// The reply's body.
    pub body: Vec<u8>,
}

/// A callback as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackRecord {
    /// Where to POST the result.
    pub url: String,
    /// Delivery state.
    pub state: CallbackState,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (ms), when pending.
    pub next_ms: Option<i64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// `webhook-id`: the same on every attempt.
    pub event_id: Option<String>,
    /// The exact bytes to POST (the completed CloudEvent), once the call ended.
    pub body: Option<Vec<u8>>,
    /// Every attempt, oldest first (the last [`MAX_ATTEMPTS_SHOWN`]);
    /// filled by [`CallStore::get`] only.
    pub history: Vec<AttemptRecord>,
}

impl CallbackRecord {
    /// A callback to `url` not yet attempted: how a call's callback is
    /// stored when the call is accepted.
    pub(crate) fn waiting(url: String) -> Self {
        Self {
            url,
            state: CallbackState::Waiting,
            attempts: 0,
            next_ms: None,
            last_error: None,
            event_id: None,
            body: None,
            history: Vec::new(),
        }
    }
}

/// How many of a callback's attempts [`CallStore::get`] reads back.
pub const MAX_ATTEMPTS_SHOWN: i64 = 100;

/// One callback attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Its number, from 1, over every round (an operator's retry starts a
    /// new round; numbers go on).
    pub number: u32,
    /// When it was made, ms.
    pub at_ms: i64,
    /// How long it took, ms.
    pub duration_ms: i64,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// When the next attempt was scheduled, when one was.
    pub next_ms: Option<i64>,
}

/// A stored call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// The call id (`correlation_id`).
    pub id: String,
    /// The caller (token name, or `anonymous`) that may see it.
    pub caller: String,
    /// The service called.
    pub service: String,
    /// Where it stands.
    pub status: CallStatus,
    /// When it was accepted, ms.
    pub created_ms: i64,
    /// When it ended, ms.
    pub completed_ms: Option<i64>,
    /// The service's deadline, ms.
    pub deadline_ms: i64,
    /// Whether the request's publish was confirmed.
    pub published: bool,
    /// The caller's `Idempotency-Key`.
    pub idem_key: Option<String>,
    /// SHA-256 of the request (content type and body), to spot a reused key.
    pub body_hash: Option<String>,
    /// W3C trace context of the call.
    pub traceparent: Option<String>,
    /// The reply, once there is one.
    pub result: Option<StoredResult>,
    /// The callback, when the caller asked for one.
    pub callback: Option<CallbackRecord>,
    /// The latest progress report of its worker, when there was one.
    pub progress: Option<ProgressRecord>,
}

/// The latest progress report of a call, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressRecord {
    /// From 0 to 1.
    pub fraction: f64,
    /// What the worker said, if anything.
    pub note: Option<String>,
    /// When it was recorded, ms.
    pub at_ms: i64,
}

impl Eq for ProgressRecord {}

/// A call to store.
#[derive(Debug, Clone)]
pub struct NewCall {
    /// The call id.
    pub id: String,
    /// The caller.
    pub caller: String,
    /// The service.
    pub service: String,
    /// Accepted at, ms.
    pub created_ms: i64,
    /// The service's deadline, ms.
    pub deadline_ms: i64,
    /// Whether the request is already confirmed by the broker.
    pub published: bool,
    /// `Idempotency-Key`.
    pub idem_key: Option<String>,
    /// Hash of the request, with `idem_key`.
    pub body_hash: Option<String>,
    /// Trace context.
    pub traceparent: Option<String>,
    /// `Callback-Url`.
    pub callback_url: Option<String>,
}

impl NewCall {
    /// The record as stored right after [`CallStore::insert`].
    pub fn to_record(&self) -> CallRecord {
        CallRecord {
            id: self.id.clone(),
            caller: self.caller.clone(),
            service: self.service.clone(),
            status: CallStatus::Pending,
            created_ms: self.created_ms,
            completed_ms: None,
            deadline_ms: self.deadline_ms,
            published: self.published,
            idem_key: self.idem_key.clone(),
            body_hash: self.body_hash.clone(),
            traceparent: self.traceparent.clone(),
            result: None,
            callback: self.callback_url.clone().map(CallbackRecord::waiting),
            progress: None,
        }
    }
}

/// What [`CallStore::insert`] did.
#[derive(Debug)]
pub enum Inserted {
    /// Stored as new.
    New,
    /// The caller already made a call with this idempotency key: this one.
    Existing(Box<CallRecord>),
}

/// The outcome of one callback attempt, to record.
#[derive(Debug, Clone)]
pub enum CallbackOutcome {
    /// Delivered.
    Delivered,
    /// Failed; try again at `next_ms`.
    Retry {
        /// When.
        next_ms: i64,
        /// Why it failed.
        error: String,
    },
    /// Failed for good.
    Dead {
        /// Why.
        error: String,
    },
    /// Not attempted (its host is paused): due again at `next_ms`, no
    /// attempt spent.
    Deferred {
        /// When.
        next_ms: i64,
        /// Why it waits.
        reason: String,
    },
}

/// Which SQL engine is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CallStore {
    /// Reads; on PostgreSQL, writes too.
    pool: AnyPool,
    /// Writes. On SQLite, a pool of one connection: SQLite takes one writer
    /// at a time, and a writer that finds the lock taken by another
    /// connection of this process sleeps in SQLite's busy handler (1, 2,
    /// 5, 10 ms and up) instead of queueing: at 32 concurrent 202 calls that
    /// sleep was most of a call's latency (BENCHMARKS.md, `bench http`).
    /// Writers queue for this connection instead, in order, without sleeping.
    writer: AnyPool,
    /// Group commit of the frequent writes, on `writer` (see `batch`).
    batch: batch::Batcher,
    backend: Backend,
    /// The gateway instance using this handle ([`CallStore::for_instance`]):
    /// recorded on the calls it stores (their replies come to its reply
    /// queue) and as the owner of the callback leases it takes. `None`
    /// (a store opened by a tool or a test): calls belong to no instance.
    instance: Option<std::sync::Arc<str>>,
}

const COLUMNS: &str = "id, caller, service, status, created_ms, completed_ms, deadline_ms, published, \
     idem_key, body_hash, traceparent, result_status, result_content_type, result_body, \
     callback_url, callback_state, callback_attempts, callback_next_ms, callback_error, \
     callback_event_id, callback_body, progress, progress_note, progress_ms";

/// Columns added after the first release, with their type: added to a
/// store made before them when it opens.
fn added_columns(backend: Backend) -> [(&'static str, &'static str); 7] {
    let real = match backend {
        Backend::Sqlite => "REAL",
        Backend::Postgres => "DOUBLE PRECISION",
    };
    [
        ("progress", real),
        ("progress_note", "TEXT"),
        ("progress_ms", "BIGINT"),
        // The instance whose reply queue the call's reply goes to (see
        // [`instances`]); NULL for calls stored before it existed.
        ("instance", "TEXT"),
        // Who is delivering the callback now, and until when (see
        // [`CallStore::claim_due_callbacks`]).
        ("lease_owner", "TEXT"),
        ("lease_until", "BIGINT"),
        // The instance that ended the call in a way no message tells again
        // (expired, cancelled) and has not yet seen its end event
        // confirmed; NULL otherwise (see [`CallStore::owed_end_events`]).
        ("end_event_pending", "TEXT"),
    ]
}

fn schema(backend: Backend) -> Vec<String> {
    let blob = match backend {
        Backend::Sqlite => "BLOB",
        Backend::Postgres => "BYTEA",
    };
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS sb_calls (
                id TEXT PRIMARY KEY,
                caller TEXT NOT NULL,
                service TEXT NOT NULL,
                status TEXT NOT NULL,
                created_ms BIGINT NOT NULL,
                completed_ms BIGINT,
                deadline_ms BIGINT NOT NULL,
                published BIGINT NOT NULL,
                idem_key TEXT,
                body_hash TEXT,
                traceparent TEXT,
                result_status BIGINT,
                result_content_type TEXT,
                result_body {blob},
                callback_url TEXT,
                callback_state TEXT,
                callback_attempts BIGINT NOT NULL DEFAULT 0,
                callback_next_ms BIGINT,
                callback_error TEXT,
                callback_event_id TEXT,
                callback_body {blob},
                progress {real},
                progress_note TEXT,
                progress_ms BIGINT
            )",
            real = added_columns(backend)[0].1
        ),
        "CREATE TABLE IF NOT EXISTS sb_callback_attempts (
                call_id TEXT NOT NULL,
                n BIGINT NOT NULL,
                at_ms BIGINT NOT NULL,
                duration_ms BIGINT NOT NULL,
                status BIGINT,
                error TEXT,
                next_ms BIGINT,
                PRIMARY KEY (call_id, n)
            )"
        .into(),
        "CREATE UNIQUE INDEX IF NOT EXISTS sb_calls_idem ON sb_calls (caller, idem_key)".into(),
        "CREATE INDEX IF NOT EXISTS sb_calls_status ON sb_calls (status, deadline_ms)".into(),
        // A caller's pending calls, counted against its gateway.limits.max_pending.
        "CREATE INDEX IF NOT EXISTS sb_calls_caller ON sb_calls (caller, status)".into(),
        "CREATE INDEX IF NOT EXISTS sb_calls_callbacks ON sb_calls (callback_state, callback_next_ms)"
            .into(),
        instances::SCHEMA.into(),
    ]
}

/// Indexes on columns of [`added_columns`], made once they exist.
const ADDED_INDEXES: [&str; 2] = [
    // An instance's pending calls, counted before its adopter lets it go.
    "CREATE INDEX IF NOT EXISTS sb_calls_instance ON sb_calls (instance, status)",
    // End events owed, by instance. Partial: a call stored or ended by a
    // reply (NULL) adds no index entry.
    "CREATE INDEX IF NOT EXISTS sb_calls_end_event_pending ON sb_calls (end_event_pending) \
     WHERE end_event_pending IS NOT NULL",
];

/// The PostgreSQL advisory lock key held while the schema is created
/// (any constant; this one spells "sbschema" in ASCII).
const SCHEMA_LOCK: i64 = 0x7362_7363_6865_6d61;

/// How the call store failed ([`Error::Store`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be opened, or its schema made. `url` has its
    /// password hidden; sqlx's error does not carry the URL.
    #[error("cannot open the call store {url}: {source}")]
    Open {
        /// The store's URL, redacted.
        url: String,
        /// sqlx's error.
        #[source]
        source: sqlx::Error,
    },
    /// A statement failed.
    #[error("{0}")]
    Query(#[source] sqlx::Error),
    /// An insert took nothing, yet no call holds its idempotency key.
    #[error("call {0} could not be stored")]
    NotStored(String),
}

fn db(e: sqlx::Error) -> Error {
    Error::Store(StoreError::Query(e))
}

impl CallStore {
    /// Opens (and creates, for SQLite with `mode=rwc`) the store at `url`
    /// and its schema.
    pub async fn open(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let mut opts = AnyPoolOptions::new().max_connections(match backend {
            // One writer at a time in SQLite anyway; a few readers beside it.
            Backend::Sqlite => 4,
            Backend::Postgres => 8,
        });
        if backend == Backend::Sqlite {
            // An SQLite connection is a file opened by this process: nothing
            // between can break it, and the ping sqlx makes on every
            // acquire by default is a round trip to the connection's worker
            // thread for each statement (BENCHMARKS.md, "202 calls and
            // synchronous calls: what each costs").
            opts = opts.test_before_acquire(false);
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL: readers never wait for the writer. NORMAL: a commit
                    // survives the process being killed (not a power loss).
                    sqlx::query("PRAGMA journal_mode=WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous=NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout=5000")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        // The schema is made on a connection of its own before the pool
        // opens any: an SQLite connection opened before a `CREATE INDEX` can
        // keep an old schema and refuse `ON CONFLICT` on that index.
        let opening = |source: sqlx::Error| {
            Error::Store(StoreError::Open {
                url: crate::settings::redact_url(url),
                source,
            })
        };
        let mut conn = sqlx::AnyConnection::connect(url).await.map_err(opening)?;
        let mut tx = conn.begin().await.map_err(db)?;
        if backend == Backend::Postgres {
            // `CREATE ... IF NOT EXISTS` run by two sessions at once can both
            // try to create, and one fails: stores opened together (gateways
            // started at once) take turns under an advisory lock, released at
            // commit. SQLite serialises writers by itself.
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(SCHEMA_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        for stmt in schema(backend) {
            sqlx::query(&stmt).execute(&mut *tx).await.map_err(db)?;
        }
        for (column, ty) in added_columns(backend) {
            let exists = match backend {
                Backend::Sqlite => sqlx::query(
                    "SELECT COUNT(*) FROM pragma_table_info('sb_calls') WHERE name = $1",
                ),
                Backend::Postgres => sqlx::query(
                    "SELECT COUNT(*) FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name = 'sb_calls' \
                     AND column_name = $1",
                ),
            }
            .bind(column)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .try_get::<i64, _>(0)
            .map_err(db)?;
            if exists == 0 {
                sqlx::query(&format!("ALTER TABLE sb_calls ADD COLUMN {column} {ty}"))
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
            }
        }
        for stmt in ADDED_INDEXES {
            sqlx::query(stmt).execute(&mut *tx).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        let _ = conn.close().await;
        let writer = match backend {
            Backend::Sqlite => opts
                .clone()
                .max_connections(1)
                .connect(url)
                .await
                .map_err(opening)?,
            Backend::Postgres => opts.clone().connect(url).await.map_err(opening)?,
        };
        let pool = match backend {
            Backend::Sqlite => opts.connect(url).await.map_err(opening)?,
            Backend::Postgres => writer.clone(),
        };
        let batch = batch::Batcher::start(writer.clone());
        Ok(Self {
            pool,
            writer,
            batch,
            backend,
            instance: None,
        })
    }

    /// This handle as used by gateway instance `id`: the calls it stores
    /// are recorded as that instance's, and its callback leases are held in
    /// that name.
    pub fn for_instance(mut self, id: &str) -> Self {
        self.instance = Some(id.into());
        self
    }

    /// The instance of [`CallStore::for_instance`], if any.
    pub fn instance(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    /// Stores a new pending call. With an idempotency key the caller already
    /// used, stores nothing and returns that call.
    pub async fn insert(&self, call: &NewCall) -> Result<Inserted> {
        let callback_state = call
            .callback_url
            .as_ref()
            .map(|_| CallbackState::Waiting.as_str());
        let done = self
            .batch
            .execute(Stmt {
                sql: "INSERT INTO sb_calls (id, caller, service, status, created_ms, deadline_ms, \
                      published, idem_key, body_hash, traceparent, callback_url, callback_state, \
                      callback_attempts, instance) \
                      VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, 0, $12) \
                      ON CONFLICT (caller, idem_key) DO NOTHING",
                args: vec![
                    Arg::Text(Some(call.id.clone())),
                    Arg::Text(Some(call.caller.clone())),
                    Arg::Text(Some(call.service.clone())),
                    Arg::Int(Some(call.created_ms)),
                    Arg::Int(Some(call.deadline_ms)),
                    Arg::Int(Some(i64::from(call.published))),
                    Arg::Text(call.idem_key.clone()),
                    Arg::Text(call.body_hash.clone()),
                    Arg::Text(call.traceparent.clone()),
                    Arg::Text(call.callback_url.clone()),
                    Arg::Text(callback_state.map(str::to_owned)),
                    Arg::Text(self.instance().map(str::to_owned)),
                ],
            })
            .await
            .map_err(db)?;
        if done == 1 {
            return Ok(Inserted::New);
        }
        let key = call.idem_key.as_deref().unwrap_or_default();
        let existing = self
            .by_idempotency_key(&call.caller, key)
            .await?
            .ok_or_else(|| Error::Store(StoreError::NotStored(call.id.clone())))?;
        Ok(Inserted::Existing(Box::new(existing)))
    }

    /// The caller's call with this idempotency key.
    pub async fn by_idempotency_key(&self, caller: &str, key: &str) -> Result<Option<CallRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM sb_calls WHERE caller = $1 AND idem_key = $2");
        let row = sqlx::query(&sql)
            .bind(caller)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|r| record(&r)).transpose()
    }

    /// Marks the call's request as confirmed by the broker.
    pub async fn mark_published(&self, id: &str) -> Result<()> {
        self.batch
            .execute(Stmt {
                sql: "UPDATE sb_calls SET published = 1 WHERE id = $1",
                args: vec![Arg::Text(Some(id.to_owned()))],
            })
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Removes a call (one whose request could not be published).
    pub async fn delete(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM sb_calls WHERE id = $1")
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// How many calls of `caller` are pending, counting up to `cap` (the
    /// count stops there: it is compared with a bound).
    pub async fn count_pending(&self, caller: &str, cap: usize) -> Result<usize> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM (SELECT 1 FROM sb_calls \
             WHERE caller = $1 AND status = 'pending' LIMIT $2) AS p",
        )
        .bind(caller)
        .bind(i64::try_from(cap).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let n: i64 = row.try_get(0).map_err(db)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// One call, with its callback's attempts.
    pub async fn get(&self, id: &str) -> Result<Option<CallRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM sb_calls WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let Some(mut call) = row.map(|r| record(&r)).transpose()? else {
            return Ok(None);
        };
        if let Some(cb) = call.callback.as_mut()
            && cb.state != CallbackState::Waiting
        {
            cb.history = self.attempts(id).await?;
        }
        Ok(Some(call))
    }

    /// Ends a pending call with `status` and `result`; `callback` carries the
    /// event id and exact bytes to deliver when the call has a callback.
    /// Returns false (and changes nothing) when the call was not pending.
    pub async fn complete(
        &self,
        id: &str,
        status: CallStatus,
        result: Option<&StoredResult>,
        completed_ms: i64,
        callback: Option<(&str, &[u8])>,
    ) -> Result<bool> {
        let owes = self.owes(status);
        let sql = if owes.is_some() {
            "UPDATE sb_calls SET status = $1, completed_ms = $2, result_status = $3, \
             result_content_type = $4, result_body = $5, \
             callback_state = CASE WHEN callback_url IS NULL THEN NULL ELSE $6 END, \
             callback_next_ms = CASE WHEN callback_url IS NULL THEN NULL ELSE $2 END, \
             callback_event_id = $7, callback_body = $8, end_event_pending = $10 \
             WHERE id = $9 AND status = 'pending'"
        } else {
            "UPDATE sb_calls SET status = $1, completed_ms = $2, result_status = $3, \
             result_content_type = $4, result_body = $5, \
             callback_state = CASE WHEN callback_url IS NULL THEN NULL ELSE $6 END, \
             callback_next_ms = CASE WHEN callback_url IS NULL THEN NULL ELSE $2 END, \
             callback_event_id = $7, callback_body = $8 \
             WHERE id = $9 AND status = 'pending'"
        };
        let mut args = vec![
            Arg::Text(Some(status.as_str().to_owned())),
            Arg::Int(Some(completed_ms)),
            Arg::Int(result.map(|r| i64::from(r.status))),
            Arg::Text(result.map(|r| r.content_type.clone())),
            Arg::Blob(result.map(|r| r.body.clone())),
            Arg::Text(Some(CallbackState::Pending.as_str().to_owned())),
            Arg::Text(callback.map(|c| c.0.to_owned())),
            Arg::Blob(callback.map(|c| c.1.to_vec())),
            Arg::Text(Some(id.to_owned())),
        ];
        if let Some(me) = owes {
            args.push(Arg::Text(Some(me.to_owned())));
        }
        let done = self.batch.execute(Stmt { sql, args }).await.map_err(db)?;
        Ok(done == 1)
    }

    /// Ends a pending call without a callback, as [`CallStore::complete`],
    /// in one statement that also returns it (`UPDATE … RETURNING`): no read
    /// first. The call as it now is; `None` (and nothing changed) when it is
    /// unknown, not pending, or has a callback (whose delivery needs the
    /// call's document before the end is stored: [`CallStore::complete`]).
    pub async fn complete_plain(
        &self,
        id: &str,
        status: CallStatus,
        result: Option<StoredResult>,
        completed_ms: i64,
    ) -> Result<Option<CallRecord>> {
        let owes = self.owes(status);
        let sql = if owes.is_some() {
            "UPDATE sb_calls SET status = $1, completed_ms = $2, result_status = $3, \
             result_content_type = $4, result_body = $5, end_event_pending = $7 \
             WHERE id = $6 AND status = 'pending' AND callback_url IS NULL \
             RETURNING id, caller, service, created_ms, deadline_ms, published, \
             idem_key, body_hash, traceparent, progress, progress_note, progress_ms"
        } else {
            "UPDATE sb_calls SET status = $1, completed_ms = $2, result_status = $3, \
             result_content_type = $4, result_body = $5 \
             WHERE id = $6 AND status = 'pending' AND callback_url IS NULL \
             RETURNING id, caller, service, created_ms, deadline_ms, published, \
             idem_key, body_hash, traceparent, progress, progress_note, progress_ms"
        };
        let mut args = vec![
            Arg::Text(Some(status.as_str().to_owned())),
            Arg::Int(Some(completed_ms)),
            Arg::Int(result.as_ref().map(|r| i64::from(r.status))),
            Arg::Text(result.as_ref().map(|r| r.content_type.clone())),
            Arg::Blob(result.as_ref().map(|r| r.body.clone())),
            Arg::Text(Some(id.to_owned())),
        ];
        if let Some(me) = owes {
            args.push(Arg::Text(Some(me.to_owned())));
        }
        let row = self.batch.fetch(Stmt { sql, args }).await.map_err(db)?;
        let Some(r) = row else {
            return Ok(None);
        };
        let get_os = |c: &str| r.try_get::<Option<String>, _>(c).map_err(db);
        let get_i = |c: &str| r.try_get::<i64, _>(c).map_err(db);
        let progress = match r.try_get::<Option<f64>, _>("progress").map_err(db)? {
            Some(fraction) => Some(ProgressRecord {
                fraction,
                note: get_os("progress_note")?,
                at_ms: r
                    .try_get::<Option<i64>, _>("progress_ms")
                    .map_err(db)?
                    .unwrap_or_default(),
            }),
            None => None,
        };
        Ok(Some(CallRecord {
            id: r.try_get::<String, _>("id").map_err(db)?,
            caller: r.try_get::<String, _>("caller").map_err(db)?,
            service: r.try_get::<String, _>("service").map_err(db)?,
            status,
            created_ms: get_i("created_ms")?,
            completed_ms: Some(completed_ms),
            deadline_ms: get_i("deadline_ms")?,
            published: get_i("published")? != 0,
            idem_key: get_os("idem_key")?,
            body_hash: get_os("body_hash")?,
            traceparent: get_os("traceparent")?,
            result,
            callback: None,
            progress,
        }))
    }

    /// The instance that owes the end event of a call ended with `status`,
    /// if it owes one: an end that no message tells again (expired,
    /// cancelled) is flagged with this handle's instance by the very
    /// `UPDATE` that stores it (`end_event_pending`), until the event is
    /// confirmed ([`CallStore::end_event_published`]). An end told by a
    /// reply or a dead letter is not: its message is acked only after its
    /// event, and it is the one written on the hot path.
    fn owes(&self, status: CallStatus) -> Option<&str> {
        match status {
            CallStatus::Expired | CallStatus::Cancelled => self.instance(),
            _ => None,
        }
    }

    /// Ended calls whose end event instance `of` owes (flagged by
    /// [`CallStore::complete`] or [`CallStore::complete_plain`], not
    /// confirmed yet), ended before `ended_before_ms`, at most `limit`;
    /// each with whether `of` also stored it (its `accepted` was `of`'s to
    /// publish).
    pub async fn owed_end_events(
        &self,
        of: &str,
        ended_before_ms: i64,
        limit: i64,
    ) -> Result<Vec<(CallRecord, bool)>> {
        let sql = format!(
            "SELECT {COLUMNS}, instance FROM sb_calls WHERE end_event_pending = $1 \
             AND completed_ms < $2 ORDER BY completed_ms LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(of)
            .bind(ended_before_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                let stored_by = r.try_get::<Option<String>, _>("instance").map_err(db)?;
                Ok((record(r)?, stored_by.as_deref() == Some(of)))
            })
            .collect()
    }

    /// Call `id` if its end event is owed (by any instance): see
    /// [`CallStore::owed_end_events`].
    pub async fn owed_end_event(&self, id: &str) -> Result<Option<CallRecord>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sb_calls WHERE id = $1 AND end_event_pending IS NOT NULL"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|r| record(&r)).transpose()
    }

    /// Records that call `id`'s end event was confirmed: nobody owes it
    /// any more (a grouped write).
    pub async fn end_event_published(&self, id: &str) -> Result<()> {
        self.batch
            .execute(Stmt {
                sql: "UPDATE sb_calls SET end_event_pending = NULL \
                      WHERE id = $1 AND end_event_pending IS NOT NULL",
                args: vec![Arg::Text(Some(id.to_owned()))],
            })
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Records the latest progress of call `id` while it is pending;
    /// returns false (and changes nothing) when it is not.
    pub async fn record_progress(
        &self,
        id: &str,
        fraction: f64,
        note: Option<&str>,
        at_ms: i64,
    ) -> Result<bool> {
        let done = self
            .batch
            .execute(Stmt {
                sql: "UPDATE sb_calls SET progress = $1, progress_note = $2, progress_ms = $3 \
                      WHERE id = $4 AND status = 'pending'",
                args: vec![
                    Arg::Real(Some(fraction)),
                    Arg::Text(note.map(str::to_owned)),
                    Arg::Int(Some(at_ms)),
                    Arg::Text(Some(id.to_owned())),
                ],
            })
            .await
            .map_err(db)?;
        Ok(done == 1)
    }

    /// Ids and deadlines of every pending call (to resume after a restart).
    pub async fn pending(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT id, deadline_ms FROM sb_calls WHERE status = 'pending' AND published = 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0).map_err(db)?,
                    r.try_get::<i64, _>(1).map_err(db)?,
                ))
            })
            .collect()
    }

    /// Pending calls whose deadline passed before `now_ms`, that this
    /// handle's instance may expire: every such call except those of an
    /// instance silent for [`instances::SILENT_AFTER`] whose replies have
    /// not been drained yet by this instance as its adopter
    /// ([`instances`]): their replies may be waiting in the dead
    /// instance's queue, and a call must not be expired while its reply
    /// sits there unread.
    pub async fn overdue(&self, now_ms: i64, limit: i64) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT c.id FROM sb_calls c WHERE c.status = 'pending' AND c.deadline_ms < $1 \
             AND NOT EXISTS (SELECT 1 FROM sb_instances i WHERE i.id = c.instance \
             AND i.id <> $2 AND i.last_seen_ms < {now} - $3 \
             AND NOT (COALESCE(i.adopted_by, '') = $2 AND i.drained = 1)) \
             LIMIT $4",
            now = instances::db_now(self.backend)
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms)
            .bind(self.instance().unwrap_or_default())
            .bind(instances::SILENT_AFTER.as_millis() as i64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(db))
            .collect()
    }

    /// Removes calls never confirmed by the broker that were stored before
    /// `created_before_ms`: their caller got no `202`, so as far as anyone
    /// knows they never existed (and a retry with the same idempotency key
    /// starts afresh). Only old ones: with several gateways on one store,
    /// a younger one may be another live gateway's call whose confirm is
    /// still on its way ([`instances::UNSENT_GRACE`]).
    pub async fn drop_unpublished(&self, created_before_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM sb_calls WHERE published = 0 AND status = 'pending' AND created_ms < $1",
        )
        .bind(created_before_ms)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(done.rows_affected())
    }

    /// Removes calls that ended before `before_ms` and whose callback, if
    /// any, is settled.
    pub async fn purge(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM sb_calls WHERE status <> 'pending' AND completed_ms < $1 \
             AND (callback_state IS NULL OR callback_state IN ('delivered', 'dead'))",
        )
        .bind(before_ms)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        if done.rows_affected() > 0 {
            sqlx::query(
                "DELETE FROM sb_callback_attempts WHERE call_id NOT IN (SELECT id FROM sb_calls)",
            )
            .execute(&self.writer)
            .await
            .map_err(db)?;
        }
        Ok(done.rows_affected())
    }

    /// Calls whose callback is due at `now_ms`, oldest first.
    pub async fn due_callbacks(&self, now_ms: i64, limit: i64) -> Result<Vec<CallRecord>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sb_calls WHERE callback_state = 'pending' \
             AND callback_next_ms <= $1 ORDER BY callback_next_ms LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(record).collect()
    }

    /// When the next pending callback is due, if any: a callback leased
    /// by a dispatcher (here or in another gateway) not before its lease
    /// ends ([`CallStore::claim_due_callbacks`]).
    pub async fn next_callback_ms(&self) -> Result<Option<i64>> {
        let row = sqlx::query(
            "SELECT MIN(CASE WHEN lease_until IS NOT NULL AND lease_until > callback_next_ms \
             THEN lease_until ELSE callback_next_ms END) \
             FROM sb_calls WHERE callback_state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        row.try_get::<Option<i64>, _>(0).map_err(db)
    }

    /// Records one callback attempt's outcome (no entry in its history).
    pub async fn record_callback(&self, id: &str, outcome: &CallbackOutcome) -> Result<()> {
        self.record_attempt(id, outcome, None).await
    }

    /// Records one callback attempt's outcome and, when given, the attempt
    /// in the callback's history (numbered after the last one), at once.
    pub async fn record_attempt(
        &self,
        id: &str,
        outcome: &CallbackOutcome,
        attempt: Option<(i64, i64, Option<u16>)>,
    ) -> Result<()> {
        let (state, next, error) = match outcome {
            CallbackOutcome::Delivered => (CallbackState::Delivered, None, None),
            CallbackOutcome::Retry { next_ms, error } => {
                (CallbackState::Pending, Some(*next_ms), Some(error.as_str()))
            }
            CallbackOutcome::Dead { error } => (CallbackState::Dead, None, Some(error.as_str())),
            CallbackOutcome::Deferred { next_ms, reason } => {
                sqlx::query(
                    "UPDATE sb_calls SET callback_next_ms = $1, callback_error = $2, \
                     lease_owner = NULL, lease_until = NULL \
                     WHERE id = $3 AND callback_state = 'pending'",
                )
                .bind(next_ms)
                .bind(reason.as_str())
                .bind(id)
                .execute(&self.writer)
                .await
                .map_err(db)?;
                return Ok(());
            }
        };
        let mut tx = self.writer.begin().await.map_err(db)?;
        sqlx::query(
            "UPDATE sb_calls SET callback_state = $1, callback_next_ms = $2, callback_error = $3, \
             callback_attempts = callback_attempts + 1, lease_owner = NULL, lease_until = NULL \
             WHERE id = $4",
        )
        .bind(state.as_str())
        .bind(next)
        .bind(error)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if let Some((at_ms, duration_ms, status)) = attempt {
            sqlx::query(
                "INSERT INTO sb_callback_attempts (call_id, n, at_ms, duration_ms, status, error, next_ms) \
                 SELECT $1, COALESCE(MAX(n), 0) + 1, $2, $3, $4, $5, $6 \
                 FROM sb_callback_attempts WHERE call_id = $1",
            )
            .bind(id)
            .bind(at_ms)
            .bind(duration_ms)
            .bind(status.map(i64::from))
            .bind(error)
            .bind(next)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    /// Sends a dead-lettered callback again: due now, a new round of
    /// attempts (the same event id and body; the signature is made at each
    /// attempt). False (and nothing changes) when it is not dead.
    pub async fn retry_callback(&self, id: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sb_calls SET callback_state = 'pending', callback_next_ms = $1, \
             callback_attempts = 0, lease_owner = NULL, lease_until = NULL \
             WHERE id = $2 AND callback_state = 'dead'",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    /// The last [`MAX_ATTEMPTS_SHOWN`] attempts of call `id`'s callback,
    /// oldest first.
    pub async fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>> {
        let rows = sqlx::query(
            "SELECT n, at_ms, duration_ms, status, error, next_ms FROM sb_callback_attempts \
             WHERE call_id = $1 ORDER BY n DESC LIMIT $2",
        )
        .bind(id)
        .bind(MAX_ATTEMPTS_SHOWN)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(AttemptRecord {
                    number: u32::try_from(r.try_get::<i64, _>(0).map_err(db)?).unwrap_or(u32::MAX),
                    at_ms: r.try_get::<i64, _>(1).map_err(db)?,
                    duration_ms: r.try_get::<i64, _>(2).map_err(db)?,
                    status: r
                        .try_get::<Option<i64>, _>(3)
                        .map_err(db)?
                        .and_then(|s| u16::try_from(s).ok()),
                    error: r.try_get::<Option<String>, _>(4).map_err(db)?,
                    next_ms: r.try_get::<Option<i64>, _>(5).map_err(db)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

fn record(r: &AnyRow) -> Result<CallRecord> {
    let get_s = |c: &str| r.try_get::<String, _>(c).map_err(db);
    let get_os = |c: &str| r.try_get::<Option<String>, _>(c).map_err(db);
    let get_oi = |c: &str| r.try_get::<Option<i64>, _>(c).map_err(db);
    let get_ob = |c: &str| r.try_get::<Option<Vec<u8>>, _>(c).map_err(db);
    let result = match get_oi("result_status")? {
        Some(status) => Some(StoredResult {
            status: u16::try_from(status).unwrap_or(502),
            content_type: get_os("result_content_type")?.unwrap_or_default(),
            body: get_ob("result_body")?.unwrap_or_default(),
        }),
        None => None,
    };
    let callback = match get_os("callback_url")? {
        Some(url) => Some(CallbackRecord {
            url,
            state: CallbackState::parse(
                &get_os("callback_state")?.unwrap_or_else(|| "waiting".into()),
            )?,
            attempts: u32::try_from(r.try_get::<i64, _>("callback_attempts").map_err(db)?)
                .unwrap_or(u32::MAX),
            next_ms: get_oi("callback_next_ms")?,
            last_error: get_os("callback_error")?,
            event_id: get_os("callback_event_id")?,
            body: get_ob("callback_body")?,
            history: Vec::new(),
        }),
        None => None,
    };
    let progress = match r.try_get::<Option<f64>, _>("progress").map_err(db)? {
        Some(fraction) => Some(ProgressRecord {
            fraction,
            note: get_os("progress_note")?,
            at_ms: get_oi("progress_ms")?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(CallRecord {
        id: get_s("id")?,
        caller: get_s("caller")?,
        service: get_s("service")?,
        status: get_s("status")?.parse()?,
        created_ms: r.try_get::<i64, _>("created_ms").map_err(db)?,
        completed_ms: get_oi("completed_ms")?,
        deadline_ms: r.try_get::<i64, _>("deadline_ms").map_err(db)?,
        published: r.try_get::<i64, _>("published").map_err(db)? != 0,
        idem_key: get_os("idem_key")?,
        body_hash: get_os("body_hash")?,
        traceparent: get_os("traceparent")?,
        result,
        callback,
        progress,
    })
}
