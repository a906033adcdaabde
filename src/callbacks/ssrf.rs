//! Which callback URLs may be called: the rules a `Callback-Url` must pass
//! when a call is accepted ([`check_url`]), and the same address filter at
//! delivery time ([`GuardedResolver`], [`check_target`]).
//!
//! A caller must not use callbacks to reach the gateway's own network. So
//! every address a host resolves to is classified ([`is_forbidden`]), and one
//! forbidden address refuses the URL. Checking at acceptance alone is not
//! enough: a name can resolve to a public address then and to `127.0.0.1` a
//! minute later (DNS rebinding). The resolver the delivery client connects
//! through applies the same filter to the addresses it actually connects to;
//! hosts written as IP literals never reach a resolver and are checked by
//! [`check_target`] before sending.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Longest callback URL accepted, in bytes.
pub const MAX_URL_LEN: usize = 2048;

/// How long a host may take to resolve.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a callback URL is refused. Each message is fit for the `detail` of a
/// `422` problem: it says what is wrong with the URL, and nothing about the
/// gateway's network or internals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallbackUrlError {
    /// Over [`MAX_URL_LEN`].
    #[error("the callback URL is longer than {max} bytes")]
    TooLong {
        /// The bound.
        max: usize,
    },
    /// Not an absolute URL.
    #[error("the callback URL is not a valid absolute URL")]
    Invalid,
    /// Neither `http` nor `https`.
    #[error("the callback URL must use http or https")]
    Scheme,
    /// No host to call.
    #[error("the callback URL must name a host")]
    NoHost,
    /// `user:password@` in the URL.
    #[error("the callback URL must not contain a user name or password")]
    Userinfo,
    /// The host name does not resolve (or not in time).
    #[error("the callback URL's host name does not resolve")]
    Unresolvable,
    /// The host is, or resolves to, an address callbacks may not reach.
    #[error(
        "the callback URL's host is or resolves to a loopback, private, link-local or other non-public address"
    )]
    Forbidden,
}

/// Checks a `Callback-Url` when a call is accepted: an absolute `http` or
/// `https` URL of at most [`MAX_URL_LEN`] bytes, with a host and no user
/// info; unless `allow_private`, the host must resolve, and to public
/// addresses only. Returns the parsed URL.
pub async fn check_url(url: &str, allow_private: bool) -> Result<Url, CallbackUrlError> {
    let parsed = check_syntax(url)?;
    if allow_private {
        return Ok(parsed);
    }
    match parsed.host() {
        Some(Host::Domain(name)) => {
            let port = parsed.port_or_known_default().unwrap_or(80);
            let addrs = resolve(name, port)
                .await
                .map_err(|_| CallbackUrlError::Unresolvable)?;
            if addrs.iter().any(|a| is_forbidden(a.ip())) {
                return Err(CallbackUrlError::Forbidden);
            }
        }
        Some(_) => check_target(&parsed, false)?,
        None => return Err(CallbackUrlError::NoHost),
    }
    Ok(parsed)
}

/// The rules that need no resolution: length, absolute, scheme, host, no
/// user info.
fn check_syntax(url: &str) -> Result<Url, CallbackUrlError> {
    if url.len() > MAX_URL_LEN {
        return Err(CallbackUrlError::TooLong { max: MAX_URL_LEN });
    }
    let parsed = Url::parse(url).map_err(|e| match e {
        url::ParseError::EmptyHost => CallbackUrlError::NoHost,
        _ => CallbackUrlError::Invalid,
    })?;
    // Parsing percent-encodes spaces, quotes, `<`... so the URL as stored
    // and delivered may be longer than the text given: bound that too, or a
    // URL accepted here is refused at delivery.
    if parsed.as_str().len() > MAX_URL_LEN {
        return Err(CallbackUrlError::TooLong { max: MAX_URL_LEN });
    }
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(CallbackUrlError::Scheme);
    }
    if parsed.host().is_none() {
        return Err(CallbackUrlError::NoHost);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(CallbackUrlError::Userinfo);
    }
    Ok(parsed)
}

/// The checks made just before a delivery: the URL rules of [`check_url`]
/// and, unless `allow_private`, a host written as an IP literal must be a
/// public address. Host names are left to [`GuardedResolver`], which checks
/// the addresses actually connected to.
pub fn check_target(url: &Url, allow_private: bool) -> Result<(), CallbackUrlError> {
    check_syntax(url.as_str())?;
    if allow_private {
        return Ok(());
    }
    let ip = match url.host() {
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err(CallbackUrlError::NoHost),
    };
    if is_forbidden(ip) {
        return Err(CallbackUrlError::Forbidden);
    }
    Ok(())
}

async fn resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let lookup = tokio::net::lookup_host((host, port));
    let addrs: Vec<SocketAddr> = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "lookup timed out"))??
        .collect();
    if addrs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no addresses",
        ));
    }
    Ok(addrs)
}

/// Whether callbacks may not reach `ip`: loopback, private (RFC 1918, CGNAT
/// `100.64/10`, unique local `fc00::/7`), link-local (`169.254/16`,
/// `fe80::/10`), unspecified, multicast, broadcast, `0/8` ("this network"),
/// `240/4` (reserved), site-local `fec0::/10`, and any IPv4 address embedded
/// in IPv6 (mapped `::ffff:0:0/96`, compatible `::/96`, NAT64 `64:ff9b::/96`)
/// that is one of these.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        // 100.64.0.0/10: carrier-grade NAT, private in practice.
        || (a == 100 && (b & 0xc0) == 64)
        // 0.0.0.0/8: "this network"; Linux connects 0.x to the local host.
        || a == 0
        // 240.0.0.0/4: reserved, never a public host.
        || a >= 240
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return true;
    }
    // fc00::/7 unique local; fe80::/10 link-local; fec0::/10 site-local.
    if (seg[0] & 0xfe00) == 0xfc00 || (seg[0] & 0xffc0) == 0xfe80 || (seg[0] & 0xffc0) == 0xfec0 {
        return true;
    }
    // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d).
    if let Some(v4) = ip.to_ipv4() {
        return is_forbidden_v4(v4);
    }
    // NAT64 well-known prefix 64:ff9b::/96: the gateway reaches the IPv4
    // address embedded in the last 32 bits.
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., hi, lo] = seg;
        let v4 = Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
        return is_forbidden_v4(v4);
    }
    false
}

/// The refusal [`GuardedResolver`] answers with; the delivery finds it in
/// the source chain of the request's error.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to a forbidden address")]
pub struct ForbiddenAddress {
    /// The host that was resolved.
    pub host: String,
}

impl ForbiddenAddress {
    /// Whether `err` (or anything in its source chain) is a refusal of
    /// this resolver.
    pub fn is_in(err: &(dyn StdError + 'static)) -> bool {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if e.is::<ForbiddenAddress>() {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

/// A DNS resolver for the delivery client that refuses a host when any of
/// its addresses is forbidden ([`is_forbidden`]), so the address connected to
/// is the address checked.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: reqwest puts in the URL's port.
            let addrs = resolve(&host, 0).await?;
            if addrs.iter().any(|a| is_forbidden(a.ip())) {
                return Err(Box::new(ForbiddenAddress { host }) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> bool {
        is_forbidden(s.parse::<Ipv4Addr>().unwrap().into())
    }

    fn v6(s: &str) -> bool {
        is_forbidden(s.parse::<Ipv6Addr>().unwrap().into())
    }

    #[test]
    fn ipv4_non_public_addresses_are_forbidden() {
        for a in [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
        ] {
            assert!(v4(a), "{a} should be forbidden");
        }
    }

    #[test]
    fn ipv4_public_addresses_are_allowed() {
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "192.169.0.1",
            "169.255.0.1",
            "11.0.0.1",
            "223.255.255.255",
        ] {
            assert!(!v4(a), "{a} should be allowed");
        }
    }

    #[test]
    fn ipv6_non_public_addresses_are_forbidden() {
        for a in [
            "::1",
            "::",
            "fc00::1",
            "fd12:3456:789a::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
        ] {
            assert!(v6(a), "{a} should be forbidden");
        }
    }

    #[test]
    fn ipv6_public_addresses_are_allowed() {
        for a in ["2001:4860:4860::8888", "2606:4700:4700::1111", "2a00::1"] {
            assert!(!v6(a), "{a} should be allowed");
        }
    }

    #[test]
    fn ipv4_embedded_in_ipv6_is_classified_as_ipv4() {
        for a in [
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::ffff:192.168.0.1",
            "::ffff:100.64.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(v6(a), "{a} should be forbidden");
        }
        for a in ["::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(!v6(a), "{a} should be allowed");
        }
    }

    #[tokio::test]
    async fn url_rules() {
        let bad = [
            ("ftp://example.com/", CallbackUrlError::Scheme),
            ("file:///etc/passwd", CallbackUrlError::Scheme),
            ("not a url", CallbackUrlError::Invalid),
            ("/relative/path", CallbackUrlError::Invalid),
            ("http://", CallbackUrlError::NoHost),
            ("http://user:pw@example.com/", CallbackUrlError::Userinfo),
            ("http://user@example.com/", CallbackUrlError::Userinfo),
        ];
        for (url, want) in bad {
            assert_eq!(check_url(url, true).await.unwrap_err(), want, "{url}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(
            check_url(&long, true).await.unwrap_err(),
            CallbackUrlError::TooLong { max: MAX_URL_LEN }
        );
        // Short enough as given, too long once its quotes are encoded (found
        // by the property tests: accepted, then refused at every delivery).
        let quotes = format!("https://example.com/{}", "\"".repeat(1000));
        assert!(quotes.len() <= MAX_URL_LEN);
        assert_eq!(
            check_url(&quotes, true).await.unwrap_err(),
            CallbackUrlError::TooLong { max: MAX_URL_LEN }
        );
        // allow_private: syntax only, no resolution.
        let ok = check_url("https://example.invalid:8443/hook?x=1", true)
            .await
            .unwrap();
        assert_eq!(ok.port(), Some(8443));
        // Without allow_private the host must resolve (.invalid never does).
        assert_eq!(
            check_url("https://example.invalid/hook", false)
                .await
                .unwrap_err(),
            CallbackUrlError::Unresolvable
        );
    }

    #[tokio::test]
    async fn literal_and_local_hosts_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://localhost/",
        ] {
            assert_eq!(
                check_url(url, false).await.unwrap_err(),
                CallbackUrlError::Forbidden,
                "{url}"
            );
            assert!(check_url(url, true).await.is_ok(), "{url}");
        }
        let target = Url::parse("http://[fe80::1]:9/").unwrap();
        assert_eq!(
            check_target(&target, false).unwrap_err(),
            CallbackUrlError::Forbidden
        );
        assert!(check_target(&target, true).is_ok());
        let public = Url::parse("https://93.184.215.14/hook").unwrap();
        assert!(check_target(&public, false).is_ok());
        assert!(check_url(public.as_str(), false).await.is_ok());
    }

    #[tokio::test]
    async fn the_resolver_refuses_hosts_with_a_forbidden_address() {
        let err = GuardedResolver
            .resolve("localhost".parse().unwrap())
            .await
            .err()
            .expect("localhost is refused");
        assert!(ForbiddenAddress::is_in(err.as_ref()));
    }
}

/// Properties: the address filter agrees with a reference classification
/// written from the list in [`is_forbidden`]'s doc, and the URL checks never
/// panic and agree with each other.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// Forbidden IPv4 networks (address, prefix length), as documented.
    const V4_FORBIDDEN: &[(u32, u32)] = &[
        (0x0000_0000, 8),  // 0/8 "this network"
        (0x0a00_0000, 8),  // 10/8
        (0x6440_0000, 10), // 100.64/10 CGNAT
        (0x7f00_0000, 8),  // 127/8 loopback
        (0xa9fe_0000, 16), // 169.254/16 link-local
        (0xac10_0000, 12), // 172.16/12
        (0xc0a8_0000, 16), // 192.168/16
        (0xe000_0000, 4),  // 224/4 multicast
        (0xf000_0000, 4),  // 240/4 reserved, and the broadcast address
    ];

    fn in_v4(ip: u32, (net, len): (u32, u32)) -> bool {
        ip >> (32 - len) == net >> (32 - len)
    }

    fn reference_v4(ip: u32) -> bool {
        V4_FORBIDDEN.iter().any(|n| in_v4(ip, *n))
    }

    fn in_v6(ip: u128, net: u128, len: u32) -> bool {
        ip >> (128 - len) == net >> (128 - len)
    }

    fn reference_v6(ip: u128) -> bool {
        let low32 = ip as u32;
        ip == 0 // unspecified
            || ip == 1 // loopback
            || in_v6(ip, 0xff00 << 112, 8) // multicast
            || in_v6(ip, 0xfc00 << 112, 7) // unique local
            || in_v6(ip, 0xfe80 << 112, 10) // link-local
            || in_v6(ip, 0xfec0 << 112, 10) // site-local
            // IPv4 embedded: mapped, compatible, NAT64 well-known prefix.
            || ((in_v6(ip, 0xffff << 32, 96) || in_v6(ip, 0, 96) || in_v6(ip, 0x64_ff9b << 96, 96))
                && reference_v4(low32))
    }

    /// Any IPv4 address, biased towards the edges of the forbidden
    /// networks and their neighbours.
    fn v4() -> impl Strategy<Value = u32> {
        let edges: Vec<u32> = V4_FORBIDDEN
            .iter()
            .flat_map(|(net, len)| {
                let size = 1u64 << (32 - len);
                let end = (u64::from(*net) + size - 1) as u32;
                [net.wrapping_sub(1), *net, end, end.wrapping_add(1)]
            })
            .collect();
        prop_oneof![
            any::<u32>(),
            prop::sample::select(edges.clone()),
            (prop::sample::select(edges), 0u32..256).prop_map(|(e, d)| e ^ d),
        ]
    }

    /// Any IPv6 address, biased towards the special prefixes.
    fn v6() -> impl Strategy<Value = u128> {
        let prefixes: Vec<(u128, u32)> = vec![
            (0, 96),
            (0xffff << 32, 96),
            (0x64_ff9b << 96, 96),
            (0x64_ff9b << 96, 64),
            (0xfc00 << 112, 7),
            (0xfe80 << 112, 10),
            (0xfec0 << 112, 10),
            (0xff00 << 112, 8),
            (0xfe00 << 112, 7),
            (0x2001_0db8 << 96, 32),
            (0x2002 << 112, 16),
            (0, 120),
        ];
        prop_oneof![
            any::<u128>(),
            (prop::sample::select(prefixes), any::<u128>(), v4()).prop_map(
                |((net, len), host, v4)| {
                    let host_mask = u128::MAX >> len;
                    let host = if len >= 96 { u128::from(v4) } else { host };
                    (net & !host_mask) | (host & host_mask)
                }
            ),
        ]
    }

    /// Text that is often close to a callback URL.
    fn url_like() -> impl Strategy<Value = String> {
        let scheme = prop_oneof![
            Just("http://"),
            Just("https://"),
            Just("HTTP://"),
            Just("ftp://"),
            Just("file://"),
            Just("http:"),
            Just(""),
        ];
        let host = prop_oneof![
            Just("example.com".to_owned()),
            Just("[::1]".to_owned()),
            Just("127.0.0.1".to_owned()),
            Just("0x7f.1".to_owned()),
            Just("user:pw@example.com".to_owned()),
            Just("".to_owned()),
            "[a-z0-9.:\\[\\]@%-]{0,24}",
            any::<String>(),
        ];
        let rest = prop_oneof![
            "(:[0-9]{0,6})?(/[ -~]{0,40})?",
            any::<String>(),
            // Long paths whose characters may be percent-encoded on parsing.
            "/[ -~]{1800,2040}",
        ];
        (scheme, host, rest).prop_map(|(s, h, r)| format!("{s}{h}{r}"))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(f)
    }

    proptest! {
        #[test]
        fn ipv4_classification_matches_the_reference(ip in v4()) {
            prop_assert_eq!(is_forbidden(Ipv4Addr::from(ip).into()), reference_v4(ip), "{}", Ipv4Addr::from(ip));
        }

        #[test]
        fn ipv6_classification_matches_the_reference(ip in v6()) {
            prop_assert_eq!(is_forbidden(Ipv6Addr::from(ip).into()), reference_v6(ip), "{}", Ipv6Addr::from(ip));
        }

        /// A URL accepted when the call is made is also accepted when its
        /// callback is delivered, and is within the length bound as stored.
        #[test]
        fn an_accepted_url_passes_the_delivery_check(url in url_like()) {
            // allow_private: syntax only, so no name is ever resolved here.
            if let Ok(parsed) = block_on(check_url(&url, true)) {
                prop_assert!(parsed.as_str().len() <= MAX_URL_LEN, "{} bytes as stored", parsed.as_str().len());
                prop_assert_eq!(check_target(&parsed, true), Ok(()));
                prop_assert!(matches!(parsed.scheme(), "http" | "https"));
            }
        }

        /// An IP literal is refused exactly when its address is forbidden,
        /// at acceptance and at delivery alike.
        #[test]
        fn ip_literals_are_refused_exactly_when_forbidden(
            ip in prop_oneof![
                v4().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))),
                v6().prop_map(|a| IpAddr::from(Ipv6Addr::from(a))),
            ],
            port in prop::option::of(any::<u16>()),
        ) {
            let host = match ip {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            let url = match port {
                Some(p) => format!("https://{host}:{p}/hook"),
                None => format!("http://{host}/hook"),
            };
            let accepted = block_on(check_url(&url, false));
            if is_forbidden(ip) {
                prop_assert_eq!(accepted, Err(CallbackUrlError::Forbidden));
            } else {
                let parsed = accepted.map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
                prop_assert_eq!(check_target(&parsed, false), Ok(()));
            }
        }
    }
}
