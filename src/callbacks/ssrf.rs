//! Which callback URLs may be called: the rules a `Callback-Url` must pass
//! when a call is accepted ([`check_url`]), and the same address filter at
//! delivery time ([`GuardedResolver`], [`check_target`]).
//!
//! A caller must not use callbacks to reach the gateway's own network. So
//! every address a host resolves to is classified ([`reach`]), and one
//! forbidden address refuses the URL ([`is_forbidden`]). The setting
//! `callbacks.allow_private` re-allows the gateway's own networks
//! (loopback, private, link-local: [`Reach::Private`]), never the addresses
//! no callback should reach ([`Reach::Never`]: unspecified, multicast,
//! broadcast, documentation, reserved...). Checking at acceptance alone is not
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
pub(super) const MAX_URL_LEN: usize = 2048;

/// How long a host may take to resolve.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a callback URL is refused. Each message is fit for the `detail` of a
/// `422` problem: it says what is wrong with the URL, and nothing about the
/// gateway's network or internals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallbackUrlError {
    /// Over `MAX_URL_LEN`.
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
/// `https` URL of at most `MAX_URL_LEN` bytes, with a host and no user
/// info. A host written as an IP address must be one callbacks may reach
/// (`is_forbidden`); a host name must resolve, and to such addresses
/// only, unless `allow_private` (then it is resolved at delivery, where
/// `GuardedResolver` refuses the addresses never reachable). Returns the
/// parsed URL.
pub async fn check_url(url: &str, allow_private: bool) -> Result<Url, CallbackUrlError> {
    let parsed = check_syntax(url)?;
    match parsed.host() {
        Some(Host::Domain(_)) if allow_private => {}
        Some(Host::Domain(name)) => {
            let port = parsed.port_or_known_default().unwrap_or(80);
            let addrs = resolve(name, port)
                .await
                .map_err(|_| CallbackUrlError::Unresolvable)?;
            if addrs.iter().any(|a| is_forbidden(a.ip(), false)) {
                return Err(CallbackUrlError::Forbidden);
            }
        }
        Some(_) => check_target(&parsed, allow_private)?,
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
/// and a host written as an IP literal must be one callbacks may reach
/// ([`is_forbidden`] with `allow_private`). Host names are left to
/// [`GuardedResolver`], which checks the addresses actually connected to.
pub(super) fn check_target(url: &Url, allow_private: bool) -> Result<(), CallbackUrlError> {
    check_syntax(url.as_str())?;
    let ip = match url.host() {
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err(CallbackUrlError::NoHost),
    };
    if is_forbidden(ip, allow_private) {
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

/// How far a callback may reach an address: what [`is_forbidden`] decides
/// with `callbacks.allow_private`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Reach {
    /// A public address: callbacks may reach it.
    Public,
    /// The gateway's own networks: loopback, private (RFC 1918, CGNAT
    /// `100.64/10`, unique local `fc00::/7`, site-local `fec0::/10`) and
    /// link-local (`169.254/16`, `fe80::/10`). Reachable only with
    /// `callbacks.allow_private`.
    Private,
    /// No host a callback should ever reach, `allow_private` or not:
    /// unspecified and "this network" (`0/8`, `::`), multicast, broadcast,
    /// reserved (`240/4`), documentation (TEST-NETs, `2001:db8::/32`,
    /// `3fff::/20`), benchmarking (`198.18/15`, `2001:2::/48`), the IETF
    /// protocol blocks (`192.0.0/24`, `2001::/23` but Teredo), the 6to4
    /// relay anycast `192.88.99/24`, local-use NAT64 `64:ff9b:1::/48`,
    /// discard `100::/64`, SRv6 SIDs `5f00::/16`, the deprecated
    /// IPv4-compatible (`::a.b.c.d`) and SIIT (`::ffff:0:a.b.c.d`) forms,
    /// and every other address outside global unicast `2000::/3` (IANA
    /// reserved).
    Never,
}

/// Whether callbacks may not reach `ip`: anything but [`Reach::Public`],
/// except that `allow_private` re-allows [`Reach::Private`].
pub(super) fn is_forbidden(ip: IpAddr, allow_private: bool) -> bool {
    match reach(ip) {
        Reach::Public => false,
        Reach::Private => !allow_private,
        Reach::Never => true,
    }
}

/// Classifies `ip` (IANA's IPv4 and IPv6 special-purpose address
/// registries). An IPv6 address that embeds an IPv4 address, in every form
/// that a host or its network may translate to IPv4 (IPv4-mapped, NAT64
/// `64:ff9b::/96`, 6to4 `2002::/16`, Teredo `2001::/32` with its server and
/// client addresses), is at least as refused as that IPv4 address.
pub(super) fn reach(ip: IpAddr) -> Reach {
    match ip {
        IpAddr::V4(v4) => reach_v4(v4),
        IpAddr::V6(v6) => reach_v6(v6),
    }
}

/// IPv4 blocks that are no public host: (network, prefix length, reach).
const V4_BLOCKS: &[(u32, u32, Reach)] = &[
    (0x0000_0000, 8, Reach::Never), // 0/8 "this network" (Linux: the local host)
    (0x0a00_0000, 8, Reach::Private), // 10/8
    (0x6440_0000, 10, Reach::Private), // 100.64/10 CGNAT, private in practice
    (0x7f00_0000, 8, Reach::Private), // 127/8 loopback
    (0xa9fe_0000, 16, Reach::Private), // 169.254/16 link-local (cloud metadata)
    (0xac10_0000, 12, Reach::Private), // 172.16/12
    (0xc000_0000, 24, Reach::Never), // 192.0.0/24 IETF protocol assignments
    (0xc000_0200, 24, Reach::Never), // 192.0.2/24 TEST-NET-1
    (0xc058_6300, 24, Reach::Never), // 192.88.99/24 6to4 relay anycast (deprecated)
    (0xc0a8_0000, 16, Reach::Private), // 192.168/16
    (0xc612_0000, 15, Reach::Never), // 198.18/15 benchmarking
    (0xc633_6400, 24, Reach::Never), // 198.51.100/24 TEST-NET-2
    (0xcb00_7100, 24, Reach::Never), // 203.0.113/24 TEST-NET-3
    (0xe000_0000, 4, Reach::Never), // 224/4 multicast
    (0xf000_0000, 4, Reach::Never), // 240/4 reserved, and 255.255.255.255
];

fn reach_v4(ip: Ipv4Addr) -> Reach {
    let ip = u32::from(ip);
    V4_BLOCKS
        .iter()
        .filter(|(net, len, _)| ip >> (32 - len) == net >> (32 - len))
        .map(|(_, _, reach)| *reach)
        .max()
        .unwrap_or(Reach::Public)
}

/// Whether `ip` is in `net`/`len`.
fn in_v6(ip: u128, net: u128, len: u32) -> bool {
    ip >> (128 - len) == net >> (128 - len)
}

/// The IPv4 address in bits `at..at + 32` of `ip` (from the left).
fn v4_at(ip: u128, at: u32) -> Ipv4Addr {
    Ipv4Addr::from((ip >> (96 - at)) as u32)
}

fn reach_v6(ip: Ipv6Addr) -> Reach {
    let ip = u128::from(ip);
    if ip == 1 {
        return Reach::Private; // ::1 loopback
    }
    // IPv4-mapped ::ffff:a.b.c.d: a dual-stack socket connects to a.b.c.d.
    if in_v6(ip, 0xffff << 32, 96) {
        return reach_v4(v4_at(ip, 96));
    }
    // NAT64 well-known prefix: the translator connects to a.b.c.d.
    if in_v6(ip, 0x64_ff9b << 96, 96) {
        return reach_v4(v4_at(ip, 96));
    }
    if in_v6(ip, 0xfc00 << 112, 7) || in_v6(ip, 0xfe80 << 112, 10) || in_v6(ip, 0xfec0 << 112, 10) {
        return Reach::Private; // unique local, link-local, site-local
    }
    // Everything else outside global unicast 2000::/3 is multicast or IANA
    // reserved (::/8 with the compatible and SIIT forms, local-use NAT64,
    // 100::/64 discard...).
    if !in_v6(ip, 0x2000 << 112, 3) {
        return Reach::Never;
    }
    // Teredo: server IPv4 in bits 32..64, client IPv4 (inverted) in 96..128.
    if in_v6(ip, 0x2001_0000 << 96, 32) {
        let server = reach_v4(v4_at(ip, 32));
        let client = reach_v4(Ipv4Addr::from(!(ip as u32)));
        return server.max(client);
    }
    // 6to4: the IPv4 address of the site in bits 16..48.
    if in_v6(ip, 0x2002 << 112, 16) {
        return reach_v4(v4_at(ip, 16));
    }
    if in_v6(ip, 0x2001 << 112, 23) // IETF protocol assignments, benchmarking...
        || in_v6(ip, 0x2001_0db8 << 96, 32) // documentation
        || in_v6(ip, 0x3fff << 112, 20) // documentation (RFC 9637)
        || in_v6(ip, 0x5f00 << 112, 16)
    // SRv6 SIDs (RFC 9602)
    {
        return Reach::Never;
    }
    Reach::Public
}

/// The refusal [`GuardedResolver`] answers with; the delivery finds it in
/// the source chain of the request's error.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to a forbidden address")]
pub(super) struct ForbiddenAddress {
    /// The host that was resolved.
    pub host: String,
}

impl ForbiddenAddress {
    /// Whether `err` (or anything in its source chain) is a refusal of
    /// this resolver.
    pub(super) fn is_in(err: &(dyn StdError + 'static)) -> bool {
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
/// its addresses is forbidden ([`is_forbidden`] with `allow_private`), so
/// the address connected to is the address checked.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct GuardedResolver {
    /// `callbacks.allow_private`: the gateway's own networks are allowed.
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allow_private = self.allow_private;
        Box::pin(async move {
            // Port 0: reqwest puts in the URL's port.
            let addrs = resolve(&host, 0).await?;
            if addrs.iter().any(|a| is_forbidden(a.ip(), allow_private)) {
                return Err(Box::new(ForbiddenAddress { host }) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Reach {
        reach(s.parse::<Ipv4Addr>().unwrap().into())
    }

    fn v6(s: &str) -> Reach {
        reach(s.parse::<Ipv6Addr>().unwrap().into())
    }

    #[test]
    fn ipv4_addresses_of_the_gateways_networks_are_private() {
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
        ] {
            assert_eq!(v4(a), Reach::Private, "{a}");
        }
    }

    #[test]
    fn ipv4_addresses_no_callback_should_reach_are_never_allowed() {
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.200",
            "198.18.0.1",
            "198.19.255.255",
            "192.88.99.1",
        ] {
            assert_eq!(v4(a), Reach::Never, "{a}");
            assert!(
                is_forbidden(a.parse::<Ipv4Addr>().unwrap().into(), true),
                "{a}"
            );
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
            "192.0.1.255",
            "198.17.255.255",
            "198.20.0.0",
            "203.0.114.1",
        ] {
            assert_eq!(v4(a), Reach::Public, "{a}");
        }
    }

    #[test]
    fn ipv6_addresses_are_classified() {
        for (a, want) in [
            ("::1", Reach::Private),
            ("fc00::1", Reach::Private),
            ("fd12:3456:789a::1", Reach::Private),
            ("fe80::1", Reach::Private),
            ("febf::1", Reach::Private),
            ("fec0::1", Reach::Private),
            ("::", Reach::Never),
            ("ff02::1", Reach::Never),
            ("ff0e::1", Reach::Never),
            ("2001:db8::1", Reach::Never),
            ("3fff::1", Reach::Never),
            ("100::1", Reach::Never),
            ("5f00::1", Reach::Never),
            ("2001:2::1", Reach::Never),
            ("64:ff9b:1::808:808", Reach::Never),
            ("fe00::1", Reach::Never),
            ("4000::1", Reach::Never),
            ("2001:4860:4860::8888", Reach::Public),
            ("2606:4700:4700::1111", Reach::Public),
            ("2a00::1", Reach::Public),
        ] {
            assert_eq!(v6(a), want, "{a}");
        }
    }

    /// The forms of the issue: 6to4 and SIIT were accepted.
    #[test]
    fn ipv4_embedded_in_ipv6_is_classified_as_ipv4_at_least() {
        for a in [
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::ffff:192.168.0.1",
            "::ffff:100.64.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo, client 127.0.0.1
            "2001:0:7f00:1::f7f7:f7f7",             // Teredo, server 127.0.0.1
        ] {
            assert_eq!(v6(a), Reach::Private, "{a}");
        }
        for a in [
            "::ffff:0:7f00:1",
            "::127.0.0.1",
            "::8.8.8.8",
            "::ffff:0.0.0.0",
            "::ffff:192.0.2.1",
            "2002:c612::1",
            "64:ff9b::e000:1",
        ] {
            assert_eq!(v6(a), Reach::Never, "{a}");
        }
        for a in [
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7", // Teredo, client 8.8.8.8
        ] {
            assert_eq!(v6(a), Reach::Public, "{a}");
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
        // allow_private: a host name is not resolved now (at delivery).
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
            "http://[2002:7f00:1::1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://localhost/",
        ] {
            assert_eq!(
                check_url(url, false).await.unwrap_err(),
                CallbackUrlError::Forbidden,
                "{url}"
            );
            assert!(check_url(url, true).await.is_ok(), "{url}");
        }
        // Never reachable, allow_private or not.
        for url in [
            "http://0.0.0.0/",
            "http://[::]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://192.0.2.1/",
            "http://198.18.0.1/",
            "http://[::ffff:0:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[ff02::1]/",
        ] {
            for allow_private in [false, true] {
                assert_eq!(
                    check_url(url, allow_private).await.unwrap_err(),
                    CallbackUrlError::Forbidden,
                    "{url} {allow_private}"
                );
            }
        }
        let target = Url::parse("http://[fe80::1]:9/").unwrap();
        assert_eq!(
            check_target(&target, false).unwrap_err(),
            CallbackUrlError::Forbidden
        );
        assert!(check_target(&target, true).is_ok());
        let target = Url::parse("http://[ff02::1]:9/").unwrap();
        assert!(check_target(&target, true).is_err());
        let public = Url::parse("https://93.184.215.14/hook").unwrap();
        assert!(check_target(&public, false).is_ok());
        assert!(check_url(public.as_str(), false).await.is_ok());
    }

    #[tokio::test]
    async fn the_resolver_refuses_hosts_with_a_forbidden_address() {
        let guarded = GuardedResolver {
            allow_private: false,
        };
        let err = guarded
            .resolve("localhost".parse().unwrap())
            .await
            .err()
            .expect("localhost is refused");
        assert!(ForbiddenAddress::is_in(err.as_ref()));
        let private = GuardedResolver {
            allow_private: true,
        };
        assert!(private.resolve("localhost".parse().unwrap()).await.is_ok());
    }
}

/// Properties: the classification agrees with a reference written from
/// IANA's registries, every IPv6 embedding of an IPv4 address is at least
/// as refused as the address itself, public addresses are accepted, and the
/// URL checks never panic and agree with each other.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// IPv4 special-purpose blocks (address, prefix length, reach), as
    /// documented on [`Reach`].
    const V4_REFERENCE: &[(u32, u32, Reach)] = &[
        (0x0000_0000, 8, Reach::Never),    // 0/8
        (0x0a00_0000, 8, Reach::Private),  // 10/8
        (0x6440_0000, 10, Reach::Private), // 100.64/10
        (0x7f00_0000, 8, Reach::Private),  // 127/8
        (0xa9fe_0000, 16, Reach::Private), // 169.254/16
        (0xac10_0000, 12, Reach::Private), // 172.16/12
        (0xc000_0000, 24, Reach::Never),   // 192.0.0/24
        (0xc000_0200, 24, Reach::Never),   // 192.0.2/24
        (0xc058_6300, 24, Reach::Never),   // 192.88.99/24
        (0xc0a8_0000, 16, Reach::Private), // 192.168/16
        (0xc612_0000, 15, Reach::Never),   // 198.18/15
        (0xc633_6400, 24, Reach::Never),   // 198.51.100/24
        (0xcb00_7100, 24, Reach::Never),   // 203.0.113/24
        (0xe000_0000, 4, Reach::Never),    // 224/4
        (0xf000_0000, 4, Reach::Never),    // 240/4
    ];

    fn in_v4(ip: u32, net: u32, len: u32) -> bool {
        ip >> (32 - len) == net >> (32 - len)
    }

    fn reference_v4(ip: u32) -> Reach {
        let mut r = Reach::Public;
        for (net, len, reach) in V4_REFERENCE {
            if in_v4(ip, *net, *len) {
                r = r.max(*reach);
            }
        }
        r
    }

    fn reference_v6(ip: u128) -> Reach {
        let at = |bits: u32| (ip >> (96 - bits)) as u32;
        if ip == 1 {
            Reach::Private
        } else if in_v6(ip, 0xffff << 32, 96) || in_v6(ip, 0x64_ff9b << 96, 96) {
            reference_v4(ip as u32)
        } else if in_v6(ip, 0xfc00 << 112, 7)
            || in_v6(ip, 0xfe80 << 112, 10)
            || in_v6(ip, 0xfec0 << 112, 10)
        {
            Reach::Private
        } else if !in_v6(ip, 0x2000 << 112, 3) {
            Reach::Never
        } else if in_v6(ip, 0x2001_0000 << 96, 32) {
            reference_v4(at(32)).max(reference_v4(!(ip as u32)))
        } else if in_v6(ip, 0x2002 << 112, 16) {
            reference_v4(at(16))
        } else if in_v6(ip, 0x2001 << 112, 23)
            || in_v6(ip, 0x2001_0db8 << 96, 32)
            || in_v6(ip, 0x3fff << 112, 20)
            || in_v6(ip, 0x5f00 << 112, 16)
        {
            Reach::Never
        } else {
            Reach::Public
        }
    }

    /// Any IPv4 address, biased towards the edges of the special blocks
    /// and their neighbours.
    fn v4() -> impl Strategy<Value = u32> {
        let edges: Vec<u32> = V4_REFERENCE
            .iter()
            .flat_map(|(net, len, _)| {
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

    /// An IPv4 address in one of the refused blocks.
    fn refused_v4() -> impl Strategy<Value = u32> {
        (prop::sample::select(V4_REFERENCE.to_vec()), any::<u32>()).prop_map(
            |((net, len, _), host)| {
                let host_mask = u32::MAX >> len;
                (net & !host_mask) | (host & host_mask)
            },
        )
    }

    /// Any IPv6 address, biased towards the special prefixes.
    fn v6() -> impl Strategy<Value = u128> {
        let prefixes: Vec<(u128, u32)> = vec![
            (0, 96),
            (0xffff << 32, 96),
            (0xffff << 48, 96),
            (0x64_ff9b << 96, 96),
            (0x64_ff9b << 96, 64),
            (0x64_ff9b_0001 << 80, 48),
            (0x0100 << 112, 64),
            (0xfc00 << 112, 7),
            (0xfe80 << 112, 10),
            (0xfec0 << 112, 10),
            (0xff00 << 112, 8),
            (0xfe00 << 112, 7),
            (0x2001_0db8 << 96, 32),
            (0x2001_0000 << 96, 32),
            (0x2001 << 112, 23),
            (0x2002 << 112, 16),
            (0x3fff << 112, 20),
            (0x5f00 << 112, 16),
            (0x2000 << 112, 3),
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

    /// Every IPv6 form that embeds `v4` (the rest of the address from
    /// `noise`): mapped, IPv4-compatible, SIIT, NAT64 (well-known and
    /// local-use), 6to4, Teredo server and Teredo client.
    fn embeddings(v4: u32, noise: u128, other_v4: u32) -> Vec<(&'static str, u128)> {
        let v4 = u128::from(v4);
        // `::` and `::1` are the unspecified and loopback addresses, not the
        // IPv4-compatible forms of 0.0.0.0 and 0.0.0.1 (RFC 4291 2.5.5.1
        // leaves them out): they have reaches of their own.
        let compatible = if v4 > 1 { v4 } else { 2 };
        vec![
            ("mapped", (0xffff << 32) | v4),
            ("compatible", compatible),
            ("SIIT", (0xffff << 48) | v4),
            ("NAT64", (0x64_ff9b << 96) | v4),
            (
                "local NAT64",
                (0x64_ff9b_0001 << 80) | (noise & (u128::MAX >> 48) & !0xffff_ffff) | v4,
            ),
            (
                "6to4",
                (0x2002 << 112) | (v4 << 80) | (noise & (u128::MAX >> 48)),
            ),
            (
                "Teredo server",
                (0x2001_0000 << 96)
                    | (v4 << 64)
                    | (noise & 0xffff_ffff_0000_0000)
                    | u128::from(!other_v4),
            ),
            (
                "Teredo client",
                (0x2001_0000 << 96)
                    | (u128::from(other_v4) << 64)
                    | (noise & 0xffff_ffff_0000_0000)
                    | u128::from(!(v4 as u32)),
            ),
        ]
    }

    /// A public IPv4 address.
    fn public_v4() -> impl Strategy<Value = u32> {
        any::<u32>().prop_filter("public", |ip| reference_v4(*ip) == Reach::Public)
    }

    /// A public IPv6 address (global unicast outside the special blocks).
    fn public_v6() -> impl Strategy<Value = u128> {
        (any::<u128>(), public_v4(), public_v4())
            .prop_map(|(host, a, b)| {
                let ip = (0x2000 << 112) | (host & (u128::MAX >> 3));
                // Embedded addresses made public, so that Teredo and 6to4
                // addresses are public ones too.
                if in_v6(ip, 0x2001_0000 << 96, 32) {
                    (ip & !(0xffff_ffff << 64) & !0xffff_ffff)
                        | (u128::from(a) << 64)
                        | u128::from(!b)
                } else if in_v6(ip, 0x2002 << 112, 16) {
                    (ip & !(0xffff_ffff << 80)) | (u128::from(a) << 80)
                } else {
                    ip
                }
            })
            .prop_filter("public", |ip| reference_v6(*ip) == Reach::Public)
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

    fn literal_url(ip: IpAddr, port: Option<u16>) -> String {
        let host = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        match port {
            Some(p) => format!("https://{host}:{p}/hook"),
            None => format!("http://{host}/hook"),
        }
    }

    proptest! {
        #[test]
        fn ipv4_classification_matches_the_reference(ip in v4()) {
            prop_assert_eq!(reach(Ipv4Addr::from(ip).into()), reference_v4(ip), "{}", Ipv4Addr::from(ip));
        }

        #[test]
        fn ipv6_classification_matches_the_reference(ip in v6()) {
            prop_assert_eq!(reach(Ipv6Addr::from(ip).into()), reference_v6(ip), "{}", Ipv6Addr::from(ip));
        }

        /// For any IPv4 address, every IPv6 form embedding it is at least
        /// as refused; so for a refused one, every embedding is refused.
        #[test]
        fn every_ipv6_embedding_of_an_ipv4_address_is_at_least_as_refused(
            ip in prop_oneof![v4(), refused_v4()],
            noise in any::<u128>(),
            other in v4(),
        ) {
            let own = reach(Ipv4Addr::from(ip).into());
            for (form, embedded) in embeddings(ip, noise, other) {
                let embedded = IpAddr::from(Ipv6Addr::from(embedded));
                prop_assert!(reach(embedded) >= own, "{} ({}) of {}: {:?} < {:?}", embedded, form, Ipv4Addr::from(ip), reach(embedded), own);
                if own != Reach::Public {
                    prop_assert!(is_forbidden(embedded, false), "{} ({}) accepted", embedded, form);
                }
                if own == Reach::Never {
                    prop_assert!(is_forbidden(embedded, true), "{} ({}) accepted with allow_private", embedded, form);
                }
            }
        }

        /// Public addresses are accepted, as literals in a callback URL too.
        #[test]
        fn public_addresses_are_accepted(
            ip in prop_oneof![
                public_v4().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))),
                public_v6().prop_map(|a| IpAddr::from(Ipv6Addr::from(a))),
            ],
            port in prop::option::of(any::<u16>()),
        ) {
            prop_assert_eq!(reach(ip), Reach::Public, "{}", ip);
            let url = literal_url(ip, port);
            prop_assert!(block_on(check_url(&url, false)).is_ok(), "{} refused", url);
        }

        /// A URL accepted when the call is made is also accepted when its
        /// callback is delivered, and is within the length bound as stored.
        #[test]
        fn an_accepted_url_passes_the_delivery_check(url in url_like()) {
            // allow_private: host names are not resolved here.
            if let Ok(parsed) = block_on(check_url(&url, true)) {
                prop_assert!(parsed.as_str().len() <= MAX_URL_LEN, "{} bytes as stored", parsed.as_str().len());
                prop_assert_eq!(check_target(&parsed, true), Ok(()));
                prop_assert!(matches!(parsed.scheme(), "http" | "https"));
            }
        }

        /// An IP literal is refused exactly when its address is forbidden,
        /// at acceptance and at delivery alike, with `allow_private` or not.
        #[test]
        fn ip_literals_are_refused_exactly_when_forbidden(
            ip in prop_oneof![
                v4().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))),
                v6().prop_map(|a| IpAddr::from(Ipv6Addr::from(a))),
            ],
            port in prop::option::of(any::<u16>()),
            allow_private in any::<bool>(),
        ) {
            let url = literal_url(ip, port);
            let accepted = block_on(check_url(&url, allow_private));
            if is_forbidden(ip, allow_private) {
                prop_assert_eq!(accepted, Err(CallbackUrlError::Forbidden));
            } else {
                let parsed = accepted.map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
                prop_assert_eq!(check_target(&parsed, allow_private), Ok(()));
            }
            if reach(ip) == Reach::Private {
                prop_assert_eq!(is_forbidden(ip, allow_private), !allow_private);
            }
        }
    }
}
