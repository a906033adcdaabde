//! The parser switchboard runs on every delivery (lapin's, amq-protocol-types
//! as vendored) against hostile bytes, through the crates a dependent of
//! switchboard gets: short strings that are not UTF-8 decode to at most 255
//! bytes without a panic, and headers nested deeper than the bound parse
//! without recursing (docs/RELIABILITY.md, "Changes to amq-protocol-types").
//! No broker needed; the same messages over the wire are in
//! `hostile::frames`.

use deadpool_lapin::lapin::protocol::basic::parse_properties;
use deadpool_lapin::lapin::types::parsing::{MAX_NESTING_DEPTH, parse_short_string};
use deadpool_lapin::lapin::types::{AMQPValue, FieldTable};
use proptest::prelude::*;

/// Decodes one short string of `bytes` (at most 255 of them).
fn short(bytes: &[u8]) -> String {
    let wire = [&[bytes.len() as u8][..], bytes].concat();
    let (rest, s) = parse_short_string(&wire[..]).expect("a short string always parses");
    assert!(rest.is_empty());
    s.as_str().to_owned()
}

#[test]
fn two_hundred_bytes_0xff_decode_to_255_bytes_of_replacement_characters() {
    assert_eq!(short(&[0xff; 200]), "\u{fffd}".repeat(85));
}

#[test]
fn valid_and_invalid_bytes_mixed_are_cut_at_a_character_boundary() {
    let decoded = short(&[&b"call-"[..], &[0xfe; 100]].concat());
    // "call-" and 83 U+FFFD: 254 bytes; an 84th would make 257.
    assert_eq!(decoded, format!("call-{}", "\u{fffd}".repeat(83)));
    // At the boundary: 252 + 3 fits, 253 + 3 does not.
    assert_eq!(short(&[&[b'a'; 252][..], &[0x80]].concat()).len(), 255);
    assert_eq!(
        short(&[&[b'a'; 253][..], &[0x80]].concat()),
        "a".repeat(253)
    );
    // Valid UTF-8 is never touched.
    assert_eq!(short("ü".repeat(127).as_bytes()), "ü".repeat(127));
}

proptest! {
    #[test]
    fn any_short_string_decodes_without_panic_to_at_most_255_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..=255)
    ) {
        let decoded = short(&bytes);
        prop_assert!(decoded.len() <= 255);
        if let Ok(valid) = std::str::from_utf8(&bytes) {
            prop_assert_eq!(decoded, valid);
        }
    }
}

/// Basic properties holding only `headers` (an encoded field table).
fn properties_with_headers(headers: &[u8]) -> Vec<u8> {
    [&(1u16 << 13).to_be_bytes()[..], headers].concat()
}

/// `levels` tables (`F`) or arrays (`A`) under the header "deep", each
/// holding the next, as one encoded headers table.
fn deep_headers(tag: u8, levels: usize) -> Vec<u8> {
    let mut inner = vec![0, 0, 0, 0];
    for _ in 1..levels {
        let entry = match tag {
            b'F' => [&[1, b'n', b'F'][..], &inner].concat(),
            _ => [&[b'A'][..], &inner].concat(),
        };
        inner = [&(entry.len() as u32).to_be_bytes()[..], &entry].concat();
    }
    let entry = [&[4][..], b"deep", &[tag], &inner].concat();
    [&(entry.len() as u32).to_be_bytes()[..], &entry].concat()
}

/// The level of the innermost value under `deep` (the headers table is
/// level 1, the value under `deep` level 2), and that value.
fn depth(headers: &FieldTable) -> (usize, AMQPValue) {
    let mut level = 2;
    let mut value = headers.inner()["deep"].clone();
    loop {
        let next = match &value {
            AMQPValue::FieldTable(t) => t.inner().get("n").cloned(),
            AMQPValue::FieldArray(a) => a.as_slice().first().cloned(),
            _ => None,
        };
        match next {
            Some(v) => {
                value = v;
                level += 1;
            }
            None => return (level, value),
        }
    }
}

#[test]
fn headers_nested_2000_deep_are_decoded_to_the_bound_and_kept_as_bytes_below() {
    for tag in [b'F', b'A'] {
        let wire = properties_with_headers(&deep_headers(tag, 2000));
        let (rest, props) = parse_properties(&wire[..]).expect("parses");
        assert!(rest.is_empty());
        let (level, bottom) = depth(props.headers().as_ref().unwrap());
        // Levels up to 64 decoded; level 65 kept as its bytes.
        assert_eq!(level, MAX_NESTING_DEPTH + 1, "{}", tag as char);
        assert!(matches!(bottom, AMQPValue::ByteArray(_)), "{bottom:?}");
    }
}

#[test]
fn headers_nested_to_the_bound_decode_in_full() {
    // The headers table is level 1; 63 more levels under it.
    let wire = properties_with_headers(&deep_headers(b'F', MAX_NESTING_DEPTH - 1));
    let (_, props) = parse_properties(&wire[..]).expect("parses");
    let (level, bottom) = depth(props.headers().as_ref().unwrap());
    assert_eq!(level, MAX_NESTING_DEPTH);
    assert_eq!(bottom, AMQPValue::FieldTable(FieldTable::default()));
}
