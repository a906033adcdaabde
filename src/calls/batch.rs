//! Group commit: the store's frequent writes (a call stored, ended, its
//! progress) from concurrent requests share one transaction.
//!
//! Each write is a [`Stmt`] (SQL and its arguments) sent to one task, which
//! takes every write queued while the previous transaction ran (up to
//! [`MAX_BATCH`]), runs them in one transaction, and answers each writer
//! once the transaction has committed: a write is never reported done
//! before it is durable, exactly as before. Nothing waits to fill a batch:
//! a lone write is committed at once; under load, the writes that queued
//! behind a commit share the next one.
//!
//! Why: every transaction writes each page it touched again (SQLite appends
//! whole pages to its WAL; PostgreSQL flushes its WAL at each commit). A
//! `202` call was three transactions of a few pages each, some 27 page
//! writes by SQLite's writer thread per call, which bounded the gateway's
//! asynchronous calls to a few hundred a second (BENCHMARKS.md, `bench
//! http`). Writes that share a transaction share its pages and its flush.
//!
//! A write may also return the row it changed (`UPDATE … RETURNING`,
//! [`Batcher::fetch`]): the tracker ends a call with one statement instead
//! of a read then a write.
//!
//! A statement that fails in a batch (none should: each is a conditional
//! update or an insert that tolerates a conflict) rolls the batch back,
//! and each of its writes is run again alone, so that only the failing one
//! reports an error. A failed commit reports its error to every write of
//! the batch and runs none again (a commit whose answer was lost may have
//! happened).

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Connection};
use tokio::sync::{mpsc, oneshot};

/// The most writes one transaction takes.
pub(crate) const MAX_BATCH: usize = 128;

/// Writes queued beyond the one running: a writer past it waits to queue.
const QUEUE: usize = 1024;

/// An argument of a [`Stmt`], owned so that the statement can be run again.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Blob(Option<Vec<u8>>),
}

/// One write: SQL with `$1`.. placeholders, and its arguments in order.
#[derive(Debug, Clone)]
pub(crate) struct Stmt {
    pub(crate) sql: &'static str,
    pub(crate) args: Vec<Arg>,
}

/// What a write did: the rows it changed, and with [`Batcher::fetch`] the
/// row its `RETURNING` gave, if any.
struct Done {
    rows: u64,
    row: Option<AnyRow>,
}

impl Stmt {
    async fn run(&self, conn: &mut AnyConnection, fetch: bool) -> Result<Done, sqlx::Error> {
        let mut q = sqlx::query(self.sql);
        for a in &self.args {
            q = match a {
                Arg::Int(v) => q.bind(*v),
                Arg::Real(v) => q.bind(*v),
                Arg::Text(v) => q.bind(v.clone()),
                Arg::Blob(v) => q.bind(v.clone()),
            };
        }
        if fetch {
            let row = q.fetch_optional(conn).await?;
            Ok(Done {
                rows: u64::from(row.is_some()),
                row,
            })
        } else {
            Ok(Done {
                rows: q.execute(conn).await?.rows_affected(),
                row: None,
            })
        }
    }
}

struct Write {
    stmt: Stmt,
    /// Whether the statement returns a row (`RETURNING`) to hand back.
    fetch: bool,
    done: oneshot::Sender<Result<Done, sqlx::Error>>,
}

/// The sending side of the group-commit task. Cheap to clone; the task
/// ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Write>,
}

impl Batcher {
    /// Starts the task that writes through `pool`, on the current runtime.
    pub(crate) fn start(pool: AnyPool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, rx));
        Self { tx }
    }

    /// Runs `stmt` in the next transaction; the rows it changed, once
    /// committed.
    pub(crate) async fn execute(&self, stmt: Stmt) -> Result<u64, sqlx::Error> {
        Ok(self.send(stmt, false).await?.rows)
    }

    /// Runs `stmt`, which returns at most one row (`… RETURNING`), in the
    /// next transaction; that row, once committed.
    pub(crate) async fn fetch(&self, stmt: Stmt) -> Result<Option<AnyRow>, sqlx::Error> {
        Ok(self.send(stmt, true).await?.row)
    }

    async fn send(&self, stmt: Stmt, fetch: bool) -> Result<Done, sqlx::Error> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Write { stmt, fetch, done })
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        // The task is gone (its runtime stopped, or the store was closed).
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

async fn run(pool: AnyPool, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit(&pool, &mut batch).await;
    }
}

/// What went wrong with a batch.
enum Failed {
    /// A statement: nothing was committed.
    Statement,
    /// The commit (or the connection or `BEGIN`): its outcome may be unknown.
    Commit(sqlx::Error),
}

async fn commit(pool: &AnyPool, batch: &mut Vec<Write>) {
    if batch.len() == 1 {
        let w = batch.pop().expect("one write");
        let r = alone(pool, &w).await;
        let _ = w.done.send(r);
        return;
    }
    match together(pool, batch).await {
        Ok(counts) => {
            for (w, n) in batch.drain(..).zip(counts) {
                let _ = w.done.send(Ok(n));
            }
        }
        Err(Failed::Statement) => {
            for w in batch.drain(..) {
                let r = alone(pool, &w).await;
                let _ = w.done.send(r);
            }
        }
        Err(Failed::Commit(e)) => {
            let text = e.to_string();
            for w in batch.drain(..) {
                let _ = w.done.send(Err(sqlx::Error::Protocol(text.clone())));
            }
        }
    }
}

async fn together(pool: &AnyPool, batch: &[Write]) -> Result<Vec<Done>, Failed> {
    let mut conn = pool.acquire().await.map_err(Failed::Commit)?;
    let mut tx = conn.begin().await.map_err(Failed::Commit)?;
    let mut counts = Vec::with_capacity(batch.len());
    for w in batch {
        match w.stmt.run(&mut tx, w.fetch).await {
            Ok(n) => counts.push(n),
            Err(_) => {
                let _ = tx.rollback().await;
                return Err(Failed::Statement);
            }
        }
    }
    tx.commit().await.map_err(Failed::Commit)?;
    Ok(counts)
}

async fn alone(pool: &AnyPool, w: &Write) -> Result<Done, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    w.stmt.run(&mut conn, w.fetch).await
}
