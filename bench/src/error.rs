//! What a bench run fails with: the library's errors, the raw references'
//! lapin errors, bad flags, and what the bench's own set-up (listeners,
//! threads, the gateway's first call) can run into.

use switchboard::lapin;

/// Everything a bench run can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The library failed (connecting, a worker, a client, the gateway).
    #[error(transparent)]
    Switchboard(#[from] switchboard::Error),
    /// A raw reference's own AMQP operation failed.
    #[error("AMQP (raw reference): {0}")]
    Amqp(#[from] lapin::Error),
    /// A flag has a value the workload cannot use.
    #[error("{flag}: {reason}")]
    Flag {
        /// The flag, e.g. `--duration`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: &'static str,
    },
    /// An operating-system resource of the bench's own (a listener, a
    /// thread, the store's directory).
    #[error("{what}: {source}")]
    Io {
        /// What the bench was setting up.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client of the gateway workloads could not be built.
    #[error("HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// A workload's set-up did not go as the gateway's contract says (its
    /// first call, its clients connecting).
    #[error("{workload} set-up: {reason}")]
    Setup {
        /// The workload, e.g. `http`.
        workload: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A thread of the bench's own ended without an answer (it panicked).
    #[error("the {0} thread ended without an answer")]
    ThreadLost(&'static str),
}

impl BenchError {
    /// A flag's value the workload cannot use.
    pub(crate) fn flag(flag: &'static str, reason: &'static str) -> Self {
        BenchError::Flag { flag, reason }
    }

    /// An I/O failure while setting up `what`.
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| BenchError::Io { what, source }
    }
}

/// Result with the bench's error.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
