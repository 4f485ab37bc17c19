//! Small, fast, deterministic hashing shared by the engine.
//!
//! SplitMix64's finaliser ([`crate::splitmix::finalize`], a bijection on `u64` with full
//! avalanche) backs the hasher of the engine's id-keyed maps (request ids and block hashes are already well spread, so
//! SipHash's DoS resistance buys nothing there and costs time on every scheduler step). Nothing
//! here is cryptographic: the prefix-cache block hashes, which clients can influence, are
//! SHA-256 ([`super::block_pool::BlockHash`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::splitmix::finalize;

/// Hasher for maps keyed by integer ids: one [`finalize`] per written word.
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
        self.0 = finalize(self.0 ^ n);
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
    fn id_hash_map_works_with_integer_keys() {
        let mut map: IdHashMap<u64, u32> = IdHashMap::default();
        for i in 0..1000u64 {
            map.insert(i, i as u32);
        }
        assert_eq!(map.get(&999), Some(&999));
        assert_eq!(map.len(), 1000);
    }
}
