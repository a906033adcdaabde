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
use super::streams::{SseOptions, sse_frame, sse_response, ws_relay};
use super::tracker::{EVENT_ACCEPTED, EVENT_CANCELLED, EVENT_COMPLETED};
use crate::calls::document::StatusDocument;
use crate::events::hub::{EventFilter, HubError, HubEvent, Subscribed};
use crate::metrics::{StreamSession, Transport};

/// Query of the event streams.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct StreamQuery {
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

/// Counts an SSE session in the metrics while its body lives.
fn sse_session(st: &AppState) -> StreamSession {
    st.broker.metrics().stream_session(Transport::Sse)
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

async fn subscribe(
    st: &AppState,
    req: &HttpRequest,
    q: &StreamQuery,
) -> Result<Subscribed, ApiError> {
    let caller = st.auth.caller(req)?;
    let filter = EventFilter {
        type_prefix: q.ty.clone(),
        subject: None,
        caller: Some(caller.name),
    };
    st.hub
        .subscribe(filter, last_event_id(req, q)?)
        .await
        .map_err(hub_error)
}

/// Everything on the events exchange as Server-Sent Events.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(StreamQuery, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position")),
    responses(
        (status = 200, description = "text/event-stream: `id:` (resumable position), `event:` (CloudEvent type), `data:` (the CloudEvent as one line of JSON); `: keep-alive` comments; `: gap` first when events may have been missed", content_type = "text/event-stream"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many streams open", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub async fn events_sse(
    req: HttpRequest,
    q: web::Query<StreamQuery>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let sub = subscribe(&st, &req, &q).await?;
    let opts = SseOptions {
        session: Some(sse_session(&st)),
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
        (status = 503, description = "Too many streams open", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub async fn events_ws(
    req: HttpRequest,
    body: web::Payload,
    q: web::Query<StreamQuery>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let sub = subscribe(&st, &req, &q).await?;
    let counted = st.broker.metrics().stream_session(Transport::WebSocket);
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
    ),
    security((), ("bearer" = [])))]
pub async fn call_events(
    req: HttpRequest,
    path: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = st.auth.caller(&req)?;
    let id = path.into_inner();
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
    let doc = StatusDocument::of(&call);
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
                session: Some(sse_session(&st)),
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
            session: Some(sse_session(&st)),
        },
    ))
}
