//! A keyed bijection on `[0, n)`, computable in both directions in O(1)
//! memory: the order in which a scan visits its (address x port) pairs.
//!
//! This is a generalised Feistel network over the mixed-radix domain
//! `a x b` (Black and Rogaway's construction, as masscan's BlackRock uses),
//! with `a x b` the smallest near-square product `>= n`, and cycle walking to
//! stay inside `[0, n)`. Because `a x b < n + 2 sqrt(n) + 1`, the walk almost
//! never takes a second step. Random access matters: a shard is a contiguous
//! range of positions, and an agent resumes from any checkpoint.

const ROUNDS: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permutation {
    n: u64,
    a: u64,
    b: u64,
    keys: [u64; ROUNDS as usize],
}

impl Permutation {
    /// Largest supported domain; keeps `a x b` and the Feistel arithmetic
    /// inside `u64`.
    pub const MAX_LEN: u64 = 1 << 62;

    /// A permutation of `[0, n)` keyed by `seed`; `n` is clamped to
    /// [`Permutation::MAX_LEN`] (callers cap scans far below it).
    pub fn new(n: u64, seed: u64) -> Self {
        let n = n.min(Self::MAX_LEN);
        let (a, b) = if n <= 1 {
            (1, 1)
        } else {
            let a = n.isqrt();
            (a, n.div_ceil(a))
        };
        let mut state = seed;
        let keys = std::array::from_fn(|_| splitmix64(&mut state));
        Self { n, a, b, keys }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The index visited at position `pos` (`pos < n`).
    pub fn apply(&self, pos: u64) -> u64 {
        debug_assert!(pos < self.n);
        let mut x = self.encrypt(pos);
        while x >= self.n {
            x = self.encrypt(x);
        }
        x
    }

    /// The position at which `index` is visited (`index < n`).
    pub fn invert(&self, index: u64) -> u64 {
        debug_assert!(index < self.n);
        let mut x = self.decrypt(index);
        while x >= self.n {
            x = self.decrypt(x);
        }
        x
    }

    fn round(&self, j: u32, r: u64) -> u64 {
        fmix64(r ^ self.keys[(j - 1) as usize])
    }

    fn modulus(&self, j: u32) -> u64 {
        if j % 2 == 1 { self.a } else { self.b }
    }

    fn encrypt(&self, m: u64) -> u64 {
        let (mut l, mut r) = (m % self.a, m / self.a);
        for j in 1..=ROUNDS {
            let md = self.modulus(j);
            let t = ((l % md) + self.round(j, r) % md) % md;
            l = r;
            r = t;
        }
        // ROUNDS is even: l < a and r < b here.
        self.a * r + l
    }

    fn decrypt(&self, m: u64) -> u64 {
        let (mut l, mut r) = (m % self.a, m / self.a);
        for j in (1..=ROUNDS).rev() {
            let md = self.modulus(j);
            let t = (r + md - self.round(j, l) % md) % md;
            r = l;
            l = t;
        }
        self.a * r + l
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// MurmurHash3's finaliser: a cheap, well-mixing round function. The
/// bijection does not depend on its quality, only the spread does.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn small_domains_are_bijections() {
        for n in 0..300u64 {
            for seed in [0, 1, 0xdead_beef] {
                let p = Permutation::new(n, seed);
                let mut seen = vec![false; n as usize];
                for pos in 0..n {
                    let i = p.apply(pos);
                    assert!(i < n);
                    assert!(!seen[i as usize], "n={n} seed={seed}: {i} visited twice");
                    seen[i as usize] = true;
                    assert_eq!(p.invert(i), pos);
                }
            }
        }
    }

    #[test]
    fn spreads_consecutive_positions() {
        // Consecutive positions should not walk one host's ports in order.
        let n = 254 * 1000;
        let p = Permutation::new(n, 42);
        let sequential = (0..1000).filter(|&i| p.apply(i + 1) == p.apply(i) + 1).count();
        assert!(sequential < 10, "{sequential} sequential steps");
    }

    #[test]
    fn huge_domains_stay_in_range() {
        for n in [Permutation::MAX_LEN, (1 << 62) - 3, 1 << 48, (1 << 32) + 7] {
            let p = Permutation::new(n, 7);
            for pos in [0, 1, n / 2, n - 2, n - 1] {
                let i = p.apply(pos);
                assert!(i < n);
                assert_eq!(p.invert(i), pos);
            }
        }
    }

    proptest! {
        #[test]
        fn is_a_bijection(n in 1u64..5000, seed in any::<u64>()) {
            let p = Permutation::new(n, seed);
            let mut seen = vec![false; n as usize];
            for pos in 0..n {
                let i = p.apply(pos);
                prop_assert!(i < n);
                prop_assert!(!seen[i as usize]);
                seen[i as usize] = true;
            }
        }

        #[test]
        fn inverts(n in 1u64..Permutation::MAX_LEN, seed in any::<u64>(), frac in 0.0f64..1.0) {
            let p = Permutation::new(n, seed);
            let pos = ((n as f64 * frac) as u64).min(n - 1);
            prop_assert_eq!(p.invert(p.apply(pos)), pos);
        }
    }
}
