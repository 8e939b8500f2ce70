//! The index space of a scan: every (address, port) pair gets an index, and
//! the keyed [`Permutation`] orders them. Controller and agent build it from
//! the same normalised inputs, so a position means the same probe on both.

use std::net::IpAddr;

use crate::{SpecError, addrs::AddressSet, permutation::Permutation, ports::PortSet};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanSpace {
    addrs: AddressSet,
    ports: PortSet,
    addr_count: u64,
    perm: Permutation,
    /// Addresses probed only on some ports (CDN edges under the web-ports
    /// policy): their other positions stay in the space, so both sides
    /// keep one permutation, but are never probed nor covered.
    limited: Option<Limited>,
}

/// Addresses (a subset of the space's) probed only on `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    pub addrs: AddressSet,
    pub ports: PortSet,
}

impl ScanSpace {
    /// Fails when the space is empty or has more than `max_probes` pairs.
    pub fn new(addrs: AddressSet, ports: PortSet, seed: u64, max_probes: u64) -> Result<Self, SpecError> {
        if addrs.is_empty() {
            return Err(SpecError::Empty("no addresses to scan".into()));
        }
        let probes = addrs.len().saturating_mul(u128::from(ports.len()));
        let max = max_probes.min(Permutation::MAX_LEN);
        if probes > u128::from(max) {
            return Err(SpecError::TooLarge { probes, max });
        }
        // Both fit: probes <= max <= 2^62.
        let addr_count = addrs.len() as u64;
        let perm = Permutation::new(probes as u64, seed);
        Ok(Self { addrs, ports, addr_count, perm, limited: None })
    }

    /// Probes `limited.addrs` only on `limited.ports`; addresses outside
    /// the space are ignored.
    pub fn with_limited(mut self, limited: Limited) -> Self {
        let addrs = limited.addrs.subtract(&limited.addrs.subtract(&self.addrs));
        self.limited = (!addrs.is_empty()).then_some(Limited { addrs, ports: limited.ports });
        self
    }

    pub fn limited(&self) -> Option<&Limited> {
        self.limited.as_ref()
    }

    /// Whether the pair is probed: false for a limited address on another
    /// port (its position counts as done without a probe).
    pub fn is_probed(&self, ip: IpAddr, port: u16) -> bool {
        self.limited.as_ref().is_none_or(|l| l.ports.contains(port) || !l.addrs.contains(ip))
    }

    /// Probes actually sent once each: [`ScanSpace::len`] less the limited
    /// addresses' other ports.
    pub fn probe_count(&self) -> u64 {
        let Some(l) = &self.limited else { return self.len() };
        let kept = self.ports.iter().filter(|p| l.ports.contains(*p)).count() as u128;
        let dropped = l.addrs.len() * (u128::from(self.ports.len()) - kept);
        // dropped <= len, which fits u64.
        self.len() - dropped as u64
    }

    /// Number of probes (addresses x ports).
    pub fn len(&self) -> u64 {
        self.perm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.perm.is_empty()
    }

    pub fn addresses(&self) -> &AddressSet {
        &self.addrs
    }

    pub fn ports(&self) -> &PortSet {
        &self.ports
    }

    /// The probe at permuted position `pos` (`pos < len`).
    pub fn probe_at(&self, pos: u64) -> (IpAddr, u16) {
        let i = self.perm.apply(pos);
        let (a, p) = (i % self.addr_count, i / self.addr_count);
        // Both indexes are in range by construction of the space.
        let ip = self.addrs.nth(u128::from(a)).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let port = self.ports.nth(p as u32).unwrap_or(0);
        (ip, port)
    }

    /// The position of a probe, if it is in the space and probed.
    pub fn position_of(&self, ip: IpAddr, port: u16) -> Option<u64> {
        if !self.is_probed(ip, port) {
            return None;
        }
        let a = self.addrs.index_of(ip)? as u64;
        let p = u64::from(self.ports.index_of(port)?);
        Some(self.perm.invert(p * self.addr_count + a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limited addresses keep their positions (one permutation on both
    /// sides) but only their limited ports are probed or found.
    #[test]
    fn limited_addresses_are_probed_on_their_ports_only() {
        let addrs = AddressSet::parse_ranges(&["192.0.2.0-192.0.2.3"]).unwrap();
        let ports = PortSet::parse("22,80,443").unwrap();
        let plain = ScanSpace::new(addrs.clone(), ports.clone(), 7, u64::MAX).unwrap();
        let edge = AddressSet::parse_ranges(&["192.0.2.2", "198.51.100.1"]).unwrap();
        let web = PortSet::parse("80,443").unwrap();
        let space = plain.clone().with_limited(Limited { addrs: edge, ports: web });
        assert_eq!(space.len(), 12);
        assert_eq!(space.probe_count(), 11);
        // Only the address inside the space is kept.
        assert_eq!(space.limited().unwrap().addrs.to_strings(), vec!["192.0.2.2"]);
        let probed: Vec<(IpAddr, u16)> =
            (0..space.len()).map(|p| space.probe_at(p)).filter(|(ip, port)| space.is_probed(*ip, *port)).collect();
        assert_eq!(probed.len(), 11);
        let ip: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!space.is_probed(ip, 22));
        assert_eq!(space.position_of(ip, 22), None);
        assert_eq!(space.position_of(ip, 80), plain.position_of(ip, 80));
        for p in 0..space.len() {
            assert_eq!(space.probe_at(p), plain.probe_at(p), "positions moved");
        }
    }
}
