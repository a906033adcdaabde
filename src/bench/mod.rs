//! `switchboard bench`: load generator and the raw-lapin reference it is
//! compared with in the same run. (Being written: see issue "Performance".)

use crate::error::Result;
use crate::settings::Settings;

/// Arguments of `switchboard bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

/// Runs the benchmark named by `args`, printing one JSON line per point.
pub async fn run(_settings: Settings, _args: BenchArgs) -> Result<()> {
    Err(crate::error::Error::Malformed(
        "bench is not written yet".into(),
    ))
}
