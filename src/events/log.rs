//! The events log `<prefix>.events.log`: a RabbitMQ stream queue bound to
//! the events fanout, so that every event published is kept (within the
//! retention, `amqp.events_log_*`) at an offset that is the same for every
//! reader. Those offsets are the positions of the gateway's event streams:
//! an SSE `id` given by one instance resumes on any other, and after any
//! restart.
//!
//! # Layout
//! - [`declare_log`]: declares the log (at start-up and by every reader).
//! - `LogQueue`: the hub's [`Declare`]: its consumer starts at `next` and,
//!   re-established, at the offset after the last one it saw.
//! - [`read_from`]: a reader of its own for one stream session resuming from
//!   a position the hub no longer holds in memory: from that offset on, then
//!   live, with a [`lost`] event first when the log no longer has it.
//!
//! # Offsets as RabbitMQ 3.10 hands them out
//! A stream consumer over AMQP 0-9-1 needs manual acks and a prefetch (acks
//! only move the credit on; nothing is removed), and says where it starts
//! with the consume argument `x-stream-offset` ([`wire::HEADER_STREAM_OFFSET`]).
//! Each delivery carries its offset in the header of the same name. The
//! broker delivers whole chunks, so a consumer asking for offset `n` may
//! first get the offsets before `n` in `n`'s chunk: they are skipped here.
//! An offset older than the log's first is served from the first: the
//! difference is what was lost. RabbitMQ 4.x adds server-side filtering
//! (`x-stream-filter`); 3.10 has none, so readers filter on their side.

use std::sync::{Arc, Mutex};

use deadpool_lapin::lapin::{
    Channel, Connection,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::CloudEvent;
use super::hub::{EventFilter, HubEvent};
use crate::amqp::consumer::{Declare, settle};
use crate::amqp::topology::{self, Declared, EventsLog};
use crate::amqp::{Broker, InFlight, wire};
use crate::error::Result;

/// Deliveries a log reader may hold unacked: RabbitMQ requires a prefetch
/// of stream consumers, and it bounds what waits in memory.
pub(crate) const READER_PREFETCH: u16 = 256;

/// Declares the events log ([`topology::declare_events_log`]); one that
/// exists with another retention is used as it is, with one warning per
/// process.
pub(crate) async fn declare_log(broker: &Broker, log: &EventsLog) -> Result<String> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let (queue, declared) = topology::declare_events_log(broker, log).await?;
    if declared == Declared::AsFound {
        WARNED.call_once(|| {
            warn!(
                %queue,
                "the events log exists with another retention than amqp.events_log_max_age and amqp.events_log_max_bytes ask for: used as it is. To change it in place, set a policy (rabbitmqctl set_policy with max-age, max-length-bytes) on it (docs/RELIABILITY.md)"
            );
        });
    }
    Ok(queue)
}

/// The `x-stream-offset` argument of a consumer starting at `at` (an
/// offset), or at the next message appended when `None`.
pub(crate) fn start_at(at: Option<u64>) -> FieldTable {
    let mut args = FieldTable::default();
    let value = match at {
        Some(offset) => AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
        None => AMQPValue::LongString("next".into()),
    };
    args.insert(wire::HEADER_STREAM_OFFSET.into(), value);
    args
}

/// The event hub's queue: the events log, read from `next` on the first
/// open and from the offset after the last one seen on every later one, so
/// that a hub whose connection comes back misses nothing the log still
/// holds.
pub(crate) struct LogQueue {
    /// The retention to declare the log with.
    pub(crate) log: EventsLog,
    /// The offset to start at on the next open (`None`: `next`); the hub
    /// moves it on as events arrive.
    pub(crate) resume_at: Arc<Mutex<Option<u64>>>,
}

#[async_trait::async_trait]
impl Declare for LogQueue {
    async fn declare(&self, broker: &Broker, _: &Connection) -> Result<String> {
        declare_log(broker, &self.log).await
    }

    fn consume_arguments(&self) -> FieldTable {
        // A poisoned lock only means a hub panicked mid-update: the value
        // is still an offset it saw.
        let at = *self.resume_at.lock().unwrap_or_else(|p| p.into_inner());
        start_at(at)
    }
}

/// The event a session gets in place of the events from `first_lost` to
/// `last_lost` (offsets), which the log no longer holds. Its position is
/// `last_lost`: a client resuming from it goes on with the first kept.
pub(crate) fn lost(first_lost: u64, last_lost: u64) -> HubEvent {
    let event = CloudEvent::new(
        wire::EVENT_EVENTS_LOST,
        wire::APP_ID,
        serde_json::json!({
            "first_lost": first_lost,
            "last_lost": last_lost,
            "reason": "older than the events log's retention",
        }),
    );
    let json = serde_json::to_vec(&event).unwrap_or_default();
    HubEvent {
        seq: last_lost,
        position: last_lost.to_string(),
        ty: event.ty,
        subject: None,
        caller: None,
        json: json.into(),
    }
}

/// Reads the events log from offset `from` for one session: each event
/// `filter` passes, in order, into `tx`, then live ones as they are
/// appended; first a [`lost`] event when the log starts after `from`. Waits
/// for the session to take each event (the prefetch bounds what the broker
/// sends meanwhile), so a slow client slows only its own reader. Ends when
/// the session's receiver is gone, when `stop` is cancelled, or when the
/// consumer is lost (the stream ends, and the client resumes from its last
/// position).
pub(crate) async fn read_from(
    broker: Broker,
    from: u64,
    filter: EventFilter,
    tx: mpsc::Sender<Arc<HubEvent>>,
    stop: CancellationToken,
) {
    let ch = match broker.channel().await {
        Ok(ch) => ch,
        Err(e) => {
            warn!(from, error = %e, "events log reader not started");
            return;
        }
    };
    let ended = tokio::select! {
        ended = read(&ch, &broker, from, &filter, &tx) => ended,
        _ = stop.cancelled() => Ok("stopped"),
        _ = tx.closed() => Ok("client gone"),
    };
    // Closed whichever way it ended: a dropped channel stays open on the
    // pooled connection, its consumer with it.
    crate::amqp::close_channel(&ch, "events log reader ended").await;
    match ended {
        Ok(why) => debug!(from, why, "events log reader ended"),
        Err(e) => warn!(from, error = %e, "events log reader lost"),
    }
}

async fn read(
    ch: &Channel,
    broker: &Broker,
    from: u64,
    filter: &EventFilter,
    tx: &mpsc::Sender<Arc<HubEvent>>,
) -> Result<&'static str> {
    // Required for a stream consumer; bounds what waits unread.
    ch.basic_qos(READER_PREFETCH, BasicQosOptions { global: false })
        .await?;
    let tag = wire::consumer_tag(broker.instance_id(), "events-log");
    let mut consumer = ch
        .basic_consume(
            broker.names().events_log().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions {
                no_local: false,
                // Streams require manual acks (they move the credit on).
                no_ack: false,
                // Every reader of the log reads it in full.
                exclusive: false,
                nowait: false,
            },
            start_at(Some(from)),
        )
        .await?;
    let mut first = true;
    // Copies of lifecycle events are dropped here too, as the hub does.
    let mut recent = super::hub::RecentIds::new(super::hub::RECENT_IDS_MIN);
    loop {
        let Some(delivery) = consumer.next().await else {
            return Ok("consumer ended");
        };
        let delivery = delivery?;
        let offset = wire::stream_offset(&delivery.properties);
        let inflight = InFlight::new(delivery);
        let parsed = match offset {
            // Earlier offsets of `from`'s chunk: not asked for.
            Some(o) if o < from => None,
            Some(o) => {
                if first && o > from {
                    let _ = tx.send(Arc::new(lost(from, o - 1))).await;
                }
                first = false;
                HubEvent::parse_with_id(o, &inflight.delivery().data)
                    .filter(|(ev, id)| recent.first_time(ev, id))
                    .map(|(ev, _)| ev)
                    .filter(|ev| filter.matches(ev))
            }
            // Not from a stream: cannot happen on a stream queue.
            None => None,
        };
        // On a stream an ack only moves the credit on: handed to lapin,
        // not awaited (InFlight::ack_now).
        settle(inflight.ack_now());
        if let Some(ev) = parsed
            && tx.send(Arc::new(ev)).await.is_err()
        {
            return Ok("client gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_event_says_what_was_lost_and_resumes_after_it() {
        let ev = lost(3, 41);
        assert_eq!(ev.position, "41");
        assert_eq!(ev.ty, wire::EVENT_EVENTS_LOST);
        let back: CloudEvent = serde_json::from_slice(&ev.json).unwrap();
        let data = back.data.unwrap();
        assert_eq!(data["first_lost"], 3);
        assert_eq!(data["last_lost"], 41);
    }

    #[test]
    fn consumers_start_at_next_or_at_an_offset() {
        let next = start_at(None);
        assert_eq!(
            next.inner().get(wire::HEADER_STREAM_OFFSET),
            Some(&AMQPValue::LongString("next".into()))
        );
        let at = start_at(Some(7));
        assert_eq!(
            at.inner().get(wire::HEADER_STREAM_OFFSET),
            Some(&AMQPValue::LongLongInt(7))
        );
    }
}
