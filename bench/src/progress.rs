//! Progress of a run on stderr, when stderr is a terminal: one bar per
//! phase (a warm-up or a measured point), cleared when the phase ends.
//! stdout keeps only the JSON lines; when stderr is not a terminal (a log
//! file, CI, the tests) nothing is drawn at all.
//!
//! The measured code only counts: a [`Tally`] is one relaxed atomic add per
//! call (nothing at all when hidden). A thread of its own (`bench-progress`,
//! in `cpu_by_thread`) reads the count five times a second and draws, so no
//! drawing ever runs on the threads being measured.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::debug;

/// How often the bar is redrawn from the count.
const REDRAW: Duration = Duration::from_millis(200);

/// Where a run's progress is drawn, if anywhere.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The bars on stderr; `None` when nothing is drawn.
    bars: Option<MultiProgress>,
}

/// How much work a phase has: a number of operations, or a length of time.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Total {
    /// This many operations.
    Count(u64),
    /// Operations until this much time has passed.
    Time(Duration),
}

impl Progress {
    /// Bars on stderr if it is a terminal, else nothing.
    pub fn on_stderr() -> Self {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { bars }
    }

    /// Draws nothing (tests, library callers).
    pub fn hidden() -> Self {
        Self { bars: None }
    }

    /// Runs `f` with the bars taken off the screen, so that what `f` writes
    /// (a JSON line, a log line) is not drawn over.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bars {
            Some(bars) => bars.suspend(f),
            None => f(),
        }
    }

    /// A writer for log lines on stderr that clears the bars while it writes
    /// (for `tracing_subscriber`'s `with_writer`).
    pub fn stderr_writer(&self) -> impl Fn() -> LogWriter + Send + Sync + 'static {
        let progress = self.clone();
        move || LogWriter(progress.clone())
    }

    /// Starts a phase named `label` of `total` `unit`s (e.g. "calls"): its
    /// [`Tally`] counts, its bar shows until the [`Phase`] is dropped.
    pub(crate) fn phase(&self, label: String, unit: &'static str, total: Total) -> Phase {
        let Some(bars) = &self.bars else {
            return Phase {
                tally: Tally(None),
                drawer: None,
            };
        };
        let done = Arc::new(AtomicU64::new(0));
        let bar = bars.add(new_bar(label, unit, total));
        let (stop, stopped) = mpsc::channel::<()>();
        let count = done.clone();
        let spawned = std::thread::Builder::new()
            .name("bench-progress".into())
            .spawn(move || draw_until(stopped, &bar, &count, unit, total));
        let drawer = match spawned {
            Ok(thread) => Some(Drawer { stop, thread }),
            Err(e) => {
                debug!(error = %e, "no progress thread: the phase runs without a bar");
                None
            }
        };
        Phase {
            tally: Tally(Some(done)),
            drawer,
        }
    }
}

/// The bar of one phase: a bar of operations, or of time for a phase with
/// a duration (the count then in the message).
fn new_bar(label: String, unit: &'static str, total: Total) -> ProgressBar {
    let (len, template) = match total {
        Total::Count(n) => (
            n,
            "{prefix} [{wide_bar}] {human_pos}/{human_len} {msg} {per_sec:0} eta {eta}",
        ),
        Total::Time(d) => (
            d.as_millis() as u64,
            "{prefix} [{wide_bar}] {elapsed}/{duration} {msg}",
        ),
    };
    // A constant template with known keys: it parses.
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::new(len)
        .with_style(style)
        .with_prefix(label)
        .with_message(unit)
}

/// Redraws `bar` from `done` every [`REDRAW`] until the phase ends (the
/// sender is dropped), then clears it.
fn draw_until(
    stopped: mpsc::Receiver<()>,
    bar: &ProgressBar,
    done: &AtomicU64,
    unit: &str,
    total: Total,
) {
    let start = Instant::now();
    loop {
        let n = done.load(Ordering::Relaxed);
        match total {
            Total::Count(_) => bar.set_position(n),
            Total::Time(_) => {
                bar.set_message(format!("{n} {unit}"));
                bar.set_position(start.elapsed().as_millis() as u64);
            }
        }
        match stopped.recv_timeout(REDRAW) {
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    bar.finish_and_clear();
}

/// The drawing thread of a phase, and how to stop it.
#[derive(Debug)]
struct Drawer {
    /// Dropped to end the thread at once.
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// A phase in progress: its [`Tally`], and its bar until dropped.
#[derive(Debug)]
pub(crate) struct Phase {
    tally: Tally,
    drawer: Option<Drawer>,
}

impl Phase {
    /// What the measured code counts with.
    pub fn tally(&self) -> Tally {
        self.tally.clone()
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(Drawer { stop, thread }) = self.drawer.take() {
            // The closed channel wakes the thread at once: it clears the bar
            // and ends.
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// Counts a phase's finished operations; a no-op when nothing is drawn.
#[derive(Debug, Clone)]
pub(crate) struct Tally(Option<Arc<AtomicU64>>);

impl Tally {
    /// One more operation done.
    pub fn add(&self, n: u64) {
        if let Some(done) = &self.0 {
            done.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Writes a log line to stderr with the bars off the screen.
pub struct LogWriter(Progress);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // One suspension per line: tracing writes each event with one call.
        self.0.suspend(|| std::io::stderr().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
