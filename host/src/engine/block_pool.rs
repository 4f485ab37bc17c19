//! The pool of KV-cache blocks: reference counts, the free queue, and the prefix-cache index.
//!
//! Every block has a reference count (the number of requests holding it). A block nobody holds is
//! in the [`FreeBlockQueue`], an intrusive doubly-linked list over two `Vec<u32>`s (as vLLM's
//! `FreeKVCacheBlockQueue`), so taking the head, appending, and unlinking a block from the middle
//! (a prefix-cache hit on a free block) are all O(1). A freed block that holds a full, hashed
//! block of tokens stays in the prefix-cache index and goes to the back of the queue; allocation
//! takes blocks from the front, so cached blocks are evicted least-recently-used first, and only
//! after every block without reusable content (those are queued at the front when freed).

use super::hashing::IdHashMap;

/// Index of a KV block in the pool (and in the model runner's KV tensors).
pub type BlockId = u32;

/// Marks "no block" in the free queue's links.
const NO_BLOCK: u32 = u32::MAX;

/// Chained hash of a full block: SHA-256 of its parent block's hash and its own token ids,
/// truncated to 128 bits, so equal hashes mean equal whole prefixes. A fast non-cryptographic
/// hash would let a client craft a prompt whose block hash equals another client's (vLLM's
/// CVE-2025-25183), and then one request would read the other's K/V; with SHA-256 neither a
/// chance collision nor a crafted one is within reach. A block costs about 1 µs to hash, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u128);

impl BlockHash {
    /// Hash of the first block has `parent == None`.
    pub fn of_block(parent: Option<BlockHash>, token_ids: &[u32]) -> BlockHash {
        Self::of_salted_block(parent, None, token_ids)
    }

    /// Like [`of_block`](Self::of_block); a first block (`parent == None`) also hashes `salt`
    /// (a request's `cache_salt`), so only requests with the same salt share cached blocks.
    pub fn of_salted_block(
        parent: Option<BlockHash>,
        salt: Option<&str>,
        token_ids: &[u32],
    ) -> BlockHash {
        use sha2::{Digest, Sha256};
        // A distinct first field for each kind of root, so no parent hash can play its part.
        let mut hasher = Sha256::new();
        match (parent, salt) {
            (Some(BlockHash(p)), _) => {
                hasher.update([1u8]);
                hasher.update(p.to_le_bytes());
            }
            (None, None) => hasher.update([0u8]),
            (None, Some(salt)) => {
                hasher.update([2u8]);
                hasher.update((salt.len() as u64).to_le_bytes());
                hasher.update(salt.as_bytes());
            }
        }
        hasher.update((token_ids.len() as u64).to_le_bytes());
        for token in token_ids {
            hasher.update(token.to_le_bytes());
        }
        let digest = hasher.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        BlockHash(u128::from_le_bytes(first))
    }
}

/// Intrusive doubly-linked list of free block ids, ordered by eviction priority (front first).
#[derive(Debug, Clone)]
pub struct FreeBlockQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    queued: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeBlockQueue {
    /// A queue holding blocks `0..num_blocks` in order.
    pub fn with_all_blocks(num_blocks: usize) -> Self {
        assert!(num_blocks < NO_BLOCK as usize, "too many KV blocks");
        let n = num_blocks as u32;
        let prev = (0..n)
            .map(|i| if i == 0 { NO_BLOCK } else { i - 1 })
            .collect();
        let next = (0..n)
            .map(|i| if i + 1 == n { NO_BLOCK } else { i + 1 })
            .collect();
        Self {
            prev,
            next,
            queued: vec![true; num_blocks],
            head: if n == 0 { NO_BLOCK } else { 0 },
            tail: if n == 0 { NO_BLOCK } else { n - 1 },
            len: num_blocks,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, block: BlockId) -> bool {
        self.queued[block as usize]
    }

    /// The block to evict next.
    pub fn front(&self) -> Option<BlockId> {
        (self.head != NO_BLOCK).then_some(self.head)
    }

    pub fn pop_front(&mut self) -> Option<BlockId> {
        let block = self.front()?;
        self.remove(block);
        Some(block)
    }

    pub fn push_back(&mut self, block: BlockId) {
        debug_assert!(!self.contains(block));
        let b = block as usize;
        self.prev[b] = self.tail;
        self.next[b] = NO_BLOCK;
        if self.tail == NO_BLOCK {
            self.head = block;
        } else {
            self.next[self.tail as usize] = block;
        }
        self.tail = block;
        self.queued[b] = true;
        self.len += 1;
    }

    pub fn push_front(&mut self, block: BlockId) {
        debug_assert!(!self.contains(block));
        let b = block as usize;
        self.next[b] = self.head;
        self.prev[b] = NO_BLOCK;
        if self.head == NO_BLOCK {
            self.tail = block;
        } else {
            self.prev[self.head as usize] = block;
        }
        self.head = block;
        self.queued[b] = true;
        self.len += 1;
    }

    /// Unlinks `block` wherever it is. It must be queued.
    pub fn remove(&mut self, block: BlockId) {
        debug_assert!(self.contains(block));
        let b = block as usize;
        let (prev, next) = (self.prev[b], self.next[b]);
        if prev == NO_BLOCK {
            self.head = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next == NO_BLOCK {
            self.tail = prev;
        } else {
            self.prev[next as usize] = prev;
        }
        self.prev[b] = NO_BLOCK;
        self.next[b] = NO_BLOCK;
        self.queued[b] = false;
        self.len -= 1;
    }

    /// Queued blocks, front (next to evict) first.
    pub fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cursor = self.head;
        std::iter::from_fn(move || {
            (cursor != NO_BLOCK).then(|| {
                let block = cursor;
                cursor = self.next[block as usize];
                block
            })
        })
    }

    /// Checks the links: both directions agree, the length matches, flags match membership.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = 0usize;
        let mut prev = NO_BLOCK;
        let mut cursor = self.head;
        while cursor != NO_BLOCK {
            let c = cursor as usize;
            if !self.queued[c] {
                return Err(format!(
                    "free queue links block {cursor} but it is not flagged queued"
                ));
            }
            if self.prev[c] != prev {
                return Err(format!(
                    "free queue: block {cursor} has prev {} instead of {prev}",
                    self.prev[c]
                ));
            }
            seen += 1;
            if seen > self.len {
                return Err("free queue has a cycle or more links than its length".into());
            }
            prev = cursor;
            cursor = self.next[c];
        }
        if prev != self.tail {
            return Err(format!(
                "free queue tail is {} but the last linked block is {prev}",
                self.tail
            ));
        }
        let flagged = self.queued.iter().filter(|&&q| q).count();
        if seen != self.len || flagged != self.len {
            return Err(format!(
                "free queue length {} but {seen} linked and {flagged} flagged",
                self.len
            ));
        }
        Ok(())
    }
}

/// All KV blocks: reference counts, hashes of cached blocks, the free queue and the hash index.
#[derive(Debug, Clone)]
pub struct BlockPool {
    ref_counts: Vec<u32>,
    hashes: Vec<Option<BlockHash>>,
    free_queue: FreeBlockQueue,
    /// Prefix-cache index: block hash → the block holding it (held or free).
    cached_blocks: IdHashMap<BlockHash, BlockId>,
    num_evictions: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            free_queue: FreeBlockQueue::with_all_blocks(num_blocks),
            // At most one entry per block: reserving up front keeps rehashing off the step path.
            cached_blocks: IdHashMap::with_capacity_and_hasher(num_blocks, Default::default()),
            num_evictions: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks no request holds (cached ones included).
    pub fn num_free_blocks(&self) -> usize {
        self.free_queue.len()
    }

    /// `1 - free / total`.
    pub fn usage_ratio(&self) -> f64 {
        if self.num_blocks() == 0 {
            return 0.0;
        }
        1.0 - self.num_free_blocks() as f64 / self.num_blocks() as f64
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    pub fn block_hash(&self, block: BlockId) -> Option<BlockHash> {
        self.hashes[block as usize]
    }

    pub fn free_queue(&self) -> &FreeBlockQueue {
        &self.free_queue
    }

    /// Cached blocks that were evicted (their hash dropped) to make room.
    pub fn num_evictions(&self) -> u64 {
        self.num_evictions
    }

    /// Number of hashes in the prefix-cache index.
    pub fn num_cached_hashes(&self) -> usize {
        self.cached_blocks.len()
    }

    /// The block holding `hash`, if it is still cached.
    pub fn cached_block(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached_blocks.get(&hash).copied()
    }

    /// Adds one holder to each block, taking free ones out of the free queue.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &block in blocks {
            if self.ref_counts[block as usize] == 0 {
                self.free_queue.remove(block);
            }
            self.ref_counts[block as usize] += 1;
        }
    }

    /// Takes `count` blocks from the front of the free queue (evicting their cached content) and
    /// appends them, each with one holder, to `out`. Takes nothing and returns false if fewer
    /// than `count` blocks are free.
    pub fn allocate(&mut self, count: usize, out: &mut Vec<BlockId>) -> bool {
        if count > self.free_queue.len() {
            return false;
        }
        out.reserve(count);
        for _ in 0..count {
            let Some(block) = self.free_queue.pop_front() else {
                return false;
            };
            self.evict_hash(block);
            self.ref_counts[block as usize] = 1;
            out.push(block);
        }
        true
    }

    /// Drops one holder from each block, in order; a block nobody holds any more joins the free
    /// queue: at the back if it is cached (evicted last, LRU), at the front if not.
    pub fn free_blocks(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for block in blocks {
            let count = &mut self.ref_counts[block as usize];
            debug_assert!(*count > 0, "freeing block {block} that nobody holds");
            *count = count.saturating_sub(1);
            if *count == 0 {
                if self.hashes[block as usize].is_some() {
                    self.free_queue.push_back(block);
                } else {
                    self.free_queue.push_front(block);
                }
            }
        }
    }

    /// Records that `block` holds the full block `hash`. If another block already holds that hash
    /// (two requests computed the same block at once) the index keeps the first one; this block
    /// still carries the hash and is freed as cached.
    pub fn cache_block(&mut self, block: BlockId, hash: BlockHash) {
        self.hashes[block as usize] = Some(hash);
        self.cached_blocks.entry(hash).or_insert(block);
    }

    fn evict_hash(&mut self, block: BlockId) {
        if let Some(hash) = self.hashes[block as usize].take() {
            if self.cached_blocks.get(&hash) == Some(&block) {
                self.cached_blocks.remove(&hash);
            }
            self.num_evictions += 1;
        }
    }

    /// Checks the free queue, that a block is free exactly when nobody holds it, that free and
    /// held blocks add up to the total, and that the hash index points at blocks carrying the hash.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.free_queue.check_invariants()?;
        let mut held = 0;
        for (block, &count) in self.ref_counts.iter().enumerate() {
            let queued = self.free_queue.contains(block as BlockId);
            if (count == 0) != queued {
                return Err(format!(
                    "block {block} has ref count {count} but queued = {queued}"
                ));
            }
            if count > 0 {
                held += 1;
            }
        }
        if held + self.free_queue.len() != self.num_blocks() {
            return Err(format!(
                "{held} held + {} free blocks != {} total",
                self.free_queue.len(),
                self.num_blocks()
            ));
        }
        for (hash, &block) in &self.cached_blocks {
            if self.hashes[block as usize] != Some(*hash) {
                return Err(format!(
                    "hash index points at block {block}, which does not carry that hash"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_hash_chains_and_distinguishes() {
        let a = BlockHash::of_block(None, &[1, 2, 3, 4]);
        assert_eq!(a, BlockHash::of_block(None, &[1, 2, 3, 4]));
        assert_ne!(a, BlockHash::of_block(None, &[1, 2, 3, 5]));
        assert_ne!(a, BlockHash::of_block(None, &[2, 1, 3, 4]));
        let b = BlockHash::of_block(Some(a), &[5, 6, 7, 8]);
        assert_ne!(b, BlockHash::of_block(None, &[5, 6, 7, 8]));
        assert_ne!(
            BlockHash::of_block(None, &[1, 2, 3]),
            BlockHash::of_block(None, &[1, 2, 3, 0])
        );
        assert_ne!(a, BlockHash::of_block(Some(BlockHash(0)), &[1, 2, 3, 4]));
        // SHA-256 of 0x00, the length (u64 LE) and the tokens (u32 LE), first 16 bytes as a LE
        // u128 (Python: hashlib.sha256(...).digest()[:16]).
        assert_eq!(a, BlockHash(0x3a53a1cbe125025611d4eb4dcf449488));
        // A salt changes the first block only; equal salts agree.
        let salted = BlockHash::of_salted_block(None, Some("tenant-a"), &[1, 2, 3, 4]);
        assert_ne!(salted, a);
        assert_ne!(
            salted,
            BlockHash::of_salted_block(None, Some("tenant-b"), &[1, 2, 3, 4])
        );
        assert_eq!(
            salted,
            BlockHash::of_salted_block(None, Some("tenant-a"), &[1, 2, 3, 4])
        );
        assert_eq!(
            BlockHash::of_salted_block(Some(a), Some("tenant-a"), &[5, 6, 7, 8]),
            b
        );
    }

    #[test]
    fn free_queue_operations() {
        let mut q = FreeBlockQueue::with_all_blocks(5);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        q.remove(2);
        q.remove(0);
        q.remove(4);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![1, 3]);
        q.push_back(0);
        q.push_front(4);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![4, 1, 3, 0]);
        assert_eq!(q.pop_front(), Some(4));
        assert_eq!(q.len(), 3);
        q.check_invariants().unwrap();
        while q.pop_front().is_some() {}
        assert!(q.is_empty());
        q.check_invariants().unwrap();
        q.push_back(2);
        assert_eq!(q.front(), Some(2));
        q.check_invariants().unwrap();
    }

    #[test]
    fn allocate_free_and_evict_lru() {
        let mut pool = BlockPool::new(4);
        let mut a = Vec::new();
        assert!(pool.allocate(2, &mut a));
        assert_eq!(a, vec![0, 1]);
        let mut b = Vec::new();
        assert!(pool.allocate(2, &mut b));
        assert!(!pool.allocate(1, &mut Vec::new()));
        let (ha, hb) = (BlockHash(1), BlockHash(2));
        pool.cache_block(a[0], ha);
        pool.cache_block(b[0], hb);
        // a is freed first, so its cached block is the least recently used.
        pool.free_blocks(a.iter().rev().copied());
        pool.free_blocks(b.iter().rev().copied());
        pool.check_invariants().unwrap();
        // Uncached blocks come first, then a's cached block, then b's.
        assert_eq!(
            pool.free_queue().iter().collect::<Vec<_>>(),
            vec![b[1], a[1], a[0], b[0]]
        );
        let mut c = Vec::new();
        assert!(pool.allocate(3, &mut c));
        assert_eq!(pool.cached_block(ha), None, "a's block is evicted first");
        assert_eq!(pool.cached_block(hb), Some(b[0]));
        assert_eq!(pool.num_evictions(), 1);
        // A prefix hit on a free cached block takes it out of the free queue.
        pool.touch(&[b[0]]);
        assert_eq!(pool.num_free_blocks(), 0);
        assert_eq!(pool.ref_count(b[0]), 1);
        pool.check_invariants().unwrap();
    }
}
