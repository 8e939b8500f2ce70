//! Fleet-wide politeness: caps on the probes per second that one target
//! address, and one /24 (IPv6: /64), receive from all running scans
//! together, whichever agents and controllers run them.
//!
//! A scan's probes are spread evenly over its addresses (the permutation
//! visits (address, port) pairs uniformly), so a scan of rate `r` over `n`
//! addresses sends `r / n` probes/s to each of them and `r * k / n` to a
//! block holding `k` of them. Retries share the rate but go only to
//! addresses that did not answer, so a silent address may get up to
//! `1 + retries` times its share: the load is counted that way (and never
//! above the scan's whole rate). The load on an address or block is the
//! sum over the scans that touch it. Each scan's rate is scaled down by the
//! tightest ratio of cap to load over everything it touches: then no
//! address or block is over its cap, because every scan adding to it was
//! scaled by at least that block's own ratio.
//!
//! Every controller computes the same rates from the same database rows,
//! so the fleet agrees without talking.

use std::net::IpAddr;

use portfleet_core::AddressSet;

/// Probes per second; 0 means no cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateCaps {
    pub per_host: u32,
    pub per_block: u32,
}

impl RateCaps {
    pub fn is_off(&self) -> bool {
        self.per_host == 0 && self.per_block == 0
    }
}

/// A running scan: its configured rate over its addresses.
#[derive(Clone, Copy, Debug)]
pub struct ScanLoad<'a> {
    pub rate: u32,
    /// Resends of an unanswered probe: they share the rate but land only on
    /// silent addresses, which can so get up to `1 + retries` times their
    /// share.
    pub retries: u32,
    pub addrs: &'a AddressSet,
}

/// IPv4 /24 and IPv6 /64: the blocks one operator's network usually is.
const V4_BLOCK_BITS: u32 = 8;
const V6_BLOCK_BITS: u32 = 64;

/// IPv4 addresses are keyed as IPv4-mapped IPv6 ones (`::ffff:a.b.c.d`):
/// the same host either way, in the same /24.
const MAPPED_LO: u128 = 0xffff_0000_0000;
const MAPPED_HI: u128 = 0xffff_ffff_ffff;

/// Each scan's rate under `caps` (at least 1 probe/s), in input order.
pub fn capped_rates(caps: RateCaps, scans: &[ScanLoad<'_>]) -> Vec<u32> {
    let mut factor = vec![1.0f64; scans.len()];
    if caps.per_host > 0 {
        let peaks = peak_loads(scans.iter().enumerate().flat_map(|(i, s)| host_segments(i, s)).collect(), scans.len());
        tighten(&mut factor, &peaks, caps.per_host);
    }
    if caps.per_block > 0 {
        let peaks = peak_loads(scans.iter().enumerate().flat_map(|(i, s)| block_segments(i, s)).collect(), scans.len());
        tighten(&mut factor, &peaks, caps.per_block);
    }
    scans.iter().zip(factor).map(|(s, f)| ((f64::from(s.rate) * f).floor() as u32).clamp(1, s.rate.max(1))).collect()
}

fn tighten(factor: &mut [f64], peaks: &[f64], cap: u32) {
    for (f, &peak) in factor.iter_mut().zip(peaks) {
        if peak > f64::from(cap) {
            *f = f.min(f64::from(cap) / peak);
        }
    }
}

/// An inclusive key interval of one scan, loaded with `weight` probes/s at
/// every key in it.
#[derive(Clone, Copy, Debug)]
struct Segment {
    lo: u128,
    hi: u128,
    scan: usize,
    weight: f64,
}

fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => MAPPED_LO | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The most a scan puts on each of its addresses: its share, times the
/// resends a silent address gets, never more than the whole rate.
fn per_address(s: &ScanLoad<'_>) -> f64 {
    f64::from(s.rate) * f64::from(s.retries.saturating_add(1)) / (s.addrs.len().max(1) as f64)
}

/// A scan's ranges as key intervals, cut where the IPv4-mapped block
/// begins and ends so each piece has one kind of block.
fn key_pieces<'a>(s: &'a ScanLoad<'a>) -> impl Iterator<Item = (u128, u128)> + 'a {
    s.addrs.ranges().iter().flat_map(|r| {
        let (lo, hi) = (key(r.first()), key(r.last()));
        [(lo, hi.min(MAPPED_LO - 1)), (lo.max(MAPPED_LO), hi.min(MAPPED_HI)), (lo.max(MAPPED_HI + 1), hi)]
            .into_iter()
            .filter(|(l, h)| l <= h)
    })
}

fn host_segments<'a>(scan: usize, s: &'a ScanLoad<'a>) -> impl Iterator<Item = Segment> + 'a {
    let weight = per_address(s).min(f64::from(s.rate));
    key_pieces(s).map(move |(lo, hi)| Segment { lo, hi, scan, weight })
}

/// The block of a key, and the block's size in bits: IPv6 /64s are keyed
/// 0..2^64, IPv4 /24s above them.
fn block_of(key: u128) -> (u128, u32) {
    if (MAPPED_LO..=MAPPED_HI).contains(&key) {
        ((1u128 << 64) | ((key & 0xffff_ffff) >> V4_BLOCK_BITS), V4_BLOCK_BITS)
    } else {
        (key >> V6_BLOCK_BITS, V6_BLOCK_BITS)
    }
}

/// A scan's blocks, each loaded with what the addresses it holds there
/// receive (at most the scan's whole rate). Partial first and last blocks
/// count their own addresses; two pieces in one block are two segments,
/// which the sweep adds up.
fn block_segments(scan: usize, s: &ScanLoad<'_>) -> Vec<Segment> {
    let (each, rate) = (per_address(s), f64::from(s.rate));
    let mut out = Vec::new();
    for (lo, hi) in key_pieces(s) {
        let ((lb, bits), (hb, _)) = (block_of(lo), block_of(hi));
        let mask = (1u128 << bits) - 1;
        let mut push = |lo_b: u128, hi_b: u128, count: u128| {
            out.push(Segment { lo: lo_b, hi: hi_b, scan, weight: (each * count as f64).min(rate) });
        };
        if lb == hb {
            push(lb, lb, hi - lo + 1);
            continue;
        }
        push(lb, lb, mask - (lo & mask) + 1);
        if hb > lb + 1 {
            push(lb + 1, hb - 1, mask + 1);
        }
        push(hb, hb, (hi & mask) + 1);
    }
    out
}

/// For each scan, the highest total load at any key it touches, in
/// O(n log n): the load of every elementary interval by a sweep, then a
/// range-maximum query per segment on a segment tree.
fn peak_loads(segments: Vec<Segment>, scans: usize) -> Vec<f64> {
    // Interval ends as half-open bounds (`None`: past the last key), ranked
    // by one sort: `span[i]` is segment i's run of elementary intervals.
    let mut bounds: Vec<(u128, u32)> = Vec::with_capacity(segments.len() * 2);
    for (i, s) in segments.iter().enumerate() {
        bounds.push((s.lo, (i as u32) << 1));
        if let Some(end) = s.hi.checked_add(1) {
            bounds.push((end, (i as u32) << 1 | 1));
        }
    }
    bounds.sort_unstable_by_key(|b| b.0);
    let mut span = vec![(0usize, usize::MAX); segments.len()];
    let mut rank = 0usize;
    for (j, &(key, tag)) in bounds.iter().enumerate() {
        if j > 0 && key != bounds[j - 1].0 {
            rank += 1;
        }
        let seg = &mut span[(tag >> 1) as usize];
        if tag & 1 == 0 { seg.0 = rank } else { seg.1 = rank }
    }
    let intervals = rank + 1;
    let mut delta = vec![0.0f64; intervals + 1];
    for (s, &(lo, end)) in segments.iter().zip(&span) {
        delta[lo] += s.weight;
        delta[end.min(intervals)] -= s.weight;
    }
    // load[i]: keys from the i-th bound to the next.
    let mut load = Vec::with_capacity(intervals);
    let mut running = 0.0f64;
    for d in &delta[..intervals] {
        running += d;
        load.push(running);
    }
    let tree = MaxTree::new(&load);
    let mut peak = vec![0.0f64; scans];
    for (s, &(lo, end)) in segments.iter().zip(&span) {
        let m = tree.max(lo, end.min(intervals));
        peak[s.scan] = peak[s.scan].max(m);
    }
    peak
}

/// An iterative segment tree answering the maximum of `v[lo..hi]`.
struct MaxTree {
    n: usize,
    t: Vec<f64>,
}

impl MaxTree {
    fn new(v: &[f64]) -> Self {
        let n = v.len();
        let mut t = vec![f64::MIN; 2 * n];
        t[n..].copy_from_slice(v);
        for i in (1..n).rev() {
            t[i] = t[2 * i].max(t[2 * i + 1]);
        }
        Self { n, t }
    }

    fn max(&self, lo: usize, hi: usize) -> f64 {
        let (mut l, mut r, mut m) = (lo + self.n, hi + self.n, f64::MIN);
        while l < r {
            if l & 1 == 1 {
                m = m.max(self.t[l]);
                l += 1;
            }
            if r & 1 == 1 {
                r -= 1;
                m = m.max(self.t[r]);
            }
            l /= 2;
            r /= 2;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> AddressSet {
        portfleet_core::targets::parse_cidr_list(items).unwrap()
    }

    fn rates(caps: RateCaps, scans: &[(u32, &AddressSet)]) -> Vec<u32> {
        let loads: Vec<ScanLoad<'_>> =
            scans.iter().map(|&(rate, addrs)| ScanLoad { rate, retries: 0, addrs }).collect();
        capped_rates(caps, &loads)
    }

    const BLOCK_1000: RateCaps = RateCaps { per_host: 0, per_block: 1000 };

    #[test]
    fn no_caps_change_nothing() {
        let a = set(&["10.0.0.0/24"]);
        assert_eq!(rates(RateCaps::default(), &[(5000, &a), (7000, &a)]), vec![5000, 7000]);
    }

    #[test]
    fn two_scans_of_one_block_share_its_cap() {
        let a = set(&["10.0.0.0/24"]);
        let b = set(&["10.0.0.0/25"]);
        let r = rates(BLOCK_1000, &[(5000, &a), (5000, &b)]);
        assert!(r[0] + r[1] <= 1000, "{r:?}");
        assert!(r[0] + r[1] >= 998, "{r:?}");
    }

    #[test]
    fn scans_of_different_blocks_do_not_meet() {
        let a = set(&["10.0.0.0/24"]);
        let b = set(&["10.0.1.0/24"]);
        assert_eq!(rates(BLOCK_1000, &[(800, &a), (900, &b)]), vec![800, 900]);
        // A /23 spreads its rate over two blocks: 1000/s each is at the cap.
        let c = set(&["10.0.0.0/23"]);
        assert_eq!(rates(BLOCK_1000, &[(2000, &c)]), vec![2000]);
    }

    #[test]
    fn a_wide_scan_only_yields_where_it_meets_another() {
        // A /16 at 65,536/s sends 256/s into each /24; a scan of one of
        // them at 1000/s makes that block 1256/s: both slow to fit.
        let wide = set(&["10.0.0.0/16"]);
        let one = set(&["10.0.7.0/24"]);
        let r = rates(BLOCK_1000, &[(65_536, &wide), (1000, &one)]);
        let block = f64::from(r[0]) / 256.0 + f64::from(r[1]);
        assert!(block <= 1000.0, "{r:?} puts {block}/s on 10.0.7.0/24");
        assert!(r[0] > 50_000, "{r:?}");
    }

    #[test]
    fn sparse_targets_are_loaded_by_what_they_hold() {
        // Two addresses in one /24, 998 elsewhere: that block gets 2/1000
        // of the rate, not all of it.
        let mut items: Vec<String> = vec!["10.9.9.1".into(), "10.9.9.2".into()];
        items.extend((0..998).map(|i| format!("10.{}.{}.1", 10 + i / 250, i % 250)));
        let sparse = portfleet_core::targets::parse_cidr_list(&items).unwrap();
        assert_eq!(rates(BLOCK_1000, &[(100_000, &sparse)]), vec![100_000]);
        assert!(rates(BLOCK_1000, &[(600_000, &sparse)])[0] <= 500_000);
    }

    #[test]
    fn per_host_cap_counts_overlap_only() {
        let caps = RateCaps { per_host: 10, per_block: 0 };
        let a = set(&["10.0.0.0/24"]);
        let b = set(&["10.0.0.5"]);
        let c = set(&["10.0.1.0/24"]);
        // a: 2560/s over 256 hosts = 10/s each; b adds 50/s to .5.
        let r = rates(caps, &[(2560, &a), (50, &b), (10_000, &c)]);
        let on_five = f64::from(r[0]) / 256.0 + f64::from(r[1]);
        assert!(on_five <= 10.0, "{r:?}");
        assert!((2559..=2560).contains(&r[2]), "c is alone: 10/s on each of its 256 hosts: {r:?}");
    }

    #[test]
    fn ipv6_blocks_are_slash_64s_and_v4_mapped_is_the_same_host() {
        let a = set(&["fd00:1::/120"]);
        let b = set(&["fd00:1::1:0/120"]);
        let c = set(&["fd00:2::/120"]);
        let r = rates(BLOCK_1000, &[(900, &a), (900, &b), (900, &c)]);
        assert!(r[0] + r[1] <= 1000, "same /64: {r:?}");
        assert_eq!(r[2], 900);
        let host = RateCaps { per_host: 100, per_block: 0 };
        let v4 = set(&["10.0.0.1"]);
        let mapped = set(&["::ffff:10.0.0.1"]);
        let r = rates(host, &[(100, &v4), (100, &mapped)]);
        assert!(r[0] + r[1] <= 100, "{r:?}");
    }

    #[test]
    fn ranges_sharing_a_block_are_summed_once() {
        let s = set(&["10.0.0.1-10.0.0.10", "10.0.0.20-10.0.1.5", "10.0.1.9"]);
        let segs = block_segments(0, &ScanLoad { rate: 17, retries: 0, addrs: &s });
        let total: f64 = segs.iter().map(|g| g.weight).sum();
        assert!((total - 17.0).abs() < 1e-9, "{segs:?}");
        let peaks = peak_loads(segs, 1);
        // 10 + 236 of 253 addresses in 10.0.0.0/24.
        assert!((peaks[0] - 17.0 * 246.0 / 253.0).abs() < 1e-9, "{peaks:?}");
    }

    #[test]
    fn retries_count_where_they_can_land() {
        // A /23 at 2000/s puts 1000/s on each /24, or up to 2000/s on a
        // silent one when every probe there is sent twice.
        let a = set(&["10.0.0.0/23"]);
        let one_retry = |rate| capped_rates(BLOCK_1000, &[ScanLoad { rate, retries: 1, addrs: &a }]);
        assert_eq!(one_retry(2000), vec![1000]);
        // One host: the whole rate is the most it can get.
        let h = set(&["10.0.0.1"]);
        let host = RateCaps { per_host: 500, per_block: 0 };
        assert_eq!(capped_rates(host, &[ScanLoad { rate: 400, retries: 3, addrs: &h }]), vec![400]);
    }

    #[test]
    fn the_ipv4_mapped_block_is_the_ipv4_slash_24() {
        let v4 = set(&["10.0.0.0/24"]);
        let mapped = set(&["::ffff:10.0.0.0/120"]);
        let r = rates(BLOCK_1000, &[(900, &v4), (900, &mapped)]);
        assert!(r[0] + r[1] <= 1000, "{r:?}");
        // A range across the start of the mapped block: half in ::/64,
        // half in 0.0.0.0/24.
        let across = set(&["::fffe:ffff:ff00-::ffff:0:ff"]);
        let segs = block_segments(0, &ScanLoad { rate: 512, retries: 0, addrs: &across });
        let weights: Vec<(u128, f64)> = segs.iter().map(|g| (g.lo, g.weight)).collect();
        assert_eq!(weights, vec![(0, 256.0), (1u128 << 64, 256.0)]);
        // The top of the IPv6 space has no key past it.
        let top = set(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120"]);
        assert_eq!(rates(BLOCK_1000, &[(900, &top), (900, &top)]).iter().sum::<u32>(), 1000);
    }

    #[test]
    fn rates_never_go_below_one() {
        let a = set(&["10.0.0.0/24"]);
        assert_eq!(rates(RateCaps { per_host: 0, per_block: 1 }, &[(1000, &a), (1000, &a)]), vec![1, 1]);
    }

    proptest::proptest! {
        /// Brute force over 10.0.0.0/22 (four /24s, 1024 hosts): after
        /// capping, no host and no block is over its cap.
        #[test]
        fn no_host_or_block_is_over_its_cap(
            scans in proptest::collection::vec(
                (1u32..50_000, 0u32..3, proptest::collection::vec((0u32..1024, 0u32..300), 1..4)), 1..6),
            per_host in 0u32..400,
            per_block in 0u32..20_000,
        ) {
            let caps = RateCaps { per_host, per_block };
            let sets: Vec<(u32, u32, AddressSet)> = scans.iter().map(|(rate, retries, ranges)| {
                let items: Vec<String> = ranges.iter().map(|&(lo, len)| {
                    let hi = (lo + len).min(1023);
                    format!("10.0.{}.{}-10.0.{}.{}", lo / 256, lo % 256, hi / 256, hi % 256)
                }).collect();
                (*rate, *retries, portfleet_core::targets::parse_cidr_list(&items).unwrap())
            }).collect();
            let loads: Vec<ScanLoad<'_>> =
                sets.iter().map(|(rate, retries, addrs)| ScanLoad { rate: *rate, retries: *retries, addrs }).collect();
            let capped = capped_rates(caps, &loads);
            // The 1 probe/s floor may exceed a tiny cap: not this property.
            proptest::prop_assume!(capped.iter().all(|&r| r > 1));
            // The worst case: every address as silent as can be (its share
            // times 1 + retries, at most the scan's rate), per scan and block.
            let mut host = [0.0f64; 1024];
            let mut block = [0.0f64; 4];
            for ((_, retries, addrs), &rate) in sets.iter().zip(&capped) {
                let rate = f64::from(rate);
                let each = (rate * f64::from(retries + 1) / addrs.len() as f64).min(rate);
                let mut mine = [0.0f64; 4];
                for h in 0..1024u32 {
                    if addrs.contains(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, (h / 256) as u8, (h % 256) as u8))) {
                        host[h as usize] += each;
                        mine[(h / 256) as usize] += each;
                    }
                }
                for b in 0..4 {
                    block[b] += mine[b].min(rate);
                }
            }
            for (h, load) in host.iter().enumerate() {
                proptest::prop_assert!(per_host == 0 || *load <= f64::from(per_host) + 1e-6, "host {h}: {load}");
            }
            for (b, load) in block.iter().enumerate() {
                proptest::prop_assert!(per_block == 0 || *load <= f64::from(per_block) + 1e-6, "block {b}: {load}");
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release -p portfleet-controller --lib time_500 -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, run by hand in release"]
    fn time_500_scans() {
        let sets: Vec<AddressSet> = (0..500)
            .map(|_| {
                let mut items: Vec<String> = (0..20)
                    .map(|_| format!("10.{}.{}.0/24", rand::random_range(0..4u8), rand::random_range(0..=255u8)))
                    .collect();
                items.extend((0..20).map(|_| {
                    format!(
                        "10.{}.{}.{}",
                        rand::random_range(0..4u8),
                        rand::random_range(0..=255u8),
                        rand::random_range(1..255u8)
                    )
                }));
                portfleet_core::targets::parse_cidr_list(&items).unwrap()
            })
            .collect();
        let loads: Vec<ScanLoad<'_>> = sets.iter().map(|addrs| ScanLoad { rate: 50_000, retries: 1, addrs }).collect();
        let caps = RateCaps { per_host: 100, per_block: 5000 };
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let r = capped_rates(caps, &loads);
            eprintln!("{} scans: {:?} ({})", r.len(), t.elapsed(), r[0]);
        }
    }
}
