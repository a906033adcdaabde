//! The stream routes: `GET /v1/events` (SSE), `GET /v1/events/ws`
//! (WebSocket) and `GET /v1/calls/{id}/events` (SSE of one call, closed when
//! it ends). Each caller sees domain events and its own calls' events only.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::AppState;
use super::calls::caller_call;
use super::error::{ApiError, Problem};
use super::limits::Slot;
use super::streams::{Counted, SseOptions, sse_frame, sse_response, ws_relay};
use crate::calls::document::StatusDocument;
use crate::calls::tracker::{EVENT_ACCEPTED, EVENT_CANCELLED, EVENT_COMPLETED};
use crate::events::hub::{EventFilter, HubError, HubEvent, Subscribed};
use crate::gateway::metrics::Transport;

/// Query of the event streams.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct StreamQuery {
    /// Only events whose type starts with this.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    ty: Option<String>,
    /// Resume after this position (as the `Last-Event-ID` header does).
    last_event_id: Option<String>,
}

fn hub_error(e: HubError) -> ApiError {
    match e {
        HubError::TooManySessions { .. } => {
            ApiError::unavailable("too many event streams are open; retry later")
        }
        other => ApiError::internal(other),
    }
}

/// Counts a session of `transport` in the metrics, with the caller's
/// stream slot, while it lives.
fn counted(st: &AppState, transport: Transport, slot: Option<Slot>) -> Counted {
    Counted {
        session: st.broker.metrics().gateway().stream_session(transport),
        slot,
    }
}

fn heartbeat(st: &AppState) -> Duration {
    Duration::from_secs(st.gateway.heartbeat_s)
}

fn last_event_id(req: &HttpRequest, q: &StreamQuery) -> Result<Option<String>, ApiError> {
    let header = match req.headers().get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::BadRequest("Last-Event-ID is not visible ASCII".into()))?
                .trim()
                .to_owned(),
        ),
    };
    let id = header.or_else(|| q.last_event_id.clone());
    if id.as_ref().is_some_and(|i| i.len() > 128) {
        return Err(ApiError::BadRequest("Last-Event-ID is too long".into()));
    }
    Ok(id)
}

/// A session of the caller's events, with the caller's stream slot.
async fn subscribe(
    st: &AppState,
    req: &HttpRequest,
    q: &StreamQuery,
) -> Result<(Subscribed, Option<Slot>), ApiError> {
    let caller = st.caller(req)?;
    let last = last_event_id(req, q)?;
    let slot = st.limits.stream(&caller)?;
    let filter = EventFilter {
        type_prefix: q.ty.clone(),
        subject: None,
        caller: Some(caller.name),
    };
    let sub = st.hub.subscribe(filter, last).await.map_err(hub_error)?;
    Ok((sub, slot))
}

/// Everything on the events exchange as Server-Sent Events.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(StreamQuery, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position")),
    responses(
        (status = 200, description = "text/event-stream: `id:` (resumable position on any instance: the offset in the events log), `event:` (CloudEvent type), `data:` (the CloudEvent as one line of JSON); `: keep-alive` comments; `switchboard.events.lost` first when resuming from before the log's retention (`data`: `first_lost`, `last_lost`); `: gap` first when `Last-Event-ID` is not a position", content_type = "text/event-stream"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The caller is over one of its limits (gateway.limits: rate, streams); header Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many streams open", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub(super) async fn events_sse(
    req: HttpRequest,
    q: web::Query<StreamQuery>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (sub, slot) = subscribe(&st, &req, &q).await?;
    let opts = SseOptions {
        session: Some(counted(&st, Transport::Sse, slot)),
        ..SseOptions::default()
    };
    Ok(sse_response(sub, heartbeat(&st), opts))
}

/// The same stream over a WebSocket: one text frame per CloudEvent.
#[utoipa::path(get, path = "/v1/events/ws", tag = "events",
    params(StreamQuery),
    responses(
        (status = 101, description = "WebSocket: each CloudEvent as one text frame"),
        (status = 400, description = "Not a WebSocket upgrade", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "An Origin not in gateway.allowed_origins (a browser page of another site)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The caller is over one of its limits (gateway.limits: rate, streams); header Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many streams open", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub(super) async fn events_ws(
    req: HttpRequest,
    body: web::Payload,
    q: web::Query<StreamQuery>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let (sub, slot) = subscribe(&st, &req, &q).await?;
    let counted = counted(&st, Transport::WebSocket, slot);
    ws_relay(&req, body, sub, heartbeat(&st), Some(counted)).await
}

/// The type prefix of a call's lifecycle events.
const CALL_EVENTS: &str = "switchboard.call.";

/// A snapshot frame of a call (not resumable: its position names the call).
fn snapshot(st: &AppState, ty: &str, doc: &StatusDocument, caller: &str) -> Bytes {
    let event = st.tracker.lifecycle_event(ty, doc, caller, None);
    let json = serde_json::to_vec(&event).unwrap_or_default();
    sse_frame(&HubEvent {
        seq: 0,
        position: format!("{}-snapshot", doc.id),
        ty: ty.to_owned(),
        subject: Some(doc.id.clone()),
        caller: Some(caller.to_owned()),
        json: Bytes::from(json),
    })
}

/// One call's status changes as Server-Sent Events: its state now, its
/// progress reports, then its end (completed or cancelled); closed when it
/// ends.
#[utoipa::path(get, path = "/v1/calls/{id}/events", tag = "calls",
    params(("id" = String, Path, description = "The call id")),
    responses(
        (status = 200, description = "text/event-stream: the call's current state, then `switchboard.call.progress` as its worker reports, then `switchboard.call.completed` or `switchboard.call.cancelled`; the stream ends with the call", content_type = "text/event-stream"),
        (status = 404, description = "No such call", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The caller is over one of its limits (gateway.limits: rate, streams); header Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub(super) async fn call_events(
    req: HttpRequest,
    path: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = st.caller(&req)?;
    let id = path.into_inner();
    let slot = st.limits.stream(&caller)?;
    // Subscribe before reading, so an end in between is not missed.
    let sub = st
        .hub
        .subscribe(
            EventFilter {
                // The call's lifecycle but `accepted`: the state before it
                // is the snapshot sent first, and an `accepted` event still
                // on its way through the hub would repeat it (skipped
                // below).
                type_prefix: Some(CALL_EVENTS.into()),
                subject: Some(id.clone()),
                caller: Some(caller.name.clone()),
            },
            None,
        )
        .await
        .map_err(hub_error)?;
    let call = match caller_call(&st, &caller, &id).await {
        Ok(c) => c,
        Err(e) => {
            st.hub.unsubscribe(sub.id).await;
            return Err(e);
        }
    };
    // As events carry it: a large result is at its `result_url`.
    let doc = st.tracker.event_document(&call);
    if call.status.is_terminal() {
        st.hub.unsubscribe(sub.id).await;
        // A session that has already ended: the snapshot, then the end.
        let (_, rx) = mpsc::channel(1);
        let ended = Subscribed {
            id: sub.id,
            rx,
            gap: false,
        };
        let ty = if call.status == crate::calls::CallStatus::Cancelled {
            EVENT_CANCELLED
        } else {
            EVENT_COMPLETED
        };
        let first = vec![snapshot(&st, ty, &doc, &caller.name)];
        return Ok(sse_response(
            ended,
            heartbeat(&st),
            SseOptions {
                first,
                session: Some(counted(&st, Transport::Sse, slot)),
                ..SseOptions::default()
            },
        ));
    }
    let first = vec![snapshot(&st, EVENT_ACCEPTED, &doc, &caller.name)];
    Ok(sse_response(
        sub,
        heartbeat(&st),
        SseOptions {
            first,
            close_after: Some(Box::new(|ev: &HubEvent| {
                ev.ty == EVENT_COMPLETED || ev.ty == EVENT_CANCELLED
            })),
            skip: Some(Box::new(|ev: &HubEvent| ev.ty == EVENT_ACCEPTED)),
            session: Some(counted(&st, Transport::Sse, slot)),
        },
    ))
}
