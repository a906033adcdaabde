//! Several gateways on one store: who is alive, who drains the queues of
//! one that died, and who delivers which callback.
//!
//! A gateway's `202` calls get their replies on its own reply queue
//! (`<prefix>.reply.<instance>`), and its dead-letter watch reads its own
//! `<prefix>.deadwatch.<instance>`. When the gateway dies, nobody reads
//! them, and its calls would end `expired` with their replies unread. So:
//! - every gateway keeps a row in `sb_instances` (its id, its two queues,
//!   `last_seen_ms` by the *database's* clock, so that gateways on hosts
//!   whose clocks disagree still agree on who is silent), refreshed every
//!   [`HEARTBEAT`], and sets it silent at once on a graceful stop;
//! - a live gateway claims a gateway silent for [`SILENT_AFTER`] with a
//!   conditional `UPDATE` (one claimant wins), drains its queues into its
//!   own tracker (`calls::adopt`) and, once the queues are empty and the
//!   dead gateway has no pending call left, deletes the queues and the row;
//! - a dead gateway's calls are not expired by anyone until its adopter has
//!   drained its queue once ([`CallStore::overdue`]);
//! - due callbacks are leased ([`CallStore::claim_due_callbacks`]) so that
//!   one dispatcher delivers each.
//!
//! # Layout
//! - constants ([`HEARTBEAT`], [`SILENT_AFTER`], [`UNSENT_GRACE`], [`LEASE_MARGIN`]);
//! - [`Silent`], an instance claimed for adoption;
//! - the [`CallStore`] methods of liveness, adoption and leases.

use std::time::Duration;

use sqlx::Row;

use super::{Backend, COLUMNS, CallRecord, CallStore, db, record};
use crate::error::Result;

/// How often a gateway refreshes its row in `sb_instances`.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a gateway's row may go unrefreshed before another adopts its
/// queues: five missed heartbeats, so that a gateway paused by a slow store
/// or a long garbage collection of its host is not taken for dead, while
/// the replies of one that died wait seconds, not minutes.
pub const SILENT_AFTER: Duration = Duration::from_secs(10);

/// How long a stored call whose request's publish was never confirmed is
/// kept before it is dropped as unsent. Its gateway may still be waiting
/// for the confirm (bounded by `amqp.confirm_timeout_ms` and a few publish
/// attempts, seconds): dropped earlier, a call that is then confirmed and
/// answered with a `202` would vanish.
pub const UNSENT_GRACE: Duration = Duration::from_secs(120);

/// How much longer than one attempt's timeout (`callbacks.timeout_ms`) a
/// callback lease lasts: the attempt and the recording of its outcome must
/// fit in it, or another gateway may deliver the same callback again.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// The table of gateway instances (see the module's documentation).
pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sb_instances (
    id TEXT PRIMARY KEY,
    reply_queue TEXT NOT NULL,
    deadwatch_queue TEXT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    adopted_by TEXT,
    drained BIGINT NOT NULL DEFAULT 0
)";

/// The database's clock in ms since the Unix epoch, as SQL.
pub(super) fn db_now(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    }
}

/// A silent instance, claimed by this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Silent {
    /// Its instance id.
    pub id: String,
    /// Its reply queue.
    pub reply_queue: String,
    /// Its dead-letter watch queue.
    pub deadwatch_queue: String,
}

impl CallStore {
    fn me(&self) -> &str {
        self.instance().unwrap_or_default()
    }

    /// Records that this handle's instance is alive now, with its queues;
    /// a claim on it by an adopter is withdrawn (it came back).
    pub async fn heartbeat(&self, reply_queue: &str, deadwatch_queue: &str) -> Result<()> {
        let now = db_now(self.backend);
        let sql = format!(
            "INSERT INTO sb_instances (id, reply_queue, deadwatch_queue, last_seen_ms, adopted_by, drained) \
             VALUES ($1, $2, $3, {now}, NULL, 0) \
             ON CONFLICT (id) DO UPDATE SET reply_queue = $2, deadwatch_queue = $3, \
             last_seen_ms = {now}, adopted_by = NULL, drained = 0"
        );
        sqlx::query(&sql)
            .bind(self.me())
            .bind(reply_queue)
            .bind(deadwatch_queue)
            .execute(&self.writer)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Marks this handle's instance silent at once (a graceful stop): its
    /// queues are adopted without waiting for [`SILENT_AFTER`].
    pub async fn mark_gone(&self) -> Result<()> {
        sqlx::query("UPDATE sb_instances SET last_seen_ms = 0 WHERE id = $1")
            .bind(self.me())
            .execute(&self.writer)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Claims one instance silent for `silent_after` that nobody alive has
    /// adopted (never adopted, or its adopter is silent too), for this
    /// handle's instance. The claim is a conditional `UPDATE` on the
    /// adopter seen: of several gateways claiming at once, one wins.
    pub async fn claim_silent(&self, silent_after: Duration) -> Result<Option<Silent>> {
        let now = db_now(self.backend);
        let silent_ms = i64::try_from(silent_after.as_millis()).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT id, reply_queue, deadwatch_queue, adopted_by FROM sb_instances \
             WHERE id <> $1 AND last_seen_ms < {now} - $2 \
             AND (adopted_by IS NULL OR (adopted_by <> $1 AND adopted_by NOT IN \
             (SELECT id FROM sb_instances WHERE last_seen_ms >= {now} - $2))) \
             ORDER BY last_seen_ms LIMIT 8"
        );
        let rows = sqlx::query(&sql)
            .bind(self.me())
            .bind(silent_ms)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        for r in rows {
            let silent = Silent {
                id: r.try_get(0).map_err(db)?,
                reply_queue: r.try_get(1).map_err(db)?,
                deadwatch_queue: r.try_get(2).map_err(db)?,
            };
            let seen: Option<String> = r.try_get(3).map_err(db)?;
            let sql = format!(
                "UPDATE sb_instances SET adopted_by = $1, drained = 0 \
                 WHERE id = $2 AND COALESCE(adopted_by, '') = $3 AND last_seen_ms < {now} - $4"
            );
            let done = sqlx::query(&sql)
                .bind(self.me())
                .bind(&silent.id)
                .bind(seen.unwrap_or_default())
                .bind(silent_ms)
                .execute(&self.writer)
                .await
                .map_err(db)?;
            if done.rows_affected() == 1 {
                return Ok(Some(silent));
            }
        }
        Ok(None)
    }

    /// Whether instance `id` is still adopted by this handle's instance
    /// (false once it came back, or another took it over).
    pub async fn still_adopted(&self, id: &str) -> Result<bool> {
        let n: i64 =
            sqlx::query("SELECT COUNT(*) FROM sb_instances WHERE id = $1 AND adopted_by = $2")
                .bind(id)
                .bind(self.me())
                .fetch_one(&self.pool)
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
        Ok(n == 1)
    }

    /// Gives up the adoption of instance `id` (its adopter failed): it is
    /// claimed again at a later look, here or by another gateway.
    pub async fn withdraw(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE sb_instances SET adopted_by = NULL WHERE id = $1 AND adopted_by = $2")
            .bind(id)
            .bind(self.me())
            .execute(&self.writer)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Records that the adopted instance `id`'s queue was found empty once:
    /// its calls past their deadline may be expired from now on
    /// ([`CallStore::overdue`]).
    pub async fn mark_drained(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE sb_instances SET drained = 1 WHERE id = $1 AND adopted_by = $2")
            .bind(id)
            .bind(self.me())
            .execute(&self.writer)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// How many calls of instance `id` are pending.
    pub async fn pending_of(&self, id: &str) -> Result<u64> {
        let n: i64 =
            sqlx::query("SELECT COUNT(*) FROM sb_calls WHERE instance = $1 AND status = 'pending'")
                .bind(id)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Lets go of adopted instance `id` for good: removes its row if it is
    /// still adopted here and still silent for `silent_after`. True when
    /// removed: its queues may then be deleted.
    pub async fn release(&self, id: &str, silent_after: Duration) -> Result<bool> {
        let sql = format!(
            "DELETE FROM sb_instances WHERE id = $1 AND adopted_by = $2 \
             AND last_seen_ms < {} - $3",
            db_now(self.backend)
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(self.me())
            .bind(i64::try_from(silent_after.as_millis()).unwrap_or(i64::MAX))
            .execute(&self.writer)
            .await
            .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends the callback leases held in this handle's instance's name: at
    /// a dispatcher's start, nothing of this process is in flight, so
    /// leases in its name are those of an earlier process under the same
    /// instance id that was killed mid-delivery (instance ids are unique
    /// per live process). Its callbacks are due again now rather than
    /// when those leases would run out. Returns how many.
    pub async fn release_own_leases(&self) -> Result<u64> {
        let Some(me) = self.instance() else {
            return Ok(0);
        };
        let done = sqlx::query(
            "UPDATE sb_calls SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(me)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(done.rows_affected())
    }

    /// Claims up to `limit` callbacks due at `now_ms` that no dispatcher
    /// holds a lease on, leasing them to this handle's instance until
    /// `lease_until_ms`, oldest due first. A lease ends when the attempt's
    /// outcome is recorded ([`CallStore::record_attempt`]) or when it runs
    /// out (its holder died): then another dispatcher may claim it.
    ///
    /// On PostgreSQL the rows are picked `FOR UPDATE SKIP LOCKED`, so that
    /// dispatchers claiming at once take different rows without waiting on
    /// each other; the outer condition is checked again on the locked row.
    /// SQLite has one writer at a time: the conditional `UPDATE` suffices.
    pub async fn claim_due_callbacks(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
    ) -> Result<Vec<CallRecord>> {
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE sb_calls SET lease_owner = $1, lease_until = $2 WHERE id IN \
             (SELECT id FROM sb_calls WHERE callback_state = 'pending' AND callback_next_ms <= $3 \
             AND (lease_until IS NULL OR lease_until < $3) \
             ORDER BY callback_next_ms LIMIT $4 {lock}) \
             AND callback_state = 'pending' AND (lease_until IS NULL OR lease_until < $3) \
             RETURNING {COLUMNS}"
        );
        // A handle of no instance (a tool, a test) still leases in a name.
        let owner = self.instance().unwrap_or("-");
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(lease_until_ms)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.writer)
            .await
            .map_err(db)?;
        let mut calls = rows.iter().map(record).collect::<Result<Vec<_>>>()?;
        calls.sort_by_key(|c| c.callback.as_ref().and_then(|cb| cb.next_ms));
        Ok(calls)
    }
}
