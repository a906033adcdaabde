//! Standard Webhooks signatures of callback deliveries: `webhook-id`,
//! `webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256>` of
//! `id.timestamp.body`), computed over the exact bytes sent.
//!
//! The id is the call's stored event id, the same on every attempt, so a
//! receiver can drop a delivery it already processed; the timestamp is the
//! attempt's, so a receiver's replay window holds for retries too.

use std::fmt;

use reqwest::header::{HeaderMap, HeaderValue};
use standardwebhooks::Webhook;

pub(super) use standardwebhooks::{
    HEADER_WEBHOOK_ID, HEADER_WEBHOOK_SIGNATURE, HEADER_WEBHOOK_TIMESTAMP,
};

/// Why a delivery could not be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SignError {
    /// The secret is empty or not base64 (after an optional `whsec_`).
    #[error("callbacks.secret is not a usable Standard Webhooks secret")]
    Secret,
    /// Standard Webhooks signs text: the body is not UTF-8.
    #[error("the callback body is not UTF-8 text")]
    NotText,
    /// The event id cannot be sent as a header value.
    #[error("the callback event id is not a valid header value")]
    BadId,
}

/// Signs deliveries with the configured secret. Its `Debug` never shows the
/// secret.
pub(crate) struct Signer {
    webhook: Webhook,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer { .. }")
    }
}

impl Signer {
    /// A signer for `secret` (`whsec_` + base64, as `callbacks.secret`).
    pub(super) fn new(secret: &str) -> Result<Self, SignError> {
        if secret.strip_prefix("whsec_").unwrap_or(secret).is_empty() {
            return Err(SignError::Secret);
        }
        let webhook = Webhook::new(secret).map_err(|_| SignError::Secret)?;
        Ok(Self { webhook })
    }

    /// The three Standard Webhooks headers for sending `body` as event
    /// `event_id` at `timestamp_secs` (Unix seconds).
    pub(super) fn headers(
        &self,
        event_id: &str,
        timestamp_secs: i64,
        body: &[u8],
    ) -> Result<HeaderMap, SignError> {
        let signature = self
            .webhook
            .sign(event_id, timestamp_secs, body)
            .map_err(|_| SignError::NotText)?;
        let mut headers = HeaderMap::with_capacity(3);
        headers.insert(
            HEADER_WEBHOOK_ID,
            HeaderValue::from_str(event_id).map_err(|_| SignError::BadId)?,
        );
        headers.insert(HEADER_WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp_secs));
        // Base64 and ASCII digits: always a valid header value.
        headers.insert(
            HEADER_WEBHOOK_SIGNATURE,
            HeaderValue::from_str(&signature).map_err(|_| SignError::NotText)?,
        );
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    fn now_secs() -> i64 {
        i64::try_from(crate::amqp::wire::now_ms() / 1000).unwrap()
    }

    #[test]
    fn what_we_sign_verifies() {
        let body = br#"{"specversion":"1.0","type":"switchboard.call.completed"}"#;
        let headers = Signer::new(SECRET)
            .unwrap()
            .headers("evt_1", now_secs(), body)
            .unwrap();
        assert_eq!(headers[HEADER_WEBHOOK_ID], "evt_1");
        assert!(
            headers[HEADER_WEBHOOK_SIGNATURE]
                .to_str()
                .unwrap()
                .starts_with("v1,")
        );
        let wh = Webhook::new(SECRET).unwrap();
        wh.verify(body, &headers).expect("signature verifies");
        // One byte changed: refused.
        assert!(wh.verify(b"{}", &headers).is_err());
        // Another secret: refused.
        let other = Webhook::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert!(other.verify(body, &headers).is_err());
    }

    #[test]
    fn a_known_vector_of_the_spec() {
        let headers = Signer::new(SECRET)
            .unwrap()
            .headers(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1_649_367_553,
                br#"{"email":"test@example.com","username":"test_user"}"#,
            )
            .unwrap();
        assert_eq!(
            headers[HEADER_WEBHOOK_SIGNATURE],
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
        assert_eq!(headers[HEADER_WEBHOOK_TIMESTAMP], "1649367553");
    }

    #[test]
    fn bad_secrets_and_bodies_are_errors() {
        assert!(matches!(Signer::new(""), Err(SignError::Secret)));
        assert!(matches!(Signer::new("whsec_"), Err(SignError::Secret)));
        assert!(matches!(Signer::new("whsec_!!!"), Err(SignError::Secret)));
        let s = Signer::new(SECRET).unwrap();
        assert!(matches!(
            s.headers("e", 1, &[0xff, 0xfe]),
            Err(SignError::NotText)
        ));
        assert!(matches!(s.headers("e\n", 1, b"{}"), Err(SignError::BadId)));
        assert_eq!(format!("{s:?}"), "Signer { .. }");
    }
}
