//! A space map: the allocation bitmap of one area (metadata blocks or data chunks), kept in
//! bitmap blocks read through the block cache.  Bit `i` set means entry `i` of the area is in
//! use.  Allocation is next-fit from a hint that the caller persists, so a search is
//! amortized O(1) and wraps around the end of the area.
//!
//! An area may defer the reuse of what it frees: entries freed by the open transaction are
//! recorded in the cache's pending list and not handed out again before it commits (their
//! old content may still be needed if the transaction is lost).

use super::block::*;
use super::cache::{Cache, CacheMem};

/// Bits of allocation state per bitmap block.
pub const BITS_PER_BITMAP: u64 = ((BLOCK_SIZE - HEADER_SIZE) * 8) as u64;

/// Most frees one transaction may defer (the cache memory's pending list holds at least
/// this many entries).
pub const PENDING_MAX: usize = 1024;

/// The state of one area's space map.  The caller keeps `used` and `hint` (they are
/// persisted with its state) and `deferred` (for the open transaction), and stores them back
/// after every call that changes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceMap {
    /// First bitmap block.
    pub bitmap_start: u64,
    /// Entries in the area.
    pub size: u64,
    /// Entries in use (the number of set bits).
    pub used: u64,
    /// Where the next search starts (taken modulo `size`; any value is valid).
    pub hint: u64,
    /// Store id the bitmap blocks carry in their headers.
    pub store_id: u64,
    /// `Some(n)`: frees are deferred, `n` are pending (in the cache's pending list);
    /// `None`: a freed entry can be allocated again at once.
    pub deferred: Option<usize>,
}

/// Byte offset and mask of bit `i` within its bitmap block.
fn bit_pos(i: u64) -> (usize, u8) {
    let bit = i % BITS_PER_BITMAP;
    (HEADER_SIZE + (bit / 8) as usize, 1u8 << (bit % 8))
}

impl SpaceMap {
    fn pending(&self) -> usize {
        self.deferred.unwrap_or(0)
    }

    /// The cache slot of the bitmap block holding bit `i` (validated when read); `pin`:
    /// protect it from eviction for the operation in progress.
    fn bitmap_block<M: CacheMem>(
        &self,
        io: &mut impl BlockIo,
        cache: &mut Cache<M>,
        i: u64,
        pin: bool,
    ) -> Result<usize> {
        let blk = self.bitmap_start + i / BITS_PER_BITMAP;
        let (slot, fresh) = if pin {
            cache.get(io, blk)?
        } else {
            cache.get_unpinned(io, blk)?
        };
        if fresh {
            if let Err(e) =
                check_header(io, cache.data(slot), BlockType::Bitmap, blk, self.store_id)
            {
                cache.discard(slot);
                return Err(e);
            }
        }
        Ok(slot)
    }

    /// Whether entry `i` is allocated.
    pub fn is_allocated<M: CacheMem>(
        &self,
        io: &mut impl BlockIo,
        cache: &mut Cache<M>,
        i: u64,
    ) -> Result<bool> {
        let slot = self.bitmap_block(io, cache, i, true)?;
        let (byte, m) = bit_pos(i);
        Ok(cache.data(slot)[byte] & m != 0)
    }

    /// Allocates a free entry, next-fit from the hint; `None` if the area is full.  The
    /// bitmap blocks scanned on the way are not pinned in the cache (only the one that gets
    /// a bit set stays, dirty), so a search never depends on the cache size.
    pub fn alloc<M: CacheMem>(
        &mut self,
        io: &mut impl BlockIo,
        cache: &mut Cache<M>,
    ) -> Result<Option<u64>> {
        let total = self.size;
        let pending = self.pending();
        if total == 0 || self.used.saturating_add(pending as u64) >= total {
            return Ok(None);
        }
        let mut i = self.hint % total;
        let mut scanned = 0u64;
        while scanned <= total {
            let slot = self.bitmap_block(io, cache, i, false)?;
            let bit0 = i % BITS_PER_BITMAP;
            let end = bit0 + (BITS_PER_BITMAP - bit0).min(total - i);
            let mut bit = bit0;
            let mut found = None;
            while bit < end {
                if bit.is_multiple_of(64) && bit + 64 <= end {
                    let o = HEADER_SIZE + (bit / 8) as usize;
                    if get64(cache.data(slot), o) == u64::MAX {
                        bit += 64;
                        continue;
                    }
                }
                let byte = cache.data(slot)[HEADER_SIZE + (bit / 8) as usize];
                if byte & (1 << (bit % 8)) == 0 {
                    let c = i - bit0 + bit;
                    if !(self.deferred.is_some() && cache.pending()[..pending].contains(&c)) {
                        found = Some(c);
                        break;
                    }
                }
                bit += 1;
            }
            if let Some(c) = found {
                let (byte, m) = bit_pos(c);
                cache.data_mut(slot)[byte] |= m;
                self.used += 1;
                self.hint = c + 1;
                return Ok(Some(c));
            }
            scanned += end - bit0;
            i = (i + (end - bit0)) % total;
        }
        Ok(None)
    }

    /// Frees entry `i` (deferred: recorded as pending until the transaction commits).
    pub fn free<M: CacheMem>(
        &mut self,
        io: &mut impl BlockIo,
        cache: &mut Cache<M>,
        i: u64,
    ) -> Result<()> {
        if i >= self.size {
            // Pointers are validated against their area when read.
            return Err(Error::Bug("freeing an entry outside its area"));
        }
        if self.deferred.is_some() && self.pending() >= PENDING_MAX {
            // Callers commit before PENDING_MAX (before anything changes here).
            return Err(Error::Bug(
                "more deferred frees than one transaction may hold",
            ));
        }
        let slot = self.bitmap_block(io, cache, i, true)?;
        let (byte, m) = bit_pos(i);
        if cache.data(slot)[byte] & m == 0 {
            return Err(Error::Corrupt {
                block: cache.block_of(slot),
                what: "double free in allocation bitmap",
            });
        }
        cache.data_mut(slot)[byte] &= !m;
        self.used = self.used.saturating_sub(1);
        if let Some(n) = self.deferred {
            cache.pending()[n] = i;
            self.deferred = Some(n + 1);
        }
        Ok(())
    }
}

/// Writes the bitmap blocks of an empty area (`blocks` blocks from `start`), with the first
/// `set` entries marked in use.
pub fn format(
    io: &mut impl BlockIo,
    start: u64,
    blocks: u64,
    set: u64,
    store_id: u64,
    scratch: &mut Block,
) -> Result<()> {
    for i in 0..blocks {
        scratch.fill(0);
        init_header(scratch, BlockType::Bitmap, start + i, store_id);
        for e in i * BITS_PER_BITMAP..set.min((i + 1) * BITS_PER_BITMAP) {
            let (byte, m) = bit_pos(e);
            scratch[byte] |= m;
        }
        seal(io, scratch);
        io.write_block(start + i, scratch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::cache::VecMem as TestMem;
    use super::super::testing::TestDev;
    use super::*;
    use std::vec::Vec;

    const STORE: u64 = 0x5eed;

    /// A formatted space map of `size` entries (bitmap blocks from block 10).
    fn setup(size: u64, deferred: bool) -> (TestDev, Cache<TestMem>, SpaceMap) {
        let mut dev = TestDev::new(1000);
        let blocks = size.div_ceil(BITS_PER_BITMAP);
        let mut scratch = [0u8; BLOCK_SIZE];
        format(&mut dev, 10, blocks, 0, STORE, &mut scratch).unwrap();
        let cache = Cache::new(TestMem::new(32)).unwrap();
        let sm = SpaceMap {
            bitmap_start: 10,
            size,
            used: 0,
            hint: 0,
            store_id: STORE,
            deferred: deferred.then_some(0),
        };
        (dev, cache, sm)
    }

    fn alloc(dev: &mut TestDev, cache: &mut Cache<TestMem>, sm: &mut SpaceMap) -> Option<u64> {
        cache.begin_op();
        sm.alloc(dev, cache).unwrap()
    }

    #[test]
    fn allocates_in_order_until_full() {
        let (mut dev, mut cache, mut sm) = setup(100, false);
        let got: Vec<u64> = (0..100)
            .map(|_| alloc(&mut dev, &mut cache, &mut sm).unwrap())
            .collect();
        assert_eq!(got, (0..100).collect::<Vec<u64>>());
        assert_eq!(sm.used, 100);
        assert_eq!(alloc(&mut dev, &mut cache, &mut sm), None, "full");
        for i in [3, 97] {
            cache.begin_op();
            assert!(sm.is_allocated(&mut dev, &mut cache, i).unwrap());
        }
    }

    #[test]
    fn free_then_reuse_and_errors() {
        let (mut dev, mut cache, mut sm) = setup(100, false);
        for _ in 0..100 {
            alloc(&mut dev, &mut cache, &mut sm).unwrap();
        }
        cache.begin_op();
        sm.free(&mut dev, &mut cache, 42).unwrap();
        assert_eq!(sm.used, 99);
        assert!(!sm.is_allocated(&mut dev, &mut cache, 42).unwrap());
        // The hint (100) wraps to 0 and the search finds the hole.
        assert_eq!(alloc(&mut dev, &mut cache, &mut sm), Some(42));
        assert_eq!(sm.hint, 43);
        cache.begin_op();
        sm.free(&mut dev, &mut cache, 7).unwrap();
        let r = sm.free(&mut dev, &mut cache, 7);
        assert!(
            matches!(r, Err(Error::Corrupt { what, .. }) if what.contains("double free")),
            "{:?}",
            r
        );
        // Pointers are validated when read: one out of its area reaching `free` is a bug.
        let r = sm.free(&mut dev, &mut cache, 100);
        assert!(matches!(r, Err(Error::Bug(_))), "{:?}", r);
    }

    #[test]
    fn hint_wraps_around_the_end() {
        let (mut dev, mut cache, mut sm) = setup(100, false);
        sm.hint = 1095; // taken modulo the size: 95
        let got: Vec<u64> = (0..10)
            .map(|_| alloc(&mut dev, &mut cache, &mut sm).unwrap())
            .collect();
        assert_eq!(got, [95, 96, 97, 98, 99, 0, 1, 2, 3, 4]);
    }

    #[test]
    fn crosses_bitmap_blocks() {
        let size = BITS_PER_BITMAP + 100;
        let (mut dev, mut cache, mut sm) = setup(size, false);
        sm.hint = BITS_PER_BITMAP - 2;
        let got: Vec<u64> = (0..4)
            .map(|_| alloc(&mut dev, &mut cache, &mut sm).unwrap())
            .collect();
        let b = BITS_PER_BITMAP;
        assert_eq!(got, [b - 2, b - 1, b, b + 1]);
        // The bits landed in two different bitmap blocks.
        cache.begin_op();
        assert!(sm.is_allocated(&mut dev, &mut cache, b - 1).unwrap());
        assert!(sm.is_allocated(&mut dev, &mut cache, b).unwrap());
        assert!(!sm.is_allocated(&mut dev, &mut cache, b + 2).unwrap());
    }

    #[test]
    fn deferred_frees_wait_for_the_commit() {
        let (mut dev, mut cache, mut sm) = setup(10, true);
        for _ in 0..10 {
            alloc(&mut dev, &mut cache, &mut sm).unwrap();
        }
        cache.begin_op();
        sm.free(&mut dev, &mut cache, 4).unwrap();
        assert_eq!(sm.deferred, Some(1));
        assert_eq!(
            alloc(&mut dev, &mut cache, &mut sm),
            None,
            "freed but pending"
        );
        sm.deferred = Some(0); // the transaction committed
        assert_eq!(alloc(&mut dev, &mut cache, &mut sm), Some(4));
        sm.deferred = Some(PENDING_MAX);
        cache.begin_op();
        assert!(matches!(
            sm.free(&mut dev, &mut cache, 5),
            Err(Error::Bug(_))
        ));
    }

    #[test]
    fn rejects_a_damaged_bitmap_block() {
        let (mut dev, mut cache, mut sm) = setup(100, false);
        let mut b = dev.peek(10);
        b[100] ^= 1;
        dev.write_block(10, &b).unwrap();
        cache.begin_op();
        let r = sm.alloc(&mut dev, &mut cache);
        assert!(
            matches!(r, Err(Error::Corrupt { block: 10, .. })),
            "{:?}",
            r
        );
    }
}
