//! The status document and result JSON of DESIGN.md, as typed structs so the
//! OpenAPI description is generated from the same code that answers.

use base64::Engine;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{AttemptRecord, CallRecord, CallStatus, CallbackState, StoredResult};

/// RFC 3339 text of a time in ms.
pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Whether a content type is JSON (`application/json` or any `+json`).
pub(crate) fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// A reply inside a status document.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ResultDocument {
    /// The reply's status (`x-status`).
    pub status: u16,
    /// The reply's content type.
    pub content_type: String,
    /// The JSON value when the content type is JSON, else the text.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub body: Option<Value>,
    /// The body in base64, when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl ResultDocument {
    /// The JSON value when the content type is JSON (and it parses), else
    /// the text, else base64.
    pub fn of(r: &StoredResult) -> Self {
        let parsed = if is_json(&r.content_type) {
            serde_json::from_slice::<Value>(&r.body).ok()
        } else {
            None
        };
        let (body, body_base64) = match (parsed, std::str::from_utf8(&r.body)) {
            (Some(v), _) => (Some(v), None),
            (None, Ok(text)) => (Some(Value::String(text.to_owned())), None),
            (None, Err(_)) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&r.body)),
            ),
        };
        Self {
            status: r.status,
            content_type: r.content_type.clone(),
            body,
            body_base64,
        }
    }
}

/// A callback inside a status document.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CallbackDocument {
    /// Where the result is POSTed.
    pub url: String,
    /// `waiting` (call not ended), `pending` (delivery under way),
    /// `delivered`, or `dead` (given up: a dead letter).
    #[schema(value_type = String)]
    pub state: CallbackState,
    /// Attempts made in this round (an operator's retry starts a new one).
    pub attempts: u32,
    /// Why the last attempt failed (or why the next one waits: its host's
    /// circuit is open).
    pub last_error: Option<String>,
    /// When the next attempt is due (RFC 3339), while one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// Every attempt, oldest first (at most the last 100).
    pub history: Vec<AttemptDocument>,
}

/// One callback attempt inside a status document.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AttemptDocument {
    /// Its number, from 1, over every round.
    pub attempt: u32,
    /// When it was made (RFC 3339).
    pub at: String,
    /// How long it took, ms.
    pub duration_ms: i64,
    /// The receiver's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the next attempt was scheduled (RFC 3339), when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

impl AttemptDocument {
    fn of(a: &AttemptRecord) -> Self {
        Self {
            attempt: a.number,
            at: rfc3339(a.at_ms),
            duration_ms: a.duration_ms,
            status: a.status,
            error: a.error.clone(),
            next_attempt_at: a.next_ms.map(rfc3339),
        }
    }
}

/// The status document of a call.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StatusDocument {
    /// The call id.
    pub id: String,
    /// The service called.
    pub service: String,
    /// `pending`, `succeeded`, `failed`, `expired` or `cancelled`.
    #[schema(value_type = String)]
    pub status: CallStatus,
    /// When the call was accepted (RFC 3339).
    pub created_at: String,
    /// When it ended (RFC 3339), or null.
    pub completed_at: Option<String>,
    /// Where the reply is, as a synchronous answer would have been.
    pub result_url: String,
    /// The callback, when one was asked for.
    pub callback: Option<CallbackDocument>,
    /// The reply, once there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultDocument>,
    /// In lifecycle events only: the reply was larger than
    /// `gateway.inline_result_max_bytes`, so it is left out; it is at
    /// `result_url`. Absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub result_omitted: bool,
    /// The latest progress its worker reported, from 0 to 1; absent when
    /// it reported none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// The note of that report, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl StatusDocument {
    /// The document of a stored call.
    pub fn of(call: &CallRecord) -> Self {
        Self::of_parts(call, true)
    }

    fn of_parts(call: &CallRecord, with_result: bool) -> Self {
        Self {
            id: call.id.clone(),
            service: call.service.clone(),
            status: call.status,
            created_at: rfc3339(call.created_ms),
            completed_at: call.completed_ms.map(rfc3339),
            result_url: format!("{}/result", call_path(&call.id)),
            callback: call.callback.as_ref().map(|c| CallbackDocument {
                url: c.url.clone(),
                state: c.state,
                attempts: c.attempts,
                last_error: c.last_error.clone(),
                next_attempt_at: match c.state {
                    CallbackState::Pending => c.next_ms.map(rfc3339),
                    _ => None,
                },
                history: c.history.iter().map(AttemptDocument::of).collect(),
            }),
            result: call
                .result
                .as_ref()
                .filter(|_| with_result)
                .map(ResultDocument::of),
            result_omitted: !with_result && call.result.is_some(),
            progress: call.progress.as_ref().map(|p| p.fraction),
            note: call.progress.as_ref().and_then(|p| p.note.clone()),
        }
    }

    /// The document of a stored call as lifecycle events carry it: a reply
    /// body over `max_inline` bytes is left out (`result_omitted`), so that
    /// an event, and every copy the event hub keeps and relays, stays small
    /// whatever the reply.
    pub fn for_events(call: &CallRecord, max_inline: usize) -> Self {
        let large = call
            .result
            .as_ref()
            .is_some_and(|r| r.body.len() > max_inline);
        Self::of_parts(call, !large)
    }
}

/// The path of a call's status document.
pub(crate) fn call_path(id: &str) -> String {
    format!("/v1/calls/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(ct: &str, body: &[u8]) -> serde_json::Value {
        serde_json::to_value(ResultDocument::of(&StoredResult {
            status: 200,
            content_type: ct.into(),
            body: body.to_vec(),
        }))
        .unwrap()
    }

    #[test]
    fn a_large_result_is_left_out_of_the_event_document_only() {
        let call = |body: usize| CallRecord {
            id: "c1".into(),
            caller: "alice".into(),
            service: "echo".into(),
            status: CallStatus::Succeeded,
            created_ms: 1_000,
            completed_ms: Some(2_000),
            deadline_ms: 30_000,
            published: true,
            idem_key: None,
            body_hash: None,
            traceparent: None,
            result: Some(StoredResult {
                status: 200,
                content_type: "text/plain".into(),
                body: vec![b'x'; body],
            }),
            callback: None,
            progress: None,
        };
        let small = serde_json::to_value(StatusDocument::for_events(&call(10), 10)).unwrap();
        assert_eq!(small["result"]["body"], "x".repeat(10));
        assert!(small.get("result_omitted").is_none(), "{small}");
        let large = serde_json::to_value(StatusDocument::for_events(&call(11), 10)).unwrap();
        assert!(large.get("result").is_none(), "{large}");
        assert_eq!(large["result_omitted"], true);
        assert_eq!(large["result_url"], "/v1/calls/c1/result");
        assert_eq!(large["status"], "succeeded");
        let full = serde_json::to_value(StatusDocument::of(&call(11))).unwrap();
        assert_eq!(full["result"]["body"], "x".repeat(11));
    }

    #[test]
    fn json_bodies_are_embedded_text_as_text_bytes_as_base64() {
        let j = result("application/json; charset=utf-8", br#"{"a":1}"#);
        assert_eq!(j["body"]["a"], 1);
        let j = result("application/problem+json", br#"{"title":"x"}"#);
        assert_eq!(j["body"]["title"], "x");
        let j = result("text/plain", b"hi");
        assert_eq!(j["body"], "hi");
        let j = result("application/json", b"not json");
        assert_eq!(j["body"], "not json");
        let j = result("application/octet-stream", &[0xff, 0x00]);
        assert_eq!(j["body_base64"], "/wA=");
        assert!(j.get("body").is_none());
    }
}

/// Properties: any reply body under any content type makes a result
/// document, with exactly one of `body` and `body_base64`, losing no byte.
#[cfg(test)]
mod props {
    use base64::Engine;
    use proptest::prelude::*;

    use super::*;

    fn content_type() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("application/json".to_owned()),
            Just("Application/JSON; charset=utf-8".to_owned()),
            Just("application/problem+json".to_owned()),
            Just("text/plain".to_owned()),
            Just("application/octet-stream".to_owned()),
            Just("".to_owned()),
            "[a-z]{1,8}/[a-z+.-]{1,12}(; ?[a-z]{1,8}=[a-z0-9-]{1,8})?",
            any::<String>(),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            any::<Vec<u8>>(),
            any::<String>().prop_map(String::into_bytes),
            Just(br#"{"a":[1,2.5,"x",null,true],"b":{"c":"\u00e9"}}"#.to_vec()),
            Just(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec()),
            Just(b"\"\\ud800\"".to_vec()),
            Just(b"1e400".to_vec()),
            Just(vec![b'{', 0xff, b'}']),
            (0usize..3000).prop_map(|n| "[".repeat(n).into_bytes()),
        ]
    }

    /// The essence of a content type is `application/json` or ends with
    /// `+json`, case aside.
    fn reference_is_json(ct: &str) -> bool {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        essence == "application/json" || essence.ends_with("+json")
    }

    proptest! {
        #[test]
        fn every_body_is_kept_whole_in_exactly_one_form(
            ct in content_type(),
            body in body(),
            status in any::<u16>(),
        ) {
            let r = StoredResult { status, content_type: ct.clone(), body: body.clone() };
            let doc = ResultDocument::of(&r);
            prop_assert_eq!(doc.status, status);
            prop_assert_eq!(&doc.content_type, &ct);
            match (&doc.body, &doc.body_base64) {
                (Some(Value::String(text)), None) if !is_json(&ct) || serde_json::from_slice::<Value>(&body).is_err() => {
                    prop_assert_eq!(text.as_bytes(), &body[..]);
                }
                (Some(v), None) => {
                    prop_assert!(is_json(&ct));
                    let parsed: Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(v, &parsed);
                }
                (None, Some(b64)) => {
                    prop_assert!(std::str::from_utf8(&body).is_err());
                    let back = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(back, body);
                }
                other => prop_assert!(false, "not exactly one form: {:?}", other),
            }
            // And it serializes, as every status document must.
            let json = serde_json::to_vec(&doc).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back: Value = serde_json::from_slice(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back.get("body").is_some(), doc.body.is_some());
            prop_assert_eq!(back.get("body_base64").is_some(), doc.body_base64.is_some());
        }

        #[test]
        fn is_json_matches_the_reference(ct in content_type()) {
            prop_assert_eq!(is_json(&ct), reference_is_json(&ct));
        }
    }
}
