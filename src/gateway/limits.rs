//! [`Limits`]: what one caller may use of the gateway, so that no caller
//! starves the others (`[gateway.limits]`, a token's own
//! `[gateway.tokens.<caller>.limits]`; docs/SECURITY.md).
//!
//! Per caller (a token's name, or `anonymous`):
//! - **rate**: requests per second with a burst, a GCRA cell per request
//!   ([`governor`]), taken when the request names its caller;
//! - **pending**: calls answered 202 and not ended yet, counted in the call
//!   store when a call is started (so calls resumed after a restart count),
//!   but not again while the last count, with the calls stored here since,
//!   is fresh and below half the bound ([`PENDING_RECOUNT`]);
//! - **streams**: SSE and WebSocket sessions open at once;
//! - **long-polls**: `GET /v1/calls/{id}?wait=N` held at once.
//!
//! Over a limit the request is refused with [`ApiError::TooManyRequests`]
//! (429, `Retry-After`, problem+json) and counted in
//! `switchboard_gateway_limited_total{caller,limit}`. Callers come from the
//! settings, so the state and the metric labels are bounded. The global
//! bounds (`gateway.max_streams`, the long-poll watchers, `rpc.max_pending`)
//! still hold: they protect the process, these protect callers from each
//! other.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;

use super::auth::Caller;
use super::error::ApiError;
use crate::metrics::Metrics;
use crate::settings::{CallerLimits, GatewaySettings};

/// The caller of every request of a gateway without tokens.
pub(super) const ANONYMOUS: &str = "anonymous";

/// One of a caller's limits (the `limit` label of the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    /// Requests per second.
    Rate,
    /// Calls pending in the store.
    Pending,
    /// Event streams open.
    Streams,
    /// Long-polls held.
    LongPolls,
}

impl Limit {
    const ALL: [Limit; 4] = [
        Limit::Rate,
        Limit::Pending,
        Limit::Streams,
        Limit::LongPolls,
    ];

    /// The label value.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Limit::Rate => "rate",
            Limit::Pending => "pending",
            Limit::Streams => "streams",
            Limit::LongPolls => "long_polls",
        }
    }

    /// The setting that sets it, for the problem's detail.
    fn setting(self) -> &'static str {
        match self {
            Limit::Rate => "rate_per_s",
            Limit::Pending => "max_pending",
            Limit::Streams => "max_streams",
            Limit::LongPolls => "max_long_polls",
        }
    }
}

/// How long a caller's pending calls counted in the store stand in for a
/// new count, while they (with the calls this gateway stored for the caller
/// since) stay below half its `max_pending`: a caller far from its bound
/// costs no store read per POST, one near it a read per POST as before.
/// Calls stored by other gateways on the same store meanwhile are seen at
/// the next count (limits are per gateway process: docs/SECURITY.md).
pub(super) const PENDING_RECOUNT: Duration = Duration::from_millis(250);

/// A count of a caller's pending calls read from the store.
#[derive(Debug, Clone, Copy)]
struct PendingSeen {
    /// When the read began.
    at: Instant,
    /// What it counted.
    count: usize,
    /// [`CallerState::stored`] when the read began: the calls stored here
    /// since are those above it.
    stored: usize,
}

/// Taken before a count of pending calls is read, handed back with it
/// ([`Limits::pending_counted`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CountStart {
    at: Instant,
    stored: usize,
}

/// One caller's limits and what it holds now.
struct CallerState {
    name: String,
    limits: CallerLimits,
    /// `None`: no rate limit.
    rate: Option<DefaultDirectRateLimiter>,
    streams: AtomicUsize,
    long_polls: AtomicUsize,
    /// The last count of its pending calls read from the store.
    pending_seen: Mutex<Option<PendingSeen>>,
    /// Calls this gateway has stored for it (pending when stored); only
    /// grows.
    stored: AtomicUsize,
    /// Refusals by [`Limit`] (in `Limit::ALL` order).
    limited: [Counter; 4],
}

impl CallerState {
    fn new(name: &str, limits: CallerLimits, metrics: &Metrics) -> Self {
        Self {
            name: name.to_owned(),
            limits,
            rate: rate_limiter(&limits),
            streams: AtomicUsize::new(0),
            long_polls: AtomicUsize::new(0),
            pending_seen: Mutex::new(None),
            stored: AtomicUsize::new(0),
            limited: Limit::ALL.map(|l| metrics.gateway().limited(name, l.as_str())),
        }
    }

    fn refuse(&self, limit: Limit, retry_after: u64, what: String) -> ApiError {
        self.limited[limit as usize].inc();
        tracing::info!(caller = %self.name, limit = limit.as_str(), "request over the caller's limit");
        ApiError::TooManyRequests {
            detail: format!(
                "{what} (the limit gateway.limits.{} of this caller); retry later",
                limit.setting()
            ),
            retry_after: retry_after.max(1),
        }
    }

    /// The counter and bound of a held limit.
    fn held(&self, limit: Limit) -> (&AtomicUsize, usize) {
        match limit {
            Limit::Streams => (&self.streams, self.limits.max_streams),
            _ => (&self.long_polls, self.limits.max_long_polls),
        }
    }
}

/// The GCRA limiter of `limits`: one request every `1 / rate_per_s`, and
/// `burst` at once (0: one second's worth, at least 1).
fn rate_limiter(limits: &CallerLimits) -> Option<DefaultDirectRateLimiter> {
    if limits.rate_per_s <= 0.0 {
        return None;
    }
    let period = Duration::from_secs_f64(1.0 / limits.rate_per_s);
    let burst = match limits.burst {
        0 => limits.rate_per_s.ceil().min(f64::from(u32::MAX)) as u32,
        b => b,
    };
    let quota =
        Quota::with_period(period)?.allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
    Some(RateLimiter::direct(quota))
}

/// Every caller's limits and holdings. Shared by the gateway's workers.
pub(crate) struct Limits {
    callers: HashMap<String, Arc<CallerState>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_map();
        for (name, c) in &self.callers {
            d.entry(name, &c.limits);
        }
        d.finish()
    }
}

impl Limits {
    /// The limits of every caller of `g` (its tokens, or `anonymous`), with
    /// their counters in `metrics`.
    pub(crate) fn new(g: &GatewaySettings, metrics: &Metrics) -> Self {
        let mut callers = HashMap::new();
        if g.tokens.is_empty() {
            callers.insert(
                ANONYMOUS.to_owned(),
                Arc::new(CallerState::new(ANONYMOUS, g.limits, metrics)),
            );
        }
        for (name, t) in &g.tokens {
            let limits = t.limits.over(g.limits);
            callers.insert(
                name.clone(),
                Arc::new(CallerState::new(name, limits, metrics)),
            );
        }
        Self { callers }
    }

    /// The state of `caller`; `None` only for a caller the settings do not
    /// name (none: [`super::auth::Auth`] names only configured callers).
    fn of(&self, caller: &Caller) -> Option<&Arc<CallerState>> {
        self.callers.get(&caller.name)
    }

    /// The limits in effect for `caller`.
    pub(crate) fn limits_of(&self, caller: &Caller) -> Option<CallerLimits> {
        self.of(caller).map(|c| c.limits)
    }

    /// Takes one request from `caller`'s rate; 429 when it is spent.
    pub(crate) fn request(&self, caller: &Caller) -> Result<(), ApiError> {
        let Some(c) = self.of(caller) else {
            return Ok(());
        };
        let Some(rate) = &c.rate else {
            return Ok(());
        };
        rate.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            c.refuse(
                Limit::Rate,
                wait.as_secs_f64().ceil() as u64,
                format!(
                    "more than {} requests per second (burst {})",
                    c.limits.rate_per_s,
                    rate_burst(&c.limits)
                ),
            )
        })
    }

    /// Whether `caller` may start one more call, having `pending` calls
    /// pending now; 429 when it is at its `max_pending`.
    pub(crate) fn pending(
        &self,
        caller: &Caller,
        pending: usize,
        retry_after: u64,
    ) -> Result<(), ApiError> {
        let Some(c) = self.of(caller) else {
            return Ok(());
        };
        let max = c.limits.max_pending;
        if max == 0 || pending < max {
            return Ok(());
        }
        Err(c.refuse(
            Limit::Pending,
            retry_after,
            format!("{pending} calls of this caller are pending (at most {max})"),
        ))
    }

    /// Whether `caller` is surely below its `max_pending` without counting
    /// in the store: its last count is younger than [`PENDING_RECOUNT`] and,
    /// with the calls stored here since, below half the bound.
    pub(crate) fn pending_surely_within(&self, caller: &Caller) -> bool {
        let Some(c) = self.of(caller) else {
            return true;
        };
        let max = c.limits.max_pending;
        if max == 0 {
            return true;
        }
        let seen = *c
            .pending_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        seen.is_some_and(|s| {
            let since = c.stored.load(Ordering::Acquire).saturating_sub(s.stored);
            s.at.elapsed() < PENDING_RECOUNT && s.count.saturating_add(since) < max / 2
        })
    }

    /// Taken before reading a count of `caller`'s pending calls.
    pub(crate) fn pending_count_start(&self, caller: &Caller) -> CountStart {
        CountStart {
            at: Instant::now(),
            stored: self
                .of(caller)
                .map_or(0, |c| c.stored.load(Ordering::Acquire)),
        }
    }

    /// Notes `count`, `caller`'s pending calls as read from the store since
    /// `start` (kept unless a later read is kept already).
    pub(crate) fn pending_counted(&self, caller: &Caller, start: CountStart, count: usize) {
        let Some(c) = self.of(caller) else {
            return;
        };
        let mut seen = c
            .pending_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if seen.is_none_or(|s| s.at <= start.at) {
            *seen = Some(PendingSeen {
                at: start.at,
                count,
                stored: start.stored,
            });
        }
    }

    /// This gateway stored a pending call of `caller`.
    pub(crate) fn pending_stored(&self, caller: &Caller) {
        if let Some(c) = self.of(caller) {
            c.stored.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A stream slot of `caller`, held until the slot is dropped; 429 when
    /// it holds its `max_streams`.
    pub(crate) fn stream(&self, caller: &Caller) -> Result<Option<Slot>, ApiError> {
        self.hold(caller, Limit::Streams, "event streams")
    }

    /// A long-poll slot of `caller`, held until the slot is dropped; 429
    /// when it holds its `max_long_polls`.
    pub(crate) fn long_poll(&self, caller: &Caller) -> Result<Option<Slot>, ApiError> {
        self.hold(caller, Limit::LongPolls, "long-polls")
    }

    fn hold(&self, caller: &Caller, limit: Limit, what: &str) -> Result<Option<Slot>, ApiError> {
        let Some(c) = self.of(caller) else {
            return Ok(None);
        };
        let (count, max) = c.held(limit);
        if max == 0 {
            return Ok(None);
        }
        let taken = count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        });
        match taken {
            Ok(_) => Ok(Some(Slot {
                caller: c.clone(),
                limit,
            })),
            Err(n) => Err(c.refuse(
                limit,
                1,
                format!("this caller holds {n} {what} open (at most {max})"),
            )),
        }
    }
}

/// The burst in effect.
fn rate_burst(limits: &CallerLimits) -> u32 {
    match limits.burst {
        0 => (limits.rate_per_s.ceil() as u32).max(1),
        b => b,
    }
}

/// A stream or long-poll of one caller, counted until dropped.
pub struct Slot {
    caller: Arc<CallerState>,
    limit: Limit,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("caller", &self.caller.name)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.caller
            .held(self.limit)
            .0
            .fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Settings, TokenSettings};

    fn limits(tweak: impl FnOnce(&mut GatewaySettings)) -> (Limits, Caller, Caller) {
        let mut s = Settings::load(None).unwrap().gateway;
        s.tokens.insert(
            "a".into(),
            TokenSettings::bearer("a-token-0123456789ab", &["*"]),
        );
        s.tokens.insert(
            "b".into(),
            TokenSettings::bearer("b-token-0123456789ab", &["*"]),
        );
        tweak(&mut s);
        let auth = super::super::auth::Auth::new(&s.tokens);
        let who = |t: &str| {
            let req = actix_web::test::TestRequest::default()
                .insert_header(("Authorization", format!("Bearer {t}")))
                .to_http_request();
            auth.caller(&req).unwrap()
        };
        let (a, b) = (who("a-token-0123456789ab"), who("b-token-0123456789ab"));
        (Limits::new(&s, &Metrics::new()), a, b)
    }

    #[test]
    fn a_rate_is_per_caller_with_its_burst() {
        let (l, a, b) = limits(|g| {
            g.limits.rate_per_s = 0.001;
            g.limits.burst = 3;
        });
        for _ in 0..3 {
            l.request(&a).unwrap();
        }
        match l.request(&a) {
            Err(ApiError::TooManyRequests { retry_after, .. }) => {
                assert!(retry_after > 100, "{retry_after}")
            }
            other => panic!("{other:?}"),
        }
        l.request(&b).unwrap();
    }

    #[test]
    fn a_pending_count_stands_only_while_fresh_and_far_from_the_bound() {
        let (l, a, b) = limits(|g| g.limits.max_pending = 8);
        assert!(!l.pending_surely_within(&a), "never counted");
        let start = l.pending_count_start(&a);
        l.pending_counted(&a, start, 2);
        assert!(l.pending_surely_within(&a), "2 of 8");
        assert!(!l.pending_surely_within(&b), "another caller's count");
        l.pending_stored(&a);
        assert!(l.pending_surely_within(&a), "3 of 8");
        l.pending_stored(&a);
        assert!(!l.pending_surely_within(&a), "4 of 8: counted again");
        // A count that began before the calls were stored includes them
        // only if the store had them: the ones stored after its start are
        // added to it.
        let start = l.pending_count_start(&a);
        l.pending_counted(&a, start, 1);
        assert!(l.pending_surely_within(&a), "1 of 8");
        l.pending_counted(
            &a,
            CountStart {
                at: start.at - Duration::from_millis(1),
                stored: 0,
            },
            0,
        );
        assert!(l.pending_surely_within(&a), "an older count is not kept");
        let stale = CountStart {
            at: Instant::now() - PENDING_RECOUNT,
            stored: start.stored,
        };
        let (l2, a2, _) = limits(|g| g.limits.max_pending = 8);
        l2.pending_counted(&a2, stale, 0);
        assert!(!l2.pending_surely_within(&a2), "too old: counted again");
    }

    #[test]
    fn slots_are_per_caller_and_come_back_when_dropped() {
        let (l, a, b) = limits(|g| {
            g.limits.max_streams = 2;
            g.tokens.get_mut("b").unwrap().limits.max_streams = Some(0);
        });
        let one = l.stream(&a).unwrap();
        let _two = l.stream(&a).unwrap();
        assert!(matches!(
            l.stream(&a),
            Err(ApiError::TooManyRequests { .. })
        ));
        for _ in 0..10 {
            assert!(l.stream(&b).unwrap().is_none(), "b has no limit");
        }
        drop(one);
        assert!(l.stream(&a).unwrap().is_some());
        assert!(l.long_poll(&a).unwrap().is_some(), "another limit");
    }
}
