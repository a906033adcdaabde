//! Supervised consumers of actix actors (the worker, the reply router, the
//! event hub): [`ActorConsumer`] runs an actor's link in the actor's own
//! context, and [`Keeper`] starts a new actor when one stops or panics.
//!
//! An actor adds its link's [`Deliveries`](super::Deliveries) as a stream:
//! each delivery reaches its `StreamHandler` straight from lapin's consumer,
//! with no hop in between. When the stream says the link is lost, the
//! actor's [`ActorConsumer`] drops that stream (so a stale one can never
//! deliver or report again), drops the link and opens a new one in the
//! actor's context; the actor's own state (pending calls, sessions, the
//! deduplication window) stays.
//!
//! A panicking actor's future is dropped by its arbiter, and with it its
//! link: the status goes down ("the task or actor holding it panicked"), and
//! the [`Keeper`] (which notices through a lifeline the actor holds) starts
//! a new actor after a pause (100 ms doubling to 5 s).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use deadpool_lapin::lapin::message::Delivery;
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::{Event, Link, Lost, MAX_RECONNECT_PAUSE, Supervisor};

/// An actor whose deliveries come from a supervised consumer.
pub trait Consumes: Actor<Context = Context<Self>> + StreamHandler<Event> {
    /// The actor's consumer.
    fn consumer(&mut self) -> &mut ActorConsumer;
    /// Called with each new link (the first and every re-established one)
    /// before its first delivery.
    fn linked(&mut self, _link: &Link, _ctx: &mut Context<Self>) {}
    /// Called when the link is lost, before a new one is opened.
    fn unlinked(&mut self, _ctx: &mut Context<Self>) {}
}

/// The consumer of one actor: its supervisor, the link it consumes now, and
/// the handles that let it drop a lost link's stream and stop reopening.
#[derive(Debug)]
pub struct ActorConsumer {
    supervisor: Supervisor,
    link: Option<Link>,
    /// The current link's deliveries in the actor's context.
    stream: Option<SpawnHandle>,
    /// The future opening a new link, while one runs.
    reopening: Option<SpawnHandle>,
    /// Set by [`ActorConsumer::stop`]: lost links are not replaced.
    stopping: bool,
    /// Dropped with the actor: tells its [`Keeper`] that the actor is gone.
    _lifeline: Option<oneshot::Sender<()>>,
}

impl ActorConsumer {
    /// A consumer that starts with `link` (opened by `supervisor`), or opens
    /// one when the actor starts.
    pub fn new(supervisor: Supervisor, link: Option<Link>) -> Self {
        Self {
            supervisor,
            link,
            stream: None,
            reopening: None,
            stopping: false,
            _lifeline: None,
        }
    }

    /// The link consumed now; `None` while a new one is being opened.
    pub fn link(&self) -> Option<&Link> {
        self.link.as_ref()
    }

    /// The supervisor (for [`Supervisor::quarantine`]).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Call from the actor's `started`: consumes the link the actor was
    /// given, or opens one.
    pub fn start<A: Consumes>(act: &mut A, ctx: &mut Context<A>) {
        match act.consumer().link.take() {
            Some(link) => Self::attach(act, ctx, link),
            None => Self::reopen(act, ctx),
        }
    }

    /// Call from the actor's `StreamHandler::handle`: the delivery, or
    /// `None` when the event says that the link was lost (a new one is then
    /// being opened).
    pub fn delivered<A: Consumes>(
        act: &mut A,
        event: Event,
        ctx: &mut Context<A>,
    ) -> Option<Delivery> {
        match event {
            Event::Delivery(d) => Some(d),
            Event::Lost(why) => {
                Self::lose(act, ctx, why);
                None
            }
        }
    }

    /// Stops on purpose: no link is opened any more, the status says
    /// stopped, and the current link (if any) is handed to the caller to
    /// cancel and close; its deliveries reach the actor until then.
    pub fn stop<A: Consumes>(act: &mut A, ctx: &mut Context<A>) -> Option<Link> {
        let c = act.consumer();
        c.stopping = true;
        if let Some(h) = c.reopening.take() {
            ctx.cancel_future(h);
        }
        c.supervisor.status().set_stopped();
        let mut link = c.link.take()?;
        link.mark_stopped();
        Some(link)
    }

    fn attach<A: Consumes>(act: &mut A, ctx: &mut Context<A>, mut link: Link) {
        if let Some(deliveries) = link.take_deliveries() {
            let handle = ctx.add_stream(deliveries);
            act.consumer().stream = Some(handle);
        }
        act.linked(&link, ctx);
        act.consumer().link = Some(link);
    }

    fn lose<A: Consumes>(act: &mut A, ctx: &mut Context<A>, why: Lost) {
        let c = act.consumer();
        if let Some(h) = c.stream.take() {
            ctx.cancel_future(h);
        }
        if let Some(link) = c.link.take() {
            warn!(consumer = %c.supervisor.name(), queue = %link.queue(), lost = %why, "consumer lost; re-establishing");
            // Deliveries of the old channel still in the actor's hands are
            // never acked on the new one: their ackers belong to the old
            // channel, which closes here.
            link.lost(why.reason());
        }
        if c.stopping {
            return;
        }
        act.unlinked(ctx);
        Self::reopen(act, ctx);
    }

    fn reopen<A: Consumes>(act: &mut A, ctx: &mut Context<A>) {
        let c = act.consumer();
        if c.reopening.is_some() || c.stopping {
            return;
        }
        let supervisor = c.supervisor.clone();
        let opening = async move { supervisor.reopen().await }
            .into_actor(act)
            .map(|link, act, ctx| {
                let c = act.consumer();
                c.reopening = None;
                if c.stopping {
                    actix::spawn(link.stop("stopping"));
                    return;
                }
                Self::attach(act, ctx, link);
            });
        let handle = ctx.spawn(opening);
        act.consumer().reopening = Some(handle);
    }
}

/// Keeps one actor running: when it stops or panics, unless
/// [`Keeper::stop_restarting`] was called, it starts a new one (after a
/// pause: 100 ms, doubling to 5 s; back to 100 ms once an actor lived a
/// minute). Handles reach the current actor through [`Keeper::addr`].
pub struct Keeper<A: Actor> {
    current: Arc<Mutex<Addr<A>>>,
    stopping: Arc<AtomicBool>,
}

impl<A: Actor> Clone for Keeper<A> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

impl<A: Actor> std::fmt::Debug for Keeper<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("stopping", &self.stopping.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How long an actor must have lived for its keeper's pause to start again
/// from the shortest.
const STEADY: Duration = Duration::from_secs(60);

impl<A: Consumes> Keeper<A> {
    /// Starts the actor with `make` on the current arbiter (it must be
    /// called inside an actix system), giving it `link` the first time and
    /// none when it is started again (it opens one).
    pub fn start(
        supervisor: Supervisor,
        link: Link,
        make: impl Fn(ActorConsumer) -> Addr<A> + 'static,
    ) -> Self {
        let (consumer, mut died) = Self::consumer(&supervisor, Some(link));
        let current = Arc::new(Mutex::new(make(consumer)));
        let stopping = Arc::new(AtomicBool::new(false));
        let keeper = Self {
            current: current.clone(),
            stopping: stopping.clone(),
        };
        actix::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                let born = tokio::time::Instant::now();
                let _ = (&mut died).await;
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if born.elapsed() >= STEADY {
                    pause = Duration::from_millis(100);
                }
                supervisor.status().set_down("its actor stopped");
                error!(consumer = %supervisor.name(), restart_in = ?pause, "consumer actor stopped; starting a new one");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RECONNECT_PAUSE);
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let (consumer, next) = Self::consumer(&supervisor, None);
                *current.lock().unwrap_or_else(|p| p.into_inner()) = make(consumer);
                died = next;
            }
        });
        keeper
    }

    fn consumer(
        supervisor: &Supervisor,
        link: Option<Link>,
    ) -> (ActorConsumer, oneshot::Receiver<()>) {
        let (lifeline, died) = oneshot::channel();
        let mut consumer = ActorConsumer::new(supervisor.clone(), link);
        consumer._lifeline = Some(lifeline);
        (consumer, died)
    }

    /// The actor running now.
    pub fn addr(&self) -> Addr<A> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The actor is being stopped on purpose: do not start another.
    pub fn stop_restarting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}
