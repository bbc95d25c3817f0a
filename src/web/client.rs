//! Who is asking, for the owner's page: the client's address (from a trusted proxy's forwarding
//! headers, else the peer), whether a request comes from a browser on this machine, whether
//! its `Host` is a name the page answers to (against DNS rebinding), and whether the listener
//! is reachable from other machines at all.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;

/// An address range: `192.0.2.0/24`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| {
            format!("{text:?} is not an IP address or a range like 10.0.0.0/8 or fd00::/8")
        })?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => match prefix.parse::<u8>() {
                Ok(prefix) if prefix <= bits => prefix,
                _ => {
                    return Err(format!(
                        "{text:?}: the prefix length must be a number from 0 to {bits}"
                    ));
                }
            },
        };
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => same_prefix(
                network.to_bits().into(),
                ip.to_bits().into(),
                self.prefix,
                32,
            ),
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                same_prefix(network.to_bits(), ip.to_bits(), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn same_prefix(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    let host_bits = bits - u32::from(prefix);
    host_bits >= bits || (a >> host_bits) == (b >> host_bits)
}

/// `web.trusted_proxies`: the peers whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// The configured ranges (validated with the config; a bad entry is skipped).
    pub fn new(entries: &[String]) -> TrustedProxies {
        TrustedProxies(entries.iter().filter_map(|e| Cidr::parse(e).ok()).collect())
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|range| range.contains(ip))
    }
}

const FORWARDING_HEADERS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

fn proxied(headers: &HeaderMap) -> bool {
    FORWARDING_HEADERS
        .iter()
        .any(|name| headers.contains_key(*name))
}

/// Whether the request comes from a browser on this machine: a loopback peer that is not a
/// trusted proxy and sent no forwarding header.
pub fn is_local(peer: Option<SocketAddr>, headers: &HeaderMap, proxies: &TrustedProxies) -> bool {
    peer.map(|p| p.ip().to_canonical())
        .is_some_and(|ip| ip.is_loopback() && !proxies.trusts(ip))
        && !proxied(headers)
}

/// The address failed logins are counted for: the peer, or, when the peer is a trusted proxy,
/// the nearest address in `X-Forwarded-For` (else `Forwarded: for=`) that is not a trusted
/// proxy itself. Entries further left were written by the client and are not believed.
pub fn client_ip(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    proxies: &TrustedProxies,
) -> IpAddr {
    let peer_ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip().to_canonical());
    if !proxies.trusts(peer_ip) {
        return peer_ip;
    }
    let chain = forwarded_chain(headers);
    let mut nearest = peer_ip;
    for entry in chain.iter().rev() {
        let Some(ip) = parse_node(entry) else {
            return nearest;
        };
        if !proxies.trusts(ip) {
            return ip;
        }
        nearest = ip;
    }
    nearest
}

/// The hops a request passed, client first: every `X-Forwarded-For` entry, or, without one,
/// the `for=` of every `Forwarded` element.
fn forwarded_chain(headers: &HeaderMap) -> Vec<String> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .flat_map(|v| {
                v.split(',')
                    .map(|e| e.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let forwarded_for = values("x-forwarded-for");
    if !forwarded_for.is_empty() {
        return forwarded_for;
    }
    values("forwarded")
        .iter()
        .map(|element| {
            element
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .find(|(key, _)| key.trim().eq_ignore_ascii_case("for"))
                .map(|(_, value)| value.trim().trim_matches('"').to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`.
fn parse_node(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(address.ip().to_canonical());
    }
    let inner = text.strip_prefix('[')?.split(']').next()?;
    inner.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// The names the owner's page answers to. A browser tricked by DNS rebinding sends the
/// attacker's name in `Host`; it cannot send another. IP addresses and `localhost` are always
/// accepted (a rebinding page has neither as its name).
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: Vec<String>,
}

impl AllowedHosts {
    /// The host of `http.listen` and of `links.base_url`, and `web.allowed_hosts`.
    pub fn new(listen: &str, base_url: Option<&str>, extra: &[String]) -> AllowedHosts {
        let base_host = base_url.and_then(url_host);
        let names = std::iter::once(host_of(listen))
            .chain(std::iter::once(base_host))
            .chain(extra.iter().map(|name| host_of(name)))
            .flatten()
            .collect();
        AllowedHosts { names }
    }

    /// Whether a request with this `Host` may see the page.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host.and_then(host_of) else {
            return false;
        };
        is_ip_literal(&host) || is_localhost(&host) || self.names.contains(&host)
    }
}

/// The host of an authority (`Example.COM:8025`, `[::1]:80`), lower-case, without the port
/// and a trailing dot; `None` when empty.
pub fn host_of(authority: &str) -> Option<String> {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

/// The host of `scheme://host[:port]/path`.
fn url_host(url: &str) -> Option<String> {
    let rest = url.trim().split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    host_of(authority)
}

fn is_ip_literal(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
}

fn is_localhost(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

fn is_loopback_host(host: &str) -> bool {
    is_localhost(host)
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Why visitors from other machines can reach the listener, if they can: it listens on a
/// non-loopback address, or `links.base_url` names a host others reach (through a proxy that
/// may add no forwarding header, so that they would look local).
pub fn exposure(listening: SocketAddr, base_url: Option<&str>) -> Option<String> {
    if !listening.ip().to_canonical().is_loopback() {
        return Some(format!(
            "the HTTP listener is on {listening}, which other machines can reach"
        ));
    }
    let host = base_url.and_then(url_host)?;
    (!is_loopback_host(&host)).then(|| {
        format!(
            "links.base_url names {host}, so visitors from elsewhere reach this listener through a \
             proxy, and may look local to it"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_contain() {
        let range = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(range.contains(ip("10.1.200.3")));
        assert!(!range.contains(ip("10.2.0.1")));
        assert!(range.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("203.0.113.1"))
        );
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains(ip("10.0.0.1")));
        for bad in ["", "10.0.0.0/33", "fd00::/129", "proxy.lan", "10.0.0.0/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let none = TrustedProxies::default();
        let loopback = TrustedProxies::new(&["127.0.0.1".into(), "10.0.0.0/8".into()]);
        let spoofed = headers(&[("x-forwarded-for", "203.0.113.9")]);
        // Nobody trusted: the peer, whatever the headers say.
        assert_eq!(client_ip(Some(local), &spoofed, &none), local.ip());
        assert_eq!(client_ip(Some(remote), &spoofed, &loopback), remote.ip());
        // A trusted proxy: the nearest untrusted hop; what the client wrote further left is
        // not believed.
        assert_eq!(
            client_ip(Some(local), &spoofed, &loopback),
            ip("203.0.113.9")
        );
        let chain = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.5")]);
        assert_eq!(client_ip(Some(local), &chain, &loopback), ip("203.0.113.9"));
        let split = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "198.51.100.4:6000"),
        ]);
        assert_eq!(
            client_ip(Some(local), &split, &loopback),
            ip("198.51.100.4")
        );
        let forwarded = headers(&[(
            "forwarded",
            "for=1.1.1.1, for=\"[2001:db8::17]:4711\";proto=https",
        )]);
        assert_eq!(
            client_ip(Some(local), &forwarded, &loopback),
            ip("2001:db8::17")
        );
        // No header from a trusted proxy: the proxy itself.
        assert_eq!(
            client_ip(Some(local), &HeaderMap::new(), &loopback),
            local.ip()
        );
    }

    #[test]
    fn only_unproxied_loopback_peers_that_are_not_proxies_are_local() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let none = HeaderMap::new();
        let nobody = TrustedProxies::default();
        assert!(is_local(Some(local), &none, &nobody));
        assert!(is_local(Some(mapped), &none, &nobody));
        assert!(is_local(Some("[::1]:1".parse().unwrap()), &none, &nobody));
        assert!(!is_local(Some(remote), &none, &nobody));
        assert!(!is_local(None, &none, &nobody));
        for name in FORWARDING_HEADERS {
            let mut forwarded = HeaderMap::new();
            forwarded.insert(name, HeaderValue::from_static("203.0.113.9"));
            assert!(!is_local(Some(local), &forwarded, &nobody), "{name}");
        }
        // A proxy on this machine that adds no header is still not "local".
        let proxy = TrustedProxies::new(&["127.0.0.1".into()]);
        assert!(!is_local(Some(local), &none, &proxy));
    }

    #[test]
    fn the_page_answers_only_to_its_own_names() {
        let hosts = AllowedHosts::new(
            "touchpoint.lan:8025",
            Some("https://Mail.Acme.example/touchpoint"),
            &["office-pc".into()],
        );
        for good in [
            "localhost",
            "localhost:8025",
            "app.localhost",
            "127.0.0.1:8025",
            "[::1]:8025",
            "192.168.1.5:8025",
            "mail.acme.example",
            "MAIL.ACME.EXAMPLE.:443",
            "touchpoint.lan:8025",
            "office-pc",
        ] {
            assert!(hosts.allows(Some(good)), "{good}");
        }
        for bad in [
            "evil.example",
            "evil.example:8025",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "acme.example",
            "",
        ] {
            assert!(!hosts.allows(Some(bad)), "{bad}");
        }
        assert!(!hosts.allows(None));
    }

    #[test]
    fn a_listener_others_can_reach_is_exposed() {
        let loopback: SocketAddr = "127.0.0.1:8025".parse().unwrap();
        assert_eq!(exposure(loopback, None), None);
        assert_eq!(exposure(loopback, Some("http://localhost:8025")), None);
        assert_eq!(exposure(loopback, Some("http://127.0.0.1:8025/")), None);
        assert!(exposure("0.0.0.0:8025".parse().unwrap(), None).is_some());
        assert!(exposure("192.168.1.5:8025".parse().unwrap(), None).is_some());
        let behind_proxy = exposure(loopback, Some("https://mail.acme.example")).unwrap();
        assert!(behind_proxy.contains("mail.acme.example"), "{behind_proxy}");
    }
}
