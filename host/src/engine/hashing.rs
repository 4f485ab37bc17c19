//! Small, fast, deterministic hashing shared by the engine.
//!
//! `mix64` is the splitmix64 finaliser (a bijection on `u64` with full avalanche). It backs the
//! hasher of the engine's id-keyed maps (request ids and block hashes are already well spread, so
//! SipHash's DoS resistance buys nothing there and costs time on every scheduler step). Nothing
//! here is cryptographic: the prefix-cache block hashes, which clients can influence, are
//! SHA-256 ([`super::block_pool::BlockHash`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The splitmix64 output function: a cheap bijective 64-bit mixer.
#[inline]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hasher for maps keyed by integer ids: one `mix64` per written word.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = mix64(self.0 ^ n);
    }

    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A `HashMap` with [`IdHasher`].
pub type IdHashMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix64_is_deterministic_and_spreads_neighbours() {
        assert_eq!(mix64(1), mix64(1));
        assert_ne!(mix64(1), mix64(2));
        // Neighbouring inputs differ in about half their output bits.
        let differing = (mix64(1000) ^ mix64(1001)).count_ones();
        assert!((16..=48).contains(&differing), "{differing}");
    }

    #[test]
    fn id_hash_map_works_with_integer_keys() {
        let mut map: IdHashMap<u64, u32> = IdHashMap::default();
        for i in 0..1000u64 {
            map.insert(i, i as u32);
        }
        assert_eq!(map.get(&999), Some(&999));
        assert_eq!(map.len(), 1000);
    }
}
