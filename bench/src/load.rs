//! The load driver: keeps `concurrency` calls in flight until a number of
//! calls is done or a duration has passed, and records each call's latency.
//!
//! Every caller is a task of its own on the current actix arbiter (the
//! thread that runs the bench), as an HTTP handler calling the library
//! would be. Both variants are driven by this same code.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tracing::warn;

use crate::error::{BenchError, Result};
use crate::probe::{Probe, Usage};
use crate::progress::{Progress, Tally, Total};
use crate::report::{histogram, record};

/// How long each point lasts.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Calls per measured point.
    #[arg(long, default_value_t = 20_000)]
    pub calls: u64,
    /// Measure for this many seconds instead of a number of calls.
    #[arg(long, conflicts_with = "calls")]
    pub duration: Option<f64>,
    /// Calls made before each point, at its concurrency, and not recorded.
    #[arg(long, default_value_t = 1_000)]
    pub warmup: u64,
}

impl LoadArgs {
    /// When each measured point ends.
    pub(crate) fn stop(&self) -> Result<Stop> {
        match self.duration {
            Some(s) if s.is_finite() && s > 0.0 => Ok(Stop::After(Duration::from_secs_f64(s))),
            Some(_) => Err(BenchError::flag("--duration", "must be positive")),
            None => Ok(Stop::Calls(self.calls)),
        }
    }
}

/// When a measured point ends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stop {
    /// After this many calls.
    Calls(u64),
    /// When this much time has passed (calls in flight then finish).
    After(Duration),
}

impl Stop {
    /// The work of a phase that ends here, for its progress bar.
    pub fn total(self) -> Total {
        match self {
            Stop::Calls(n) => Total::Count(n),
            Stop::After(d) => Total::Time(d),
        }
    }
}

/// What one drive measured.
#[derive(Debug)]
pub(crate) struct Measured {
    /// Latencies of successful calls, µs.
    pub hist: Histogram<u64>,
    /// Of the same calls, the time until their request was confirmed by the
    /// broker (the rest is the wait for the reply), µs.
    pub confirmed: Histogram<u64>,
    /// Calls made (including failed ones).
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// From the first call started to the last one finished.
    pub elapsed: Duration,
}

/// The two phases of a measured point: a warm-up of `warmup` calls (not
/// recorded; none when 0), then the measured phase until `stop` between two
/// probe readings; each shown as a bar under `label`.
pub(crate) struct Phases<'a> {
    pub label: String,
    pub warmup: u64,
    pub stop: Stop,
    pub probe: &'a Probe,
    pub progress: &'a Progress,
}

impl Phases<'_> {
    /// Runs both phases with `drive` (one phase: calls until the stop it is
    /// given, each counted on the tally); `between` runs after the warm-up,
    /// right before the first reading (to reset what the warm-up counted).
    pub async fn run<D, Fut>(self, between: impl FnOnce(), drive: D) -> (Measured, Usage)
    where
        D: Fn(Stop, Tally) -> Fut,
        Fut: Future<Output = Measured>,
    {
        if self.warmup > 0 {
            let warmup = Stop::Calls(self.warmup);
            let label = format!("{} warm-up", self.label);
            let phase = self.progress.phase(label, "calls", warmup.total());
            drive(warmup, phase.tally()).await;
        }
        let phase = self.progress.phase(self.label, "calls", self.stop.total());
        between();
        let snap = self.probe.start();
        let m = drive(self.stop, phase.tally()).await;
        (m, self.probe.finish(&snap))
    }

    /// [`Phases::run`] of calls made by `call` with `concurrency` in flight,
    /// with this process's resident memory (KiB) right before the measured
    /// phase and right after it.
    pub async fn run_with_rss<F, Fut>(
        self,
        concurrency: usize,
        call: F,
    ) -> (Measured, Usage, Option<u64>, Option<u64>)
    where
        F: Fn() -> Fut + Clone + 'static,
        Fut: Future<Output = Result<Instant, String>> + 'static,
    {
        let mut before = None;
        let (m, usage) = self
            .run(
                || before = crate::probe::rss_kib(),
                |stop, tally| drive(concurrency, stop, tally, call.clone()),
            )
            .await;
        (m, usage, before, crate::probe::rss_kib())
    }
}

/// Runs calls made by `call` with `concurrency` in flight until `stop`,
/// counting each finished call on `tally`. A call answers the instant its
/// request was confirmed, or `Err(reason)` when it failed; the first
/// reason is logged.
pub(crate) async fn drive<F, Fut>(concurrency: usize, stop: Stop, tally: Tally, call: F) -> Measured
where
    F: Fn() -> Fut + Clone + 'static,
    Fut: Future<Output = Result<Instant, String>> + 'static,
{
    // Tickets handed out so far: every task runs on this one thread.
    let issued = Rc::new(Cell::new(0u64));
    let logged = Rc::new(Cell::new(false));
    let start = Instant::now();
    let end = match stop {
        Stop::After(d) => Some(start + d),
        Stop::Calls(_) => None,
    };
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let call = call.clone();
            let issued = issued.clone();
            let logged = logged.clone();
            let tally = tally.clone();
            actix_rt::spawn(async move {
                let (mut hist, mut confirmed) = (histogram(), histogram());
                let (mut calls, mut errors) = (0u64, 0u64);
                loop {
                    match (stop, end) {
                        (Stop::Calls(n), _) if issued.get() >= n => break,
                        (_, Some(end)) if Instant::now() >= end => break,
                        _ => issued.set(issued.get() + 1),
                    }
                    let t0 = Instant::now();
                    let outcome = call().await;
                    calls += 1;
                    tally.add(1);
                    match outcome {
                        Ok(sent) => {
                            record(&mut hist, t0.elapsed());
                            record(&mut confirmed, sent.saturating_duration_since(t0));
                        }
                        Err(reason) => {
                            errors += 1;
                            if !logged.replace(true) {
                                warn!(%reason, "a bench call failed (further failures are only counted)");
                            }
                        }
                    }
                }
                (hist, confirmed, calls, errors)
            })
        })
        .collect();
    let mut out = Measured {
        hist: histogram(),
        confirmed: histogram(),
        calls: 0,
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        match task.await {
            Ok((hist, confirmed, calls, errors)) => {
                // Same bounds everywhere: addition cannot fail.
                let _ = out.hist.add(&hist);
                let _ = out.confirmed.add(&confirmed);
                out.calls += calls;
                out.errors += errors;
            }
            Err(e) => {
                warn!(error = %e, "a bench caller task ended abnormally");
                out.errors += 1;
            }
        }
    }
    out.elapsed = start.elapsed();
    out
}
