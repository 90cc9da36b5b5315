//! Address arithmetic for subnets (IPv4 now; the types name the version so
//! that IPv6 can join): CIDRs, gateways, allocation pools, MAC addresses, and
//! the subnet checks of the issue (malformed CIDR, gateway outside, pools
//! outside or overlapping). Pure functions, unit-tested here.

use std::fmt;
use std::net::Ipv4Addr;

use runtime::error::Error;
use runtime::types::short;

/// An IPv4 network: the address is the network address (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr4 {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr4 {
    /// Parses `a.b.c.d/n`; host bits must be zero (`10.0.0.1/24` is refused).
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Error> {
        let bad = || Error::invalid(field, format!("is not an IPv4 CIDR: {:?}", short(s)));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 || p.starts_with('+') {
            return Err(bad());
        }
        if !(8..=30).contains(&prefix) {
            return Err(Error::invalid(
                field,
                "prefix length must be between 8 and 30",
            ));
        }
        let c = Cidr4 {
            network: addr,
            prefix,
        };
        if u32::from(addr) & !c.mask() != 0 {
            return Err(Error::invalid(
                field,
                format!("{s} has host bits set (did you mean {}?)", c.normalised()),
            ));
        }
        Ok(c)
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    fn normalised(&self) -> Cidr4 {
        Cidr4 {
            network: Ipv4Addr::from(u32::from(self.network) & self.mask()),
            prefix: self.prefix,
        }
    }

    pub fn first(&self) -> u32 {
        u32::from(self.network)
    }

    pub fn last(&self) -> u32 {
        self.first() | !self.mask()
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.first()
    }

    /// Usable host addresses: not the network or broadcast address.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && u32::from(ip) != self.first() && u32::from(ip) != self.last()
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }
}

impl fmt::Display for Cidr4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// An inclusive range of addresses the IPAM may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pool {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl Pool {
    pub fn size(&self) -> u64 {
        u64::from(u32::from(self.end)) - u64::from(u32::from(self.start)) + 1
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(ip))
    }

    /// The `n`th address of the pool (n < size).
    pub fn nth(&self, n: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.start).wrapping_add(n as u32))
    }
}

pub fn parse_ip(field: &'static str, s: &str) -> Result<Ipv4Addr, Error> {
    s.parse()
        .map_err(|_| Error::invalid(field, format!("is not an IPv4 address: {:?}", short(s))))
}

/// The gateway: absent means the first host address, empty means none; a
/// given one must be a host address of the CIDR.
pub fn gateway(cidr: &Cidr4, given: Option<&str>) -> Result<Option<Ipv4Addr>, Error> {
    match given {
        None => Ok(Some(Ipv4Addr::from(cidr.first() + 1))),
        Some("") => Ok(None),
        Some(s) => {
            let ip = parse_ip("gateway_ip", s)?;
            if !cidr.is_host(ip) {
                return Err(Error::invalid(
                    "gateway_ip",
                    format!("{ip} is not a host address of {cidr}"),
                ));
            }
            Ok(Some(ip))
        }
    }
}

/// Allocation pools: given ones are checked (inside the CIDR's host
/// addresses, start ≤ end, not overlapping each other, not holding the
/// gateway); none given means every host address but the gateway.
pub fn pools(
    cidr: &Cidr4,
    gateway: Option<Ipv4Addr>,
    given: &[(String, String)],
) -> Result<Vec<Pool>, Error> {
    let first = cidr.first() + 1;
    let last = cidr.last() - 1;
    if given.is_empty() {
        let mut out = Vec::new();
        match gateway.map(u32::from) {
            Some(g) if (first..=last).contains(&g) => {
                if g > first {
                    out.push((first, g - 1));
                }
                if g < last {
                    out.push((g + 1, last));
                }
            }
            _ => out.push((first, last)),
        }
        return Ok(out
            .into_iter()
            .map(|(s, e)| Pool {
                start: Ipv4Addr::from(s),
                end: Ipv4Addr::from(e),
            })
            .collect());
    }
    let mut out: Vec<Pool> = Vec::with_capacity(given.len());
    for (s, e) in given {
        let start = parse_ip("allocation_pools", s)?;
        let end = parse_ip("allocation_pools", e)?;
        if u32::from(start) > u32::from(end) {
            return Err(Error::invalid(
                "allocation_pools",
                format!("{start}-{end} ends before it starts"),
            ));
        }
        if !cidr.is_host(start) || !cidr.is_host(end) {
            return Err(Error::invalid(
                "allocation_pools",
                format!("{start}-{end} is not inside the host addresses of {cidr}"),
            ));
        }
        let pool = Pool { start, end };
        if let Some(g) = gateway.filter(|g| pool.contains(*g)) {
            return Err(Error::invalid(
                "allocation_pools",
                format!("{start}-{end} holds the gateway {g}"),
            ));
        }
        if let Some(o) = out
            .iter()
            .find(|o| u32::from(o.start) <= u32::from(end) && u32::from(start) <= u32::from(o.end))
        {
            return Err(Error::invalid(
                "allocation_pools",
                format!("{start}-{end} overlaps {}-{}", o.start, o.end),
            ));
        }
        out.push(pool);
    }
    Ok(out)
}

/// A MAC address in lower-case colon form; unicast only.
pub fn parse_mac(field: &'static str, s: &str) -> Result<String, Error> {
    let bad = || Error::invalid(field, format!("is not a MAC address: {:?}", short(s)));
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(bad());
    }
    let first = u8::from_str_radix(parts[0], 16).map_err(|_| bad())?;
    if first & 1 == 1 {
        return Err(Error::invalid(field, "must be a unicast MAC address"));
    }
    if s.eq_ignore_ascii_case("00:00:00:00:00:00") {
        return Err(bad());
    }
    Ok(s.to_ascii_lowercase())
}

/// A random MAC with OpenStack's prefix `fa:16:3e`.
pub fn random_mac() -> String {
    let b = uuid::Uuid::new_v4();
    let b = b.as_bytes();
    format!("fa:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// A random number below `n` (n > 0), from a v4 UUID's random bits.
pub fn random_below(n: u64) -> u64 {
    let b = uuid::Uuid::new_v4().as_u128();
    (b as u64) % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Result<impl fmt::Debug, Error>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn cidrs() {
        let c = Cidr4::parse("cidr", "10.0.0.0/24").ok();
        assert_eq!(c.map(|c| c.to_string()).as_deref(), Some("10.0.0.0/24"));
        assert_eq!(
            msg(Cidr4::parse("cidr", "10.0.0.1/24")),
            "cidr: 10.0.0.1/24 has host bits set (did you mean 10.0.0.0/24?)"
        );
        assert_eq!(
            msg(Cidr4::parse("cidr", "10.0.0.0/33")),
            "cidr: is not an IPv4 CIDR: \"10.0.0.0/33\""
        );
        assert_eq!(
            msg(Cidr4::parse("cidr", "banana")),
            "cidr: is not an IPv4 CIDR: \"banana\""
        );
        assert_eq!(
            msg(Cidr4::parse("cidr", "10.0.0.0/31")),
            "cidr: prefix length must be between 8 and 30"
        );
    }

    #[test]
    fn gateways_and_pools() {
        let c = Cidr4::parse("cidr", "10.0.0.0/24").unwrap_or_else(|e| panic!("{e}"));
        let g = gateway(&c, None).ok().flatten();
        assert_eq!(g, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            msg(gateway(&c, Some("10.0.1.1"))),
            "gateway_ip: 10.0.1.1 is not a host address of 10.0.0.0/24"
        );
        let p = pools(&c, g, &[]).unwrap_or_default();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].start, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(p[0].size(), 253);
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            msg(pools(&c, g, &[s("10.0.0.10", "10.0.1.5")])),
            "allocation_pools: 10.0.0.10-10.0.1.5 is not inside the host addresses of 10.0.0.0/24"
        );
        assert_eq!(
            msg(pools(
                &c,
                g,
                &[s("10.0.0.10", "10.0.0.20"), s("10.0.0.20", "10.0.0.30")]
            )),
            "allocation_pools: 10.0.0.20-10.0.0.30 overlaps 10.0.0.10-10.0.0.20"
        );
        assert_eq!(
            msg(pools(&c, g, &[s("10.0.0.1", "10.0.0.5")])),
            "allocation_pools: 10.0.0.1-10.0.0.5 holds the gateway 10.0.0.1"
        );
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("mac_address", "FA:16:3E:00:00:01")
                .ok()
                .as_deref(),
            Some("fa:16:3e:00:00:01")
        );
        assert_eq!(
            msg(parse_mac("mac_address", "01:00:5e:00:00:01")),
            "mac_address: must be a unicast MAC address"
        );
        assert!(parse_mac("mac_address", "fa:16:3e:00:00").is_err());
        assert!(parse_mac("m", &random_mac()).is_ok());
    }
}
