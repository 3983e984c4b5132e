//! The PROXY protocol header (v1 text, v2 binary) that tells a backend the client's real
//! address. spliced writes it to the backend socket before the pair is spliced, so the
//! backend reads it first and exactly once. Spec: haproxy's `doc/proxy-protocol.txt`.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtoVersion;

/// The 12 bytes every v2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// The header for a TCP connection from `client` to `local` (the address it connected to).
pub fn header(version: ProxyProtoVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(client, local);
    match version {
        ProxyProtoVersion::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyProtoVersion::V2 => {
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(V2_PROXY);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(V2_TCP4);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.push(V2_TCP6);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

/// Both addresses in one family: IPv4-mapped IPv6 addresses become IPv4 when both are; a
/// mixed pair is written as IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    let (a, b) = (canon(a), canon(b));
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        let up = |s: SocketAddr| SocketAddr::new(IpAddr::V6(v6(s.ip())), s.port());
        (up(a), up(b))
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    #[test]
    fn v1_ipv4_and_ipv6() {
        let h = header(
            ProxyProtoVersion::V1,
            addr("198.18.0.1:40000"),
            addr("198.18.0.2:443"),
        );
        assert_eq!(h, b"PROXY TCP4 198.18.0.1 198.18.0.2 40000 443\r\n");
        let h = header(
            ProxyProtoVersion::V1,
            addr("[fd00:5::1]:40000"),
            addr("[fd00:5::2]:443"),
        );
        assert_eq!(h, b"PROXY TCP6 fd00:5::1 fd00:5::2 40000 443\r\n");
    }

    #[test]
    fn v1_mapped_addresses_become_ipv4() {
        let h = header(
            ProxyProtoVersion::V1,
            addr("[::ffff:10.0.0.1]:1"),
            addr("[::ffff:10.0.0.2]:2"),
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n");
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = header(
            ProxyProtoVersion::V2,
            addr("10.0.0.1:258"),
            addr("10.0.0.2:80"),
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2, 1, 2, 0, 80]);
        assert_eq!(h, want);
    }

    #[test]
    fn v2_ipv6_length() {
        let h = header(
            ProxyProtoVersion::V2,
            addr("[fd00::1]:1"),
            addr("[fd00::2]:2"),
        );
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
    }
}
