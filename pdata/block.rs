//! On-disk primitives shared by every metadata block: the block header, little-endian field
//! access, checksums, the block I/O trait and the persistent-data error type.  See
//! Documentation/format.md for the layout.

use core::fmt;

/// Size of every metadata block, in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Sectors (512 bytes) per metadata block.
pub const BLOCK_SECTORS: u64 = (BLOCK_SIZE / 512) as u64;
/// One metadata block.
pub type Block = [u8; BLOCK_SIZE];

/// Size of the common header at the start of every metadata block.
pub const HEADER_SIZE: usize = 32;

const TYPE_MAGIC: u32 = 0x5353_4e00; // "\0NSS": shared snapshot

/// The type of a metadata block, stored (with a magic) in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum BlockType {
    /// Block 0: the static superblock (identity and layout), written once by format.
    Super = 1,
    /// Blocks 1 and 2: where journal replay starts (two copies, written alternately).
    JournalHeader = 2,
    /// First block of a journal transaction.
    JournalDesc = 3,
    /// Allocation bitmap of the metadata or the data area.
    Bitmap = 4,
    /// Btree internal node.
    Internal = 5,
    /// Btree leaf.
    Leaf = 6,
    /// Block 3: the state block (counters, btree root, snapshot table), journaled.
    State = 7,
}

impl BlockType {
    /// The value stored in the header's type field.
    pub const fn tag(self) -> u32 {
        TYPE_MAGIC | self as u32
    }
}

/// What the persistent-data layer can fail with.  The conditions of the layers above (an
/// area is full, no such snapshot, ...) are theirs, and outcomes that are not failures (the
/// transaction must be committed first, a block is not cached) are return values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The device failed a read or write of this block.
    Io {
        /// Block number (the first of a multi-block write).
        block: u64,
    },
    /// The device failed a flush (of its write cache: no block to name).
    Flush,
    /// A metadata block failed validation.
    Corrupt {
        /// Block number.
        block: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// Every cache slot is dirty or held by the operation in progress.
    CacheFull,
    /// No room for a new btree node: no free block, or the tree is at its deepest.
    NoSpace,
    /// An invariant of this code does not hold: a bug.
    Bug(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Io { block } => write!(f, "I/O error on metadata block {}", block),
            Error::Flush => write!(f, "I/O error on flush"),
            Error::Corrupt { block, what } => {
                write!(f, "metadata block {} corrupt: {}", block, what)
            }
            Error::CacheFull => write!(f, "metadata cache full"),
            Error::NoSpace => write!(f, "metadata area full"),
            Error::Bug(what) => write!(f, "internal error: {}", what),
        }
    }
}

/// Result of persistent-data operations.
pub type Result<T> = core::result::Result<T, Error>;

/// Block I/O and checksums, supplied by the caller (kernel: dm-io and crc32c(); userspace:
/// a file or a memory image and the crc32c crate).
pub trait BlockIo {
    /// Reads metadata block `nr` (4 KiB units from the start of the COW device).
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> Result<()>;
    /// Writes metadata block `nr`; durable only after a later `flush`.
    fn write_block(&mut self, nr: u64, buf: &Block) -> Result<()>;
    /// Makes every completed write durable (REQ_PREFLUSH).
    fn flush(&mut self) -> Result<()>;
    /// Writes consecutive blocks from `nr` in one request; `preflush`: everything completed
    /// before is durable first (REQ_PREFLUSH); `fua`: these blocks are durable when it
    /// returns (REQ_FUA).  The default issues single writes and flushes.
    fn write_run(&mut self, nr: u64, bufs: &[Block], preflush: bool, fua: bool) -> Result<()> {
        if preflush {
            self.flush()?;
        }
        for (i, b) in bufs.iter().enumerate() {
            self.write_block(nr + i as u64, b)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    /// Size of the COW device in 4 KiB blocks.
    fn size_blocks(&self) -> u64;
    /// CRC-32C (Castagnoli) of `data`, seed !0, final inversion (the kernel's crc32c() with
    /// seed !0, inverted).
    fn crc32c(&self, data: &[u8]) -> u32;
}

/// Reads a little-endian u32 at `off`.
#[inline]
pub fn get32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Reads a little-endian u64 at `off`.
#[inline]
pub fn get64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Writes a little-endian u16 at `off`.
#[inline]
#[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u32 at `off`.
#[inline]
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u64 at `off`.
#[inline]
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Reads little-endian fields one after the other from a byte slice: a structure's layout is
/// the order of its reads.  Bounds are checked: a field that does not fit in the slice is
/// an error (`Error::Bug`: on-disk structures have fixed sizes, so it is never corruption).
#[derive(Debug)]
pub struct LeReader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> LeReader<'a> {
    /// A reader at the start of `b`.
    #[inline]
    pub fn new(b: &'a [u8]) -> Self {
        LeReader { b, pos: 0 }
    }

    /// The next `n` bytes (a nested structure, for its own `unpack`).
    #[inline]
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let b: &'a [u8] = self.b;
        let f = self
            .pos
            .checked_add(n)
            .and_then(|end| b.get(self.pos..end))
            .ok_or(Error::Bug("field beyond the end of its structure"))?;
        self.pos += n;
        Ok(f)
    }

    /// Skips `n` reserved bytes.
    #[inline]
    pub fn skip(&mut self, n: usize) -> Result<()> {
        self.take(n).map(|_| ())
    }

    /// Entry `i` of an array of `size`-byte entries starting at the next field.
    #[inline]
    pub fn entry(&mut self, i: usize, size: usize) -> Result<&'a [u8]> {
        let skip = i
            .checked_mul(size)
            .ok_or(Error::Bug("field beyond the end of its structure"))?;
        self.skip(skip)?;
        self.take(size)
    }

    /// The next `N` bytes.
    #[inline]
    pub fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// The next little-endian u16.
    #[inline]
    pub fn u16(&mut self) -> Result<u16> {
        self.bytes().map(u16::from_le_bytes)
    }

    /// The next little-endian u32.
    #[inline]
    pub fn u32(&mut self) -> Result<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    /// The next little-endian u64.
    #[inline]
    pub fn u64(&mut self) -> Result<u64> {
        self.bytes().map(u64::from_le_bytes)
    }
}

/// Writes little-endian fields one after the other into a byte slice, in the order
/// `LeReader` reads them back.  Bounds are checked: a field that does not fit is not
/// written (nothing panics) and `fits` turns false: a bug, which the structures' round-trip
/// tests catch.
#[derive(Debug)]
pub struct LeWriter<'a> {
    b: &'a mut [u8],
    pos: usize,
    overrun: bool,
}

impl<'a> LeWriter<'a> {
    /// A writer at the start of `b`.
    #[inline]
    pub fn new(b: &'a mut [u8]) -> Self {
        LeWriter {
            b,
            pos: 0,
            overrun: false,
        }
    }

    /// Offset of the next field.
    #[inline]
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Whether every field written so far fit in the slice.
    #[inline]
    pub fn fits(&self) -> bool {
        !self.overrun
    }

    /// The next `n` bytes (a nested structure, for its own `pack`); empty if they do not fit.
    #[inline]
    pub fn take(&mut self, n: usize) -> &mut [u8] {
        let start = self.pos;
        match start.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                self.pos = end;
                &mut self.b[start..end]
            }
            _ => {
                self.overrun = true;
                &mut []
            }
        }
    }

    /// Entry `i` of an array of `size`-byte entries starting at the next field; empty if
    /// it does not fit.
    #[inline]
    pub fn entry(&mut self, i: usize, size: usize) -> &mut [u8] {
        match i.checked_mul(size) {
            Some(skip) if self.take(skip).len() == skip => self.take(size),
            _ => {
                self.overrun = true;
                &mut []
            }
        }
    }

    /// Writes `v` as the next bytes.
    #[inline]
    pub fn bytes(&mut self, v: &[u8]) {
        let f = self.take(v.len());
        if f.len() == v.len() {
            f.copy_from_slice(v);
        }
    }

    /// Writes `n` zero (reserved) bytes.
    #[inline]
    pub fn zeros(&mut self, n: usize) {
        self.take(n).fill(0);
    }

    /// Writes the next little-endian u16.
    #[inline]
    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    /// Writes the next little-endian u32.
    #[inline]
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    /// Writes the next little-endian u64.
    #[inline]
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

// Header layout: crc32c u32 @0 (of bytes 4..), type u32 @4, block number u64 @8,
// store id u64 @16, type-specific u64 @24.
const H_CRC: usize = 0;
const H_TYPE: usize = 4;
const H_BLOCKNR: usize = 8;
const H_STORE_ID: usize = 16;
/// Offset of the type-specific header word (btree nodes: their `NodeHeader`).
pub const H_AUX: usize = 24;

/// Fills in a block's header fields (not the checksum).
pub fn init_header(b: &mut Block, ty: BlockType, nr: u64, store_id: u64) {
    put32(b, H_TYPE, ty.tag());
    put64(b, H_BLOCKNR, nr);
    put64(b, H_STORE_ID, store_id);
}

/// Block number recorded in a header.
pub fn header_blocknr(b: &Block) -> u64 {
    get64(b, H_BLOCKNR)
}

/// Store id recorded in a header.
pub fn header_store_id(b: &Block) -> u64 {
    get64(b, H_STORE_ID)
}

/// Type tag recorded in a header.
pub fn header_type(b: &Block) -> u32 {
    get32(b, H_TYPE)
}

/// Computes and stores the block's checksum.
pub fn seal(io: &impl BlockIo, b: &mut Block) {
    let crc = io.crc32c(&b[4..]);
    put32(b, H_CRC, crc);
}

/// Checksum of a whole block as stored in journal descriptors.
pub fn block_crc(io: &impl BlockIo, b: &Block) -> u32 {
    io.crc32c(&b[..])
}

/// [`block_crc`] of a block [`seal`] has just sealed, without reading the block again: the
/// header checksum already covers all of it but its first 4 bytes (the checksum itself),
/// and CRCs combine, `crc(a ‖ b) = crc(a)·x^(8·|b|) ⊕ crc(b)` (mod the CRC-32C polynomial).
pub fn sealed_block_crc(io: &impl BlockIo, b: &Block) -> u32 {
    gf2_mul(io.crc32c(&b[..H_CRC + 4]), X_SEALED) ^ get32(b, H_CRC)
}

/// The CRC-32C polynomial, bit-reflected as the checksums are: bit 31 is x^0.
const CRC32C_POLY: u32 = 0x82f6_3b78;

/// `a·b mod P` for polynomials in the reflected representation of CRC-32C values.
const fn gf2_mul(a: u32, b: u32) -> u32 {
    let (mut a, mut b, mut p) = (a, b, 0u32);
    let mut i = 0;
    while i < 32 {
        if b & 0x8000_0000 != 0 {
            p ^= a;
        }
        b <<= 1;
        // a·x: x^31 (bit 0) becomes x^32, reduced by P.
        a = if a & 1 != 0 {
            (a >> 1) ^ CRC32C_POLY
        } else {
            a >> 1
        };
        i += 1;
    }
    p
}

/// `x^(8·n) mod P`: appending n zero bytes multiplies a CRC by it.
const fn x_pow_bytes(n: usize) -> u32 {
    let (mut r, mut base, mut e) = (0x8000_0000u32, 0x0080_0000u32, n); // x^0, x^8
    while e > 0 {
        if e & 1 != 0 {
            r = gf2_mul(r, base);
        }
        base = gf2_mul(base, base);
        e >>= 1;
    }
    r
}

/// The shift of the bytes a header checksum covers.
const X_SEALED: u32 = x_pow_bytes(BLOCK_SIZE - H_CRC - 4);

/// Validates the common header: checksum, type, block number and store id.
pub fn check_header(
    io: &impl BlockIo,
    b: &Block,
    ty: BlockType,
    nr: u64,
    store_id: u64,
) -> Result<()> {
    if get32(b, H_CRC) != io.crc32c(&b[4..]) {
        return Err(Error::Corrupt {
            block: nr,
            what: "checksum mismatch",
        });
    }
    if get32(b, H_TYPE) != ty.tag() {
        return Err(Error::Corrupt {
            block: nr,
            what: "wrong block type",
        });
    }
    if get64(b, H_BLOCKNR) != nr {
        return Err(Error::Corrupt {
            block: nr,
            what: "block number in header does not match its location",
        });
    }
    if get64(b, H_STORE_ID) != store_id {
        return Err(Error::Corrupt {
            block: nr,
            what: "block belongs to another store (store id)",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::TestDev;
    use super::*;

    /// The descriptor checksum derived from the header one equals the whole block's.
    #[test]
    fn sealed_block_crc_is_the_whole_blocks_crc() {
        let io = TestDev::new(1);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..64 {
            let mut b = [0u8; BLOCK_SIZE];
            for (i, byte) in b.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = match round % 4 {
                    0 => x as u8,
                    1 => 0,
                    2 => 0xff,
                    _ => (i % 7) as u8,
                };
            }
            init_header(&mut b, BlockType::JournalDesc, round, 0x5eed);
            seal(&io, &mut b);
            assert_eq!(
                sealed_block_crc(&io, &b),
                block_crc(&io, &b),
                "round {}",
                round
            );
        }
    }
}
