//! Parsing of the request headers the gateway honours: `Prefer` (RFC 7240),
//! `Idempotency-Key`, `traceparent`, `Last-Event-ID`, and `?wait=` values.
//! Everything here takes client input: it never panics and never allocates
//! without bound.

use super::error::ApiError;

/// The preferences of a request that the gateway honours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preferences {
    /// `respond-async`: answer 202 as soon as the call is accepted.
    pub respond_async: bool,
    /// `wait=N`: wait up to N seconds for the reply.
    pub wait: Option<u64>,
}

/// Parses every `Prefer` header value. Unknown preferences are ignored
/// (RFC 7240); a `wait` that is not a non-negative integer is a 400. The
/// first occurrence of a preference wins.
pub fn parse_prefer<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Preferences, ApiError> {
    let mut prefs = Preferences::default();
    let mut seen_wait = false;
    for value in values {
        for item in split_outside_quotes(value, ',') {
            // Parameters after ';' are ignored for the preferences we honour.
            let head = split_outside_quotes(item, ';').next().unwrap_or_default();
            let (name, val) = match head.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (head.trim(), None),
            };
            if name.eq_ignore_ascii_case("respond-async") {
                prefs.respond_async = true;
            } else if name.eq_ignore_ascii_case("wait") && !seen_wait {
                seen_wait = true;
                prefs.wait = Some(parse_seconds(val.unwrap_or_default(), "Prefer: wait")?);
            }
        }
    }
    Ok(prefs)
}

/// A non-negative whole number of seconds (at most 10 digits), else 400
/// naming `what`.
pub fn parse_seconds(s: &str, what: &str) -> Result<u64, ApiError> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(format!(
            "{what} must be a non-negative whole number of seconds"
        )));
    }
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("{what} is out of range")))
}

fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty())
}

/// `Idempotency-Key`: 1 to 255 visible ASCII characters, else 400.
pub fn check_idempotency_key(key: &str) -> Result<(), ApiError> {
    if (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_parses_wait_and_respond_async() {
        assert_eq!(parse_prefer(["wait=5"]).unwrap().wait, Some(5));
        let p = parse_prefer(["respond-async, wait=10"]).unwrap();
        assert!(p.respond_async);
        assert_eq!(p.wait, Some(10));
        let p = parse_prefer(["Respond-Async; foo=bar", "WAIT = 3 ", "wait=9"]).unwrap();
        assert!(p.respond_async);
        assert_eq!(p.wait, Some(3));
        assert_eq!(parse_prefer(["wait=\"7\""]).unwrap().wait, Some(7));
        assert_eq!(
            parse_prefer(["handling=lenient, return=minimal"]).unwrap(),
            Preferences::default()
        );
        assert_eq!(parse_prefer(["x=\"a,wait=1\""]).unwrap().wait, None);
    }

    #[test]
    fn a_bad_wait_is_400() {
        for bad in [
            "wait=-1",
            "wait=abc",
            "wait=",
            "wait",
            "wait=1.5",
            "wait=99999999999",
            "wait=٣",
        ] {
            assert!(
                matches!(parse_prefer([bad]), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_up_to_255() {
        assert!(check_idempotency_key("order-42").is_ok());
        assert!(check_idempotency_key(&"k".repeat(255)).is_ok());
        for bad in ["", "with space", "tab\t", "ünï", &"k".repeat(256)] {
            assert!(check_idempotency_key(bad).is_err(), "{bad:?}");
        }
    }
}
