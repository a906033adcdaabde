//! Parsing of the request headers the gateway honours: `Prefer` (RFC 7240),
//! `Idempotency-Key`, `Content-Type`, and `?wait=` values.
//! Everything here takes client input: it never panics and never allocates
//! without bound.

use super::error::ApiError;

/// The preferences of a request that the gateway honours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Preferences {
    /// `respond-async`: answer 202 as soon as the call is accepted.
    pub respond_async: bool,
    /// `wait=N`: wait up to N seconds for the reply.
    pub wait: Option<u64>,
}

/// Parses every `Prefer` header value. Unknown preferences are ignored
/// (RFC 7240); a `wait` that is not a non-negative integer is a 400. The
/// first occurrence of a preference wins.
pub(super) fn parse_prefer<'a>(
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
pub(super) fn parse_seconds(s: &str, what: &str) -> Result<u64, ApiError> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(format!(
            "{what} must be a non-negative whole number of seconds"
        )));
    }
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("{what} is out of range")))
}

/// Splits `s` at every `sep` outside a quoted-string. Inside one, a
/// backslash escapes the next character (a quoted-pair, RFC 9110), so `\"`
/// does not end it.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
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
pub(super) fn check_idempotency_key(key: &str) -> Result<(), ApiError> {
    if (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ))
    }
}

/// `Content-Type`: at most [`wire::MAX_SHORT_STRING`] bytes, else 400: it
/// travels as an AMQP short string.
///
/// [`wire::MAX_SHORT_STRING`]: crate::amqp::wire::MAX_SHORT_STRING
pub(super) fn check_content_type(content_type: &str) -> Result<(), ApiError> {
    if content_type.len() <= crate::amqp::wire::MAX_SHORT_STRING {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "Content-Type must be at most {} bytes",
            crate::amqp::wire::MAX_SHORT_STRING
        )))
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
        // A quoted-pair does not end the quoted-string (found by the
        // property tests: the escaped quote let `wait=1` out, and dropped
        // the `respond-async` after it).
        assert_eq!(parse_prefer([r#"x="\",wait=1""#]).unwrap().wait, None);
        assert!(
            parse_prefer([r#"x="\"", respond-async"#])
                .unwrap()
                .respond_async
        );
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

/// Properties over arbitrary input: what a client sends never panics, and
/// exactly the documented language is accepted.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// Text made of the pieces the `Prefer` parser cares about, mixed with
    /// any character.
    fn prefer_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just(",".to_owned()),
            Just(";".to_owned()),
            Just("=".to_owned()),
            Just("\"".to_owned()),
            Just("\\".to_owned()),
            Just(" ".to_owned()),
            Just("wait".to_owned()),
            Just("respond-async".to_owned()),
            "[0-9]{1,12}",
            any::<char>().prop_map(String::from),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    /// An RFC 7230 token (the name of an unknown preference or parameter).
    fn token() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,12}".prop_filter("not a preference we honour", |t| {
            !t.eq_ignore_ascii_case("wait") && !t.eq_ignore_ascii_case("respond-async")
        })
    }

    /// The inside of a quoted-string: qdtext and quoted-pairs, biased towards
    /// what would be a preference outside the quotes.
    fn quoted_inside() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("wait=1".to_owned()),
            Just("respond-async".to_owned()),
            Just(",".to_owned()),
            Just(";".to_owned()),
            Just("\\\"".to_owned()),
            Just("\\\\".to_owned()),
            "\\\\[ -~]",
            "[ !#-\\[\\]-~]{1,4}",
        ];
        prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
    }

    /// An unknown preference, with or without a value and parameters.
    fn unknown_preference() -> impl Strategy<Value = String> {
        (
            token(),
            prop::option::of(prop_oneof![
                token(),
                quoted_inside().prop_map(|q| format!("\"{q}\""))
            ]),
            prop::option::of(token()),
        )
            .prop_map(|(name, value, param)| {
                let mut s = name;
                if let Some(v) = value {
                    s = format!("{s}={v}");
                }
                if let Some(p) = param {
                    s = format!("{s}; {p}");
                }
                s
            })
    }

    proptest! {
        #[test]
        fn prefer_never_panics(
            values in prop::collection::vec(prefer_text(), 0..4),
            raw in any::<String>(),
        ) {
            let _ = parse_prefer(values.iter().map(String::as_str));
            let _ = parse_prefer([raw.as_str()]);
        }

        #[test]
        fn seconds_are_exactly_one_to_ten_ascii_digits(
            s in prop_oneof![any::<String>(), "[0-9]{0,12}", "[0-9+\\- .٣]{1,11}"],
        ) {
            let valid = (1..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
            match parse_seconds(&s, "wait") {
                Ok(n) => {
                    prop_assert!(valid, "{s:?} accepted");
                    prop_assert_eq!(Some(n), s.parse::<u64>().ok());
                }
                Err(e) => {
                    prop_assert!(!valid, "{s:?} refused");
                    prop_assert!(matches!(e, ApiError::BadRequest(_)));
                }
            }
        }

        #[test]
        fn wait_and_respond_async_are_found_among_unknown_preferences(
            wait in prop::option::of(0u64..=9_999_999_999),
            quoted in any::<bool>(),
            respond_async in any::<bool>(),
            others in prop::collection::vec(unknown_preference(), 0..4),
            at in any::<prop::sample::Index>(),
        ) {
            let mut prefs = others;
            if let Some(n) = wait {
                let v = if quoted { format!("wait=\"{n}\"") } else { format!("Wait = {n}") };
                let i = at.index(prefs.len() + 1);
                prefs.insert(i, v);
            }
            if respond_async {
                prefs.push("RESPOND-ASYNC".into());
            }
            let header = prefs.join(", ");
            let got = parse_prefer([header.as_str()]);
            prop_assert!(got.is_ok(), "{header:?}: {got:?}");
            prop_assert_eq!(got.ok(), Some(Preferences { respond_async, wait }), "{:?}", header);
        }

        #[test]
        fn a_preference_inside_a_quoted_string_takes_no_effect(
            name in token(),
            inside in quoted_inside(),
        ) {
            let header = format!("{name}=\"{inside}\"");
            let got = parse_prefer([header.as_str()]);
            prop_assert_eq!(got.ok(), Some(Preferences::default()), "{:?}", header);
        }

        #[test]
        fn content_types_are_at_most_255_bytes(ct in prop_oneof![any::<String>(), "[ -~]{250,260}"]) {
            prop_assert_eq!(check_content_type(&ct).is_ok(), ct.len() <= 255);
        }

        #[test]
        fn idempotency_keys_are_exactly_1_to_255_visible_ascii(
            key in prop_oneof![
                any::<String>(),
                "[!-~]{1,255}",
                "[!-~]{256,300}",
                "[ -~\t\u{80}-\u{10ffff}]{0,300}",
            ],
        ) {
            let valid = (1..=255).contains(&key.len())
                && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
            prop_assert_eq!(check_idempotency_key(&key).is_ok(), valid, "{:?}", key);
        }
    }
}
