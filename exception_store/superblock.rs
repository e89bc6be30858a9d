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
        l.validate(total_blocks)?;
        Ok(l)
    }

    /// Checks that the regions are sane, in order, and fit a device of `dev_blocks`.
    pub fn validate(&self, dev_blocks: u64) -> Result<()> {
        let bad = |w| Err(PdataError::Corrupt { block: 0, what: w }.into());
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
    /// Snapshot slots.
    pub snaps: [SnapSlot; MAX_SNAPSHOTS],
}

const SB_VERSION: usize = 32;
const SB_CHUNK: usize = 36;
const SB_BLOCKSIZE: usize = 40;
const SB_FLAGS: usize = 44;
const SB_UUID: usize = 48;
const SB_LAYOUT: usize = 64; // 12 u64 fields, chunk_sectors stored separately
const SB_META_USED: usize = 160;
const SB_DATA_USED: usize = 168;
const SB_ROOT: usize = 176;
const SB_DEPTH: usize = 184;
const SB_DELETE_CURSOR: usize = 192;
const SB_NEXT_SEQ: usize = 200;
const SB_MAGIC_STR: usize = 208;
const SB_ALLOC_HINT: usize = 216; // 2 u64: metadata, data
const MAGIC_STR: &[u8; 8] = b"SHSNAP\r\n";
const SB_SNAPS: usize = 512;
const SNAP_SIZE: usize = 32;

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
        put32(b, SB_VERSION, FORMAT_VERSION);
        put32(b, SB_CHUNK, self.layout.chunk_sectors);
        put32(b, SB_BLOCKSIZE, BLOCK_SIZE as u32);
        put32(b, SB_FLAGS, self.flags);
        b[SB_UUID..SB_UUID + 16].copy_from_slice(&self.uuid);
        let l = &self.layout;
        let f = [
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
        for (i, v) in f.iter().enumerate() {
            put64(b, SB_LAYOUT + 8 * i, *v);
        }
        put64(b, SB_META_USED, self.meta_used);
        put64(b, SB_DATA_USED, self.data_used);
        put64(b, SB_ROOT, self.root.block);
        put32(b, SB_DEPTH, self.root.depth);
        put64(b, SB_DELETE_CURSOR, self.delete_cursor);
        put64(b, SB_NEXT_SEQ, self.next_seq);
        b[SB_MAGIC_STR..SB_MAGIC_STR + 8].copy_from_slice(MAGIC_STR);
        put64(b, SB_ALLOC_HINT, self.alloc_hint[0]);
        put64(b, SB_ALLOC_HINT + 8, self.alloc_hint[1]);
        for (i, s) in self.snaps.iter().enumerate() {
            let o = SB_SNAPS + i * SNAP_SIZE;
            put32(b, o, s.id);
            put32(b, o + 4, s.flags);
            put64(b, o + 8, s.create_seq);
            put64(b, o + 16, s.owned);
        }
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
        Self::identity(io, b, 0, dev_blocks)
    }

    /// Checks the header, magic (block 0), version and block size of the superblock or
    /// state block `nr`, and decodes and validates its layout.
    fn identity(io: &impl BlockIo, b: &Block, nr: u64, dev_blocks: u64) -> Result<(u64, Layout)> {
        let ty = if nr == 0 {
            BlockType::Super
        } else {
            BlockType::State
        };
        if nr == 0
            && (header_type(b) != ty.tag() || b[SB_MAGIC_STR..SB_MAGIC_STR + 8] != MAGIC_STR[..])
        {
            return Err(Error::NotAStore("no shared-snapshot superblock magic"));
        }
        let store_id = get64(b, 16);
        check_header(io, b, ty, nr, store_id)?;
        if get32(b, SB_VERSION) != FORMAT_VERSION {
            return Err(Error::NotAStore("unsupported format version"));
        }
        if get32(b, SB_BLOCKSIZE) as usize != BLOCK_SIZE {
            return Err(Error::NotAStore("unsupported metadata block size"));
        }
        let g = |i: usize| get64(b, SB_LAYOUT + 8 * i);
        let layout = Layout {
            total_blocks: g(0),
            chunk_sectors: get32(b, SB_CHUNK),
            journal_start: g(1),
            journal_blocks: g(2),
            meta_bitmap_start: g(3),
            meta_bitmap_blocks: g(4),
            data_bitmap_start: g(5),
            data_bitmap_blocks: g(6),
            meta_start: g(7),
            meta_blocks: g(8),
            data_start: g(9),
            data_chunks: g(10),
        };
        layout.validate(dev_blocks)?;
        Ok((store_id, layout))
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
        let (store_id, layout) = Self::identity(io, b, nr, dev_blocks)?;
        sb.store_id = store_id;
        sb.uuid.copy_from_slice(&b[SB_UUID..SB_UUID + 16]);
        sb.flags = get32(b, SB_FLAGS);
        sb.layout = layout;
        sb.meta_used = get64(b, SB_META_USED);
        sb.data_used = get64(b, SB_DATA_USED);
        sb.root = Root {
            block: get64(b, SB_ROOT),
            depth: get32(b, SB_DEPTH),
        };
        sb.delete_cursor = get64(b, SB_DELETE_CURSOR);
        sb.next_seq = get64(b, SB_NEXT_SEQ);
        sb.alloc_hint = [get64(b, SB_ALLOC_HINT), get64(b, SB_ALLOC_HINT + 8)];
        let bad = |w| Err(PdataError::Corrupt { block: nr, what: w }.into());
        if sb.meta_used > layout.meta_blocks || sb.data_used > layout.data_chunks {
            return bad("space counters exceed the areas");
        }
        if !layout.is_meta(sb.root.block)
            || sb.root.depth == 0
            || sb.root.depth as usize > MAX_DEPTH
        {
            return bad("btree root");
        }
        for i in 0..MAX_SNAPSHOTS {
            let o = SB_SNAPS + i * SNAP_SIZE;
            let s = SnapSlot {
                id: get32(b, o),
                flags: get32(b, o + 4),
                create_seq: get64(b, o + 8),
                owned: get64(b, o + 16),
            };
            if s.flags & !SNAP_KNOWN != 0
                || (s.flags & SNAP_LIVE != 0 && s.flags & SNAP_DELETING != 0)
            {
                return bad("snapshot slot flags");
            }
            if s.flags != 0 && s.flags & (SNAP_LIVE | SNAP_DELETING) == 0 {
                return bad("snapshot slot flags");
            }
            sb.snaps[i] = s;
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
        Ok(())
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
