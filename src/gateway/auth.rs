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
