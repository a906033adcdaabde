//! The wire conventions of DESIGN.md in one place: every exchange and queue
//! name, header, property and status mapping. Nothing else in the crate
//! spells a queue name or a header by hand.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_lapin::lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

/// Header carrying a reply's HTTP-style status (200 when absent).
pub const HEADER_STATUS: &str = "x-status";
/// Header carrying the W3C trace context.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Header carrying the call's absolute deadline in ms since the Unix epoch,
/// so a worker can tell that a request is stale even when the broker has not
/// dropped it yet (`expiration` is relative to enqueueing, and the AMQP
/// `timestamp` only has whole seconds).
pub const HEADER_DEADLINE: &str = "x-sb-deadline-ms";
/// Header in which a quorum queue says how many deliveries of a message
/// failed before this one (RabbitMQ 4.3 and later: rejects and lost
/// connections; before: every return).
pub const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
/// Headers on a message moved to the poison queue ([`Names::poison_queue`]):
/// the queue it was taken from, why it could not be handled, and the
/// instance that moved it.
pub const HEADER_POISON_QUEUE: &str = "x-sb-poison-queue";
/// See [`HEADER_POISON_QUEUE`].
pub const HEADER_POISON_REASON: &str = "x-sb-poison-reason";
/// See [`HEADER_POISON_QUEUE`].
pub const HEADER_POISON_INSTANCE: &str = "x-sb-poison-instance";
/// Header that makes a message on a call's `reply_to` a progress report,
/// not its reply: the fraction of the work done, a number from 0 to 1 (an
/// AMQP float or double, an integer 0 or 1, or a decimal string such as
/// `"0.4"`). The body, UTF-8 text, is an optional note. A progress report
/// carries the call's `correlation_id` and never ends the call.
pub const HEADER_PROGRESS: &str = "x-sb-progress";
/// Header on a request whose caller reads progress reports
/// ([`HEADER_PROGRESS`]) on its `reply_to` (every switchboard caller sets
/// it). A worker reports progress only on requests that carry it, so a
/// plain RPC client (a RabbitMQ tutorial-6 program) only ever receives the
/// reply.
pub const HEADER_ACCEPTS_PROGRESS: &str = "x-sb-accepts-progress";
/// Header on a request whose caller waits for the reply in memory (the
/// library's `RpcClient::call`, the gateway's synchronous calls): if the
/// caller goes, so does every use of the reply, so a durable, confirmed
/// reply buys it nothing. A worker answers such a request with a transient
/// reply, not confirmed, and acks it right after the write. A request
/// without it (a tutorial-6 client, a call that outlives its caller: 202,
/// callback, idempotent call in the store) gets a persistent, confirmed
/// reply before its ack (docs/RELIABILITY.md, "What survives what").
pub const HEADER_CALLER_WAITS: &str = "x-sb-caller-waits";
/// The longest progress note kept, in bytes (a longer one is cut at a
/// character boundary).
pub const MAX_PROGRESS_NOTE: usize = 1024;
/// RabbitMQ's pseudo-queue for direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Default content type of a request.
pub const CONTENT_JSON: &str = "application/json";
/// Content type of error replies (RFC 9457).
pub const CONTENT_PROBLEM: &str = "application/problem+json";
/// Content type of events (CloudEvents structured mode).
pub const CONTENT_CLOUDEVENTS: &str = "application/cloudevents+json";
/// CloudEvents extension attribute naming the caller of a call lifecycle
/// event, so event streams show each caller only its own calls.
pub const EXT_CALLER: &str = "switchboardcaller";
/// CloudEvent `type` of the lifecycle event published when a call is
/// accepted with a 202 (`subject` = call id, `data` = its status document).
pub const EVENT_CALL_ACCEPTED: &str = "switchboard.call.accepted";
/// CloudEvent `type` of the lifecycle event published when a call ends
/// (`data` = its status document with the result).
pub const EVENT_CALL_COMPLETED: &str = "switchboard.call.completed";
/// CloudEvent `type` of the lifecycle event published when a stored call's
/// worker reports progress (`data` = its status document, with `progress`
/// and `note`).
pub const EVENT_CALL_PROGRESS: &str = "switchboard.call.progress";
/// CloudEvent `type` of the lifecycle event published when a call is
/// cancelled by its caller (`data` = its status document, `cancelled`).
/// Workers watch for it: a request not yet begun is dropped, a running
/// handler is told.
pub const EVENT_CALL_CANCELLED: &str = "switchboard.call.cancelled";
/// Every lifecycle event type with what it says, for the descriptions.
pub const CALL_LIFECYCLE_EVENTS: &[(&str, &str)] = &[
    (
        EVENT_CALL_ACCEPTED,
        "A call was accepted with a 202 (or, with `sync_events`, started): `data` is its status document, `pending`.",
    ),
    (
        EVENT_CALL_PROGRESS,
        "The worker of a call answered with a 202 reported progress: `data` is its status document, `pending`, with `progress` (0 to 1) and `note`.",
    ),
    (
        EVENT_CALL_COMPLETED,
        "A call ended (`succeeded`, `failed` or `expired`): `data` is its status document with the result.",
    ),
    (
        EVENT_CALL_CANCELLED,
        "A call was cancelled by its caller (`DELETE /v1/calls/{id}`): `data` is its status document, `cancelled`. Workers drop its request if it has not begun, and tell a running handler.",
    ),
];
/// RabbitMQ's stream offset: the consume argument saying where a stream
/// consumer starts (`first`, `last`, `next`, an offset or a timestamp), and
/// the header of each delivery from a stream giving its offset.
pub const HEADER_STREAM_OFFSET: &str = "x-stream-offset";
/// CloudEvent `type` of the event an event stream sends in place of events
/// it can no longer replay (older than the events log's retention): `data`
/// says which positions were lost (`first_lost`, `last_lost`); its position
/// is `last_lost`, so resuming from it goes on with the first event kept.
pub const EVENT_EVENTS_LOST: &str = "switchboard.events.lost";
/// `app_id` on every message switchboard publishes.
pub const APP_ID: &str = "switchboard";
/// `delivery_mode` of a persistent message.
pub const PERSISTENT: u8 = 2;
/// Longest AMQP short string, in bytes: the content type, correlation and
/// message ids, `type`, `reply_to` and routing keys are short strings, and
/// lapin panics on a longer one, so whatever fills them is checked first.
pub const MAX_SHORT_STRING: usize = 255;

/// The names of everything switchboard declares, under one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix` (`amqp.prefix`, `sb` by default).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `<p>.requests`: direct exchange, routing key = service name.
    pub fn requests_exchange(&self) -> String {
        format!("{}.requests", self.prefix)
    }
    /// `<p>.svc.<service>`: the service's work queue.
    pub fn service_queue(&self, service: &str) -> String {
        format!("{}.svc.{service}", self.prefix)
    }
    /// `<p>.dead`: direct exchange for dead letters, routing key = service.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// `<p>.svc.<service>.dead`: the service's dead letters.
    pub fn dead_queue(&self, service: &str) -> String {
        format!("{}.svc.{service}.dead", self.prefix)
    }
    /// `<p>.events`: fanout exchange for broadcast.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    /// `<p>.events.types`: direct exchange bound to the events fanout (an
    /// exchange-to-exchange binding), so every event reaches it with its
    /// routing key, the CloudEvent type ([`event_routing_key`]): a queue
    /// bound to it with a type's key receives the events of that type only
    /// (the workers' cancellation watch). Declared by that watch.
    pub fn events_types_exchange(&self) -> String {
        format!("{}.events.types", self.prefix)
    }
    /// `<p>.events.log`: the events log, a stream queue bound to the events
    /// fanout. Its offsets are the positions of `/v1/events` (SSE `id`,
    /// `Last-Event-ID`), the same on every instance; any AMQP client may
    /// replay it ([`HEADER_STREAM_OFFSET`]).
    pub fn events_log(&self) -> String {
        format!("{}.events.log", self.prefix)
    }
    /// `<p>.reply.<instance>`: replies for one instance.
    pub fn reply_queue(&self, instance: &str) -> String {
        format!("{}.reply.{instance}", self.prefix)
    }
    /// `<p>.deadwatch.<instance>`: the gateway's copy of dead letters, bound
    /// to the dead exchange beside each service's dead queue, so it can mark
    /// its dead-lettered calls failed while operators keep the originals.
    pub fn deadwatch_queue(&self, instance: &str) -> String {
        format!("{}.deadwatch.{instance}", self.prefix)
    }
    /// `<p>.sub.<name>`: a named, durable event subscription.
    pub fn subscriber_queue(&self, name: &str) -> String {
        format!("{}.sub.{name}", self.prefix)
    }
    /// `<p>.poison`: messages that switchboard's consumers could not decode
    /// or handle on the queues without a dead-letter queue of their own
    /// (reply, dead-letter watch, durable subscriptions), kept for operators.
    /// One per prefix, not per instance: an instance that never comes back
    /// leaves nothing behind, and operators look in one place.
    pub fn poison_queue(&self) -> String {
        format!("{}.poison", self.prefix)
    }
}

/// The routing key an event is published with: its CloudEvent type, which
/// the events fanout ignores and `<p>.events.types` routes on
/// ([`Names::events_types_exchange`]). A type longer than AMQP's 255-byte
/// short string is published with the empty key (as events were before
/// types were routed): every fanout subscriber still gets it, and only
/// queues of `<p>.events.types` bound with the empty key do.
pub fn event_routing_key(ty: &str) -> &str {
    if ty.len() <= 255 { ty } else { "" }
}

/// `switchboard/<instance>/<role>`: the connection name operators see.
pub fn connection_name(instance: &str, role: &str) -> String {
    format!("switchboard/{instance}/{role}")
}

/// Consumer tag naming the instance and what it consumes.
pub fn consumer_tag(instance: &str, what: &str) -> String {
    format!(
        "switchboard/{instance}/{what}/{}",
        uuid::Uuid::new_v4().simple()
    )
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The `message_id` of a gateway call made with an idempotency key:
/// `<caller>:<hex SHA-256 of the caller's name and the key>`. Workers
/// deduplicate on `message_id`, so the key is scoped to its caller: two
/// callers' equal keys never meet. The caller's name stays readable for an
/// operator; the key does not travel (a worker needs no more than a stable
/// id). At most 100 + 1 + 64 bytes, a short string, for the caller names the
/// settings accept.
pub fn caller_message_id(caller: &str, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // Length-prefixed, so that no (caller, key) pair reads as another.
    h.update((caller.len() as u64).to_be_bytes());
    h.update(caller.as_bytes());
    h.update(key.as_bytes());
    format!("{caller}:{:x}", h.finalize())
}

/// What a caller publishes as a request.
#[derive(Debug, Clone)]
pub struct RequestMeta<'a> {
    /// The service (the `type` property).
    pub service: &'a str,
    /// The call id.
    pub correlation_id: &'a str,
    /// Idempotency key; the call id when absent.
    pub message_id: Option<&'a str>,
    /// Reply destination; `None` when no reply is wanted.
    pub reply_to: Option<&'a str>,
    /// The payload's content type.
    pub content_type: &'a str,
    /// Time left until the call's deadline.
    pub timeout: Option<Duration>,
    /// W3C trace context.
    pub traceparent: Option<&'a str>,
    /// The caller waits for the reply in memory ([`HEADER_CALLER_WAITS`]).
    pub caller_waits: bool,
}

/// The AMQP properties of a request (DESIGN.md, "Request").
pub fn request_properties(meta: &RequestMeta<'_>, persistent: bool) -> BasicProperties {
    let now = now_ms();
    let mut headers = FieldTable::default();
    if let Some(tp) = meta.traceparent {
        headers.insert(HEADER_TRACEPARENT.into(), AMQPValue::LongString(tp.into()));
    }
    if meta.reply_to.is_some() {
        // switchboard callers read progress reports (and drop those of
        // calls they no longer follow).
        headers.insert(HEADER_ACCEPTS_PROGRESS.into(), AMQPValue::Boolean(true));
    }
    if meta.caller_waits {
        headers.insert(HEADER_CALLER_WAITS.into(), AMQPValue::Boolean(true));
    }
    let mut props = BasicProperties::default()
        .with_content_type(meta.content_type.into())
        .with_correlation_id(meta.correlation_id.into())
        .with_message_id(meta.message_id.unwrap_or(meta.correlation_id).into())
        .with_type(meta.service.into())
        .with_app_id(APP_ID.into())
        .with_timestamp(now / 1000)
        .with_delivery_mode(if persistent { PERSISTENT } else { 1 });
    if let Some(reply_to) = meta.reply_to {
        props = props.with_reply_to(reply_to.into());
    }
    if let Some(timeout) = meta.timeout {
        let ms = timeout.as_millis().max(1) as u64;
        props = props.with_expiration(ms.to_string().into());
        headers.insert(
            HEADER_DEADLINE.into(),
            AMQPValue::LongLongInt((now + ms) as i64),
        );
    }
    props.with_headers(headers)
}

/// The AMQP properties of a reply (DESIGN.md, "Reply"): persistent.
pub fn reply_properties(
    correlation_id: Option<&ShortString>,
    status: u16,
    content_type: &str,
    traceparent: Option<&str>,
) -> BasicProperties {
    reply_properties_for(correlation_id, status, content_type, traceparent, false)
}

/// The AMQP properties of a reply to a request that did (`caller_waits`:
/// transient) or did not ([`reply_properties`]: persistent) carry
/// [`HEADER_CALLER_WAITS`].
pub fn reply_properties_for(
    correlation_id: Option<&ShortString>,
    status: u16,
    content_type: &str,
    traceparent: Option<&str>,
    caller_waits: bool,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_STATUS.into(), AMQPValue::ShortInt(status as i16));
    if let Some(tp) = traceparent {
        headers.insert(HEADER_TRACEPARENT.into(), AMQPValue::LongString(tp.into()));
    }
    let mut props = BasicProperties::default()
        .with_content_type(content_type.into())
        .with_app_id(APP_ID.into())
        .with_timestamp(now_ms() / 1000)
        // Transient only when the caller waits in memory: a copy on disk
        // would outlive everyone who could use it.
        .with_delivery_mode(if caller_waits { 1 } else { PERSISTENT })
        .with_headers(headers);
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.clone());
    }
    props
}

/// The AMQP properties of a progress report on a call's `reply_to`
/// (DESIGN.md, "Progress"): the reply's, with [`HEADER_PROGRESS`], and a
/// text body (the note).
pub fn progress_properties(
    correlation_id: Option<&ShortString>,
    fraction: f64,
    traceparent: Option<&str>,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_PROGRESS.into(), AMQPValue::Double(fraction));
    if let Some(tp) = traceparent {
        headers.insert(HEADER_TRACEPARENT.into(), AMQPValue::LongString(tp.into()));
    }
    let mut props = BasicProperties::default()
        .with_content_type(CONTENT_TEXT.into())
        .with_app_id(APP_ID.into())
        .with_timestamp(now_ms() / 1000)
        // Transient: a report is worth nothing once the call moved on.
        .with_delivery_mode(1)
        .with_headers(headers);
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.clone());
    }
    props
}

/// Content type of a progress report's note.
pub const CONTENT_TEXT: &str = "text/plain; charset=utf-8";

/// Why a progress report could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed x-sb-progress header: not a number from 0 to 1")]
pub struct MalformedProgress;

/// Whether a message on a reply queue is a progress report, and its
/// fraction: `None` for a reply (no [`HEADER_PROGRESS`]), an error when the
/// header is there but not a number from 0 to 1.
pub fn progress_of(props: &BasicProperties) -> Option<Result<f64, MalformedProgress>> {
    let value = props.headers().as_ref()?.inner().get(HEADER_PROGRESS)?;
    let fraction = match value {
        AMQPValue::Double(v) => Some(*v),
        AMQPValue::Float(v) => Some(f64::from(*v)),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|t| t.trim().parse::<f64>().ok()),
        AMQPValue::ShortString(s) => s.as_str().trim().parse::<f64>().ok(),
        AMQPValue::DecimalValue(d) => Some(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        _ => header_int(props, HEADER_PROGRESS).map(|v| v as f64),
    };
    Some(
        fraction
            .filter(|f| (0.0..=1.0).contains(f))
            .ok_or(MalformedProgress),
    )
}

/// A progress note as kept: the body as text (lossy), cut to
/// [`MAX_PROGRESS_NOTE`] bytes at a character boundary; `None` when empty.
pub fn progress_note(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_PROGRESS_NOTE + 4)]);
    let mut end = text.len().min(MAX_PROGRESS_NOTE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let note = text[..end].trim();
    (!note.is_empty()).then(|| note.to_owned())
}

/// Whether a request's caller reads progress reports
/// ([`HEADER_ACCEPTS_PROGRESS`]: true, or a non-zero number).
pub fn accepts_progress(props: &BasicProperties) -> bool {
    flag(props, HEADER_ACCEPTS_PROGRESS)
}

/// Whether a request's caller waits for its reply in memory
/// ([`HEADER_CALLER_WAITS`]: true, or a non-zero number, or `"true"`).
pub fn caller_waits(props: &BasicProperties) -> bool {
    flag(props, HEADER_CALLER_WAITS)
}

/// A boolean header: true, a non-zero number, or the text `true`.
fn flag(props: &BasicProperties, name: &str) -> bool {
    match props.headers().as_ref().and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::Boolean(b)) => *b,
        Some(_) => {
            header_int(props, name).is_some_and(|v| v != 0)
                || header_str(props, name).is_some_and(|s| s.trim().eq_ignore_ascii_case("true"))
        }
        None => false,
    }
}

/// A header as text, when it is a string of some kind.
pub fn header_str<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A header as an integer, when it is a number or a decimal string.
pub fn header_int(props: &BasicProperties, name: &str) -> Option<i64> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// The offset of a delivery from a stream queue ([`HEADER_STREAM_OFFSET`]);
/// `None` when absent or negative (not a delivery from a stream).
pub fn stream_offset(props: &BasicProperties) -> Option<u64> {
    u64::try_from(header_int(props, HEADER_STREAM_OFFSET)?).ok()
}

/// Why a reply's status could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed x-status header")]
pub struct MalformedStatus;

/// The reply status: `x-status`, 200 when absent; a value that is not an
/// integer from 100 to 599 is malformed.
pub fn reply_status(props: &BasicProperties) -> Result<u16, MalformedStatus> {
    let present = props
        .headers()
        .as_ref()
        .is_some_and(|h| h.contains_key(HEADER_STATUS));
    if !present {
        return Ok(200);
    }
    match header_int(props, HEADER_STATUS) {
        Some(s) if (100..=599).contains(&s) => Ok(s as u16),
        _ => Err(MalformedStatus),
    }
}

/// Whether a request is past its deadline: the `x-sb-deadline-ms` header,
/// else `timestamp` (seconds) plus `expiration` (ms).
pub fn is_expired(props: &BasicProperties, now_ms: u64) -> bool {
    if let Some(deadline) = header_int(props, HEADER_DEADLINE) {
        return deadline >= 0 && (deadline as u64) < now_ms;
    }
    let ttl = props
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok());
    match (props.timestamp(), ttl) {
        // Saturating throughout: `timestamp` is whatever the publisher put
        // there, and an overflow here would panic (debug) or wrap to "long
        // expired" (release).
        (Some(ts), Some(ttl)) => {
            ts.saturating_mul(1000)
                .saturating_add(ttl)
                .saturating_add(999)
                < now_ms
        }
        _ => false,
    }
}

/// The content type of a message, `application/octet-stream` when absent.
pub fn content_type(props: &BasicProperties) -> &str {
    props
        .content_type()
        .as_ref()
        .map(|c| c.as_str())
        .unwrap_or("application/octet-stream")
}

/// A problem+json body (RFC 9457).
pub fn problem_body(status: u16, title: &str, detail: Option<&str>) -> Vec<u8> {
    let mut doc = serde_json::json!({"type": "about:blank", "status": status, "title": title});
    if let Some(d) = detail {
        doc["detail"] = serde_json::Value::String(d.to_owned());
    }
    serde_json::to_vec(&doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let n = Names::new("sb");
        assert_eq!(n.requests_exchange(), "sb.requests");
        assert_eq!(n.service_queue("echo"), "sb.svc.echo");
        assert_eq!(n.dead_exchange(), "sb.dead");
        assert_eq!(n.dead_queue("echo"), "sb.svc.echo.dead");
        assert_eq!(n.events_exchange(), "sb.events");
        assert_eq!(n.events_log(), "sb.events.log");
        assert_eq!(n.events_types_exchange(), "sb.events.types");
        assert_eq!(
            event_routing_key(EVENT_CALL_CANCELLED),
            EVENT_CALL_CANCELLED
        );
        assert_eq!(event_routing_key(&"t".repeat(255)).len(), 255);
        assert_eq!(event_routing_key(&"t".repeat(256)), "");
        assert_eq!(n.reply_queue("host1"), "sb.reply.host1");
        assert_eq!(n.deadwatch_queue("host1"), "sb.deadwatch.host1");
        assert_eq!(n.poison_queue(), "sb.poison");
    }

    #[test]
    fn status_is_200_when_absent_and_malformed_when_out_of_range() {
        assert_eq!(reply_status(&BasicProperties::default()), Ok(200));
        let p = reply_properties(None, 404, CONTENT_PROBLEM, None);
        assert_eq!(reply_status(&p), Ok(404));
        let mut h = FieldTable::default();
        h.insert(HEADER_STATUS.into(), AMQPValue::LongString("abc".into()));
        let p = BasicProperties::default().with_headers(h);
        assert_eq!(reply_status(&p), Err(MalformedStatus));
        let mut h = FieldTable::default();
        h.insert(HEADER_STATUS.into(), AMQPValue::LongInt(7000));
        let p = BasicProperties::default().with_headers(h);
        assert_eq!(reply_status(&p), Err(MalformedStatus));
        let mut h = FieldTable::default();
        h.insert(HEADER_STATUS.into(), AMQPValue::LongString("503".into()));
        let p = BasicProperties::default().with_headers(h);
        assert_eq!(reply_status(&p), Ok(503));
    }

    #[test]
    fn progress_reports_are_told_from_replies() {
        let reply = reply_properties(None, 200, CONTENT_JSON, None);
        assert_eq!(progress_of(&reply), None);
        let p = progress_properties(None, 0.25, None);
        assert_eq!(progress_of(&p), Some(Ok(0.25)));
        for (value, expected) in [
            (AMQPValue::LongString("0.5".into()), Some(Ok(0.5))),
            (AMQPValue::ShortShortInt(1), Some(Ok(1.0))),
            (AMQPValue::Float(0.75), Some(Ok(0.75))),
            (AMQPValue::Double(1.5), Some(Err(MalformedProgress))),
            (AMQPValue::Double(f64::NAN), Some(Err(MalformedProgress))),
            (
                AMQPValue::LongString("half".into()),
                Some(Err(MalformedProgress)),
            ),
            (AMQPValue::Boolean(true), Some(Err(MalformedProgress))),
        ] {
            let mut h = FieldTable::default();
            h.insert(HEADER_PROGRESS.into(), value);
            let p = BasicProperties::default().with_headers(h);
            assert_eq!(progress_of(&p), expected);
        }
    }

    #[test]
    fn notes_are_text_cut_at_a_character_boundary() {
        assert_eq!(progress_note(b""), None);
        assert_eq!(progress_note(b"  \n"), None);
        assert_eq!(
            progress_note(b" step 2 of 5 ").as_deref(),
            Some("step 2 of 5")
        );
        let long = "\u{e9}".repeat(MAX_PROGRESS_NOTE);
        let note = progress_note(long.as_bytes()).unwrap();
        assert!(note.len() <= MAX_PROGRESS_NOTE && note.chars().all(|c| c == '\u{e9}'));
        assert_eq!(progress_note(&[0xff, b'a']).as_deref(), Some("\u{fffd}a"));
    }

    #[test]
    fn requests_with_a_reply_to_accept_progress() {
        let mut meta = RequestMeta {
            service: "s",
            correlation_id: "c",
            message_id: None,
            reply_to: Some("r"),
            content_type: CONTENT_JSON,
            timeout: None,
            traceparent: None,
            caller_waits: false,
        };
        assert!(accepts_progress(&request_properties(&meta, true)));
        meta.reply_to = None;
        assert!(!accepts_progress(&request_properties(&meta, true)));
        let mut h = FieldTable::default();
        h.insert(
            HEADER_ACCEPTS_PROGRESS.into(),
            AMQPValue::LongString("true".into()),
        );
        assert!(accepts_progress(
            &BasicProperties::default().with_headers(h)
        ));
    }

    #[test]
    fn a_caller_that_waits_gets_a_transient_reply() {
        let mut meta = RequestMeta {
            service: "s",
            correlation_id: "c",
            message_id: None,
            reply_to: Some("r"),
            content_type: CONTENT_JSON,
            timeout: None,
            traceparent: None,
            caller_waits: false,
        };
        assert!(!caller_waits(&request_properties(&meta, true)));
        meta.caller_waits = true;
        let request = request_properties(&meta, true);
        assert!(caller_waits(&request));
        let reply = reply_properties_for(
            request.correlation_id().as_ref(),
            200,
            CONTENT_JSON,
            None,
            caller_waits(&request),
        );
        assert_eq!(*reply.delivery_mode(), Some(1));
        let reply = reply_properties(request.correlation_id().as_ref(), 200, CONTENT_JSON, None);
        assert_eq!(*reply.delivery_mode(), Some(PERSISTENT));
    }

    #[test]
    fn expiry_uses_the_deadline_header() {
        let meta = RequestMeta {
            service: "s",
            correlation_id: "c",
            message_id: None,
            reply_to: None,
            content_type: CONTENT_JSON,
            timeout: Some(Duration::from_millis(100)),
            traceparent: None,
            caller_waits: false,
        };
        let p = request_properties(&meta, true);
        let now = now_ms();
        assert!(!is_expired(&p, now));
        assert!(is_expired(&p, now + 10_000));
        assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("c"));
    }

    #[test]
    fn a_timestamp_near_the_end_of_time_does_not_overflow() {
        // Found by the property tests: a peer's timestamp of ~u64::MAX/1000
        // s and a TTL overflowed the sum (a panic in a debug build, and in
        // release a wrap that dropped the request as long expired).
        let p = BasicProperties::default()
            .with_timestamp(18_446_736_746_353_776)
            .with_expiration("7327355775000".into());
        assert!(!is_expired(&p, 0));
        assert!(!is_expired(&p, now_ms()));
        let p = BasicProperties::default()
            .with_timestamp(u64::MAX)
            .with_expiration("1".into());
        assert!(!is_expired(&p, u64::MAX - 1));
    }
}

/// Properties over whatever a foreign peer can put in a message's
/// properties: nothing panics, statuses are read exactly as documented.
#[cfg(test)]
mod props {
    use deadpool_lapin::lapin::types::{DecimalValue, FieldArray, LongString};
    use proptest::prelude::*;

    use super::*;

    /// Text that is often a status, or nearly one.
    fn status_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{1,4}",
            "[ +-]?[0-9]{1,6} ?",
            "[0-9]{1,3}\\.[0-9]",
            "[0-9]{19,22}",
            "[ -~]{0,12}",
            any::<String>().prop_map(|s| s.chars().take(60).collect()),
        ]
    }

    /// Any AMQP field value, tables and arrays nested a little.
    fn value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            (90i64..700).prop_map(AMQPValue::LongLongInt),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<f64>().prop_map(AMQPValue::Double),
            (90.0f64..700.0).prop_map(|f| AMQPValue::Double(f.trunc())),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
            status_text().prop_map(|s| AMQPValue::ShortString(s.into())),
            status_text().prop_map(|s| AMQPValue::LongString(s.into())),
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(|b| AMQPValue::ByteArray(b.into())),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                prop::collection::vec(("[a-z-]{1,8}", inner), 0..4).prop_map(|kv| {
                    let mut t = FieldTable::default();
                    for (k, v) in kv {
                        t.insert(k.into(), v);
                    }
                    AMQPValue::FieldTable(t)
                }),
            ]
        })
    }

    fn with_header(name: &str, value: Option<AMQPValue>) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert("other".into(), AMQPValue::Boolean(true));
        if let Some(v) = value {
            h.insert(name.into(), v);
        }
        BasicProperties::default().with_headers(h)
    }

    /// A decimal string: optional surrounding whitespace and sign, then
    /// ASCII digits only.
    fn decimal(bytes: &[u8]) -> Option<i64> {
        let s = std::str::from_utf8(bytes).ok()?.trim();
        let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }

    /// The documented reading of `x-status`, written independently.
    fn reference_status(v: Option<&AMQPValue>) -> Result<u16, MalformedStatus> {
        let n = match v {
            None => return Ok(200),
            Some(AMQPValue::ShortShortInt(x)) => Some(i64::from(*x)),
            Some(AMQPValue::ShortShortUInt(x)) => Some(i64::from(*x)),
            Some(AMQPValue::ShortInt(x)) => Some(i64::from(*x)),
            Some(AMQPValue::ShortUInt(x)) => Some(i64::from(*x)),
            Some(AMQPValue::LongInt(x)) => Some(i64::from(*x)),
            Some(AMQPValue::LongUInt(x)) => Some(i64::from(*x)),
            Some(AMQPValue::LongLongInt(x)) => Some(*x),
            Some(AMQPValue::LongString(s)) => decimal(s.as_bytes()),
            Some(AMQPValue::ShortString(s)) => decimal(s.as_str().as_bytes()),
            Some(_) => None,
        };
        match n {
            Some(n) if (100..=599).contains(&n) => Ok(n as u16),
            _ => Err(MalformedStatus),
        }
    }

    proptest! {
        #[test]
        fn reply_status_reads_exactly_the_documented_values(v in prop::option::of(value())) {
            let props = with_header(HEADER_STATUS, v.clone());
            prop_assert_eq!(reply_status(&props), reference_status(v.as_ref()), "{:?}", v);
        }

        #[test]
        fn every_status_a_worker_sends_reads_back(status in 100u16..=599) {
            let props = reply_properties(None, status, CONTENT_PROBLEM, None);
            prop_assert_eq!(reply_status(&props), Ok(status));
        }

        #[test]
        fn header_readers_never_panic_and_read_only_their_kind(v in value()) {
            let props = with_header("h", Some(v.clone()));
            let text = header_str(&props, "h");
            match &v {
                AMQPValue::ShortString(s) => prop_assert_eq!(text, Some(s.as_str())),
                AMQPValue::LongString(s) => {
                    prop_assert_eq!(text, std::str::from_utf8(s.as_bytes()).ok())
                }
                _ => prop_assert_eq!(text, None),
            }
            let _ = header_int(&props, "h");
            prop_assert_eq!(header_str(&props, "missing"), None);
            prop_assert_eq!(header_int(&props, "missing"), None);
        }

        #[test]
        fn expiry_never_panics_and_never_comes_undone(
            deadline in prop::option::of(value()),
            timestamp in prop::option::of(prop_oneof![any::<u64>(), Just(u64::MAX), (u64::MAX - 10_000)..=u64::MAX]),
            expiration in prop::option::of(prop_oneof!["[0-9]{1,20}", "[ -~]{0,8}"]),
            now in any::<u64>(),
            later in any::<u64>(),
        ) {
            let mut props = with_header(HEADER_DEADLINE, deadline);
            if let Some(ts) = timestamp {
                props = props.with_timestamp(ts);
            }
            if let Some(e) = expiration {
                props = props.with_expiration(e.into());
            }
            let later = now.saturating_add(later);
            if is_expired(&props, now) {
                prop_assert!(is_expired(&props, later), "expired at {now}, not at {later}");
            }
        }

        #[test]
        fn without_a_deadline_or_a_complete_ttl_nothing_expires(
            timestamp in prop::option::of(any::<u64>()),
            now in any::<u64>(),
        ) {
            let mut props = BasicProperties::default();
            if let Some(ts) = timestamp {
                props = props.with_timestamp(ts);
            }
            prop_assert!(!is_expired(&props, now));
        }

        #[test]
        fn content_type_is_passed_through(ct in prop::option::of("[ -~]{0,255}")) {
            let mut props = BasicProperties::default();
            if let Some(c) = &ct {
                props = props.with_content_type(c.as_str().into());
            }
            prop_assert_eq!(
                content_type(&props),
                ct.as_deref().unwrap_or("application/octet-stream")
            );
        }

        #[test]
        fn caller_message_ids_are_stable_short_strings_and_never_shared(
            a in "[A-Za-z0-9._-]{1,100}",
            b in "[A-Za-z0-9._-]{1,100}",
            key in "[!-~]{1,255}",
            other_key in "[!-~]{1,255}",
            cut in 0usize..100,
        ) {
            let id = caller_message_id(&a, &key);
            prop_assert!(id.len() <= MAX_SHORT_STRING, "{} bytes", id.len());
            prop_assert_eq!(&id, &caller_message_id(&a, &key));
            prop_assert!(id.starts_with(&format!("{a}:")), "{}", id);
            prop_assert!(!id.contains(&key) || a.contains(&key) || key.len() < 8, "{}", id);
            if a != b {
                prop_assert_ne!(&id, &caller_message_id(&b, &key));
            }
            if key != other_key {
                prop_assert_ne!(&id, &caller_message_id(&a, &other_key));
            }
            // Moving characters between the name and the key makes another id.
            let joined = format!("{a}{key}");
            let cut = cut.min(joined.len() - 1) + 1;
            let (a2, k2) = joined.split_at(cut);
            if (a2, k2) != (a.as_str(), key.as_str()) {
                prop_assert_ne!(&id, &caller_message_id(a2, k2));
            }
        }

        #[test]
        fn problem_bodies_are_json_with_what_was_given(
            status in any::<u16>(),
            title in any::<String>(),
            detail in prop::option::of(any::<String>()),
        ) {
            let doc: serde_json::Value = serde_json::from_slice(&problem_body(status, &title, detail.as_deref()))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&doc["status"], status);
            prop_assert_eq!(&doc["title"], title.as_str());
            prop_assert_eq!(doc.get("detail").and_then(|d| d.as_str()), detail.as_deref());
        }
    }
}
