//! The shared exception store: one btree of exceptions for all snapshots of an origin, a
//! journal, and allocation bitmaps, on one COW device.  `no_std`, no heap: the caller passes
//! the block I/O (`BlockIo`) and the cache memory (`CacheMem`).
//!
//! Transactions: mutating operations change cached blocks; `commit` journals them.  An
//! operation that returns a COW chunk to copy into expects the caller to finish that copy
//! before the next `commit` (the commit's leading flush makes it durable first).  When the
//! transaction is full, operations return `Step::CommitFirst` without changing anything:
//! commit and call again.  A failure of the persistent-data layer (I/O error, corruption, ...)
//! in the middle of an operation poisons the store: nothing more is committed, and reopening
//! replays the last committed state.

pub mod error;
pub mod exceptions;
pub mod format;
pub mod superblock;

/// The block cache: the kernel target and the tools supply its memory.
pub use crate::pdata::cache;
/// The journal (the checker reads it).
pub use crate::pdata::journal;
pub use cache::Cached;
pub use error::{Error, Result, Step};

use crate::pdata::space_map::{self, SpaceMap, PENDING_MAX};
use cache::{Cache, CacheMem};
use core::ops::DerefMut;
use exceptions as btree;
use exceptions::{Exception, NodeStore, Root};
use format::*;
use journal::{Journal, ReplayReport};
use superblock::*;

/// Most blocks one operation can dirty or hold in a tree of `depth` levels (the path, a
/// split at every level and a new root, metadata and data bitmap blocks); at most
/// `2 * MAX_DEPTH + 10`.
const fn op_max_dirty(depth: u32) -> usize {
    let d = if depth as usize > MAX_DEPTH {
        MAX_DEPTH
    } else {
        depth as usize
    };
    2 * d + 10
}

/// How far one step of the deletion sweep got.
enum DeleteLeaf {
    /// The leaf is done; the cursor moved to the next one.
    Next,
    /// The transaction is full: the same leaf is taken up again after a commit.
    Partial,
    /// The last leaf is done.
    Done,
}

/// What an origin write to a chunk requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginWrite {
    /// No live snapshot shares the chunk with the origin: write straight through.
    NoCopy,
    /// Copy the origin chunk to this COW chunk, commit, then write.
    Copy(u64),
    /// The COW device is full: these snapshot slots were invalidated instead.
    Invalidated(u64),
}

/// Where a snapshot's data for a chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The origin chunk (still shared with the origin).
    Origin,
    /// A COW chunk.
    Cow(u64),
}

/// What a snapshot write to a chunk requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapWrite {
    /// The snapshot owns this COW chunk alone: write in place.
    InPlace(u64),
    /// Copy `from` into COW chunk `to` (unless the write covers the whole chunk), then write
    /// there; commit before acknowledging.
    Copy {
        /// Current content.
        from: Source,
        /// The snapshot's new private chunk.
        to: u64,
    },
}

/// Parameters for `format`.
#[derive(Debug, Clone, Copy)]
pub struct FormatParams {
    /// Chunk size in sectors (power of two, 8..=2048).
    pub chunk_sectors: u32,
    /// Random, non-zero store id.
    pub store_id: u64,
    /// User-visible uuid.
    pub uuid: [u8; 16],
    /// Metadata area size in blocks (0: default).
    pub meta_blocks: u64,
}

/// Space and state summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Data chunks in use.
    pub data_used: u64,
    /// Data chunks in all.
    pub data_total: u64,
    /// Metadata blocks in use.
    pub meta_used: u64,
    /// Metadata blocks in all.
    pub meta_total: u64,
}

/// Which allocation area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// Metadata blocks.
    Meta,
    /// Data chunks.
    Data,
}

/// An open store.  `S` holds the decoded superblock (about 2 KiB: the caller puts it on the
/// heap, so that the store itself stays small on the kernel stack).
pub struct Store<D: BlockIo, M: CacheMem, S: DerefMut<Target = Super>> {
    io: D,
    cache: Cache<M>,
    sb: S,
    sb_dirty: bool,
    journal: Journal,
    poisoned: Option<Error>,
    npending: usize,
    readonly: bool,
    /// What the journal replay at open found.
    pub replay: ReplayReport,
}

fn account(snaps: &mut [SnapSlot; MAX_SNAPSHOTS], old: u64, new: u64) {
    if old.count_ones() == 1 {
        let s = &mut snaps[old.trailing_zeros() as usize];
        s.owned = s.owned.saturating_sub(1);
    }
    if new.count_ones() == 1 {
        let s = &mut snaps[new.trailing_zeros() as usize];
        s.owned = s.owned.saturating_add(1);
    }
}

/// Writes a fresh store on `io`.
pub fn format(io: &mut impl BlockIo, p: &FormatParams, scratch: &mut Block) -> Result<Super> {
    if p.store_id == 0 {
        return Err(Error::Invalid("store id must not be 0"));
    }
    let l = Layout::compute(io.size_blocks(), p.chunk_sectors, p.meta_blocks)?;
    // Bitmaps: all clear but the root leaf (first metadata block).
    space_map::format(
        io,
        l.meta_bitmap_start,
        l.meta_bitmap_blocks,
        1,
        p.store_id,
        scratch,
    )?;
    space_map::format(
        io,
        l.data_bitmap_start,
        l.data_bitmap_blocks,
        0,
        p.store_id,
        scratch,
    )?;
    scratch.fill(0);
    init_header(scratch, BlockType::Leaf, l.meta_start, p.store_id);
    btree::init_node(scratch, 0);
    seal(io, scratch);
    io.write_block(l.meta_start, scratch)?;
    // Invalidate whatever journal was there before.
    journal::format(io, l.journal_region(), p.store_id, scratch)?;
    let sb = Super {
        store_id: p.store_id,
        uuid: p.uuid,
        flags: 0,
        layout: l,
        meta_used: 1,
        data_used: 0,
        root: Root {
            block: l.meta_start,
            depth: 1,
        },
        delete_cursor: 0,
        next_seq: 1,
        alloc_hint: [0; 2],
        source_uuid: [0; 16],
        progress: Progress::NONE,
        snaps: [SnapSlot::default(); MAX_SNAPSHOTS],
    };
    sb.encode(scratch, STATE_BLOCK);
    seal(io, scratch);
    io.write_block(STATE_BLOCK, scratch)?;
    io.flush()?;
    // The superblock last: until it is durable the device is not a store.
    sb.encode(scratch, 0);
    seal(io, scratch);
    io.write_block(0, scratch)?;
    io.flush()?;
    Ok(sb)
}

impl<D: BlockIo, M: CacheMem, S: DerefMut<Target = Super>> Store<D, M, S> {
    /// Opens a store: validates the superblock, replays the journal, marks the store dirty.
    #[inline(never)]
    pub fn open(mut io: D, mem: M, sb: S) -> Result<Self> {
        let mut cache = Cache::new(mem)?;
        let (store_id, layout) = Self::read_identity(&mut io, &mut cache)?;
        let (journal, replay) = {
            let (a, b) = cache.scratch2();
            let home_ok = |b| layout.is_journalable(b);
            journal::replay(&mut io, layout.journal_region(), home_ok, store_id, a, b)?
        };
        let mut s = Self::loaded(io, cache, sb, journal, false, replay, store_id, &layout)?;
        s.cache.drop_clean();
        s.sb.flags |= SB_DIRTY;
        s.sb_dirty = true;
        s.commit()?;
        Ok(s)
    }

    /// Opens a store without writing anything (no replay, no dirty flag, no header): fails
    /// with `NeedsReplay` if the journal holds transactions replay would apply.  Lookups
    /// work; every mutation (and a commit with changes) fails with `ReadOnly`; `close`
    /// writes nothing.
    #[inline(never)]
    pub fn open_readonly(mut io: D, mem: M, sb: S) -> Result<Self> {
        let mut cache = Cache::new(mem)?;
        let (store_id, layout) = Self::read_identity(&mut io, &mut cache)?;
        let (journal, pending) = {
            let (a, b) = cache.scratch2();
            let home_ok = |b| layout.is_journalable(b);
            journal::needs_replay(&mut io, layout.journal_region(), home_ok, store_id, a, b)?
        };
        if pending {
            return Err(Error::NeedsReplay);
        }
        let report = ReplayReport::default();
        Self::loaded(io, cache, sb, journal, true, report, store_id, &layout)
    }

    /// Whether the store was opened read-only.
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// The store over an opened journal, with its state block loaded.
    #[expect(
        clippy::too_many_arguments,
        reason = "what the two kinds of open have each prepared for the one constructor"
    )]
    fn loaded(
        io: D,
        cache: Cache<M>,
        sb: S,
        journal: Journal,
        readonly: bool,
        replay: ReplayReport,
        store_id: u64,
        layout: &Layout,
    ) -> Result<Self> {
        let mut s = Store {
            io,
            cache,
            sb,
            sb_dirty: false,
            journal,
            poisoned: None,
            npending: 0,
            readonly,
            replay,
        };
        s.load_state(store_id, layout)?;
        Ok(s)
    }

    /// Store id and layout from the (static) superblock.
    #[inline(never)]
    fn read_identity(io: &mut D, cache: &mut Cache<M>) -> Result<(u64, Layout)> {
        let scratch = cache.scratch(0);
        io.read_block(0, scratch)?;
        Super::decode_identity(io, scratch, io.size_blocks())
    }

    /// The state block, after replay; it must agree with the superblock.
    #[inline(never)]
    fn load_state(&mut self, store_id: u64, layout: &Layout) -> Result<()> {
        let scratch = self.cache.scratch(0);
        self.io.read_block(STATE_BLOCK, scratch)?;
        let dev = self.io.size_blocks();
        Super::decode_into(&self.io, scratch, STATE_BLOCK, dev, &mut self.sb)?;
        if self.sb.store_id != store_id || self.sb.layout != *layout {
            return Err(PdataError::Corrupt {
                block: STATE_BLOCK,
                what: "state block disagrees with the superblock",
            }
            .into());
        }
        Ok(())
    }

    /// Commits, marks the store clean, and checkpoints.  Returns the I/O object and memory.
    pub fn close(mut self) -> Result<(D, M, S)> {
        if self.readonly {
            // Nothing was changed (mutations fail): nothing to write.
            return Ok((self.io, self.cache.into_mem(), self.sb));
        }
        self.commit()?;
        self.sb.flags &= !SB_DIRTY;
        self.sb_dirty = true;
        self.commit()?;
        journal::checkpoint(
            &mut self.io,
            &mut self.cache,
            &mut self.journal,
            self.sb.store_id,
        )?;
        Ok((self.io, self.cache.into_mem(), self.sb))
    }

    /// Gives back the I/O object and memory without committing (simulated crash).
    pub fn abandon(self) -> (D, M, S) {
        (self.io, self.cache.into_mem(), self.sb)
    }

    /// The superblock as it stands in memory (committed or not).
    pub fn sb(&self) -> &Super {
        &self.sb
    }

    /// The I/O object.
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn io(&mut self) -> &mut D {
        &mut self.io
    }

    /// The I/O object, shared.
    pub fn io_ref(&self) -> &D {
        &self.io
    }

    /// The journal state.
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The cache memory (for accounting).
    pub fn mem(&self) -> &M {
        self.cache.mem()
    }

    /// Metadata blocks read from disk so far.
    pub fn cache_reads(&self) -> u64 {
        self.cache.reads
    }

    /// Set after an error that left memory inconsistent with disk.
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn poisoned(&self) -> Option<Error> {
        self.poisoned
    }

    /// Space summary.
    pub fn usage(&self) -> Usage {
        Usage {
            data_used: self.sb.data_used,
            data_total: self.sb.layout.data_chunks,
            meta_used: self.sb.meta_used,
            meta_total: self.sb.layout.meta_blocks,
        }
    }

    /// Whether there is uncommitted state.
    pub fn is_dirty(&self) -> bool {
        self.sb_dirty || self.cache.ndirty() > 0
    }

    /// Whether the transaction is too full for another operation.
    pub fn needs_commit(&self) -> bool {
        self.cache.ndirty() + self.op_max() + 1 > self.tx_limit()
            || self.npending + btree::LEAF_CAP > PENDING_MAX
    }

    fn op_max(&self) -> usize {
        op_max_dirty(self.sb.root.depth)
    }

    /// Most dirty blocks a transaction may reach (the state block included): what the
    /// journal descriptor holds, and what the cache can keep while an operation runs.  Half
    /// of a large cache stays for clean blocks; a small one gives room for two operations.
    fn tx_limit(&self) -> usize {
        let cap = self.cache.capacity();
        MAX_TX_BLOCKS.min((cap / 2).max(2 * self.op_max() + 2).min(cap))
    }

    fn check_usable(&self) -> Result<()> {
        if let Some(e) = self.poisoned {
            return Err(e);
        }
        Ok(())
    }

    /// Starts a mutation, unless the transaction is too full for one (`CommitFirst`).
    fn begin(&mut self) -> Result<Step<()>> {
        self.check_usable()?;
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        if self.needs_commit() {
            return Ok(Step::CommitFirst);
        }
        self.cache.begin_op();
        Ok(Step::Done(()))
    }

    /// Runs a mutation; failures of the persistent-data layer can leave memory half-updated:
    /// they poison the store.
    fn guard<T, E: Into<Error>>(&mut self, r: core::result::Result<T, E>) -> Result<T> {
        r.map_err(|e| {
            let e = e.into();
            if let Error::Pdata(_) = e {
                self.poisoned = Some(e);
            }
            e
        })
    }

    /// Commits the current transaction through the journal.
    #[inline(never)]
    pub fn commit(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.readonly {
            return if self.is_dirty() {
                Err(Error::ReadOnly)
            } else {
                Ok(())
            };
        }
        if self.sb_dirty {
            self.cache.begin_op();
            let r = self.cache.get_new(&mut self.io, STATE_BLOCK);
            let slot = self.guard(r)?;
            self.sb.encode(self.cache.data_mut(slot), STATE_BLOCK);
        }
        let r = journal::commit(
            &mut self.io,
            &mut self.cache,
            &mut self.journal,
            self.sb.store_id,
        );
        self.guard(r)?;
        self.sb_dirty = false;
        self.npending = 0;
        Ok(())
    }

    // ---- allocation ----------------------------------------------------------------------

    /// The space map of `area`, as the state block and the open transaction leave it.
    fn space_map(&self, area: Area) -> SpaceMap {
        let l = &self.sb.layout;
        let (bitmap_start, size, used, deferred) = match area {
            Area::Meta => (l.meta_bitmap_start, l.meta_blocks, self.sb.meta_used, None),
            Area::Data => (
                l.data_bitmap_start,
                l.data_chunks,
                self.sb.data_used,
                Some(self.npending),
            ),
        };
        SpaceMap {
            bitmap_start,
            size,
            used,
            hint: self.sb.alloc_hint[area as usize],
            store_id: self.sb.store_id,
            deferred,
        }
    }

    /// Stores back what a space-map operation changed.
    fn put_space_map(&mut self, area: Area, sm: &SpaceMap) {
        match area {
            Area::Meta => self.sb.meta_used = sm.used,
            Area::Data => self.sb.data_used = sm.used,
        }
        self.sb.alloc_hint[area as usize] = sm.hint;
        if let Some(n) = sm.deferred {
            self.npending = n;
        }
        self.sb_dirty = true;
    }

    /// Whether bit `i` of `area` is set (allocated).
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn is_allocated(&mut self, area: Area, i: u64) -> Result<bool> {
        let sm = self.space_map(area);
        Ok(sm.is_allocated(&mut self.io, &mut self.cache, i)?)
    }

    /// Next-fit allocation from the hint persisted in the state block (`SpaceMap::alloc`);
    /// `None`: the area is full.
    fn alloc(&mut self, area: Area) -> PdataResult<Option<u64>> {
        let mut sm = self.space_map(area);
        let c = sm.alloc(&mut self.io, &mut self.cache)?;
        if c.is_some() {
            self.put_space_map(area, &sm);
        }
        Ok(c)
    }

    fn free(&mut self, area: Area, i: u64) -> PdataResult<()> {
        let mut sm = self.space_map(area);
        sm.free(&mut self.io, &mut self.cache, i)?;
        self.put_space_map(area, &sm);
        Ok(())
    }

    // ---- lookups -------------------------------------------------------------------------

    /// Calls `f` for every exception of `chunk`.
    pub fn exceptions_of(&mut self, chunk: u64, f: impl FnMut(&Exception)) -> Result<()> {
        blocking(self.scan(chunk, false, f))
    }

    /// `exceptions_of`; `cached_only`: read nothing from disk (`Miss` instead).
    fn scan(
        &mut self,
        chunk: u64,
        cached_only: bool,
        mut f: impl FnMut(&Exception),
    ) -> Result<Cached<()>> {
        self.check_usable()?;
        self.cache.begin_op();
        let root = self.sb.root;
        let path = if cached_only {
            match btree::find_cached_leaf(self, root, chunk)? {
                Cached::Hit(path) => path,
                Cached::Miss => return Ok(Cached::Miss),
            }
        } else {
            btree::find_leaf(self, root, chunk)?
        };
        let b = self.cache.data(path.leaf.1);
        let (s, e) = btree::chunk_range(b, chunk);
        for i in s..e {
            f(&btree::leaf_entry(b, i));
        }
        Ok(Cached::Hit(()))
    }

    /// Where snapshot `slot` reads `chunk` from.
    pub fn lookup(&mut self, chunk: u64, slot: usize) -> Result<Source> {
        blocking(self.lookup_in(chunk, slot, false))
    }

    /// As `lookup`, without reading metadata from disk.
    pub fn lookup_cached(&mut self, chunk: u64, slot: usize) -> Result<Cached<Source>> {
        self.lookup_in(chunk, slot, true)
    }

    fn lookup_in(&mut self, chunk: u64, slot: usize, cached_only: bool) -> Result<Cached<Source>> {
        if slot >= MAX_SNAPSHOTS || self.sb.snaps[slot].flags & SNAP_LIVE == 0 {
            return Err(Error::NoSuchSnapshot);
        }
        if self.sb.snaps[slot].flags & SNAP_INVALID != 0 {
            return Err(Error::SnapshotInvalid);
        }
        let bit = 1u64 << slot;
        let mut src = Source::Origin;
        let r = self.scan(chunk, cached_only, |e| {
            if e.share & bit != 0 {
                src = Source::Cow(e.cow);
            }
        })?;
        Ok(r.map(|()| src))
    }

    /// The delta between snapshots `a` and `b` (slots): calls `f` with every chunk at or after
    /// `start` that they read from different places (both from the origin, or both from one
    /// exception, is the same place), in increasing order, visiting at most `max_leaves`
    /// leaves.  Only chunks with exceptions can differ, so the cost is the exceptions visited.
    /// `f` returns false to stop before the chunk it is given.  Returns where to continue
    /// (`None`: the delta is complete).
    pub fn delta(
        &mut self,
        a: usize,
        b: usize,
        start: u64,
        max_leaves: usize,
        mut f: impl FnMut(u64) -> bool,
    ) -> Result<Option<u64>> {
        self.check_usable()?;
        for slot in [a, b] {
            let s = self.sb.snaps.get(slot).ok_or(Error::NoSuchSnapshot)?;
            if !s.is_live() {
                return Err(Error::NoSuchSnapshot);
            }
            if s.is_invalid() {
                return Err(Error::SnapshotInvalid);
            }
        }
        let (bit_a, bit_b) = (1u64 << a, 1u64 << b);
        let mut key = start;
        for _ in 0..max_leaves {
            self.cache.begin_op();
            let path = btree::find_leaf(self, self.sb.root, key)?;
            let leaf = self.cache.data(path.leaf.1);
            let n = btree::count(leaf);
            let mut i = btree::chunk_range(leaf, key).0;
            while i < n {
                let chunk = btree::leaf_entry(leaf, i).chunk;
                let (mut from_a, mut from_b) = (None, None);
                while i < n && btree::leaf_entry(leaf, i).chunk == chunk {
                    let e = btree::leaf_entry(leaf, i);
                    if e.share & bit_a != 0 {
                        from_a = Some(e.cow);
                    }
                    if e.share & bit_b != 0 {
                        from_b = Some(e.cow);
                    }
                    i += 1;
                }
                if from_a != from_b && !f(chunk) {
                    return Ok(Some(chunk));
                }
            }
            match path.upper {
                Some(u) => key = u,
                None => return Ok(None),
            }
        }
        Ok(Some(key))
    }

    /// The COW chunk snapshot `slot` owns alone for `chunk` (an exception whose share is
    /// exactly its bit: a write goes there in place), if any; reads nothing from disk.
    pub fn owned_alone_cached(&mut self, chunk: u64, slot: usize) -> Result<Cached<Option<u64>>> {
        let bit = 1u64 << slot;
        let mut own = None;
        let r = self.scan(chunk, true, |e| {
            if e.share == bit {
                own = Some(e.cow);
            }
        })?;
        Ok(r.map(|()| own))
    }

    /// Bitmap of valid live snapshots that still share `chunk` with the origin.
    pub fn origin_sharers(&mut self, chunk: u64) -> Result<u64> {
        blocking(self.origin_sharers_in(chunk, false))
    }

    /// As `origin_sharers`, without reading metadata from disk.
    pub fn origin_sharers_cached(&mut self, chunk: u64) -> Result<Cached<u64>> {
        self.origin_sharers_in(chunk, true)
    }

    fn origin_sharers_in(&mut self, chunk: u64, cached_only: bool) -> Result<Cached<u64>> {
        let live = self.sb.valid_mask();
        if live == 0 {
            return Ok(Cached::Hit(0));
        }
        let mut copied = 0u64;
        let r = self.scan(chunk, cached_only, |e| copied |= e.share)?;
        Ok(r.map(|()| live & !copied))
    }

    // ---- mutations -----------------------------------------------------------------------

    fn insert_exception(&mut self, e: Exception) -> PdataResult<()> {
        let mut root = self.sb.root;
        let r = btree::insert(self, &mut root, e);
        if root != self.sb.root {
            self.sb.root = root;
            self.sb_dirty = true;
        }
        r?;
        account(&mut self.sb.snaps, 0, e.share);
        Ok(())
    }

    /// Sets the share bitmap of exception (chunk, cow); removes it (and frees its chunk) when
    /// the bitmap becomes empty.
    fn set_share(&mut self, chunk: u64, cow: u64, share: u64) -> PdataResult<()> {
        let mut root = self.sb.root;
        let path = btree::find_leaf(self, root, chunk)?;
        let lslot = path.leaf.1;
        let (s, e) = btree::chunk_range(self.cache.data(lslot), chunk);
        let Some(i) = (s..e).find(|&i| btree::leaf_entry(self.cache.data(lslot), i).cow == cow)
        else {
            // The caller found it in this leaf.
            return Err(PdataError::Bug("no such exception"));
        };
        let old = btree::leaf_entry(self.cache.data(lslot), i).share;
        account(&mut self.sb.snaps, old, share);
        if share != 0 {
            btree::set_leaf_share(self.cache.data_mut(lslot), i, share);
            return Ok(());
        }
        let r = btree::remove_at(self, &mut root, &path, i);
        if root != self.sb.root {
            self.sb.root = root;
            self.sb_dirty = true;
        }
        r?;
        self.free(Area::Data, cow)
    }

    fn meta_room(&self) -> Result<()> {
        if self.sb.layout.meta_blocks.saturating_sub(self.sb.meta_used)
            < self.sb.root.depth as u64 + 3
        {
            return Err(Error::NoMetaSpace);
        }
        Ok(())
    }

    fn invalidate_mask(&mut self, mask: u64) {
        for i in 0..MAX_SNAPSHOTS {
            if mask & (1 << i) != 0 && self.sb.snaps[i].flags & SNAP_LIVE != 0 {
                self.sb.snaps[i].flags |= SNAP_INVALID;
                self.sb_dirty = true;
            }
        }
    }

    /// Marks snapshots invalid (for example after an I/O error on their data).
    pub fn invalidate(&mut self, mask: u64) -> Result<()> {
        self.check_usable()?;
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        self.invalidate_mask(mask);
        Ok(())
    }

    /// Prepares an origin write to `chunk`: records one exception for every snapshot still
    /// sharing the chunk, whatever their number.
    pub fn origin_write(&mut self, chunk: u64) -> Result<Step<OriginWrite>> {
        let Step::Done(()) = self.begin()? else {
            return Ok(Step::CommitFirst);
        };
        let sharers = self.origin_sharers(chunk);
        let sharers = self.guard(sharers)?;
        if sharers == 0 {
            return Ok(Step::Done(OriginWrite::NoCopy));
        }
        self.meta_room()?;
        let r = self.alloc(Area::Data);
        let Some(cow) = self.guard(r)? else {
            self.invalidate_mask(sharers);
            return Ok(Step::Done(OriginWrite::Invalidated(sharers)));
        };
        let r = self.insert_exception(Exception {
            chunk,
            cow,
            share: sharers,
        });
        self.guard(r)?;
        Ok(Step::Done(OriginWrite::Copy(cow)))
    }

    /// Prepares a write by snapshot `slot` to `chunk`.
    pub fn snapshot_write(&mut self, chunk: u64, slot: usize) -> Result<Step<SnapWrite>> {
        let Step::Done(()) = self.begin()? else {
            return Ok(Step::CommitFirst);
        };
        let src = self.lookup(chunk, slot);
        let src = self.guard(src)?;
        let bit = 1u64 << slot;
        let mut share = 0;
        if let Source::Cow(c) = src {
            self.exceptions_of(chunk, |e| {
                if e.cow == c {
                    share = e.share;
                }
            })?;
            if share == bit {
                return Ok(Step::Done(SnapWrite::InPlace(c)));
            }
        }
        self.meta_room()?;
        let r = self.alloc(Area::Data);
        let Some(to) = self.guard(r)? else {
            self.invalidate_mask(bit);
            return Err(Error::NoDataSpace);
        };
        let r = (|| {
            if let Source::Cow(c) = src {
                self.set_share(chunk, c, share & !bit)?;
            }
            self.insert_exception(Exception {
                chunk,
                cow: to,
                share: bit,
            })
        })();
        self.guard(r)?;
        Ok(Step::Done(SnapWrite::Copy { from: src, to }))
    }

    /// Creates snapshot `id` of the origin as it is now; returns its slot.
    pub fn create_snapshot(&mut self, id: u32) -> Result<Step<usize>> {
        self.create(id, None)
    }

    /// Creates snapshot `id` as a replica: a complete copy of snapshot `source_seq` (its
    /// creation sequence) of the store `source_uuid`, which becomes the replication source
    /// (if it was another store, the other snapshots stop being replicas).  Clears the
    /// receive progress: the transfer it tracked is complete.
    pub fn create_replica(
        &mut self,
        id: u32,
        source_uuid: [u8; 16],
        source_seq: u64,
    ) -> Result<Step<usize>> {
        if source_uuid == [0; 16] || source_seq == 0 {
            return Err(Error::Invalid("replication source identity"));
        }
        self.create(id, Some((source_uuid, source_seq)))
    }

    fn create(&mut self, id: u32, source: Option<([u8; 16], u64)>) -> Result<Step<usize>> {
        let Step::Done(()) = self.begin()? else {
            return Ok(Step::CommitFirst);
        };
        if self.sb.slot_of(id).is_some() {
            return Err(Error::DuplicateId);
        }
        let Some(slot) = self.sb.snaps.iter().position(|s| s.flags == 0) else {
            return Err(Error::TooManySnapshots);
        };
        let Some(next) = self.sb.next_seq.checked_add(1) else {
            return Err(PdataError::Corrupt {
                block: STATE_BLOCK,
                what: "creation sequence number out of range",
            }
            .into());
        };
        self.sb.snaps[slot] = SnapSlot {
            id,
            flags: SNAP_LIVE,
            create_seq: self.sb.next_seq,
            owned: 0,
            source_seq: 0,
        };
        self.sb.next_seq = next;
        if let Some((uuid, seq)) = source {
            if self.sb.source_uuid != uuid {
                for s in self.sb.snaps.iter_mut() {
                    s.source_seq = 0;
                }
                self.sb.source_uuid = uuid;
            }
            self.sb.snaps[slot].source_seq = seq;
            self.sb.progress = Progress::NONE;
        }
        self.sb_dirty = true;
        Ok(Step::Done(slot))
    }

    /// Records the receive progress (`Progress::MAX` bytes at most; empty: none).
    pub fn set_progress(&mut self, bytes: &[u8]) -> Result<Step<()>> {
        let Some(p) = Progress::new(bytes) else {
            return Err(Error::Invalid("receive progress too long"));
        };
        let Step::Done(()) = self.begin()? else {
            return Ok(Step::CommitFirst);
        };
        self.sb.progress = p;
        self.sb_dirty = true;
        Ok(Step::Done(()))
    }

    /// Deletes snapshot `id`: it disappears at once; its exceptions are released by
    /// `delete_step`.
    pub fn delete_snapshot(&mut self, id: u32) -> Result<Step<()>> {
        let Step::Done(()) = self.begin()? else {
            return Ok(Step::CommitFirst);
        };
        let Some(slot) = self.sb.slot_of(id) else {
            return Err(Error::NoSuchSnapshot);
        };
        self.sb.snaps[slot].flags = SNAP_DELETING;
        self.sb.snaps[slot].source_seq = 0;
        self.sb.delete_cursor = 0;
        self.sb_dirty = true;
        Ok(Step::Done(()))
    }

    /// Whether deleted snapshots still have exceptions to release.
    pub fn delete_pending(&self) -> bool {
        self.sb.mask(SNAP_DELETING) != 0
    }

    /// Releases deleted snapshots' exceptions, at most `max_leaves` leaves per call.
    /// Returns true while work remains (commit between calls when `needs_commit`).
    pub fn delete_step(&mut self, max_leaves: usize) -> Result<bool> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        let gone = self.sb.mask(SNAP_DELETING);
        if gone == 0 {
            return Ok(false);
        }
        for _ in 0..max_leaves {
            if let Step::CommitFirst = self.begin()? {
                return Ok(true);
            }
            let r = self.delete_leaf(gone);
            match self.guard(r)? {
                DeleteLeaf::Next => continue,
                // Commit (`needs_commit` says so), then call again.
                DeleteLeaf::Partial => return Ok(true),
                DeleteLeaf::Done => {}
            }
            for s in self.sb.snaps.iter_mut() {
                if s.flags & SNAP_DELETING != 0 {
                    *s = SnapSlot::default();
                }
            }
            self.sb.delete_cursor = 0;
            self.sb_dirty = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn delete_leaf(&mut self, gone: u64) -> PdataResult<DeleteLeaf> {
        let cursor = self.sb.delete_cursor;
        let mut root = self.sb.root;
        let path = btree::find_leaf(self, root, cursor)?;
        let lslot = path.leaf.1;
        let mut i = btree::count(self.cache.data(lslot));
        while i > 0 {
            i -= 1;
            let e = btree::leaf_entry(self.cache.data(lslot), i);
            if e.chunk < cursor || e.share & gone == 0 {
                continue;
            }
            if self.needs_commit() {
                // The transaction is as full as one operation may leave it (each entry
                // dirties at most its bitmap block besides the leaf; the prune below fits
                // in what one operation may add): stop here, this leaf is taken up again
                // after the commit (entries done no longer name a deleted snapshot).
                return Ok(DeleteLeaf::Partial);
            }
            let new = e.share & !gone;
            account(&mut self.sb.snaps, e.share, new);
            if new != 0 {
                btree::set_leaf_share(self.cache.data_mut(lslot), i, new);
            } else {
                btree::leaf_remove(self.cache.data_mut(lslot), i);
                self.free(Area::Data, e.cow)?;
            }
        }
        if btree::count(self.cache.data(lslot)) == 0 {
            btree::prune(self, &mut root, &path)?;
        }
        self.sb.root = root;
        self.sb_dirty = true;
        match path.upper {
            Some(u) => {
                self.sb.delete_cursor = u;
                Ok(DeleteLeaf::Next)
            }
            None => Ok(DeleteLeaf::Done),
        }
    }
}

/// The answer of a lookup run where it may block (never `Miss`).
fn blocking<T>(r: Result<Cached<T>>) -> Result<T> {
    match r? {
        Cached::Hit(t) => Ok(t),
        Cached::Miss => Err(PdataError::Bug("a blocking lookup missed the cache").into()),
    }
}

impl<D: BlockIo, M: CacheMem, S: DerefMut<Target = Super>> Store<D, M, S> {
    /// Checks a btree pointer before it is followed.
    fn check_node_ptr(&self, block: u64) -> PdataResult<()> {
        if !self.sb.layout.is_meta(block) {
            return Err(PdataError::Corrupt {
                block,
                what: "btree pointer outside the metadata area",
            });
        }
        Ok(())
    }

    /// Validates node `block` in cache slot `slot`, expected at `level`: all of it when it
    /// was just read (`fresh`; dropped from the cache if bad), else its level and type.
    fn loaded_node(
        &mut self,
        slot: usize,
        fresh: bool,
        block: u64,
        level: u16,
    ) -> PdataResult<usize> {
        let l = self.sb.layout;
        if fresh {
            let b = self.cache.data(slot);
            let r = check_header(
                &self.io,
                b,
                btree::node_type(level),
                block,
                self.sb.store_id,
            )
            .and_then(|_| btree::validate_node(b, block, level, |c| l.is_meta(c), l.data_chunks));
            if let Err(e) = r {
                self.cache.discard(slot);
                return Err(e);
            }
        } else if btree::level(self.cache.data(slot)) != level
            || format::header_type(self.cache.data(slot)) != btree::node_type(level).tag()
        {
            return Err(PdataError::Corrupt {
                block,
                what: "btree node reached at the wrong level",
            });
        }
        Ok(slot)
    }
}

impl<D: BlockIo, M: CacheMem, S: DerefMut<Target = Super>> NodeStore for Store<D, M, S> {
    fn node(&mut self, block: u64, level: u16) -> PdataResult<usize> {
        self.check_node_ptr(block)?;
        let (slot, fresh) = self.cache.get(&mut self.io, block)?;
        self.loaded_node(slot, fresh, block, level)
    }

    fn cached_node(&mut self, block: u64, level: u16) -> PdataResult<Cached<usize>> {
        self.check_node_ptr(block)?;
        match self.cache.get_cached(block) {
            Some(slot) => self.loaded_node(slot, false, block, level).map(Cached::Hit),
            None => Ok(Cached::Miss),
        }
    }

    fn nb(&self, slot: usize) -> &Block {
        self.cache.data(slot)
    }

    fn nb_mut(&mut self, slot: usize) -> &mut Block {
        self.cache.data_mut(slot)
    }

    fn nb_mut2(&mut self, a: usize, b: usize) -> PdataResult<(&mut Block, &mut Block)> {
        self.cache.data_mut2(a, b)
    }

    fn alloc_node(&mut self, level: u16) -> PdataResult<(u64, usize)> {
        let i = self.alloc(Area::Meta)?.ok_or(PdataError::NoSpace)?;
        let blk = self.sb.layout.meta_start + i;
        if self.cache.contains(blk) {
            // A block the operation holds cannot be free: the bitmap is wrong.
            return Err(PdataError::Corrupt {
                block: blk,
                what: "metadata bitmap marks a block in use as free",
            });
        }
        let slot = self.cache.get_new(&mut self.io, blk)?;
        let b = self.cache.data_mut(slot);
        init_header(b, btree::node_type(level), blk, self.sb.store_id);
        btree::init_node(b, level);
        Ok((blk, slot))
    }

    fn free_node(&mut self, block: u64) -> PdataResult<()> {
        let Some(i) = block.checked_sub(self.sb.layout.meta_start) else {
            return Err(PdataError::Corrupt {
                block,
                what: "freeing a block outside the metadata area",
            });
        };
        self.free(Area::Meta, i)
    }

    fn meta_free(&self) -> u64 {
        self.sb.layout.meta_blocks.saturating_sub(self.sb.meta_used)
    }
}
