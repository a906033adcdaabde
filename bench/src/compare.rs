//! `bench rpc`, `bench raw` and `bench compare`: the variants ([`rpc`]'s
//! switchboard side, [`raw`]'s reference) set up side by side for each
//! profile, then for each round and concurrency one point per variant,
//! alternating which goes first, and a ratio line per concurrency when both
//! variants ran.
//!
//! [`rpc`]: crate::rpc
//! [`raw`]: crate::raw

use std::collections::HashMap;

use crate::Out;
use crate::env::{Env, Target};
use crate::error::Result;
use crate::load::{Measured, Phases, Stop};
use crate::probe::Probe;
use crate::progress::Tally;
use crate::raw::RawRpc;
use crate::report::{self, Labels, Line, Point, Totals, measured_point};
use crate::rpc::{RpcArgs, SbRpc};

/// Flags of `bench compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// As `bench rpc`.
    #[command(flatten)]
    pub rpc: RpcArgs,
    /// Repetitions of raw and rpc, alternating which goes first; the ratio
    /// merges them.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
}

/// Which implementation a point measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Variant {
    /// The library.
    Switchboard,
    /// The reference on bare lapin.
    Raw,
}

impl Variant {
    /// The point's `variant`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Switchboard => "switchboard",
            Variant::Raw => "raw",
        }
    }
}

/// One side of an rpc comparison, set up for one profile.
enum Side {
    Switchboard(Box<SbRpc>),
    Raw(Box<RawRpc>),
}

impl Side {
    async fn start(variant: Variant, t: &Target) -> Result<Self> {
        Ok(match variant {
            Variant::Switchboard => Side::Switchboard(Box::new(SbRpc::start(t).await?)),
            Variant::Raw => Side::Raw(Box::new(RawRpc::start(t).await?)),
        })
    }

    async fn drive(&self, concurrency: usize, stop: Stop, tally: Tally) -> Measured {
        match self {
            Side::Switchboard(s) => s.drive(concurrency, stop, tally).await,
            Side::Raw(r) => r.drive(concurrency, stop, tally).await,
        }
    }

    async fn stop(self) {
        match self {
            Side::Switchboard(s) => s.stop().await,
            Side::Raw(r) => r.stop().await,
        }
    }
}

/// The points of `bench rpc` (`variants` = switchboard), `bench raw` (raw)
/// and `bench compare` (both, `rounds` times).
pub(crate) async fn run(
    env: &mut Env,
    a: &RpcArgs,
    variants: &[Variant],
    rounds: u32,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    let stop = a.load.stop()?;
    // `--worker-processes`: points for each count (0: in-process worker).
    let counts = if a.worker_processes.is_empty() {
        vec![0]
    } else {
        a.worker_processes.clone()
    };
    for (&profile, &processes) in a
        .profile
        .iter()
        .flat_map(|p| counts.iter().map(move |n| (p, n)))
    {
        let targets = variants
            .iter()
            .map(|&v| env.target(v, profile, processes, a).map(|t| (v, t)))
            .collect::<Result<Vec<_>>>()?;
        let mut sides = Vec::new();
        let mut result = Ok(());
        for (variant, target) in &targets {
            match Side::start(*variant, target).await {
                Ok(side) => sides.push((*variant, target.labels, side)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            measure_sides(&sides, a, stop, rounds, probe, out).await;
        }
        for (_, _, side) in sides {
            side.stop().await;
        }
        result?;
    }
    Ok(())
}

/// Every round and concurrency of the sides already set up, then the ratio
/// lines.
async fn measure_sides(
    sides: &[(Variant, Labels, Side)],
    a: &RpcArgs,
    stop: Stop,
    rounds: u32,
    probe: &Probe,
    out: &mut Out<'_>,
) {
    let mut totals: HashMap<(usize, Variant), Totals> = HashMap::new();
    let mut last: HashMap<usize, Point> = HashMap::new();
    for round in 1..=rounds {
        for &c in &a.concurrency {
            let order: Vec<_> = if round % 2 == 1 {
                sides.iter().collect()
            } else {
                sides.iter().rev().collect()
            };
            for (variant, labels, side) in order {
                let label = format!(
                    "rpc {} {} c={c} round {round}/{rounds}",
                    variant.name(),
                    labels.profile
                );
                let phases = Phases {
                    label,
                    warmup: a.load.warmup,
                    stop,
                    probe,
                    progress: out.progress(),
                };
                let (m, usage) = phases
                    .run(|| {}, |stop, tally| side.drive(c, stop, tally))
                    .await;
                let point = measured_point("rpc", variant.name(), *labels, c, round, &m, usage);
                totals.entry((c, *variant)).or_insert_with(Totals::new).add(
                    m.calls,
                    point.seconds,
                    &m.hist,
                );
                last.insert(c, point.clone());
                out.emit(Line::Point(point));
            }
        }
    }
    if sides.len() < 2 {
        return;
    }
    for &c in &a.concurrency {
        let sb = totals.get(&(c, Variant::Switchboard));
        let raw = totals.get(&(c, Variant::Raw));
        if let (Some(sb), Some(raw), Some(like)) = (sb, raw, last.get(&c)) {
            out.emit(Line::Ratio(report::ratio(like, rounds, sb, raw)));
        }
    }
}
