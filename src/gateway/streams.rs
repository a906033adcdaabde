//! Event streams over HTTP: a hub session ([`Subscribed`]) served as
//! Server-Sent Events ([`sse_response`]) or over a WebSocket ([`ws_relay`]).
//! The one public module of the gateway: an application with actix-web
//! routes of its own relays [`crate::events::hub`] sessions with these.
//!
//! Both are bounded by the hub: a client that does not keep up fills its
//! session's buffer, the hub drops the session, and the stream ends (an SSE
//! client comes back with `Last-Event-ID`). Both notice a client that left:
//! heartbeats are written even when no event flows, a write to a closed
//! connection fails, the body (SSE) or the relay task (WebSocket) is dropped,
//! and with it the session's receiver, which the hub then removes.
//!
//! SSE framing (DESIGN.md): `id: <position>` (the event's offset in the
//! events log, the same on every instance), `event: <type>`,
//! `data: <CloudEvent JSON on one line>`; comments `: gap` (first, when the
//! `Last-Event-ID` given was not a position) and `: keep-alive` (every
//! heartbeat). Events the log no longer holds come as one
//! `switchboard.events.lost` event (`events::log::lost`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{CloseCode, CloseReason, Message};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::debug;

use super::limits::Slot;
use crate::events::hub::{HubEvent, Subscribed};
use crate::gateway::metrics::StreamSession;

/// `Content-Type` of an SSE response.
pub(crate) const CONTENT_EVENT_STREAM: &str = "text/event-stream";
/// The comment sent first when events may have been missed.
pub(crate) const GAP_COMMENT: &[u8] = b": gap\n\n";
/// The comment sent every heartbeat.
pub(crate) const KEEP_ALIVE_COMMENT: &[u8] = b": keep-alive\n\n";
/// The shortest heartbeat: a zero interval would spin.
pub(crate) const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// The largest frame a WebSocket client may send. Clients have nothing to
/// say but control frames; a bigger frame ends the connection.
pub(crate) const MAX_CLIENT_FRAME: usize = 16 * 1024;
/// Heartbeats a WebSocket client may let pass without a word (a pong counts)
/// before it is taken as gone.
pub(crate) const WS_MISSED_HEARTBEATS: u32 = 3;

/// What a stream holds while it lives: its place in the sessions gauge and
/// its caller's stream slot (`super::limits`), both given back when the
/// stream ends.
#[derive(Debug)]
pub struct Counted {
    /// Counts the session in the metrics (held for its `Drop`: never read).
    #[expect(dead_code, reason = "held for its Drop, which ends the count")]
    pub(crate) session: StreamSession,
    /// The caller's stream slot, when its streams are limited.
    pub slot: Option<Slot>,
}

/// Test on an event: whether the stream ends after it.
pub type CloseAfter = Box<dyn Fn(&HubEvent) -> bool + Send>;

/// What an SSE response sends besides the session's events.
#[derive(Default)]
pub struct SseOptions {
    /// Frames sent before any event (e.g. a `retry:` line, or a snapshot).
    pub first: Vec<Bytes>,
    /// End the stream after the first event for which this is true (e.g. a
    /// call's stream ends with its completion).
    pub close_after: Option<CloseAfter>,
    /// Events for which this is true are not sent (e.g. a call's stream
    /// leaves out the `accepted` event its snapshot already said).
    pub skip: Option<CloseAfter>,
    /// Counts the session while the stream lives.
    pub session: Option<Counted>,
}

impl fmt::Debug for SseOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseOptions")
            .field("first", &self.first.len())
            .field("close_after", &self.close_after.is_some())
            .field("skip", &self.skip.is_some())
            .field("counted", &self.session.is_some())
            .finish()
    }
}

/// One SSE frame: `id: <position>\nevent: <type>\ndata: <json>\n\n`.
///
/// Line breaks would end a field early (and let a publisher inject fields),
/// so any CR or LF in the type or the JSON is removed: in JSON a raw line
/// break can only be whitespace between tokens (inside strings it is
/// escaped), so the data stays the same JSON, on one line.
pub(crate) fn sse_frame(ev: &HubEvent) -> Bytes {
    let mut out = BytesMut::with_capacity(ev.position.len() + ev.ty.len() + ev.json.len() + 24);
    out.put_slice(b"id: ");
    put_one_line(&mut out, ev.position.as_bytes());
    out.put_slice(b"\nevent: ");
    put_one_line(&mut out, ev.ty.as_bytes());
    out.put_slice(b"\ndata: ");
    put_one_line(&mut out, &ev.json);
    out.put_slice(b"\n\n");
    out.freeze()
}

/// Appends `bytes` without CR or LF.
fn put_one_line(out: &mut BytesMut, bytes: &[u8]) {
    if bytes.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        out.extend(
            bytes
                .iter()
                .copied()
                .filter(|b| !matches!(b, b'\n' | b'\r')),
        );
    } else {
        out.put_slice(bytes);
    }
}

/// A heartbeat timer whose first tick is one period away.
fn heartbeat_timer(period: Duration) -> Interval {
    let period = period.max(MIN_HEARTBEAT);
    let mut timer = tokio::time::interval_at(Instant::now() + period, period);
    // A late tick is one heartbeat, not a burst of them.
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
}

/// The state of one SSE body.
struct SseBody {
    /// Frames to send before waiting for anything else.
    queued: VecDeque<Bytes>,
    rx: tokio::sync::mpsc::Receiver<Arc<HubEvent>>,
    heartbeat: Interval,
    close_after: Option<CloseAfter>,
    skip: Option<CloseAfter>,
    /// The closing event was sent: end once `queued` is empty.
    done: bool,
    session: u64,
    /// Dropped with the body: the session is no longer counted.
    _counted: Option<Counted>,
}

impl SseBody {
    /// The next chunk of the body; `None` ends it.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(frame) = self.queued.pop_front() {
            return Some(frame);
        }
        if self.done {
            debug!(
                session = self.session,
                "SSE stream closed after its last event"
            );
            return None;
        }
        loop {
            return tokio::select! {
                // Events first: a heartbeat is only for idle times.
                biased;
                ev = self.rx.recv() => match ev {
                    Some(ev) if self.skip.as_ref().is_some_and(|f| f(&ev)) => continue,
                    Some(ev) => {
                        if self.close_after.as_ref().is_some_and(|f| f(&ev)) {
                            self.done = true;
                        }
                        Some(sse_frame(&ev))
                    }
                    None => {
                        debug!(session = self.session, "SSE session ended by the hub");
                        None
                    }
                },
                _ = self.heartbeat.tick() => Some(Bytes::from_static(KEEP_ALIVE_COMMENT)),
            };
        }
    }
}

/// Serves a hub session as Server-Sent Events (framing in the module doc).
///
/// Sends `: gap` first when `sub.gap`, then `opts.first`, then every event,
/// with a `: keep-alive` comment every `heartbeat` (at least
/// `MIN_HEARTBEAT`). The stream ends after the event `opts.close_after`
/// picks, when the hub drops the session, or when the client leaves.
pub fn sse_response(sub: Subscribed, heartbeat: Duration, opts: SseOptions) -> HttpResponse {
    let mut queued = VecDeque::with_capacity(opts.first.len() + 1);
    if sub.gap {
        queued.push_back(Bytes::from_static(GAP_COMMENT));
    }
    queued.extend(opts.first);
    let body = SseBody {
        queued,
        rx: sub.rx,
        heartbeat: heartbeat_timer(heartbeat),
        close_after: opts.close_after,
        skip: opts.skip,
        done: false,
        session: sub.id,
        _counted: opts.session,
    };
    let stream = futures_util::stream::unfold(body, |mut body| async move {
        let chunk = body.next().await?;
        Some((Ok::<_, Infallible>(chunk), body))
    });
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, CONTENT_EVENT_STREAM))
        .insert_header((CACHE_CONTROL, "no-cache"))
        // Proxies (nginx) must pass each event on at once.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream)
}

/// Serves a hub session over a WebSocket: each event is one text frame (the
/// CloudEvent JSON). Answers Ping with Pong, pings every `heartbeat`, and
/// ends on Close, on a send error, on a protocol error, when the client has
/// been silent for `WS_MISSED_HEARTBEATS` heartbeats, or when the hub
/// drops the session (then with close code 1013, "try again later").
/// `counted`, when given, counts the session until it ends.
pub async fn ws_relay(
    req: &HttpRequest,
    body: web::Payload,
    sub: Subscribed,
    heartbeat: Duration,
    counted: Option<Counted>,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, session, messages) = actix_ws::handle(req, body)?;
    let messages = messages.max_frame_size(MAX_CLIENT_FRAME);
    actix_web::rt::spawn(async move {
        ws_loop(session, messages, sub, heartbeat).await;
        drop(counted);
    });
    Ok(response)
}

/// Why a WebSocket relay ended, for the log.
#[derive(Debug)]
enum WsEnd {
    ClientClosed,
    ClientGone,
    SendFailed,
    ProtocolError,
    Silent,
    HubDropped,
}

async fn ws_loop(
    mut session: actix_ws::Session,
    mut messages: actix_ws::MessageStream,
    sub: Subscribed,
    heartbeat: Duration,
) {
    let Subscribed { id, mut rx, gap } = sub;
    let mut timer = heartbeat_timer(heartbeat);
    let silence_limit = heartbeat.max(MIN_HEARTBEAT) * WS_MISSED_HEARTBEATS;
    let mut last_heard = Instant::now();
    debug!(session = id, gap, "WebSocket relay started");
    let (end, close) = loop {
        tokio::select! {
            // Client frames first: a Close must win over more events.
            biased;
            msg = messages.recv() => {
                let msg = match msg {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        debug!(session = id, error = %e, "WebSocket protocol error");
                        break (WsEnd::ProtocolError, Some(CloseReason {
                            code: CloseCode::Protocol,
                            description: None,
                        }));
                    }
                    None => break (WsEnd::ClientGone, None),
                };
                last_heard = Instant::now();
                match msg {
                    Message::Ping(payload) => {
                        if session.pong(&payload).await.is_err() {
                            break (WsEnd::SendFailed, None);
                        }
                    }
                    Message::Close(reason) => break (WsEnd::ClientClosed, reason),
                    // Pongs only prove the client is there; anything else a
                    // client says is ignored: the stream is one-way.
                    Message::Pong(_)
                    | Message::Text(_)
                    | Message::Binary(_)
                    | Message::Continuation(_)
                    | Message::Nop => {}
                }
            }
            ev = rx.recv() => match ev {
                Some(ev) => {
                    // The hub stores JSON it encoded itself, so this is UTF-8.
                    let Ok(text) = std::str::from_utf8(&ev.json) else {
                        continue;
                    };
                    if session.text(text).await.is_err() {
                        break (WsEnd::SendFailed, None);
                    }
                }
                None => break (WsEnd::HubDropped, Some(CloseReason {
                    code: CloseCode::Again,
                    description: Some("event stream session ended".into()),
                })),
            },
            _ = timer.tick() => {
                if last_heard.elapsed() > silence_limit {
                    break (WsEnd::Silent, Some(CloseReason {
                        code: CloseCode::Away,
                        description: None,
                    }));
                }
                if session.ping(b"").await.is_err() {
                    break (WsEnd::SendFailed, None);
                }
            }
        }
    };
    debug!(session = id, reason = ?end, "WebSocket relay ended");
    // Nothing to do if the connection is gone already.
    let _ = session.close(close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: &str, json: &str) -> HubEvent {
        HubEvent {
            seq: 3,
            position: "ab12-3".into(),
            ty: ty.into(),
            subject: None,
            caller: None,
            json: Bytes::copy_from_slice(json.as_bytes()),
        }
    }

    #[test]
    fn a_frame_has_id_event_and_data_lines() {
        let f = sse_frame(&event("orders.created", r#"{"a":1}"#));
        assert_eq!(
            &f[..],
            b"id: ab12-3\nevent: orders.created\ndata: {\"a\":1}\n\n"
        );
    }

    #[test]
    fn data_stays_one_line_and_the_type_cannot_inject_fields() {
        let f = sse_frame(&event("x\ndata: injected\r", "{\n  \"a\": \"b\\nc\"\r\n}"));
        let text = std::str::from_utf8(&f).unwrap();
        assert_eq!(
            text,
            "id: ab12-3\nevent: xdata: injected\ndata: {  \"a\": \"b\\nc\"}\n\n"
        );
        let data = text.lines().nth(2).unwrap().strip_prefix("data: ").unwrap();
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["a"], "b\nc");
        // Exactly one blank line: the end of the frame.
        assert_eq!(text.matches("\n\n").count(), 1);
    }
}
