//! The status document and result JSON of DESIGN.md.

use base64::Engine;
use serde_json::{Map, Value, json};

use super::{CallRecord, StoredResult};

/// RFC 3339 text of a time in ms.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Whether a content type is JSON (`application/json` or any `+json`).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// `{"status", "content_type", "body" | "body_base64"}`: the JSON value when
/// the content type is JSON (and it parses), else the text, else base64.
pub fn result_json(r: &StoredResult) -> Value {
    let mut doc = Map::new();
    doc.insert("status".into(), json!(r.status));
    doc.insert("content_type".into(), json!(r.content_type));
    let parsed = if is_json(&r.content_type) {
        serde_json::from_slice::<Value>(&r.body).ok()
    } else {
        None
    };
    match (parsed, std::str::from_utf8(&r.body)) {
        (Some(v), _) => doc.insert("body".into(), v),
        (None, Ok(text)) => doc.insert("body".into(), Value::String(text.to_owned())),
        (None, Err(_)) => doc.insert(
            "body_base64".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(&r.body)),
        ),
    };
    Value::Object(doc)
}

/// The path of a call's status document.
pub fn call_path(id: &str) -> String {
    format!("/v1/calls/{id}")
}

/// The status document: `{"id", "service", "status", "created_at",
/// "completed_at", "result_url", "callback"}`, plus `result` once there is one.
pub fn status_document(call: &CallRecord) -> Value {
    let callback = call.callback.as_ref().map(|c| {
        json!({
            "url": c.url,
            "state": c.state,
            "attempts": c.attempts,
            "last_error": c.last_error,
        })
    });
    let mut doc = json!({
        "id": call.id,
        "service": call.service,
        "status": call.status,
        "created_at": rfc3339(call.created_ms),
        "completed_at": call.completed_ms.map(rfc3339),
        "result_url": format!("{}/result", call_path(&call.id)),
        "callback": callback,
    });
    if let Some(r) = &call.result {
        doc["result"] = result_json(r);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(ct: &str, body: &[u8]) -> StoredResult {
        StoredResult {
            status: 200,
            content_type: ct.into(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn json_bodies_are_embedded_text_as_text_bytes_as_base64() {
        let j = result_json(&result("application/json; charset=utf-8", br#"{"a":1}"#));
        assert_eq!(j["body"]["a"], 1);
        let j = result_json(&result("application/problem+json", br#"{"title":"x"}"#));
        assert_eq!(j["body"]["title"], "x");
        let j = result_json(&result("text/plain", b"hi"));
        assert_eq!(j["body"], "hi");
        let j = result_json(&result("application/json", b"not json"));
        assert_eq!(j["body"], "not json");
        let j = result_json(&result("application/octet-stream", &[0xff, 0x00]));
        assert_eq!(j["body_base64"], "/wA=");
        assert!(j.get("body").is_none());
    }
}
