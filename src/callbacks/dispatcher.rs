//! The dispatcher: one task that delivers due callbacks from the call store,
//! a bounded number at once, and records every attempt's outcome there.
//!
//! The store, not the broker, holds the delivery state: the status document
//! must show it, and the store is already the durable record of every call
//! answered `202`. So a callback due before a restart is delivered after it,
//! by whichever dispatcher looks first.
//!
//! The loop: claim the callbacks due now (a lease in the store, so that of
//! several gateways sharing it one delivers each:
//! [`crate::calls::CallStore::claim_due_callbacks`]), start each one not already in
//! flight (at most `callbacks.concurrency` at once), then sleep until the
//! next one is due, a [`DispatcherHandle::wake`], a delivery ending, or the
//! cancellation token; never longer than [`MAX_IDLE`], so callbacks that
//! another gateway sharing the store schedules are seen too.
//!
//! Every attempt is recorded in the callback's history (time, status or
//! error, duration, next attempt), shown in the status document. A receiver
//! that answers `429` or `503` with `Retry-After` is not asked again before
//! then (within `callbacks.max_backoff_ms`). A receiver host that fails
//! `callbacks.circuit_failures` attempts in a row is paused ([`Circuits`]):
//! its callbacks wait `callbacks.circuit_pause_ms` without spending an
//! attempt, then one attempt tries it again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use reqwest::redirect::Policy;
use reqwest::{Client, StatusCode};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use url::Url;

use super::sign::Signer;
use super::ssrf::{CallbackUrlError, ForbiddenAddress, GuardedResolver, check_target};
use crate::amqp::wire::now_ms;
use crate::calls::{CallRecord, CallStore, CallbackOutcome, CallbackRecord};
use crate::settings::CallbackSettings;

/// Longest the dispatcher sleeps without looking at the store.
pub const MAX_IDLE: Duration = Duration::from_secs(1);

/// Shortest sleep between two looks at the store when nothing woke it, so
/// that a row the store reports due but does not hand out cannot spin it.
const MIN_IDLE: Duration = Duration::from_millis(5);

/// The content type of a delivery: a structured-mode CloudEvent.
pub(super) const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// The `user-agent` of deliveries.
pub(super) const USER_AGENT: &str = "switchboard";

/// Counters of delivery attempts since the dispatcher started (for metrics).
#[derive(Debug, Default)]
pub struct CallbackStats {
    /// Attempts made (every outcome recorded, including rows found
    /// undeliverable).
    pub attempts: AtomicU64,
    /// Attempts answered 2xx.
    pub delivered: AtomicU64,
    /// Failed attempts scheduled to be tried again.
    pub retried: AtomicU64,
    /// Callbacks given up: kept as dead letters.
    pub dead: AtomicU64,
    /// Attempts put off because their host's circuit was open.
    pub deferred: AtomicU64,
    /// The circuit of each receiver host.
    pub circuits: Circuits,
}

/// Receiver hosts followed at most by [`Circuits`]: past it, hosts whose
/// circuit is closed are forgotten first, and a new host is not followed.
const MAX_HOSTS: usize = 4096;

/// How long callbacks of a host wait while the one attempt that tries its
/// half-open circuit is in flight.
const TRIAL_WAIT_MS: i64 = 1000;

/// The circuit of each receiver host (`host:port`): closed (callbacks go),
/// open (they wait until a time), half-open (one attempt tries the host).
/// Bounded by `MAX_HOSTS`.
#[derive(Debug, Default)]
pub struct Circuits {
    hosts: std::sync::Mutex<HashMap<String, Circuit>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Circuit {
    /// Failed attempts in a row.
    failures: u32,
    /// While open: until when (ms); then half-open.
    open_until_ms: Option<i64>,
    /// Half-open: the attempt that tries the host is in flight.
    trying: bool,
}

/// Why an attempt waits: its host's circuit is open until `until_ms`.
struct Paused {
    until_ms: i64,
    failures: u32,
}

impl Circuits {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Circuit>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an attempt to `host` may go at `now`.
    fn admit(&self, host: &str, now: i64) -> Result<(), Paused> {
        let mut hosts = self.lock();
        let Some(c) = hosts.get_mut(host) else {
            return Ok(());
        };
        match c.open_until_ms {
            None => Ok(()),
            Some(until) if now < until => Err(Paused {
                until_ms: until,
                failures: c.failures,
            }),
            Some(_) if c.trying => Err(Paused {
                until_ms: now + TRIAL_WAIT_MS,
                failures: c.failures,
            }),
            Some(_) => {
                c.trying = true;
                Ok(())
            }
        }
    }

    /// An attempt to `host` was not sent after all: a trial is over.
    fn untried(&self, host: &str) {
        if let Some(c) = self.lock().get_mut(host) {
            c.trying = false;
        }
    }

    /// The host answered: its circuit closes.
    fn succeeded(&self, host: &str) {
        self.lock().remove(host);
    }

    /// An attempt to `host` failed at `now`: returns until when its circuit
    /// is now open, if it is.
    fn failed(&self, host: &str, now: i64, settings: &CallbackSettings) -> Option<i64> {
        if settings.circuit_failures == 0 {
            return None;
        }
        let mut hosts = self.lock();
        if !hosts.contains_key(host) && hosts.len() >= MAX_HOSTS {
            hosts.retain(|_, c| c.open_until_ms.is_some());
            if hosts.len() >= MAX_HOSTS {
                return None;
            }
        }
        let c = hosts.entry(host.to_owned()).or_default();
        c.failures = c.failures.saturating_add(1);
        // A failed trial opens it again at once.
        if c.trying || c.failures >= settings.circuit_failures {
            let pause = i64::try_from(settings.circuit_pause_ms).unwrap_or(i64::MAX);
            let until = now.saturating_add(pause);
            if c.open_until_ms.is_none_or(|u| u <= now) {
                warn!(%host, failures = c.failures, pause_ms = pause, "callback receiver paused: its circuit is open");
            }
            c.open_until_ms = Some(until);
            c.trying = false;
            return Some(until);
        }
        None
    }

    /// Every host followed, with whether its circuit is open (or half-open)
    /// now: for the metrics.
    pub fn states(&self) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = self
            .lock()
            .iter()
            .map(|(h, c)| (h.clone(), c.open_until_ms.is_some()))
            .collect();
        out.sort();
        out
    }
}

/// What the rest of the process holds of a running dispatcher. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct DispatcherHandle {
    /// Wakes the dispatcher: a callback became due (a call with a callback
    /// completed). A wake while it is busy is kept, not lost.
    pub notify: Arc<Notify>,
    /// Delivery counters.
    pub stats: Arc<CallbackStats>,
    /// Closed when the dispatcher's task has ended.
    stopped: watch::Receiver<()>,
}

impl DispatcherHandle {
    /// Tells the dispatcher that a callback became due.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Waits until the dispatcher has stopped (after its cancellation token
    /// fired) and its deliveries in flight have ended and been recorded;
    /// each is bounded by `callbacks.timeout_ms`.
    pub async fn stopped(&self) {
        let mut rx = self.stopped.clone();
        while rx.changed().await.is_ok() {}
    }
}

/// The delivery loop; see the module doc.
pub struct Dispatcher {
    store: CallStore,
    /// Everything a delivery task needs, shared by them.
    deliverer: Arc<Deliverer>,
    notify: Arc<Notify>,
    cancel: CancellationToken,
    /// Bounds the deliveries in flight (`callbacks.concurrency`).
    permits: Arc<Semaphore>,
    /// Delivery tasks; reaped only by the loop, between two looks at the
    /// store, so that a row is never handed out while its last attempt
    /// is still being recorded.
    tasks: JoinSet<bool>,
    /// Call ids in flight, so two attempts of one callback never overlap.
    in_flight: HashSet<String>,
    /// The call id of each task, to clear `in_flight` even if a task panics.
    task_ids: HashMap<Id, String>,
    /// Set when the store failed; the next sleep is [`MAX_IDLE`], so a
    /// failing store is not hammered and an unrecorded attempt is not
    /// repeated at once.
    trouble: bool,
}

impl Dispatcher {
    /// Starts the dispatcher on the current Tokio runtime. It runs until
    /// `cancel` fires, then waits for its deliveries in flight.
    ///
    /// `settings` are expected valid ([`crate::settings::Settings::validate`]).
    /// With an empty secret callbacks are disabled: the dispatcher logs
    /// that once and delivers nothing, leaving due callbacks in the store for
    /// a later start with a secret.
    pub fn start(
        store: CallStore,
        settings: CallbackSettings,
        cancel: CancellationToken,
    ) -> DispatcherHandle {
        let notify = Arc::new(Notify::new());
        let stats = Arc::new(CallbackStats::default());
        let (stopped_tx, stopped) = watch::channel(());
        let handle = DispatcherHandle {
            notify: notify.clone(),
            stats: stats.clone(),
            stopped,
        };
        let deliverer = match Deliverer::new(store.clone(), settings, stats) {
            Ok(d) => d,
            Err(why) => {
                error!(%why, "callbacks are not delivered");
                tokio::spawn(async move {
                    cancel.cancelled().await;
                    drop(stopped_tx);
                });
                return handle;
            }
        };
        let concurrency = deliverer.settings.concurrency.max(1);
        let dispatcher = Dispatcher {
            store,
            deliverer: Arc::new(deliverer),
            notify,
            cancel,
            permits: Arc::new(Semaphore::new(concurrency)),
            tasks: JoinSet::new(),
            in_flight: HashSet::new(),
            task_ids: HashMap::new(),
            trouble: false,
        };
        tokio::spawn(async move {
            dispatcher.run().await;
            drop(stopped_tx);
        });
        handle
    }

    async fn run(mut self) {
        info!(
            concurrency = self.deliverer.settings.concurrency,
            "callback dispatcher started"
        );
        match self.store.release_own_leases().await {
            Ok(0) => {}
            Ok(n) => info!(
                leases = n,
                "callback leases of an earlier process of this instance ended"
            ),
            Err(e) => {
                warn!(error = %e, "callback leases of an earlier process not ended; they run out")
            }
        }
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let now = now_ms_i64();
            if !self.trouble {
                self.start_due(now).await;
            }
            let wait = self.idle_time(now).await;
            self.trouble = false;
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(done);
                }
                () = self.notify.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
            while let Some(done) = self.tasks.try_join_next_with_id() {
                self.finished(done);
            }
        }
        info!(
            in_flight = self.in_flight.len(),
            "callback dispatcher stopping"
        );
        while let Some(done) = self.tasks.join_next_with_id().await {
            self.finished(done);
        }
    }

    /// Starts a delivery for each due callback not in flight, while permits
    /// last.
    async fn start_due(&mut self, now: i64) {
        let free = self.permits.available_permits();
        if free == 0 {
            return;
        }
        // Rows in flight here are leased here: not claimed again. With
        // several gateways on one store, each due row is leased to one of
        // them, so one delivers it (another once the lease runs out, if
        // its holder died mid-delivery).
        let limit = i64::try_from(free).unwrap_or(i64::MAX);
        let lease = Duration::from_millis(self.deliverer.settings.timeout_ms)
            + crate::calls::instances::LEASE_MARGIN;
        let lease_until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let rows = match self
            .store
            .claim_due_callbacks(now, limit, lease_until)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "cannot read due callbacks");
                self.trouble = true;
                return;
            }
        };
        for row in rows {
            if self.in_flight.contains(&row.id) {
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            let id = row.id.clone();
            let deliverer = self.deliverer.clone();
            let task = self.tasks.spawn(async move {
                let recorded = deliverer.attempt(row).await;
                drop(permit);
                recorded
            });
            self.task_ids.insert(task.id(), id.clone());
            self.in_flight.insert(id);
        }
    }

    /// How long to sleep before looking at the store again.
    async fn idle_time(&self, looked_at: i64) -> Duration {
        if self.trouble {
            return MAX_IDLE;
        }
        match self.store.next_callback_ms().await {
            Ok(Some(due)) if due > looked_at => {
                let ms = u64::try_from(due - now_ms_i64()).unwrap_or(0);
                Duration::from_millis(ms).clamp(MIN_IDLE, MAX_IDLE)
            }
            // Everything due when we looked was started (or no permit was
            // free): the earliest due callback is in flight and hides when
            // the next one is due. A delivery ending wakes the loop sooner.
            Ok(Some(_)) if !self.in_flight.is_empty() => MAX_IDLE,
            // It came due between the two queries.
            Ok(Some(_)) => MIN_IDLE,
            Ok(None) => MAX_IDLE,
            Err(e) => {
                warn!(error = %e, "cannot read when the next callback is due");
                MAX_IDLE
            }
        }
    }

    /// Clears a finished delivery from the books.
    fn finished(&mut self, done: Result<(Id, bool), JoinError>) {
        let (task, recorded) = match done {
            Ok((task, recorded)) => (task, recorded),
            Err(e) => {
                error!(error = %e, "a callback delivery task failed");
                (e.id(), false)
            }
        };
        if let Some(id) = self.task_ids.remove(&task) {
            self.in_flight.remove(&id);
        }
        if !recorded {
            self.trouble = true;
        }
    }
}

fn now_ms_i64() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

/// What one attempt came to.
enum Verdict {
    /// Answered 2xx.
    Delivered,
    /// Worth trying again.
    Transient(String),
    /// Never worth trying again.
    Permanent(String),
}

/// What one attempt got back.
struct Answer {
    /// The receiver's status, when it answered.
    status: Option<u16>,
    verdict: Verdict,
    /// A `429` or `503`'s `Retry-After`: not before then.
    retry_after: Option<Duration>,
}

/// The `host:port` of a callback URL: what a circuit is for.
fn host_of(url: &str) -> Option<String> {
    let url = Url::parse(url).ok()?;
    Some(format!(
        "{}:{}",
        url.host_str()?,
        url.port_or_known_default()?
    ))
}

/// A `Retry-After` value: seconds, or an HTTP date; how long from `now_ms`.
fn retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let ms = at.timestamp_millis().saturating_sub(now_ms);
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// Makes one attempt and records it; shared by the delivery tasks.
struct Deliverer {
    store: CallStore,
    client: Client,
    signer: Signer,
    settings: CallbackSettings,
    stats: Arc<CallbackStats>,
}

impl Deliverer {
    fn new(
        store: CallStore,
        settings: CallbackSettings,
        stats: Arc<CallbackStats>,
    ) -> Result<Self, String> {
        let signer = Signer::new(&settings.secret).map_err(|e| e.to_string())?;
        let mut builder = Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            // A redirect could lead anywhere, past the URL checks.
            .redirect(Policy::none())
            // A proxy would connect to the target itself, past the resolver
            // that checks the address.
            .no_proxy()
            .user_agent(USER_AGENT);
        // With allow_private too: some addresses are never reachable.
        builder = builder.dns_resolver(Arc::new(GuardedResolver {
            allow_private: settings.allow_private,
        }));
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            store,
            client,
            signer,
            settings,
            stats,
        })
    }

    /// One attempt at `row`'s callback, recorded in the store (with its
    /// history), or put off while its host's circuit is open. Returns false
    /// when the outcome could not be recorded.
    async fn attempt(&self, row: CallRecord) -> bool {
        let Some(callback) = row.callback else {
            return true;
        };
        let host = host_of(&callback.url);
        let at = now_ms_i64();
        if let Some(h) = &host
            && let Err(paused) = self.stats.circuits.admit(h, at)
        {
            self.stats.deferred.fetch_add(1, Ordering::Relaxed);
            let outcome = CallbackOutcome::Deferred {
                next_ms: paused.until_ms,
                reason: format!(
                    "paused: {h} failed {} times in a row (its circuit is open)",
                    paused.failures
                ),
            };
            return self.record(&row.id, &outcome, None).await;
        }
        let attempt = callback.attempts.saturating_add(1);
        self.stats.attempts.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let answer = self.send(callback).await;
        let took = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let status = answer.status;
        let now = now_ms_i64();
        match (&answer.verdict, &host) {
            (Verdict::Delivered, Some(h)) => self.stats.circuits.succeeded(h),
            // 410 Gone: the host answers; it is the call it refuses.
            (Verdict::Permanent(_), Some(h)) if status.is_some() => {
                self.stats.circuits.succeeded(h)
            }
            // Not sent (the URL or body was refused): says nothing of the
            // host, but a trial is over.
            (Verdict::Permanent(_), Some(h)) => self.stats.circuits.untried(h),
            _ => {}
        }
        let opened = match (&answer.verdict, &host) {
            (Verdict::Transient(_), Some(h)) => self.stats.circuits.failed(h, now, &self.settings),
            _ => None,
        };
        let outcome = match answer.verdict {
            Verdict::Delivered => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                info!(call_id = %row.id, attempt, status, "callback delivered");
                CallbackOutcome::Delivered
            }
            Verdict::Transient(error) if attempt < self.settings.max_attempts => {
                let backoff =
                    retry_delay_ms(&self.settings, attempt, rand::rng().random_range(0.8..=1.2));
                // The receiver's word, within the cap.
                let asked = answer
                    .retry_after
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .min(self.settings.max_backoff_ms);
                let delay = backoff.max(asked);
                let next_ms = now
                    .saturating_add(i64::try_from(delay).unwrap_or(i64::MAX))
                    .max(opened.unwrap_or(i64::MIN));
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                warn!(call_id = %row.id, attempt, status, %error, retry_in_ms = next_ms - now, "callback attempt failed");
                CallbackOutcome::Retry { next_ms, error }
            }
            Verdict::Transient(error) => {
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                let error = format!("{error}; gave up after {attempt} attempts");
                warn!(call_id = %row.id, attempt, status, %error, "callback dead");
                CallbackOutcome::Dead { error }
            }
            Verdict::Permanent(error) => {
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                warn!(call_id = %row.id, attempt, status, %error, "callback dead");
                CallbackOutcome::Dead { error }
            }
        };
        self.record(&row.id, &outcome, Some((at, took, status)))
            .await
    }

    /// Records an outcome; false when the store failed.
    async fn record(
        &self,
        id: &str,
        outcome: &CallbackOutcome,
        attempt: Option<(i64, i64, Option<u16>)>,
    ) -> bool {
        match self.store.record_attempt(id, outcome, attempt).await {
            Ok(()) => true,
            Err(e) => {
                error!(call_id = %id, error = %e, "cannot record a callback attempt");
                false
            }
        }
    }

    /// POSTs the stored body, signed. Returns the answer's status, if any,
    /// and what it means. Error texts end up in the status document: they
    /// speak of the receiver and the URL only.
    async fn send(&self, callback: CallbackRecord) -> Answer {
        let (status, verdict, retry_after) = self.post(callback).await;
        Answer {
            status,
            verdict,
            retry_after,
        }
    }

    async fn post(&self, callback: CallbackRecord) -> (Option<u16>, Verdict, Option<Duration>) {
        let (Some(body), Some(event_id)) = (callback.body, callback.event_id) else {
            return (
                None,
                Verdict::Permanent("the call ended without a callback body to deliver".into()),
                None,
            );
        };
        let url = match Url::parse(&callback.url) {
            Ok(url) => url,
            Err(_) => {
                return (
                    None,
                    Verdict::Permanent(CallbackUrlError::Invalid.to_string()),
                    None,
                );
            }
        };
        if let Err(e) = check_target(&url, self.settings.allow_private) {
            return (None, Verdict::Permanent(e.to_string()), None);
        }
        let timestamp = now_ms_i64() / 1000;
        let headers = match self.signer.headers(&event_id, timestamp, &body) {
            Ok(h) => h,
            Err(e) => return (None, Verdict::Permanent(e.to_string()), None),
        };
        let sent = self
            .client
            .post(url)
            .headers(headers)
            .header(CONTENT_TYPE, HeaderValue::from_static(CLOUDEVENTS_JSON))
            .body(body)
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status();
                let wait = match status {
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry_after(v, now_ms_i64())),
                    _ => None,
                };
                (Some(status.as_u16()), verdict_of(status), wait)
            }
            Err(e) => (None, self.verdict_of_error(&e), None),
        }
    }

    fn verdict_of_error(&self, e: &reqwest::Error) -> Verdict {
        if ForbiddenAddress::is_in(e) {
            Verdict::Permanent(CallbackUrlError::Forbidden.to_string())
        } else if e.is_timeout() {
            Verdict::Transient(format!("no answer within {} ms", self.settings.timeout_ms))
        } else if e.is_connect() {
            Verdict::Transient("could not connect to the callback URL".into())
        } else {
            Verdict::Transient("the request to the callback URL failed".into())
        }
    }
}

/// 2xx: delivered; 410 Gone: the receiver wants no more; anything else
/// (3xx included: redirects are not followed) is tried again.
fn verdict_of(status: StatusCode) -> Verdict {
    if status.is_success() {
        Verdict::Delivered
    } else if status == StatusCode::GONE {
        Verdict::Permanent("the receiver answered 410 Gone".into())
    } else {
        Verdict::Transient(format!("the receiver answered {status}"))
    }
}

/// The delay after failed attempt number `attempt` (1-based):
/// `initial * 2^(attempt-1)`, times `jitter` (0.8 to 1.2), capped at
/// `max_backoff_ms`.
fn retry_delay_ms(settings: &CallbackSettings, attempt: u32, jitter: f64) -> u64 {
    let factor = 1u64
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u64::MAX);
    let base = settings
        .initial_backoff_ms
        .saturating_mul(factor)
        .min(settings.max_backoff_ms);
    // A u64 of milliseconds fits an f64 well enough for a delay.
    let jittered = (base as f64 * jitter).round() as u64;
    jittered.clamp(1, settings.max_backoff_ms.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(initial: u64, max: u64) -> CallbackSettings {
        CallbackSettings {
            secret: String::new(),
            max_attempts: 8,
            initial_backoff_ms: initial,
            max_backoff_ms: max,
            timeout_ms: 1000,
            allow_private: false,
            concurrency: 4,
            circuit_failures: 0,
            circuit_pause_ms: 1,
        }
    }

    #[test]
    fn the_delay_doubles_up_to_the_cap() {
        let s = settings(1000, 300_000);
        let delays: Vec<u64> = (1..=10).map(|a| retry_delay_ms(&s, a, 1.0)).collect();
        assert_eq!(
            delays,
            [
                1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000
            ]
        );
        assert_eq!(retry_delay_ms(&s, 200, 1.0), 300_000);
        assert_eq!(retry_delay_ms(&s, u32::MAX, 1.0), 300_000);
    }

    #[test]
    fn jitter_spreads_within_twenty_percent_and_never_past_the_cap() {
        let s = settings(1000, 300_000);
        assert_eq!(retry_delay_ms(&s, 1, 0.8), 800);
        assert_eq!(retry_delay_ms(&s, 1, 1.2), 1200);
        assert_eq!(retry_delay_ms(&s, 3, 0.8), 3200);
        assert_eq!(retry_delay_ms(&s, 20, 1.2), 300_000);
        assert_eq!(retry_delay_ms(&s, 20, 0.8), 240_000);
        assert_eq!(retry_delay_ms(&settings(1, 1), 1, 0.8), 1);
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert_eq!(retry_after(" 3 ", 0), Some(Duration::from_secs(3)));
        let now = 1_445_412_480_000; // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn a_host_failing_in_a_row_is_paused_then_tried_once() {
        let s = CallbackSettings {
            circuit_failures: 2,
            circuit_pause_ms: 100,
            ..settings(10, 100)
        };
        let c = Circuits::default();
        let h = "hooks.example.com:443";
        assert!(c.admit(h, 0).is_ok());
        assert_eq!(c.failed(h, 0, &s), None);
        c.succeeded(h);
        assert_eq!(c.failed(h, 1, &s), None, "a success resets the count");
        assert_eq!(c.failed(h, 2, &s), Some(102));
        assert_eq!(c.admit(h, 50).err().map(|p| p.until_ms), Some(102));
        assert_eq!(c.states(), [(h.to_owned(), true)]);
        // Half-open: one attempt goes, the others wait for it.
        assert!(c.admit(h, 102).is_ok());
        assert!(c.admit(h, 103).is_err());
        // It fails: open again at once.
        assert_eq!(c.failed(h, 110, &s), Some(210));
        assert!(c.admit(h, 211).is_ok());
        c.succeeded(h);
        assert!(c.states().is_empty());
        assert!(c.admit(h, 212).is_ok());
        let off = CallbackSettings {
            circuit_failures: 0,
            ..s
        };
        for n in 0..10 {
            assert_eq!(c.failed(h, n, &off), None);
        }
    }

    #[test]
    fn statuses_map_to_verdicts() {
        assert!(matches!(verdict_of(StatusCode::OK), Verdict::Delivered));
        assert!(matches!(
            verdict_of(StatusCode::NO_CONTENT),
            Verdict::Delivered
        ));
        assert!(matches!(
            verdict_of(StatusCode::GONE),
            Verdict::Permanent(_)
        ));
        for s in [
            StatusCode::FOUND,
            StatusCode::BAD_REQUEST,
            StatusCode::NOT_FOUND,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            match verdict_of(s) {
                Verdict::Transient(e) => assert!(e.contains(s.as_str()), "{e}"),
                _ => panic!("{s} should be retried"),
            }
        }
    }
}
