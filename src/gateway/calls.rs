//! The call routes: `POST /v1/services/{service}/calls`,
//! `GET /v1/calls/{id}` (with long-polling), `DELETE /v1/calls/{id}`
//! (cancel), `GET /v1/calls/{id}/result` and
//! `POST /v1/calls/{id}/callback/retry`.

use std::time::Duration;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use rand::Rng;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{Instrument, field::Empty, info_span};

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, Problem};
use super::headers::{self, Preferences};
use crate::amqp::wire;
use crate::calls::document::{StatusDocument, call_path};
use crate::calls::metrics::{CallMetrics, Mode};
use crate::calls::tracker::{EVENT_ACCEPTED, EVENT_COMPLETED, Outcome};
use crate::calls::{CallRecord, CallStatus, Inserted, NewCall};
use crate::rpc::Call;
use crate::worker::Reply;

/// How long a 202 waits for its `accepted` event to be confirmed.
const ACCEPTED_EVENT_WAIT: Duration = Duration::from_secs(2);

/// Reads the body, refusing more than `limit` bytes with a 413, and a body
/// that has not all arrived within `timeout` with a 408 (the whole body, so
/// a byte now and then does not hold the connection either; the connection
/// is then closed: [`super::connections`]).
pub(super) async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    tokio::time::timeout(timeout, read_body_within(req, &mut payload, limit))
        .await
        .unwrap_or(Err(ApiError::RequestTimeout(timeout.as_millis() as u64)))
}

async fn read_body_within(
    req: &HttpRequest,
    payload: &mut web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::BadRequest("the request body could not be read".into()))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn header_str<'a>(req: &'a HttpRequest, name: &str) -> Result<Option<&'a str>, ApiError> {
    match req.headers().get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::BadRequest(format!("the {name} header is not visible ASCII"))),
    }
}

/// A `Retry-After` spread with jitter: `base` to `2 * base` seconds.
pub(super) fn retry_after(base: u64) -> String {
    let base = base.max(1);
    (base + rand::rng().random_range(0..=base)).to_string()
}

/// The caller's `traceparent` header, when it is well formed.
pub(super) fn incoming_traceparent(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|tp| crate::telemetry::is_traceparent(tp))
}

/// `202 Accepted` with `Location`, `Retry-After`, `Preference-Applied` and
/// the status document.
fn accepted(st: &AppState, doc: &StatusDocument, applied: Option<&str>) -> HttpResponse {
    let mut res = HttpResponse::Accepted();
    res.insert_header((header::LOCATION, call_path(&doc.id)))
        .insert_header((header::RETRY_AFTER, retry_after(st.gateway.retry_after_s)))
        .insert_header(("Call-Id", doc.id.as_str()));
    if let Some(a) = applied {
        res.insert_header(("Preference-Applied", a));
    }
    res.json(doc)
}

/// The reply as a synchronous answer: its status, content type and body,
/// plus `Call-Id`. The reply comes from whoever published it, so what HTTP
/// cannot carry is not passed on: an informational status (1xx) is no final
/// answer, and is a 502 as for any invalid reply; a content type that is no
/// valid header value (control characters) becomes
/// `application/octet-stream`.
fn reply_response(id: &str, status: u16, content_type: &str, body: Bytes) -> HttpResponse {
    let Some(status) = StatusCode::from_u16(status)
        .ok()
        .filter(|s| !s.is_informational())
    else {
        let problem = wire::problem_body(
            502,
            "Bad Gateway",
            Some("the service replied with a status that is not a final HTTP status"),
        );
        return HttpResponse::BadGateway()
            .insert_header(("Call-Id", id))
            .insert_header((header::CONTENT_TYPE, wire::CONTENT_PROBLEM))
            .body(problem);
    };
    let content_type = header::HeaderValue::from_str(content_type)
        .unwrap_or_else(|_| header::HeaderValue::from_static("application/octet-stream"));
    HttpResponse::build(status)
        .insert_header(("Call-Id", id))
        .insert_header((header::CONTENT_TYPE, content_type))
        .body(body)
}

fn request_hash(service: &str, content_type: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(service.as_bytes());
    h.update([0]);
    h.update(content_type.as_bytes());
    h.update([0]);
    h.update(body);
    format!("{:x}", h.finalize())
}

/// What a repeat of an idempotent request gets: the call's answer so far.
fn repeat_answer(st: &AppState, call: &CallRecord) -> HttpResponse {
    match (&call.result, call.status) {
        (Some(r), s) if s.is_terminal() => reply_response(
            &call.id,
            r.status,
            &r.content_type,
            Bytes::from(r.body.clone()),
        ),
        _ => accepted(st, &StatusDocument::of(call), None),
    }
}

/// Starts a call of `service`.
#[utoipa::path(
    post,
    path = "/v1/services/{service}/calls",
    tag = "calls",
    params(
        ("service" = String, Path, description = "The service to call"),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (seconds to wait for the reply) and/or `respond-async` (RFC 7240)"),
        ("Callback-Url" = Option<String>, Header, description = "Where to POST the signed result (Standard Webhooks); implies respond-async"),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; a repeat by the same caller returns the same call (keys are per caller)"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context"),
    ),
    request_body(content = String, description = "The payload, passed through untouched with its content type", content_type = "*/*"),
    responses(
        (status = 200, description = "The reply in time: its status, content type and body, with header Call-Id (any reply status is passed through)"),
        (status = 202, description = "Accepted: the call goes on; headers Location, Retry-After, Preference-Applied, Call-Id", body = StatusDocument),
        (status = 400, description = "Malformed Prefer, Idempotency-Key or body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A browser page of an origin not in gateway.allowed_origins", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown service, or one the token may not call (the same answer)", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The declared body did not arrive within gateway.body_timeout_ms; the connection is closed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Payload too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid Callback-Url, or Idempotency-Key reused with another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The caller is over one of its limits (gateway.limits: rate, pending calls); header Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker unavailable or overloaded; header Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub(super) async fn start_call(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let received = Instant::now();
    let service = path.into_inner();
    let caller = st.caller(&req)?;
    let svc = caller.service(&st.services, &service)?;
    // Read lossily rather than skipped when not visible ASCII: obs-text is
    // allowed in a quoted-string, and an unknown preference that has some
    // must not hide the `wait` or `respond-async` beside it.
    let prefer: Vec<_> = req
        .headers()
        .get_all("prefer")
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect();
    let prefs = headers::parse_prefer(prefer.iter().map(|v| v.as_ref()))?;
    let idem_key = header_str(&req, "idempotency-key")?.map(str::to_owned);
    if let Some(k) = &idem_key {
        headers::check_idempotency_key(k)?;
    }
    // Before the body is read: a caller at its bound costs no more. A
    // request with a key may repeat a call it made: checked once stored.
    if idem_key.is_none() {
        check_pending(&st, &caller, 0).await?;
    }
    let callback_url = match header_str(&req, "callback-url")? {
        None => None,
        Some(url) => {
            if !st.callbacks_enabled {
                return Err(ApiError::Unprocessable(
                    "callbacks are not enabled on this gateway".into(),
                ));
            }
            let checked = crate::callbacks::check_url(url, st.allow_private_callbacks)
                .await
                .map_err(|e| ApiError::Unprocessable(format!("Callback-Url refused: {e}")))?;
            Some(checked.to_string())
        }
    };
    let content_type = header_str(&req, "content-type")?
        .filter(|c| !c.is_empty())
        .unwrap_or(wire::CONTENT_JSON)
        .to_owned();
    headers::check_content_type(&content_type)?;
    let body = read_body(
        &req,
        payload,
        st.gateway.payload_limit_bytes,
        Duration::from_millis(st.gateway.body_timeout_ms),
    )
    .await?;
    let call_id = uuid::Uuid::now_v7().to_string();
    let span = info_span!("call", %call_id, %service, caller = %caller.name, trace_id = Empty);
    // The gateway is a hop of its own: its span continues the caller's trace
    // and the request carries on a context naming it.
    let traceparent = crate::telemetry::hop(&span, incoming_traceparent(&req));
    if let Some(trace_id) = crate::telemetry::trace_id(&traceparent) {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    let ctx = CallContext {
        st: &st,
        caller,
        service,
        timeout: svc.timeout(),
        sync_events: svc.sync_events,
        prefs,
        idem_key,
        callback_url,
        content_type,
        body,
        call_id,
        traceparent,
        received,
    };
    ctx.run().instrument(span).await
}

/// 429 when `caller` has its `gateway.limits.max_pending` calls pending
/// already, not counting `own` (this request's call, when it is stored).
async fn check_pending(st: &AppState, caller: &Caller, own: usize) -> Result<(), ApiError> {
    let Some(max) = st
        .limits
        .limits_of(caller)
        .map(|l| l.max_pending)
        .filter(|m| *m > 0)
    else {
        return Ok(());
    };
    // Far below the bound as counted a moment ago: no store read (a
    // synchronous call then touches no store at all).
    if own == 0 && st.limits.pending_surely_within(caller) {
        return Ok(());
    }
    let start = st.limits.pending_count_start(caller);
    let pending = st
        .tracker
        .store()
        .count_pending(&caller.name, max.saturating_add(own))
        .await?;
    st.limits.pending_counted(caller, start, pending);
    st.limits.pending(
        caller,
        pending.saturating_sub(own),
        st.gateway.retry_after_s,
    )
}

/// Everything one POST decided before the call starts.
struct CallContext<'a> {
    st: &'a AppState,
    caller: Caller,
    service: String,
    timeout: Duration,
    sync_events: bool,
    prefs: Preferences,
    idem_key: Option<String>,
    callback_url: Option<String>,
    content_type: String,
    body: Bytes,
    call_id: String,
    traceparent: String,
    /// When the request came in: a synchronous answer's duration runs from here.
    received: Instant,
}

impl CallContext<'_> {
    fn new_call(&self, created_ms: i64, published: bool) -> NewCall {
        NewCall {
            id: self.call_id.clone(),
            caller: self.caller.name.clone(),
            service: self.service.clone(),
            created_ms,
            deadline_ms: created_ms + self.timeout.as_millis() as i64,
            published,
            idem_key: self.idem_key.clone(),
            body_hash: self
                .idem_key
                .as_ref()
                .map(|_| request_hash(&self.service, &self.content_type, &self.body)),
            traceparent: Some(self.traceparent.clone()),
            callback_url: self.callback_url.clone(),
        }
    }

    async fn run(self) -> Result<HttpResponse, ApiError> {
        let st = self.st;
        let store = st.tracker.store();
        let created_ms = wire::now_ms() as i64;
        // An idempotent call is stored before anything is published, so that
        // a concurrent repeat finds it and publishes nothing.
        let stored_early = self.idem_key.is_some();
        if stored_early {
            match store.insert(&self.new_call(created_ms, false)).await? {
                Inserted::New => {
                    st.limits.pending_stored(&self.caller);
                    // A new call, not a repeat: within the caller's bound
                    // (this one, stored already, aside), or it is undone.
                    if let Err(e) = check_pending(st, &self.caller, 1).await {
                        let _ = store.delete(&self.call_id).await;
                        return Err(e);
                    }
                }
                Inserted::Existing(existing) => {
                    let hash = request_hash(&self.service, &self.content_type, &self.body);
                    if existing.body_hash.as_deref() != Some(hash.as_str()) {
                        return Err(ApiError::Unprocessable(
                            "this Idempotency-Key was used with another request".into(),
                        ));
                    }
                    return Ok(repeat_answer(st, &existing));
                }
            }
        }
        let call = Call {
            service: self.service.clone(),
            payload: self.body.clone(),
            content_type: self.content_type.clone(),
            call_id: Some(self.call_id.clone()),
            // Scoped to the caller: workers deduplicate on it.
            message_id: self
                .idem_key
                .as_deref()
                .map(|k| wire::caller_message_id(&self.caller.name, k)),
            timeout: Some(self.timeout),
            traceparent: Some(self.traceparent.clone()),
        };
        // A synchronous call without a key waits in memory, and nothing but
        // this request can use its reply: it says so, and its worker skips
        // the durable, confirmed reply (docs/RELIABILITY.md, "What survives
        // what"). A call answered 202 or stored (key, callback) outlives its
        // request: its reply must outlive a broker restart.
        let sent = if self.mode() == Mode::Sync && !stored_early {
            st.rpc.send_waiting(call).await
        } else {
            st.rpc.send(call).await
        };
        let mut pending = match sent {
            Ok(p) => p,
            Err(e) => {
                if stored_early {
                    let _ = store.delete(&self.call_id).await;
                }
                return Err(e.into());
            }
        };
        if stored_early {
            store.mark_published(&self.call_id).await?;
        }
        self.count(|m| m.started(self.mode()));
        let asynchronous = self.prefs.respond_async || self.callback_url.is_some();
        if asynchronous {
            return self
                .accept(pending, created_ms, stored_early, Some("respond-async"))
                .await;
        }
        let wait = self
            .prefs
            .wait
            .unwrap_or(st.gateway.default_wait_s)
            .min(st.gateway.max_wait_s);
        let applied = self.prefs.wait.map(|_| format!("wait={wait}"));
        match pending
            .wait_until_held(Instant::now() + Duration::from_secs(wait))
            .await
        {
            None => {
                self.accept(pending, created_ms, stored_early, applied.as_deref())
                    .await
            }
            Some(Ok(routed)) => {
                self.count_answered(routed.reply().status);
                self.answer(routed, created_ms, stored_early, applied).await
            }
            Some(Err(crate::Error::Timeout { .. })) => {
                // The service's deadline passed within the wait.
                self.count_answered(504);
                if stored_early {
                    st.tracker
                        .complete_answered(&self.call_id, Outcome::Expired)
                        .await?;
                }
                let body = wire::problem_body(
                    504,
                    "Gateway Timeout",
                    Some("the service did not reply within its timeout"),
                );
                Ok(reply_response(
                    &self.call_id,
                    504,
                    wire::CONTENT_PROBLEM,
                    Bytes::from(body),
                ))
            }
            Some(Err(e)) => {
                let e = ApiError::from(e);
                // A stored call is ended (and counted) later by the tracker.
                if !stored_early {
                    self.count_answered(e.status_code().as_u16());
                }
                Err(e)
            }
        }
    }

    /// The mode the caller asked for.
    fn mode(&self) -> Mode {
        if self.callback_url.is_some() {
            Mode::Callback
        } else if self.prefs.respond_async {
            Mode::Async
        } else {
            Mode::Sync
        }
    }

    /// Counts with the service's call metrics.
    fn count(&self, f: impl FnOnce(&CallMetrics)) {
        if let Some(m) = self.st.call_metrics.get(&self.service) {
            f(m);
        }
    }

    /// The call ended with its HTTP answer, of `status`.
    fn count_answered(&self, status: u16) {
        self.count(|m| m.finished(Mode::Sync, status, self.received.elapsed()));
    }

    /// 202: store the call (if not yet), publish `accepted`, follow it.
    async fn accept(
        self,
        pending: crate::rpc::PendingReply,
        created_ms: i64,
        stored_early: bool,
        applied: Option<&str>,
    ) -> Result<HttpResponse, ApiError> {
        let st = self.st;
        let new_call = self.new_call(created_ms, true);
        if !stored_early {
            st.tracker.store().insert(&new_call).await?;
            st.limits.pending_stored(&self.caller);
        }
        // Pending here until the tracker ends it: its long-polls read no
        // store. Noted before the detach below, which may end it at once.
        st.tracker
            .note_accepted(&self.call_id, &self.caller.name, new_call.deadline_ms);
        let doc = StatusDocument::of(&new_call.to_record());
        let event = st.tracker.lifecycle_event(
            EVENT_ACCEPTED,
            &doc,
            &self.caller.name,
            Some(&self.traceparent),
        );
        // The 202 is not held for the event's confirm: the call is stored
        // and its request confirmed, which is what a 202 promises. The call's
        // end publishes its own event only after this one (the tracker sees
        // to it), so no subscriber sees a call end before it began. Bounded:
        // a broker in trouble must not hold the call's end past its deadline.
        st.tracker
            .publish_accepted(&self.call_id, event, ACCEPTED_EVENT_WAIT);
        st.tracker.adopt(pending);
        tracing::info!(status = "pending", "call accepted");
        Ok(accepted(st, &doc, applied))
    }

    /// The reply came in time: answer with it.
    async fn answer(
        self,
        routed: crate::rpc::Routed,
        created_ms: i64,
        stored_early: bool,
        applied: Option<String>,
    ) -> Result<HttpResponse, ApiError> {
        let st = self.st;
        if stored_early {
            // Kept so that a repeat with the same key gets the same answer.
            // The reply is acked only once its end is stored and its event
            // published: a gateway killed in between leaves it in its reply
            // queue, and whoever takes it again publishes the event (the
            // same id); one the store failed to take goes back there too.
            let reply = routed.reply().clone();
            if let Err(e) = st
                .tracker
                .complete_answered(&self.call_id, Outcome::Reply(reply))
                .await
            {
                routed.hand_back().await;
                return Err(e.into());
            }
        }
        let reply = routed.done();
        if !stored_early && self.sync_events {
            self.publish_sync_events(&reply, created_ms).await;
        }
        tracing::info!(status = reply.status, "call answered");
        let mut res = reply_response(&self.call_id, reply.status, &reply.content_type, reply.body);
        if let Some(a) = applied
            && let Ok(v) = header::HeaderValue::from_str(&a)
        {
            res.headers_mut()
                .insert(header::HeaderName::from_static("preference-applied"), v);
        }
        Ok(res)
    }

    /// Lifecycle events of a synchronous call, for services that ask for them.
    async fn publish_sync_events(&self, reply: &Reply, created_ms: i64) {
        let mut record = CallRecord {
            id: self.call_id.clone(),
            caller: self.caller.name.clone(),
            service: self.service.clone(),
            status: CallStatus::Pending,
            created_ms,
            completed_ms: None,
            deadline_ms: created_ms + self.timeout.as_millis() as i64,
            published: true,
            idem_key: None,
            body_hash: None,
            traceparent: Some(self.traceparent.clone()),
            result: None,
            callback: None,
            progress: None,
        };
        let tracker = &self.st.tracker;
        let tp = Some(self.traceparent.as_str());
        let accepted = tracker.lifecycle_event(
            EVENT_ACCEPTED,
            &StatusDocument::of(&record),
            &self.caller.name,
            tp,
        );
        record.status = CallStatus::of_reply(reply.status);
        record.completed_ms = Some(wire::now_ms() as i64);
        record.result = Some(crate::calls::StoredResult {
            status: reply.status,
            content_type: reply.content_type.clone(),
            body: reply.body.to_vec(),
        });
        let completed = tracker.lifecycle_event(
            EVENT_COMPLETED,
            &tracker.event_document(&record),
            &self.caller.name,
            tp,
        );
        tracker.publish_event(&accepted).await;
        tracker.publish_event(&completed).await;
    }
}

/// `?wait=N` on a status document.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct WaitQuery {
    /// Hold the request up to N seconds until the call ends.
    wait: Option<String>,
}

/// The caller's stored call, or 404 (also for another caller's call).
pub(super) async fn caller_call(
    st: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<CallRecord, ApiError> {
    let not_found = || ApiError::NotFound(format!("no call {id:?}"));
    if id.len() > 64 {
        return Err(not_found());
    }
    match st.tracker.store().get(id).await? {
        Some(c) if c.caller == caller.name => Ok(c),
        _ => Err(not_found()),
    }
}

fn document_response(st: &AppState, call: &CallRecord) -> HttpResponse {
    let doc = StatusDocument::of(call);
    let mut res = HttpResponse::Ok();
    if call.status == CallStatus::Pending {
        res.insert_header((header::RETRY_AFTER, retry_after(st.gateway.retry_after_s)));
    } else {
        st.tracker.remember_finished(call, &doc);
    }
    res.json(doc)
}

/// A call's status document; with `?wait=N`, held until the call ends.
#[utoipa::path(
    get,
    path = "/v1/calls/{id}",
    tag = "calls",
    params(("id" = String, Path, description = "The call id"), WaitQuery),
    responses(
        (status = 200, description = "The status document; Retry-After (jittered) while pending", body = StatusDocument),
        (status = 400, description = "A wait that is not a non-negative integer", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such call (or another caller's, or one answered synchronously)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The caller is over one of its limits (gateway.limits: rate, long-polls); header Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub(super) async fn get_call(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<WaitQuery>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = st.caller(&req)?;
    let id = path.into_inner();
    let wait = match &query.wait {
        Some(w) => headers::parse_seconds(w, "wait")?.min(st.gateway.max_wait_s),
        None => 0,
    };
    // A finished call's document cannot change: served from memory.
    if let Some(res) = finished_response(&st, &caller, &id) {
        return res;
    }
    if wait == 0 {
        let call = caller_call(&st, &caller, &id).await?;
        return Ok(document_response(&st, &call));
    }
    // Watched before the read, so that an end after the read wakes this
    // request: one store read at most. The watch is not counted among the
    // long-polls until it waits, and is removed when this request ends: an
    // id that names no call (of any length) leaves nothing behind.
    let mut watch = st.tracker.watch(&id);
    // A call this gateway accepted and has not seen end is pending: no
    // store read (its end, from now on, wakes the watch).
    if !st.tracker.pending_here(&id, &caller.name) {
        let call = caller_call(&st, &caller, &id).await?;
        if call.status.is_terminal() {
            return Ok(document_response(&st, &call));
        }
    }
    // Held until the answer: one caller's long-polls cannot take every
    // watcher of the gateway.
    let _slot = st.limits.long_poll(&caller)?;
    if watch.hold() {
        watch.wait(Duration::from_secs(wait)).await;
    }
    drop(watch);
    // Woken by the call's end: the tracker kept its document before it
    // woke the watchers, so most long-polls end without a store read.
    if let Some(res) = finished_response(&st, &caller, &id) {
        return res;
    }
    let call = caller_call(&st, &caller, &id).await?;
    Ok(document_response(&st, &call))
}

/// The kept document of finished call `id` ([`crate::calls::tracker`]'s
/// cache), if it is kept: 404 for another caller's call.
fn finished_response(
    st: &AppState,
    caller: &Caller,
    id: &str,
) -> Option<Result<HttpResponse, ApiError>> {
    let doc = st.tracker.finished(id)?;
    if doc.caller != caller.name {
        return Some(Err(ApiError::NotFound(format!("no call {id:?}"))));
    }
    Some(Ok(HttpResponse::Ok()
        .content_type(wire::CONTENT_JSON)
        .body(doc.body.clone())))
}

/// A call's reply exactly as a synchronous answer would have been.
#[utoipa::path(
    get,
    path = "/v1/calls/{id}/result",
    tag = "calls",
    params(("id" = String, Path, description = "The call id")),
    responses(
        (status = 200, description = "The reply: its status, content type and body (any reply status is passed through)"),
        (status = 202, description = "Still pending; Retry-After", body = StatusDocument),
        (status = 404, description = "No such call", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The caller is over one of its limits (gateway.limits: requests per second); header Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The request was dead-lettered", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "No reply within the service's timeout", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub(super) async fn get_result(
    req: HttpRequest,
    path: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = st.caller(&req)?;
    let call = caller_call(&st, &caller, &path.into_inner()).await?;
    Ok(match (&call.result, call.status) {
        (_, CallStatus::Pending) => accepted(&st, &StatusDocument::of(&call), None),
        (Some(r), _) => reply_response(
            &call.id,
            r.status,
            &r.content_type,
            Bytes::from(r.body.clone()),
        ),
        (None, CallStatus::Cancelled) => {
            let body = wire::problem_body(
                409,
                "Conflict",
                Some("the call was cancelled by its caller"),
            );
            reply_response(&call.id, 409, wire::CONTENT_PROBLEM, Bytes::from(body))
        }
        (None, _) => {
            let body = wire::problem_body(
                504,
                "Gateway Timeout",
                Some("no reply within the service's timeout"),
            );
            reply_response(&call.id, 504, wire::CONTENT_PROBLEM, Bytes::from(body))
        }
    })
}

/// Cancels a pending call of the caller.
#[utoipa::path(
    delete,
    path = "/v1/calls/{id}",
    tag = "calls",
    params(("id" = String, Path, description = "The call id")),
    responses(
        (status = 200, description = "Cancelled: the status document, `cancelled`. Event `switchboard.call.cancelled` is published (workers drop the request if it has not begun and tell a running handler), the callback is sent, and a reply that still arrives is dropped", body = StatusDocument),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such call (or another caller's, or one answered synchronously)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The call has already ended", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub(super) async fn cancel_call(
    req: HttpRequest,
    path: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = st.auth.caller(&req)?;
    let id = path.into_inner();
    let ended = || ApiError::Conflict(format!("call {id:?} has already ended"));
    let call = caller_call(&st, &caller, &id).await?;
    if call.status.is_terminal() {
        // Its end event, if still owed (its gateway died before the
        // confirm), goes out now; nothing when it is out already.
        st.tracker.publish_owed_end(&id).await?;
        return Err(ended());
    }
    if !st.tracker.cancel(&id).await? {
        return Err(ended());
    }
    tracing::info!(call_id = %id, caller = %caller.name, "call cancelled");
    let call = caller_call(&st, &caller, &id).await?;
    Ok(document_response(&st, &call))
}

/// Sends a call's dead-lettered callback again.
#[utoipa::path(
    post,
    path = "/v1/calls/{id}/callback/retry",
    tag = "calls",
    params(("id" = String, Path, description = "The call id")),
    responses(
        (status = 202, description = "The callback is due again, with a new round of attempts: the same `webhook-id` and body, a new signature and timestamp. The status document, its callback `pending`", body = StatusDocument),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such call (or another caller's), or a call without a callback", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The callback is not dead (waiting, pending or delivered), or callbacks are not enabled", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub(super) async fn retry_callback(
    req: HttpRequest,
    path: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = st.auth.caller(&req)?;
    let id = path.into_inner();
    let call = caller_call(&st, &caller, &id).await?;
    let Some(callback) = &call.callback else {
        return Err(ApiError::NotFound(format!("call {id:?} has no callback")));
    };
    let Some(dispatcher) = &st.callbacks else {
        return Err(ApiError::Conflict(
            "callbacks are not enabled on this gateway".into(),
        ));
    };
    let not_dead = || ApiError::Conflict(format!("the callback of call {id:?} is not dead"));
    if callback.state != crate::calls::CallbackState::Dead {
        return Err(not_dead());
    }
    if !st
        .tracker
        .store()
        .retry_callback(&id, wire::now_ms() as i64)
        .await?
    {
        return Err(not_dead());
    }
    tracing::info!(call_id = %id, caller = %caller.name, "dead callback sent again");
    dispatcher.wake();
    let call = caller_call(&st, &caller, &id).await?;
    Ok(HttpResponse::Accepted().json(StatusDocument::of(&call)))
}
