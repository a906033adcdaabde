//! Bearer-token authentication: who is calling, and which services it may
//! call. Without configured tokens every request is the `anonymous` caller
//! (and the gateway only listens on loopback: see settings validation).
//!
//! Tokens are kept as SHA-256 digests (the settings may give the token or
//! its digest); a presented token is digested and compared with every
//! configured digest in constant time ([`subtle`]), so neither the time
//! taken nor the length of a token tells anything.

use std::collections::BTreeMap;

use actix_web::HttpRequest;
use actix_web::http::header;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::settings::{ServiceSettings, TokenSettings};

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The token's name in the settings, or `anonymous`.
    pub name: String,
    /// Services it may call; `None` means all.
    services: Option<Vec<String>>,
}

impl Caller {
    /// Whether this caller may call `service`.
    pub(crate) fn may_call(&self, service: &str) -> bool {
        self.services
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == service))
    }

    /// The settings of `service` when this caller may call it. Otherwise
    /// 404, the very answer to a service that does not exist: a token
    /// learns nothing of the services it may not call.
    pub(crate) fn service<'a>(
        &self,
        services: &'a BTreeMap<String, ServiceSettings>,
        name: &str,
    ) -> Result<&'a ServiceSettings, ApiError> {
        services
            .get(name)
            .filter(|_| self.may_call(name))
            .ok_or_else(|| ApiError::NotFound(format!("no service named {name:?}")))
    }
}

/// One configured token.
#[derive(Clone)]
struct Token {
    /// The caller's name.
    name: String,
    /// SHA-256 of the token.
    digest: [u8; 32],
    /// Services it may call; `None` means all.
    services: Option<Vec<String>>,
}

/// The configured tokens. Its `Debug` shows caller names only.
#[derive(Clone)]
pub(crate) struct Auth {
    tokens: Vec<Token>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field(
                "callers",
                &self.tokens.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Auth {
    /// From `gateway.tokens` (validated: an entry without a usable token
    /// has been refused at start-up, and would be left out here).
    pub(crate) fn new(tokens: &BTreeMap<String, TokenSettings>) -> Self {
        let tokens = tokens
            .iter()
            .filter_map(|(name, t)| {
                let all = t.services.iter().any(|s| s == "*");
                Some(Token {
                    name: name.clone(),
                    digest: t.sha256()?,
                    services: (!all).then(|| t.services.clone()),
                })
            })
            .collect();
        Self { tokens }
    }

    /// Whether no token is configured: every caller is `anonymous`.
    pub(crate) fn is_anonymous(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Who sent `req`: 401 without a known bearer token when tokens are set.
    pub(crate) fn caller(&self, req: &HttpRequest) -> Result<Caller, ApiError> {
        if self.tokens.is_empty() {
            return Ok(Caller {
                name: "anonymous".into(),
                services: None,
            });
        }
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(ApiError::Unauthorized)?;
        let presented = Sha256::digest(presented.as_bytes());
        // Compare with every digest, each in constant time, without
        // stopping at a match: timing tells nothing.
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.digest.ct_eq(presented.as_slice())) {
                found = Some(t);
            }
        }
        let t = found.ok_or(ApiError::Unauthorized)?;
        Ok(Caller {
            name: t.name.clone(),
            services: t.services.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn auth() -> Auth {
        let mut t = BTreeMap::new();
        t.insert(
            "billing".to_string(),
            TokenSettings::bearer("billing-token-0123456789", &["invoice"]),
        );
        t.insert(
            "ops".to_string(),
            TokenSettings::bearer("ops-token-0123456789abc", &["*"]),
        );
        Auth::new(&t)
    }

    #[test]
    fn tokens_name_the_caller_and_limit_services() {
        let a = auth();
        let req = TestRequest::default()
            .insert_header(("Authorization", "Bearer billing-token-0123456789"))
            .to_http_request();
        let c = a.caller(&req).unwrap();
        assert_eq!(c.name, "billing");
        assert!(c.may_call("invoice"));
        assert!(!c.may_call("echo"));
        let req = TestRequest::default()
            .insert_header(("Authorization", "bearer ops-token-0123456789abc"))
            .to_http_request();
        assert!(a.caller(&req).unwrap().may_call("anything"));
    }

    #[test]
    fn a_token_given_as_its_digest_names_its_caller() {
        let digest = format!("{:x}", Sha256::digest(b"billing-token-0123456789"));
        let mut t = BTreeMap::new();
        t.insert(
            "billing".to_string(),
            TokenSettings::digest(&digest, &["invoice"]),
        );
        let a = Auth::new(&t);
        let req = TestRequest::default()
            .insert_header(("Authorization", "Bearer billing-token-0123456789"))
            .to_http_request();
        assert_eq!(a.caller(&req).unwrap().name, "billing");
        let req = TestRequest::default()
            .insert_header(("Authorization", format!("Bearer {digest}")))
            .to_http_request();
        assert!(matches!(a.caller(&req), Err(ApiError::Unauthorized)));
        assert!(!format!("{a:?}").contains(&digest));
    }

    #[test]
    fn a_service_the_caller_may_not_call_is_not_found_as_one_that_does_not_exist() {
        let mut services = BTreeMap::new();
        services.insert("invoice".to_string(), ServiceSettings::default());
        services.insert("echo".to_string(), ServiceSettings::default());
        let req = TestRequest::default()
            .insert_header(("Authorization", "Bearer billing-token-0123456789"))
            .to_http_request();
        let billing = auth().caller(&req).unwrap();
        assert!(billing.service(&services, "invoice").is_ok());
        let forbidden = billing.service(&services, "echo").unwrap_err();
        let absent = billing.service(&services, "ehco").unwrap_err();
        assert!(matches!(forbidden, ApiError::NotFound(_)));
        assert_eq!(
            forbidden.to_string().replace("echo", "X"),
            absent.to_string().replace("ehco", "X")
        );
    }

    #[test]
    fn missing_or_wrong_tokens_are_401() {
        let a = auth();
        for h in [
            "",
            "Bearer",
            "Bearer nope",
            "Basic billing-token-0123456789",
        ] {
            let mut r = TestRequest::default();
            if !h.is_empty() {
                r = r.insert_header(("Authorization", h));
            }
            assert!(
                matches!(a.caller(&r.to_http_request()), Err(ApiError::Unauthorized)),
                "{h}"
            );
        }
    }
}

/// Properties: any `Authorization` bytes are safe, and only a configured
/// token, presented as a bearer token, names a caller.
#[cfg(test)]
mod props {
    use actix_web::http::header::HeaderValue;
    use actix_web::test::TestRequest;
    use proptest::prelude::*;

    use super::*;

    const TOKENS: &[(&str, &str)] = &[
        ("billing", "billing-token-0123456789"),
        ("ops", "ops-token-0123456789abc"),
    ];

    fn auth() -> Auth {
        let tokens = TOKENS
            .iter()
            .map(|(name, token)| (name.to_string(), TokenSettings::bearer(token, &["*"])))
            .collect();
        Auth::new(&tokens)
    }

    fn caller_of(bytes: &[u8]) -> Option<Result<Caller, ApiError>> {
        // Not every byte string is a header value (no CR, LF, NUL...).
        let value = HeaderValue::from_bytes(bytes).ok()?;
        let req = TestRequest::default()
            .insert_header((header::AUTHORIZATION, value))
            .to_http_request();
        Some(auth().caller(&req))
    }

    fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
        let token = prop::sample::select(TOKENS.iter().map(|(_, t)| *t).collect::<Vec<_>>());
        prop_oneof![
            any::<Vec<u8>>(),
            (
                "(?i:bearer|basic|token)?",
                "[ \t]{0,3}",
                token,
                prop::collection::vec(any::<u8>(), 0..3),
            )
                .prop_map(|(s, sp, t, tail)| {
                    let mut v = format!("{s}{sp}{t}").into_bytes();
                    v.extend(tail);
                    v
                }),
        ]
    }

    proptest! {
        #[test]
        fn only_a_configured_bearer_token_names_a_caller(bytes in header_bytes()) {
            if let Some(res) = caller_of(&bytes) {
                match res {
                    Ok(c) => {
                        let token = TOKENS
                            .iter()
                            .find(|(name, _)| *name == c.name)
                            .map(|(_, t)| *t)
                            .unwrap_or_default();
                        let text = std::str::from_utf8(&bytes).unwrap_or_default();
                        let (scheme, rest) = text.trim().split_once(' ').unwrap_or_default();
                        prop_assert!(scheme.eq_ignore_ascii_case("bearer"), "{:?}", text);
                        prop_assert_eq!(rest.trim(), token);
                    }
                    Err(e) => prop_assert!(matches!(e, ApiError::Unauthorized)),
                }
            }
        }

        #[test]
        fn a_bearer_token_in_any_case_and_spacing_is_accepted(
            scheme in "(?i:bearer)",
            before in "[ ]{0,2}",
            between in "[ ]{1,3}",
            after in "[ \t]{0,2}",
            i in 0..TOKENS.len(),
        ) {
            let (name, token) = TOKENS[i];
            let header = format!("{before}{scheme}{between}{token}{after}");
            let got = caller_of(header.as_bytes()).map(|r| r.map(|c| c.name));
            prop_assert_eq!(got.map(|r| r.ok()), Some(Some(name.to_owned())), "{:?}", header);
        }
    }
}
