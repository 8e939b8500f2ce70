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
        Ok(Self { addrs, ports, addr_count, perm })
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

    /// The position of a probe, if it is in the space.
    pub fn position_of(&self, ip: IpAddr, port: u16) -> Option<u64> {
        let a = self.addrs.index_of(ip)? as u64;
        let p = u64::from(self.ports.index_of(port)?);
        Some(self.perm.invert(p * self.addr_count + a))
    }
}
