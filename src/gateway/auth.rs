//! Bearer-token authentication: who is calling, and which services it may
//! call. Without configured tokens every request is the `anonymous` caller
//! (and the gateway only listens on loopback: see settings validation).

use std::collections::BTreeMap;

use actix_web::HttpRequest;
use actix_web::http::header;

use super::error::ApiError;
use crate::settings::TokenSettings;

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name in the settings, or `anonymous`.
    pub name: String,
    /// Services it may call; `None` means all.
    services: Option<Vec<String>>,
}

impl Caller {
    /// Whether this caller may call `service`.
    pub fn may_call(&self, service: &str) -> bool {
        self.services
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == service))
    }

    /// 403 unless this caller may call `service`.
    pub fn check(&self, service: &str) -> Result<(), ApiError> {
        if self.may_call(service) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(service.to_owned()))
        }
    }
}

/// The configured tokens.
#[derive(Debug, Clone)]
pub struct Auth {
    tokens: Vec<(String, TokenSettings)>,
}

impl Auth {
    /// From `gateway.tokens`.
    pub fn new(tokens: &BTreeMap<String, TokenSettings>) -> Self {
        Self {
            tokens: tokens.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// Who sent `req`: 401 without a known bearer token when tokens are set.
    pub fn caller(&self, req: &HttpRequest) -> Result<Caller, ApiError> {
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
        // Compare with every token in constant time, so timing tells nothing.
        let mut found = None;
        for (name, t) in &self.tokens {
            if constant_time_eq(t.token.as_bytes(), presented.as_bytes()) {
                found = Some((name, t));
            }
        }
        let (name, t) = found.ok_or(ApiError::Unauthorized)?;
        let all = t.services.iter().any(|s| s == "*");
        Ok(Caller {
            name: name.clone(),
            services: (!all).then(|| t.services.clone()),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn auth() -> Auth {
        let mut t = BTreeMap::new();
        t.insert(
            "billing".to_string(),
            TokenSettings {
                token: "billing-token-0123456789".into(),
                services: vec!["invoice".into()],
            },
        );
        t.insert(
            "ops".to_string(),
            TokenSettings {
                token: "ops-token-0123456789abc".into(),
                services: vec!["*".into()],
            },
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
            .map(|(name, token)| {
                (
                    name.to_string(),
                    TokenSettings {
                        token: token.to_string(),
                        services: vec!["*".into()],
                    },
                )
            })
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
