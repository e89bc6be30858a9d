//! A bounded write-back cache of metadata blocks.  Memory comes from the caller (`CacheMem`):
//! the kernel hands vmalloc'ed slots, userspace a Vec.  Dirty blocks stay until the journal
//! commits them; clean ones are evicted by a clock hand.  Blocks touched by the operation in
//! progress (same epoch) are never evicted, so an operation may hold several slot indices.

use super::block::{Block, BlockIo, Error, Result};

const NONE: u32 = u32::MAX;

/// The answer of a lookup that must not read from disk (it runs where blocking is not
/// allowed).  Not a failure: the caller asks again where it may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached<T> {
    /// Everything the answer needed was cached.
    Hit(T),
    /// A block the answer needs is not cached.
    Miss,
}

impl<T> Cached<T> {
    /// The answer `f` makes of a hit.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Cached<U> {
        match self {
            Cached::Hit(t) => Cached::Hit(f(t)),
            Cached::Miss => Cached::Miss,
        }
    }
}

/// Bookkeeping of one cache slot (the block data lives in a separate, page-aligned array so
/// that it can be handed to DMA).
#[derive(Clone, Copy)]
pub struct Slot {
    block: u64,
    next: u32,
    state: SlotState,
    referenced: bool,
    epoch: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Empty,
    /// Same as on disk.
    Clean,
    /// Changed by the open transaction.
    Dirty,
    /// Committed to the journal but not yet written home: written home before eviction
    /// and at the next checkpoint.
    Committed,
}

impl Slot {
    /// An empty slot.
    pub const fn new() -> Self {
        Slot {
            block: 0,
            next: NONE,
            state: SlotState::Empty,
            referenced: false,
            epoch: 0,
        }
    }
}

impl Default for Slot {
    fn default() -> Self {
        Self::new()
    }
}

/// Largest transaction, in metadata blocks: what the staging area below holds (and what one
/// journal descriptor can describe: `journal` checks it at compile time).
pub const MAX_TX_BLOCKS: usize = 240;

/// Scratch blocks the store needs besides the cache slots: two for replay and headers,
/// then a contiguous staging area for one journal transaction (descriptor + images).
pub const SCRATCH_BLOCKS: usize = 2 + MAX_TX_BLOCKS + 1;

/// The parts of the cache memory, borrowed together.
pub struct Parts<'a> {
    /// Block data: one per slot, then `SCRATCH_BLOCKS` scratch blocks.
    pub blocks: &'a mut [Block],
    /// Slot bookkeeping.
    pub slots: &'a mut [Slot],
    /// Hash buckets (length a power of two, at least the number of slots).
    pub buckets: &'a mut [u32],
    /// Data chunks freed by the open transaction (at least 1024 entries).
    pub pending: &'a mut [u64],
}

/// Memory for the cache and the store, supplied by the caller.
pub trait CacheMem {
    /// All parts at once.
    fn parts(&mut self) -> Parts<'_>;
    /// Block data, read-only.
    fn blocks(&self) -> &[Block];
    /// Slot bookkeeping, read-only.
    fn slots(&self) -> &[Slot];
}

/// The cache proper.
pub struct Cache<M: CacheMem> {
    mem: M,
    capacity: usize,
    hand: usize,
    epoch: u32,
    ndirty: usize,
    /// Blocks read from disk since creation (for statistics and tests).
    pub reads: u64,
}

fn hash(block: u64, nbuckets: usize) -> usize {
    (block.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & (nbuckets - 1)
}

impl<M: CacheMem> Cache<M> {
    /// Wraps caller-provided memory; fails if it is too small or badly shaped.
    pub fn new(mut mem: M) -> Result<Self> {
        let p = mem.parts();
        let (n, nb) = (p.slots.len(), p.buckets.len());
        // 32: what one operation on the deepest tree holds (see needs_commit), and room.
        if n < 32
            || n >= NONE as usize
            || nb < n
            || !nb.is_power_of_two()
            || p.blocks.len() != n + SCRATCH_BLOCKS
            || p.pending.len() < 1024
        {
            return Err(Error::Bug(
                "cache memory: need >= 32 slots, a block each plus scratch, power-of-two buckets",
            ));
        }
        for b in p.buckets.iter_mut() {
            *b = NONE;
        }
        for s in p.slots.iter_mut() {
            s.state = SlotState::Empty;
            s.next = NONE;
        }
        Ok(Cache {
            mem,
            capacity: n,
            hand: 0,
            epoch: 1,
            ndirty: 0,
            reads: 0,
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of dirty slots.
    pub fn ndirty(&self) -> usize {
        self.ndirty
    }

    /// Starts a new operation: blocks touched from now on are protected from eviction.
    pub fn begin_op(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
    }

    fn find(&mut self, block: u64) -> Option<usize> {
        let nb = self.mem.parts().buckets.len();
        let mut i = self.mem.parts().buckets[hash(block, nb)];
        while i != NONE {
            let s = &self.mem.slots()[i as usize];
            if s.block == block && s.state != SlotState::Empty {
                return Some(i as usize);
            }
            i = s.next;
        }
        None
    }

    fn unhash(&mut self, idx: usize) {
        let block = self.mem.parts().slots[idx].block;
        let nb = self.mem.parts().buckets.len();
        let h = hash(block, nb);
        let next = self.mem.parts().slots[idx].next;
        let mut i = self.mem.parts().buckets[h];
        if i as usize == idx {
            self.mem.parts().buckets[h] = next;
            return;
        }
        while i != NONE {
            let cur = i as usize;
            i = self.mem.parts().slots[cur].next;
            if i as usize == idx {
                self.mem.parts().slots[cur].next = next;
                return;
            }
        }
    }

    fn victim(&mut self, io: &mut impl BlockIo) -> Result<usize> {
        let n = self.capacity();
        for _ in 0..2 * n + 1 {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            let epoch = self.epoch;
            let s = &mut self.mem.parts().slots[i];
            match s.state {
                SlotState::Empty => return Ok(i),
                SlotState::Dirty => continue,
                SlotState::Clean | SlotState::Committed => {
                    if s.epoch == epoch {
                        continue;
                    }
                    if s.referenced {
                        s.referenced = false;
                        continue;
                    }
                    if s.state == SlotState::Committed {
                        // Journaled already: its home copy may be written at any time.
                        let p = self.mem.parts();
                        io.write_block(p.slots[i].block, &p.blocks[i])?;
                    }
                    self.unhash(i);
                    self.mem.parts().slots[i].state = SlotState::Empty;
                    return Ok(i);
                }
            }
        }
        Err(Error::CacheFull)
    }

    fn install(&mut self, idx: usize, block: u64) {
        let nb = self.mem.parts().buckets.len();
        let h = hash(block, nb);
        let head = self.mem.parts().buckets[h];
        let epoch = self.epoch;
        let s = &mut self.mem.parts().slots[idx];
        s.block = block;
        s.next = head;
        s.state = SlotState::Clean;
        s.referenced = true;
        s.epoch = epoch;
        self.mem.parts().buckets[h] = idx as u32;
    }

    fn touch(&mut self, idx: usize) {
        let epoch = self.epoch;
        let s = &mut self.mem.parts().slots[idx];
        s.referenced = true;
        s.epoch = epoch;
    }

    /// Returns the slot holding `block`, reading it if needed.  The bool is true when the
    /// block was just read from disk: the caller must validate it (and `discard` on failure).
    pub fn get(&mut self, io: &mut impl BlockIo, block: u64) -> Result<(usize, bool)> {
        if let Some(i) = self.get_cached(block) {
            return Ok((i, false));
        }
        let i = self.victim(io)?;
        io.read_block(block, &mut self.mem.parts().blocks[i])?;
        self.reads += 1;
        self.install(i, block);
        Ok((i, true))
    }

    /// As `get`, without reading: the slot holding `block`, if it is cached.
    pub fn get_cached(&mut self, block: u64) -> Option<usize> {
        let i = self.find(block)?;
        self.touch(i);
        Some(i)
    }

    /// As `get`, without protecting the block from eviction by the operation in
    /// progress (a block it already protects stays protected): for scans that look at many
    /// blocks and keep none.  The slot index is valid only until the next cache call.
    pub fn get_unpinned(&mut self, io: &mut impl BlockIo, block: u64) -> Result<(usize, bool)> {
        if let Some(i) = self.find(block) {
            self.mem.parts().slots[i].referenced = true;
            return Ok((i, false));
        }
        let i = self.victim(io)?;
        io.read_block(block, &mut self.mem.parts().blocks[i])?;
        self.reads += 1;
        self.install(i, block);
        let epoch = self.epoch.wrapping_sub(1);
        self.mem.parts().slots[i].epoch = epoch;
        Ok((i, true))
    }

    /// Returns a zeroed, dirty slot for a newly allocated block (no read).
    pub fn get_new(&mut self, io: &mut impl BlockIo, block: u64) -> Result<usize> {
        let i = match self.find(block) {
            Some(i) => i,
            None => {
                let i = self.victim(io)?;
                self.install(i, block);
                i
            }
        };
        self.touch(i);
        self.mem.parts().blocks[i].fill(0);
        self.mark_dirty(i);
        Ok(i)
    }

    /// Drops a slot whose content failed validation.
    pub fn discard(&mut self, idx: usize) {
        if self.mem.parts().slots[idx].state == SlotState::Dirty {
            self.ndirty -= 1;
        }
        self.unhash(idx);
        self.mem.parts().slots[idx].state = SlotState::Empty;
    }

    /// Drops every clean block (used after journal replay rewrote blocks behind the cache).
    pub fn drop_clean(&mut self) {
        for i in 0..self.capacity() {
            if self.mem.parts().slots[i].state == SlotState::Clean {
                self.discard(i);
            }
        }
    }

    /// The block in slot `idx`.
    pub fn data(&self, idx: usize) -> &Block {
        &self.mem.blocks()[idx]
    }

    /// The block in slot `idx`, for modification: marks it dirty.
    pub fn data_mut(&mut self, idx: usize) -> &mut Block {
        self.mark_dirty(idx);
        &mut self.mem.parts().blocks[idx]
    }

    /// Two distinct slots for modification (both marked dirty).
    pub fn data_mut2(&mut self, a: usize, b: usize) -> Result<(&mut Block, &mut Block)> {
        if a == b {
            return Err(Error::Corrupt {
                block: self.block_of(a),
                what: "one block reached as two btree nodes",
            });
        }
        self.mark_dirty(a);
        self.mark_dirty(b);
        let blocks = self.mem.parts().blocks;
        Ok(if a < b {
            let (x, y) = blocks.split_at_mut(b);
            (&mut x[a], &mut y[0])
        } else {
            let (x, y) = blocks.split_at_mut(a);
            (&mut y[0], &mut x[b])
        })
    }

    /// Whether `block` is cached.
    pub fn contains(&mut self, block: u64) -> bool {
        self.find(block).is_some()
    }

    fn mark_dirty(&mut self, idx: usize) {
        let s = &mut self.mem.parts().slots[idx];
        if s.state != SlotState::Dirty {
            s.state = SlotState::Dirty;
            self.ndirty += 1;
        }
    }

    /// Block number held by slot `idx`.
    pub fn block_of(&self, idx: usize) -> u64 {
        self.mem.slots()[idx].block
    }

    /// Calls `f` with the slot index of every dirty block, in slot order.
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn for_each_dirty(
        &mut self,
        mut f: impl FnMut(&mut Self, usize) -> Result<()>,
    ) -> Result<()> {
        for i in 0..self.capacity() {
            if self.mem.parts().slots[i].state == SlotState::Dirty {
                f(self, i)?;
            }
        }
        Ok(())
    }

    /// Mutable access to a dirty slot's data without changing its state (sealing).
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn raw_mut(&mut self, idx: usize) -> &mut Block {
        &mut self.mem.parts().blocks[idx]
    }

    /// Scratch block `i` (0 or 1), outside the cache proper.
    pub fn scratch(&mut self, i: usize) -> &mut Block {
        let n = self.capacity();
        &mut self.mem.parts().blocks[n + i]
    }

    /// Both scratch blocks.
    pub fn scratch2(&mut self) -> (&mut Block, &mut Block) {
        let n = self.capacity();
        let (a, b) = self.mem.parts().blocks[n..].split_at_mut(1);
        (&mut a[0], &mut b[0])
    }

    /// The list of data chunks freed in the open transaction.
    pub fn pending(&mut self) -> &mut [u64] {
        self.mem.parts().pending
    }

    /// Slot data and bookkeeping, plus the journal staging area (for the commit).
    pub fn commit_view(&mut self) -> (&mut [Block], &[Slot], &mut [Block]) {
        let p = self.mem.parts();
        let n = p.slots.len();
        let (blocks, rest) = p.blocks.split_at_mut(n);
        (blocks, p.slots, &mut rest[2..])
    }

    /// Whether slot `idx` is dirty.
    pub fn slot_dirty(s: &Slot) -> bool {
        s.state == SlotState::Dirty
    }

    /// Block number of a slot.
    pub fn slot_block(s: &Slot) -> u64 {
        s.block
    }

    /// Marks every dirty block committed (after the journal made them durable).
    pub fn mark_all_committed(&mut self) {
        for s in self.mem.parts().slots.iter_mut() {
            if s.state == SlotState::Dirty {
                s.state = SlotState::Committed;
            }
        }
        self.ndirty = 0;
    }

    /// Writes every committed block home (checkpoint); they become clean.
    pub fn write_committed(&mut self, io: &mut impl BlockIo) -> Result<()> {
        let p = self.mem.parts();
        for (s, b) in p.slots.iter_mut().zip(p.blocks.iter()) {
            if s.state == SlotState::Committed {
                io.write_block(s.block, b)?;
                s.state = SlotState::Clean;
            }
        }
        Ok(())
    }

    /// The staging area for one journal transaction.
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn staging(&mut self) -> &mut [Block] {
        let n = self.capacity();
        &mut self.mem.parts().blocks[n + 2..]
    }

    /// Forgets everything, dirty blocks included (after a failed commit the in-memory state
    /// is no longer trusted).
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn reset(&mut self) {
        for b in self.mem.parts().buckets.iter_mut() {
            *b = NONE;
        }
        for s in self.mem.parts().slots.iter_mut() {
            s.state = SlotState::Empty;
            s.next = NONE;
        }
        self.ndirty = 0;
    }

    /// The memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Gives the memory back.
    pub fn into_mem(self) -> M {
        self.mem
    }
}

/// Cache memory from the heap (userspace: the tools and the tests).
#[cfg(feature = "std")]
pub struct VecMem {
    blocks: std::vec::Vec<Block>,
    slots: std::vec::Vec<Slot>,
    buckets: std::vec::Vec<u32>,
    pending: std::vec::Vec<u64>,
}

#[cfg(feature = "std")]
impl VecMem {
    /// `n` slots of 4 KiB.
    pub fn new(n: usize) -> Self {
        VecMem {
            blocks: std::vec![[0u8; super::block::BLOCK_SIZE]; n + SCRATCH_BLOCKS],
            slots: std::vec![Slot::new(); n],
            buckets: std::vec![0; (2 * n).next_power_of_two()],
            pending: std::vec![0; super::space_map::PENDING_MAX],
        }
    }
}

#[cfg(feature = "std")]
impl CacheMem for VecMem {
    fn parts(&mut self) -> Parts<'_> {
        Parts {
            blocks: &mut self.blocks,
            slots: &mut self.slots,
            buckets: &mut self.buckets,
            pending: &mut self.pending,
        }
    }
    fn blocks(&self) -> &[Block] {
        &self.blocks
    }
    fn slots(&self) -> &[Slot] {
        &self.slots
    }
}
