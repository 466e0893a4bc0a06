//! Leaf: the host's noise for diffusion and flow-matching policies (`[[noise]]` inputs), from a
//! 64-bit seed per request, so a decision can be replayed: the same seed gives the same values
//! on every machine.
//!
//! The generator, in full (`models/export.py` has the same in Python for its references):
//! SplitMix64 from the seed gives 64-bit words; each pair `(a, b)` gives two standard normal
//! values by Box–Muller in double precision, `u1 = ((a >> 11) + 1) / 2^53`,
//! `u2 = (b >> 11) / 2^53`, `r = sqrt(-2 ln u1)`: `r cos(2π u2)`, then `r sin(2π u2)`; each is
//! rounded to `f32`. Row `r` of a request uses `seed + r`; a row's noise inputs take the values
//! in input order.

/// SplitMix64.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A row's standard normal values, `count` of them, from `seed`.
pub fn normal(seed: u64, count: usize) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    let mut out = Vec::with_capacity(count + 1);
    let scale = 2f64.powi(-53);
    while out.len() < count {
        let u1 = ((rng.next() >> 11) + 1) as f64 * scale;
        let u2 = (rng.next() >> 11) as f64 * scale;
        let r = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        out.push((r * angle.cos()) as f32);
        out.push((r * angle.sin()) as f32);
    }
    out.truncate(count);
    out
}

/// A fresh seed for a request that brings none.
pub fn fresh_seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No system randomness: the clock still varies per request.
        return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_noise_and_it_looks_normal() {
        assert_eq!(normal(7, 5), normal(7, 5));
        assert_ne!(normal(7, 5), normal(8, 5));
        // The first values continue the same stream whatever the count.
        assert_eq!(normal(7, 3), normal(7, 4)[..3]);
        let v = normal(42, 100_000);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean}, variance {var}");
    }

    #[test]
    fn splitmix64_is_the_published_one() {
        // The first outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next(), 0x6E78_9E6A_A1B9_65F4);
    }
}
