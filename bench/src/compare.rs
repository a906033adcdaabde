//! `bench rpc`, `bench raw` and `bench compare`: the variants ([`rpc`]'s
//! switchboard sides, [`raw`]'s and [`plain`]'s references) set up side by
//! side for each profile, then for each round and concurrency one point per
//! variant, alternating which goes first (odd rounds in the order given,
//! even rounds reversed), and a ratio line per concurrency and pair of
//! variants that ran ([`RATIOS`]).
//!
//! [`rpc`]: crate::rpc
//! [`raw`]: crate::raw
//! [`plain`]: crate::plain

use std::collections::HashMap;

use crate::Out;
use crate::env::{Env, Target};
use crate::error::Result;
use crate::load::{Measured, Phases, Stop};
use crate::plain::PlainRpc;
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
    /// Repetitions of the variants, alternating which goes first; the ratio
    /// merges them.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// The variants to measure, in this order on odd rounds (reversed on
    /// even ones).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain,plain-guarantees,switchboard-waits,switchboard,raw"
    )]
    pub variants: Vec<Variant>,
}

/// Which implementation a point measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Variant {
    /// The library: `RpcClient::send` then wait (a call that may outlive its
    /// caller: persistent reply, confirmed before the request's ack).
    Switchboard,
    /// The library: `RpcClient::call` (the caller waits in memory: a
    /// transient reply, the request acked once the reply is written).
    SwitchboardWaits,
    /// The reference on bare lapin with switchboard's properties and queues.
    Raw,
    /// The tutorials' RPC loop in two processes (crate::plain).
    Plain,
    /// The same with switchboard's guarantees (crate::plain).
    PlainGuarantees,
}

impl Variant {
    /// The point's `variant`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Switchboard => "switchboard",
            Variant::SwitchboardWaits => "switchboard-waits",
            Variant::Raw => "raw",
            Variant::Plain => "plain",
            Variant::PlainGuarantees => "plain-guarantees",
        }
    }
}

/// The ratio lines of `bench compare`, each of two variants when both ran:
/// the first divided by the second (the first is always a switchboard
/// side). The first pair's line has no `of` (as before the plain variants).
pub const RATIOS: &[(Variant, Variant)] = &[
    (Variant::Switchboard, Variant::Raw),
    (Variant::Switchboard, Variant::PlainGuarantees),
    (Variant::Switchboard, Variant::Plain),
    (Variant::SwitchboardWaits, Variant::Plain),
    (Variant::SwitchboardWaits, Variant::PlainGuarantees),
];

/// One side of an rpc comparison, set up for one profile.
enum Side {
    Switchboard(Box<SbRpc>),
    Raw(Box<RawRpc>),
    Plain(Box<PlainRpc>),
}

impl Side {
    async fn start(variant: Variant, t: &Target) -> Result<Self> {
        Ok(match variant {
            Variant::Switchboard => Side::Switchboard(Box::new(SbRpc::start(t, false).await?)),
            Variant::SwitchboardWaits => Side::Switchboard(Box::new(SbRpc::start(t, true).await?)),
            Variant::Raw => Side::Raw(Box::new(RawRpc::start(t).await?)),
            Variant::Plain => Side::Plain(Box::new(PlainRpc::start(t, false).await?)),
            Variant::PlainGuarantees => Side::Plain(Box::new(PlainRpc::start(t, true).await?)),
        })
    }

    async fn drive(&self, concurrency: usize, stop: Stop, tally: Tally) -> Measured {
        match self {
            Side::Switchboard(s) => s.drive(concurrency, stop, tally).await,
            Side::Raw(r) => r.drive(concurrency, stop, tally).await,
            Side::Plain(p) => p.drive(concurrency, stop, tally).await,
        }
    }

    async fn stop(self) {
        match self {
            Side::Switchboard(s) => s.stop().await,
            Side::Raw(r) => r.stop().await,
            Side::Plain(p) => p.stop().await,
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
        for (i, &(top, bottom)) in RATIOS.iter().enumerate() {
            let sb = totals.get(&(c, top));
            let raw = totals.get(&(c, bottom));
            if let (Some(sb), Some(raw), Some(like)) = (sb, raw, last.get(&c)) {
                let mut ratio = report::ratio(like, rounds, sb, raw);
                if i > 0 {
                    ratio.of = Some(format!("{} / {}", top.name(), bottom.name()));
                }
                out.emit(Line::Ratio(ratio));
            }
        }
    }
}
