//! Stateless reply validation: each probe's sequence number is a keyed
//! SipHash of its 4-tuple, so a reply is ours exactly when its ack is that
//! hash plus one - no table of sent probes, O(1) memory however many
//! targets.

use std::{hash::Hasher, net::IpAddr};

use siphasher::sip::SipHasher13;

#[derive(Clone, Copy, Debug)]
pub struct CookieKey {
    k0: u64,
    k1: u64,
}

impl CookieKey {
    pub fn random() -> Self {
        Self { k0: rand::random(), k1: rand::random() }
    }

    #[cfg(test)]
    pub fn fixed(k0: u64, k1: u64) -> Self {
        Self { k0, k1 }
    }

    /// The sequence number of a probe from `src:src_port` to `dst:dst_port`.
    pub fn seq(&self, src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16) -> u32 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                h.write(&s.octets());
                h.write(&d.octets());
            }
            (s, d) => {
                h.write(&to_v6(s));
                h.write(&to_v6(d));
            }
        }
        h.write_u16(src_port);
        h.write_u16(dst_port);
        h.finish() as u32
    }

    /// Whether `reply` (from `remote:remote_port` to `local:local_port`)
    /// answers one of our probes: its ack must be our sequence plus one.
    pub fn validates(&self, local: IpAddr, remote: IpAddr, local_port: u16, remote_port: u16, ack: u32) -> bool {
        ack == self.seq(local, remote, local_port, remote_port).wrapping_add(1)
    }
}

fn to_v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_real_replies_and_rejects_forged_ones() {
        let key = CookieKey::fixed(1, 2);
        let (us, them): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let seq = key.seq(us, them, 40000, 443);
        assert!(key.validates(us, them, 40000, 443, seq.wrapping_add(1)));
        // Off by anything, from another address or port, or under another key: refused.
        assert!(!key.validates(us, them, 40000, 443, seq));
        assert!(!key.validates(us, them, 40000, 443, seq.wrapping_add(2)));
        assert!(!key.validates(us, "10.0.0.3".parse().unwrap(), 40000, 443, seq.wrapping_add(1)));
        assert!(!key.validates(us, them, 40000, 444, seq.wrapping_add(1)));
        assert!(!key.validates(us, them, 40001, 443, seq.wrapping_add(1)));
        assert!(!CookieKey::fixed(1, 3).validates(us, them, 40000, 443, seq.wrapping_add(1)));
        let v6: IpAddr = "2001:db8::2".parse().unwrap();
        let us6: IpAddr = "2001:db8::1".parse().unwrap();
        let seq6 = key.seq(us6, v6, 40000, 22);
        assert!(key.validates(us6, v6, 40000, 22, seq6.wrapping_add(1)));
    }

    #[test]
    fn a_blind_forger_almost_never_passes() {
        let key = CookieKey::random();
        let (us, them): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let passed = (0..100_000u32)
            .filter(|&guess| key.validates(us, them, 40000, 80, guess.wrapping_mul(2_654_435_761)))
            .count();
        assert!(passed <= 1, "{passed} random acks passed");
    }
}
