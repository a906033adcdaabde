//! The process's resources around a measured point: peak RSS, CPU time
//! by thread, optionally the broker's CPU time, and the whole machine's.
//!
//! Readings come from `/proc` (Linux); where it cannot be read they are
//! `null`, never an error: a missing reading must not stop a benchmark.

use std::collections::{BTreeMap, HashMap};

use crate::report::{Point, round3};

/// Reads the process's resources around a measured point.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    /// The thread running the actix system (the one that made the probe).
    main_tid: Option<u32>,
    /// The broker process to read CPU time from, when given.
    broker_pid: Option<u32>,
}

/// Readings taken at the start of a point.
#[derive(Debug)]
pub(crate) struct Snapshot {
    threads: HashMap<u32, (String, u64)>,
    broker_ns: Option<u64>,
    machine_ticks: Option<u64>,
    peak_reset: bool,
}

/// What a point adds to its [`Point`] from the probe.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    pub peak_rss_kib: Option<u64>,
    pub peak_rss_reset: bool,
    pub cpu_s: Option<f64>,
    pub main_cpu_s: Option<f64>,
    pub cpu_by_thread: BTreeMap<String, f64>,
    pub broker_cpu_s: Option<f64>,
    pub machine_cpu_s: Option<f64>,
}

impl Usage {
    /// `p` with these readings.
    pub fn into_point(self, p: Point) -> Point {
        Point {
            peak_rss_kib: self.peak_rss_kib,
            peak_rss_reset: self.peak_rss_reset,
            cpu_s: self.cpu_s,
            main_cpu_s: self.main_cpu_s,
            cpu_by_thread: self.cpu_by_thread,
            broker_cpu_s: self.broker_cpu_s,
            machine_cpu_s: self.machine_cpu_s,
            ..p
        }
    }
}

impl Probe {
    /// A probe for the calling thread's process.
    pub fn new(broker_pid: Option<u32>) -> Self {
        let main_tid = std::fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|p| p.file_name()?.to_str()?.parse().ok());
        Self {
            main_tid,
            broker_pid,
        }
    }

    /// Resets the peak RSS (best effort) and reads the CPU counters.
    pub fn start(&self) -> Snapshot {
        // "5" resets VmHWM to the current RSS (Linux 4.0 and later).
        let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        Snapshot {
            threads: threads_cpu_ns("self"),
            broker_ns: self
                .broker_pid
                .and_then(|p| total_ns(&threads_cpu_ns(&p.to_string()))),
            machine_ticks: machine_busy_ticks(),
            peak_reset,
        }
    }

    /// The resources used since `start`.
    pub fn finish(&self, start: &Snapshot) -> Usage {
        let now = threads_cpu_ns("self");
        let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
        let mut total = 0u64;
        let mut main = None;
        for (tid, (name, ns)) in &now {
            let before = start.threads.get(tid).map_or(0, |(_, b)| *b);
            let used = ns.saturating_sub(before);
            total += used;
            *by_name.entry(name.clone()).or_default() += used as f64 / 1e9;
            if Some(*tid) == self.main_tid {
                main = Some(used as f64 / 1e9);
            }
        }
        let broker_cpu_s = match (start.broker_ns, self.broker_pid) {
            (Some(before), Some(pid)) => total_ns(&threads_cpu_ns(&pid.to_string()))
                .map(|after| round3(after.saturating_sub(before) as f64 / 1e9)),
            _ => None,
        };
        let machine_cpu_s = match (start.machine_ticks, machine_busy_ticks()) {
            (Some(before), Some(after)) => {
                Some(round3(after.saturating_sub(before) as f64 / USER_HZ))
            }
            _ => None,
        };
        Usage {
            machine_cpu_s,
            peak_rss_kib: peak_rss_kib(),
            peak_rss_reset: start.peak_reset,
            cpu_s: (!now.is_empty()).then(|| round3(total as f64 / 1e9)),
            main_cpu_s: main.map(round3),
            cpu_by_thread: by_name.into_iter().map(|(k, v)| (k, round3(v))).collect(),
            broker_cpu_s,
        }
    }
}

/// VmHWM of this process, KiB.
pub fn peak_rss_kib() -> Option<u64> {
    status_kib("VmHWM:")
}

/// VmRSS of this process (resident now), KiB.
pub fn rss_kib() -> Option<u64> {
    status_kib("VmRSS:")
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU time (ns) and name of every thread of `/proc/<pid>`, from `schedstat`.
fn threads_cpu_ns(pid: &str) -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let path = entry.path();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        let name = std::fs::read_to_string(path.join("comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        if let Some(ns) = ns {
            out.insert(tid, (name, ns));
        }
    }
    out
}

/// The unit of `/proc/stat` (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// Busy time of all CPUs together (everything but idle and iowait), in
/// `USER_HZ` ticks.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let (idle, iowait) = (*fields.get(3)?, *fields.get(4)?);
    Some(fields.iter().sum::<u64>() - idle - iowait)
}

fn total_ns(threads: &HashMap<u32, (String, u64)>) -> Option<u64> {
    (!threads.is_empty()).then(|| threads.values().map(|(_, ns)| ns).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_kib().is_some_and(|k| k > 0));
        }
    }
}
