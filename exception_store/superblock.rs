//! The superblock (block 0) and the journal header (block 1): layout of the COW device,
//! space counters, btree root, and the 64 snapshot slots.

use super::exceptions::Root;
use super::format::*;
// JournalHeader: for the tools (the kernel target does not use it).
#[cfg_attr(not(feature = "std"), expect(unused_imports, reason = "for the tools"))]
pub use crate::pdata::journal::JournalHeader;
use crate::pdata::journal::Region;
pub use crate::pdata::journal::MAX_TX_BLOCKS;
pub use crate::pdata::space_map::BITS_PER_BITMAP;

/// Snapshot slot flag: the slot holds a live snapshot.
pub const SNAP_LIVE: u32 = 1;
/// Snapshot slot flag: the snapshot lost data (COW full, I/O error) and fails all I/O.
pub const SNAP_INVALID: u32 = 2;
/// Snapshot slot flag: deleted; its bit is being cleared from the btree.
pub const SNAP_DELETING: u32 = 4;
const SNAP_KNOWN: u32 = SNAP_LIVE | SNAP_INVALID | SNAP_DELETING;

/// Superblock flag: the store was not closed cleanly.
pub const SB_DIRTY: u32 = 1;

/// Block number of the state block.
pub const STATE_BLOCK: u64 = 3;
/// First journal block.
pub const JOURNAL_START: u64 = 4;

/// Smallest journal accepted.
pub const MIN_JOURNAL_BLOCKS: u64 = 2 * (MAX_TX_BLOCKS as u64 + 1) + 2;

/// One snapshot slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapSlot {
    /// User-visible id.
    pub id: u32,
    /// SNAP_* flags; 0 = free slot.
    pub flags: u32,
    /// Creation sequence number (orders snapshots).
    pub create_seq: u64,
    /// Exceptions this snapshot owns alone.
    pub owned: u64,
    /// Replication: the creation sequence of the snapshot of the replication source store
    /// (`Super::source_uuid`) this snapshot is a complete copy of; 0: not a replica.
    pub source_seq: u64,
}

impl SnapSlot {
    /// Whether the slot holds a live snapshot (invalid or not).
    pub fn is_live(&self) -> bool {
        self.flags & SNAP_LIVE != 0
    }

    /// Whether the snapshot was invalidated (it fails all I/O).
    pub fn is_invalid(&self) -> bool {
        self.flags & SNAP_INVALID != 0
    }
}

/// Receive progress: up to `Progress::MAX` opaque bytes the store keeps for the replication
/// receiver (its resume token), committed like any other state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes in use (at most `MAX` in a valid store; checked when decoded).
    len: u32,
    bytes: [u8; Progress::MAX],
}

impl Default for Progress {
    fn default() -> Self {
        Progress::NONE
    }
}

impl Progress {
    /// Most bytes kept.
    pub const MAX: usize = 128;
    /// No progress recorded.
    pub const NONE: Progress = Progress {
        len: 0,
        bytes: [0; Progress::MAX],
    };

    /// `b` as progress; `None` if longer than `MAX`.
    pub fn new(b: &[u8]) -> Option<Progress> {
        let mut p = Progress::NONE;
        p.bytes.get_mut(..b.len())?.copy_from_slice(b);
        p.len = b.len() as u32;
        Some(p)
    }

    /// The bytes recorded (`None`: the length is out of range, a damaged store).
    pub fn get(&self) -> Option<&[u8]> {
        self.bytes.get(..self.len as usize)
    }
}

/// Where everything lives on the COW device (block numbers are 4 KiB units).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layout {
    /// Blocks of the device when formatted.
    pub total_blocks: u64,
    /// Chunk size in 512-byte sectors.
    pub chunk_sectors: u32,
    /// First journal block.
    pub journal_start: u64,
    /// Journal length.
    pub journal_blocks: u64,
    /// First bitmap block of the metadata area.
    pub meta_bitmap_start: u64,
    /// Bitmap blocks of the metadata area.
    pub meta_bitmap_blocks: u64,
    /// First bitmap block of the data area.
    pub data_bitmap_start: u64,
    /// Bitmap blocks of the data area.
    pub data_bitmap_blocks: u64,
    /// First block of the metadata area.
    pub meta_start: u64,
    /// Blocks in the metadata area.
    pub meta_blocks: u64,
    /// First block of the data area (chunk aligned).
    pub data_start: u64,
    /// Chunks in the data area.
    pub data_chunks: u64,
}

impl Layout {
    /// Metadata blocks per chunk.
    pub fn chunk_blocks(&self) -> u64 {
        self.chunk_sectors as u64 / BLOCK_SECTORS
    }

    /// Computes a layout for a device of `total_blocks`; `meta_blocks` 0 picks a default.
    pub fn compute(total_blocks: u64, chunk_sectors: u32, meta_blocks: u64) -> Result<Layout> {
        if !chunk_sectors.is_power_of_two() || !(8..=2048).contains(&chunk_sectors) {
            return Err(Error::Invalid(
                "chunk size must be a power of two from 8 to 2048 sectors",
            ));
        }
        let cb = chunk_sectors as u64 / BLOCK_SECTORS;
        let journal_blocks = (total_blocks / 256).clamp(MIN_JOURNAL_BLOCKS, 8192);
        let journal_start = JOURNAL_START;
        let after_journal = journal_start + journal_blocks;
        if total_blocks < after_journal + 64 {
            return Err(Error::Invalid("COW device too small"));
        }
        let rest = total_blocks - after_journal;
        let est_chunks = rest / cb;
        let meta_blocks = if meta_blocks > 0 {
            meta_blocks
        } else {
            (est_chunks / 32).max(256).min(rest / 2)
        };
        let meta_bitmap_blocks = meta_blocks.div_ceil(BITS_PER_BITMAP);
        let data_bitmap_blocks = est_chunks.div_ceil(BITS_PER_BITMAP).max(1);
        let meta_bitmap_start = after_journal;
        let data_bitmap_start = meta_bitmap_start + meta_bitmap_blocks;
        let meta_start = data_bitmap_start + data_bitmap_blocks;
        let data_start = (meta_start + meta_blocks).div_ceil(cb) * cb;
        if data_start + cb > total_blocks {
            return Err(Error::Invalid("COW device too small for this chunk size"));
        }
        let data_chunks = (total_blocks - data_start) / cb;
        let l = Layout {
            total_blocks,
            chunk_sectors,
            journal_start,
            journal_blocks,
            meta_bitmap_start,
            meta_bitmap_blocks,
            data_bitmap_start,
            data_bitmap_blocks,
            meta_start,
            meta_blocks,
            data_start,
            data_chunks,
        };
        l.validate(total_blocks, 0)?;
        Ok(l)
    }

    /// Checks that the regions are sane, in order, and fit a device of `dev_blocks`; a
    /// defect is reported in block `nr` (the superblock or the state block it was read from).
    pub fn validate(&self, dev_blocks: u64, nr: u64) -> Result<()> {
        let bad = |w| Err(PdataError::Corrupt { block: nr, what: w }.into());
        if !self.chunk_sectors.is_power_of_two() || !(8..=2048).contains(&self.chunk_sectors) {
            return bad("chunk size out of range");
        }
        if self.total_blocks > dev_blocks {
            return Err(Error::NotAStore(
                "COW device is smaller than the store on it (truncated?)",
            ));
        }
        if self.journal_start != JOURNAL_START || self.journal_blocks < MIN_JOURNAL_BLOCKS {
            return bad("journal region");
        }
        let chk = |a: u64, b: u64| a.checked_add(b);
        let (Some(j_end), Some(mb_end), Some(db_end), Some(m_end)) = (
            chk(self.journal_start, self.journal_blocks),
            chk(self.meta_bitmap_start, self.meta_bitmap_blocks),
            chk(self.data_bitmap_start, self.data_bitmap_blocks),
            chk(self.meta_start, self.meta_blocks),
        ) else {
            return bad("region overflows");
        };
        if self.meta_bitmap_start != j_end
            || self.data_bitmap_start != mb_end
            || self.meta_start != db_end
        {
            return bad("regions out of order");
        }
        if self.meta_blocks == 0
            || self.meta_bitmap_blocks != self.meta_blocks.div_ceil(BITS_PER_BITMAP)
        {
            return bad("metadata bitmap size");
        }
        if self.data_bitmap_blocks < self.data_chunks.div_ceil(BITS_PER_BITMAP) {
            return bad("data bitmap size");
        }
        let cb = self.chunk_blocks();
        if self.data_start < m_end || !self.data_start.is_multiple_of(cb) {
            return bad("data area start");
        }
        match self
            .data_chunks
            .checked_mul(cb)
            .and_then(|x| x.checked_add(self.data_start))
        {
            Some(end) if end <= self.total_blocks && self.data_chunks > 0 => Ok(()),
            _ => bad("data area exceeds the device"),
        }
    }

    /// Whether `b` is a block of the metadata area.
    pub fn is_meta(&self, b: u64) -> bool {
        b >= self.meta_start && b < self.meta_start + self.meta_blocks
    }

    /// The journal's region.
    pub fn journal_region(&self) -> Region {
        Region {
            start: self.journal_start,
            blocks: self.journal_blocks,
        }
    }

    /// Whether a journaled block may be written home to `b`.
    pub fn is_journalable(&self, b: u64) -> bool {
        b == STATE_BLOCK || (b >= self.meta_bitmap_start && b < self.meta_start + self.meta_blocks)
    }

    /// Sector on the COW device where data chunk `c` starts.
    pub fn chunk_sector(&self, c: u64) -> u64 {
        self.data_start * BLOCK_SECTORS + c * self.chunk_sectors as u64
    }
}

/// The superblock, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Super {
    /// Random id written in every block header of this store.
    pub store_id: u64,
    /// User-visible uuid.
    pub uuid: [u8; 16],
    /// SB_* flags.
    pub flags: u32,
    /// Region layout.
    pub layout: Layout,
    /// Metadata blocks in use.
    pub meta_used: u64,
    /// Data chunks in use.
    pub data_used: u64,
    /// Btree root.
    pub root: Root,
    /// Next chunk the snapshot-deletion sweep will visit.
    pub delete_cursor: u64,
    /// Next creation sequence number.
    pub next_seq: u64,
    /// Where the next allocation search starts, per area (metadata, data): a hint, taken
    /// modulo the area size (0 in stores written before it existed).
    pub alloc_hint: [u64; 2],
    /// Replication: the uuid of the store the replica snapshots were received from (all 0:
    /// none).
    pub source_uuid: [u8; 16],
    /// Receive progress: opaque bytes kept for the receiver (`progress[..progress_len]`).
    pub progress: Progress,
    /// Snapshot slots.
    pub snaps: [SnapSlot; MAX_SNAPSHOTS],
}

// Superblock and state block: the block header, the fields (`SbFields`) from byte 32, zeros,
// the snapshot table (`MAX_SNAPSHOTS` slots of `SnapSlot::SIZE` bytes) from byte 512.
const SB_FIELDS: usize = HEADER_SIZE;
const SB_SNAPS: usize = 512;
const MAGIC_STR: &[u8; 8] = b"SHSNAP\r\n";
const _: () = assert!(SB_FIELDS + SbFields::SIZE <= SB_SNAPS);
const _: () = assert!(SB_SNAPS + MAX_SNAPSHOTS * SnapSlot::SIZE <= BLOCK_SIZE);

impl SnapSlot {
    /// Bytes of a slot on disk.
    pub const SIZE: usize = 32;

    /// Packs into `out` (`SIZE` bytes): u32 id, u32 flags, u64 creation sequence, u64 owned,
    /// u64 source sequence.
    pub fn pack(&self, out: &mut [u8]) {
        let mut w = LeWriter::new(out);
        w.u32(self.id);
        w.u32(self.flags);
        w.u64(self.create_seq);
        w.u64(self.owned);
        w.u64(self.source_seq);
        debug_assert!(w.fits() && w.pos() == Self::SIZE);
    }

    /// Unpacks what `pack` wrote (the flags are checked apart: `flags_ok`).
    pub fn unpack(b: &[u8]) -> Result<SnapSlot> {
        let mut r = LeReader::new(b);
        let s = SnapSlot {
            id: r.u32()?,
            flags: r.u32()?,
            create_seq: r.u64()?,
            owned: r.u64()?,
            source_seq: r.u64()?,
        };
        Ok(s)
    }

    /// Whether the flags are a state a slot can be in: free, live (maybe invalid), or
    /// deleting (maybe invalid), and no unknown bit; and only a live slot is a replica.
    fn flags_ok(&self) -> bool {
        let f = self.flags;
        f & !SNAP_KNOWN == 0
            && !(f & SNAP_LIVE != 0 && f & SNAP_DELETING != 0)
            && (f == 0 || f & (SNAP_LIVE | SNAP_DELETING) != 0)
            && (self.source_seq == 0 || f & SNAP_LIVE != 0)
    }
}

/// The fields of the superblock and the state block between the block header and the
/// snapshot table, as stored (nothing checked yet).  The order of the reads in `unpack` and
/// of the writes in `pack` is the layout (Documentation/format.md): from byte 32, u32
/// version, u32 chunk size, u32 block size, u32 flags, 16-byte uuid, the 11 u64 of the
/// layout, 8 reserved bytes, u64 metadata and data in use, u64 root block, u32 depth, 4
/// reserved bytes, u64 deletion cursor, u64 next sequence, 8-byte magic, u64 allocation
/// hints (metadata, data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SbFields {
    version: u32,
    block_size: u32,
    flags: u32,
    uuid: [u8; 16],
    /// Its chunk size is stored after the version, its areas after the uuid.
    layout: Layout,
    meta_used: u64,
    data_used: u64,
    root: Root,
    delete_cursor: u64,
    next_seq: u64,
    magic: [u8; 8],
    alloc_hint: [u64; 2],
    source_uuid: [u8; 16],
    /// Its length is checked by `Super::decode_into`.
    progress: Progress,
}

impl SbFields {
    /// Bytes on disk.
    const SIZE: usize = 348;

    fn pack(&self, out: &mut [u8]) {
        let mut w = LeWriter::new(out);
        let l = &self.layout;
        w.u32(self.version);
        w.u32(l.chunk_sectors);
        w.u32(self.block_size);
        w.u32(self.flags);
        w.bytes(&self.uuid);
        for v in [
            l.total_blocks,
            l.journal_start,
            l.journal_blocks,
            l.meta_bitmap_start,
            l.meta_bitmap_blocks,
            l.data_bitmap_start,
            l.data_bitmap_blocks,
            l.meta_start,
            l.meta_blocks,
            l.data_start,
            l.data_chunks,
        ] {
            w.u64(v);
        }
        w.zeros(8);
        w.u64(self.meta_used);
        w.u64(self.data_used);
        w.u64(self.root.block);
        w.u32(self.root.depth);
        w.zeros(4);
        w.u64(self.delete_cursor);
        w.u64(self.next_seq);
        w.bytes(&self.magic);
        w.u64(self.alloc_hint[0]);
        w.u64(self.alloc_hint[1]);
        w.bytes(&self.source_uuid);
        w.u32(self.progress.len);
        w.bytes(&self.progress.bytes);
        debug_assert!(w.fits() && w.pos() == Self::SIZE);
    }

    fn unpack(b: &[u8]) -> Result<SbFields> {
        let mut r = LeReader::new(b);
        let version = r.u32()?;
        let chunk_sectors = r.u32()?;
        let block_size = r.u32()?;
        let flags = r.u32()?;
        let uuid = r.bytes()?;
        // The fields of a struct expression are evaluated in the order written: on-disk order.
        let layout = Layout {
            chunk_sectors,
            total_blocks: r.u64()?,
            journal_start: r.u64()?,
            journal_blocks: r.u64()?,
            meta_bitmap_start: r.u64()?,
            meta_bitmap_blocks: r.u64()?,
            data_bitmap_start: r.u64()?,
            data_bitmap_blocks: r.u64()?,
            meta_start: r.u64()?,
            meta_blocks: r.u64()?,
            data_start: r.u64()?,
            data_chunks: r.u64()?,
        };
        r.skip(8)?;
        let meta_used = r.u64()?;
        let data_used = r.u64()?;
        let root = Root {
            block: r.u64()?,
            depth: r.u32()?,
        };
        r.skip(4)?;
        Ok(SbFields {
            version,
            block_size,
            flags,
            uuid,
            layout,
            meta_used,
            data_used,
            root,
            delete_cursor: r.u64()?,
            next_seq: r.u64()?,
            magic: r.bytes()?,
            alloc_hint: [r.u64()?, r.u64()?],
            source_uuid: r.bytes()?,
            progress: Progress {
                len: r.u32()?,
                bytes: r.bytes()?,
            },
        })
    }
}

impl Super {
    /// Encodes into a block (header included, checksum not): as the static superblock
    /// (block 0) or as the state block.
    pub fn encode(&self, b: &mut Block, nr: u64) {
        b.fill(0);
        let ty = if nr == 0 {
            BlockType::Super
        } else {
            BlockType::State
        };
        init_header(b, ty, nr, self.store_id);
        let (head, table) = b.split_at_mut(SB_SNAPS);
        SbFields {
            version: FORMAT_VERSION,
            block_size: BLOCK_SIZE as u32,
            flags: self.flags,
            uuid: self.uuid,
            layout: self.layout,
            meta_used: self.meta_used,
            data_used: self.data_used,
            root: self.root,
            delete_cursor: self.delete_cursor,
            next_seq: self.next_seq,
            magic: *MAGIC_STR,
            alloc_hint: self.alloc_hint,
            source_uuid: self.source_uuid,
            progress: self.progress,
        }
        .pack(&mut head[SB_FIELDS..]);
        let mut w = LeWriter::new(table);
        for s in &self.snaps {
            s.pack(w.take(SnapSlot::SIZE));
        }
        debug_assert!(w.fits());
    }

    /// An all-zero superblock (to decode into).
    pub const fn empty() -> Super {
        const L: Layout = Layout {
            total_blocks: 0,
            chunk_sectors: 0,
            journal_start: 0,
            journal_blocks: 0,
            meta_bitmap_start: 0,
            meta_bitmap_blocks: 0,
            data_bitmap_start: 0,
            data_bitmap_blocks: 0,
            meta_start: 0,
            meta_blocks: 0,
            data_start: 0,
            data_chunks: 0,
        };
        const S: SnapSlot = SnapSlot {
            id: 0,
            flags: 0,
            create_seq: 0,
            owned: 0,
            source_seq: 0,
        };
        Super {
            store_id: 0,
            uuid: [0; 16],
            flags: 0,
            layout: L,
            meta_used: 0,
            data_used: 0,
            root: Root { block: 0, depth: 0 },
            delete_cursor: 0,
            next_seq: 0,
            alloc_hint: [0; 2],
            source_uuid: [0; 16],
            progress: Progress::NONE,
            snaps: [S; MAX_SNAPSHOTS],
        }
    }

    /// Decodes and validates the superblock (`nr` 0) or the state block read from a device
    /// of `dev_blocks`.
    #[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
    pub fn decode(io: &impl BlockIo, b: &Block, nr: u64, dev_blocks: u64) -> Result<Super> {
        let mut sb = Super::empty();
        Self::decode_into(io, b, nr, dev_blocks, &mut sb)?;
        Ok(sb)
    }

    /// Store id and layout of a superblock, validated, without decoding the snapshot table
    /// (small stack frame: the kernel stack is small).
    #[inline(never)]
    pub fn decode_identity(io: &impl BlockIo, b: &Block, dev_blocks: u64) -> Result<(u64, Layout)> {
        Self::identity(io, b, 0, dev_blocks).map(|(id, f)| (id, f.layout))
    }

    /// Checks the header, magic (block 0), version and block size of the superblock or
    /// state block `nr`, and validates its layout; returns the store id and the fields.
    fn identity(io: &impl BlockIo, b: &Block, nr: u64, dev_blocks: u64) -> Result<(u64, SbFields)> {
        let ty = if nr == 0 {
            BlockType::Super
        } else {
            BlockType::State
        };
        let f = SbFields::unpack(&b[SB_FIELDS..])?;
        if nr == 0 && (header_type(b) != ty.tag() || f.magic != *MAGIC_STR) {
            return Err(Error::NotAStore("no shared-snapshot superblock magic"));
        }
        let store_id = header_store_id(b);
        check_header(io, b, ty, nr, store_id)?;
        if f.version != FORMAT_VERSION {
            return Err(Error::NotAStore("unsupported format version"));
        }
        if f.block_size as usize != BLOCK_SIZE {
            return Err(Error::NotAStore("unsupported metadata block size"));
        }
        f.layout.validate(dev_blocks, nr)?;
        Ok((store_id, f))
    }

    /// As `decode`, into `sb` (no large temporaries: the kernel stack is small).
    #[inline(never)]
    pub fn decode_into(
        io: &impl BlockIo,
        b: &Block,
        nr: u64,
        dev_blocks: u64,
        sb: &mut Super,
    ) -> Result<()> {
        let (store_id, f) = Self::identity(io, b, nr, dev_blocks)?;
        let layout = f.layout;
        sb.store_id = store_id;
        sb.uuid = f.uuid;
        sb.flags = f.flags;
        sb.layout = layout;
        sb.meta_used = f.meta_used;
        sb.data_used = f.data_used;
        sb.root = f.root;
        sb.delete_cursor = f.delete_cursor;
        sb.next_seq = f.next_seq;
        sb.alloc_hint = f.alloc_hint;
        sb.source_uuid = f.source_uuid;
        sb.progress = f.progress;
        let bad = |w| Err(PdataError::Corrupt { block: nr, what: w }.into());
        if sb.progress.get().is_none() {
            return bad("receive progress length");
        }
        if sb.meta_used > layout.meta_blocks || sb.data_used > layout.data_chunks {
            return bad("space counters exceed the areas");
        }
        if !layout.is_meta(sb.root.block)
            || sb.root.depth == 0
            || sb.root.depth as usize > MAX_DEPTH
        {
            return bad("btree root");
        }
        let mut r = LeReader::new(&b[SB_SNAPS..]);
        for slot in sb.snaps.iter_mut() {
            let s = SnapSlot::unpack(r.take(SnapSlot::SIZE)?)?;
            if !s.flags_ok() {
                return bad("snapshot slot flags");
            }
            *slot = s;
        }
        for i in 0..MAX_SNAPSHOTS {
            for j in 0..i {
                if sb.snaps[i].flags & SNAP_LIVE != 0
                    && sb.snaps[j].flags & SNAP_LIVE != 0
                    && sb.snaps[i].id == sb.snaps[j].id
                {
                    return bad("two live snapshots with one id");
                }
            }
        }
        if sb.source_uuid == [0; 16] && sb.snaps.iter().any(|s| s.source_seq != 0) {
            return bad("a replica snapshot without a replication source");
        }
        Ok(())
    }

    /// The store's identity for replication: its uuid, or for a store formatted without one
    /// (by modules before replication), 8 bytes `0xff` and the random store id, which never
    /// changes either.
    pub fn replication_uuid(&self) -> [u8; 16] {
        if self.uuid != [0; 16] {
            return self.uuid;
        }
        let mut u = [0xff; 16];
        u[8..].copy_from_slice(&self.store_id.to_le_bytes());
        u
    }

    /// Bitmap of live snapshot slots.
    pub fn live_mask(&self) -> u64 {
        self.mask(SNAP_LIVE)
    }

    /// Bitmap of live, valid snapshot slots (one pass: on the origin-write path).
    pub fn valid_mask(&self) -> u64 {
        let mut m = 0;
        for (i, s) in self.snaps.iter().enumerate() {
            if s.flags & (SNAP_LIVE | SNAP_INVALID) == SNAP_LIVE {
                m |= 1u64 << i;
            }
        }
        m
    }

    /// Bitmap of slots with `flag` set.
    pub fn mask(&self, flag: u32) -> u64 {
        let mut m = 0;
        for (i, s) in self.snaps.iter().enumerate() {
            if s.flags & flag != 0 {
                m |= 1u64 << i;
            }
        }
        m
    }

    /// Slot of the live snapshot `id`.
    pub fn slot_of(&self, id: u32) -> Option<usize> {
        self.snaps
            .iter()
            .position(|s| s.flags & SNAP_LIVE != 0 && s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Super {
        let mut sb = Super::empty();
        sb.store_id = 0x5157_0e1d;
        sb.uuid = [0x11; 16];
        sb.flags = SB_DIRTY;
        sb.layout = Layout::compute(1 << 16, 16, 0).unwrap();
        sb.meta_used = 0x1601;
        sb.data_used = 0x1602;
        sb.root = Root {
            block: 0x1603,
            depth: 3,
        };
        sb.delete_cursor = 0x1604;
        sb.next_seq = 0x1605;
        sb.alloc_hint = [0x1606, 0x1607];
        sb.source_uuid = [0x22; 16];
        sb.progress = Progress::new(&[0x33; 84]).unwrap();
        for (i, s) in sb.snaps.iter_mut().enumerate() {
            let i = i as u64;
            *s = SnapSlot {
                id: 100 + i as u32,
                flags: [0, SNAP_LIVE, SNAP_LIVE | SNAP_INVALID, SNAP_DELETING][i as usize % 4],
                create_seq: 0x1_0000 + i,
                owned: 0x2_0000 + i,
                source_seq: if i % 4 == 1 { 0x3_0000 + i } else { 0 },
            };
        }
        sb
    }

    /// Each structure reads back what it wrote within exactly its size, and no less.
    #[test]
    fn pack_unpack_round_trip() {
        let sb = sample();
        for s in sb.snaps {
            let mut b = [0xaa; SnapSlot::SIZE];
            s.pack(&mut b);
            assert_eq!(SnapSlot::unpack(&b), Ok(s));
            assert!(SnapSlot::unpack(&b[..SnapSlot::SIZE - 1]).is_err());
        }
        let f = SbFields {
            version: FORMAT_VERSION,
            block_size: BLOCK_SIZE as u32,
            flags: sb.flags,
            uuid: sb.uuid,
            layout: sb.layout,
            meta_used: sb.meta_used,
            data_used: sb.data_used,
            root: sb.root,
            delete_cursor: sb.delete_cursor,
            next_seq: sb.next_seq,
            magic: *MAGIC_STR,
            alloc_hint: sb.alloc_hint,
            source_uuid: sb.source_uuid,
            progress: sb.progress,
        };
        let mut b = [0xaa; SbFields::SIZE];
        f.pack(&mut b);
        assert_eq!(SbFields::unpack(&b), Ok(f));
        assert!(SbFields::unpack(&b[..SbFields::SIZE - 1]).is_err());
        let mut short = [0u8; SbFields::SIZE - 1];
        let mut w = LeWriter::new(&mut short);
        w.bytes(&b);
        assert!(!w.fits());
    }

    /// The encoded block has every field where Documentation/format.md says.
    #[test]
    fn encoding_matches_format_md() {
        let sb = sample();
        let mut b = [0xaa; BLOCK_SIZE];
        sb.encode(&mut b, STATE_BLOCK);
        assert_eq!(header_type(&b), BlockType::State.tag());
        assert_eq!(header_blocknr(&b), STATE_BLOCK);
        assert_eq!(header_store_id(&b), sb.store_id);
        assert_eq!(get32(&b, 32), FORMAT_VERSION);
        assert_eq!(get32(&b, 36), sb.layout.chunk_sectors);
        assert_eq!(get32(&b, 40), BLOCK_SIZE as u32);
        assert_eq!(get32(&b, 44), sb.flags);
        assert_eq!(b[48..64], sb.uuid);
        let l = &sb.layout;
        let areas = [
            l.total_blocks,
            l.journal_start,
            l.journal_blocks,
            l.meta_bitmap_start,
            l.meta_bitmap_blocks,
            l.data_bitmap_start,
            l.data_bitmap_blocks,
            l.meta_start,
            l.meta_blocks,
            l.data_start,
            l.data_chunks,
        ];
        for (i, v) in areas.into_iter().enumerate() {
            assert_eq!(get64(&b, 64 + 8 * i), v);
        }
        assert_eq!(get64(&b, 160), sb.meta_used);
        assert_eq!(get64(&b, 168), sb.data_used);
        assert_eq!(get64(&b, 176), sb.root.block);
        assert_eq!(get32(&b, 184), sb.root.depth);
        assert_eq!(get64(&b, 192), sb.delete_cursor);
        assert_eq!(get64(&b, 200), sb.next_seq);
        assert_eq!(&b[208..216], MAGIC_STR);
        assert_eq!(get64(&b, 216), sb.alloc_hint[0]);
        assert_eq!(get64(&b, 224), sb.alloc_hint[1]);
        assert_eq!(b[232..248], sb.source_uuid);
        assert_eq!(get32(&b, 248), 84);
        assert_eq!(b[252..252 + 84], [0x33; 84]);
        for (i, s) in sb.snaps.iter().enumerate() {
            let o = 512 + 32 * i;
            assert_eq!(get32(&b, o), s.id);
            assert_eq!(get32(&b, o + 4), s.flags);
            assert_eq!(get64(&b, o + 8), s.create_seq);
            assert_eq!(get64(&b, o + 16), s.owned);
            assert_eq!(get64(&b, o + 24), s.source_seq);
        }
        // Everything else (reserved) is zero.
        let mut fields = [false; BLOCK_SIZE];
        let mut mark = |o: usize, n: usize| fields[o..o + n].fill(true);
        mark(0, 152);
        mark(160, 28);
        mark(192, 40 + 16 + 4 + 84);
        for i in 0..MAX_SNAPSHOTS {
            mark(512 + 32 * i, 32);
        }
        for (i, byte) in b.iter().enumerate() {
            assert!(fields[i] || *byte == 0, "byte {} not zero", i);
        }
    }
}
