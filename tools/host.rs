//! Userspace implementations of the core's traits: an in-memory device that can simulate
//! power loss, a file or block device, and Vec-backed cache memory.

pub use crate::exception_store::cache::VecMem;
use crate::exception_store::format::{Block, BlockIo, PdataError, PdataResult, BLOCK_SIZE};
use std::boxed::Box;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::vec::Vec;

/// CRC-32C as the on-disk format defines it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// A write not yet made durable by a flush.
#[derive(Clone)]
struct Pending {
    block: u64,
    data: Box<Block>,
}

/// An in-memory block device with volatile write-back semantics: writes become durable at
/// the next flush; `crash` returns the image a power cut would leave.
#[derive(Clone)]
pub struct MemDev {
    blocks: u64,
    durable: HashMap<u64, Box<Block>>,
    volatile: Vec<Pending>,
    /// Writes issued so far.
    pub writes: u64,
    /// Flushes issued so far.
    pub flushes: u64,
    /// FUA requests completed so far.
    pub fuas: u64,
    /// Fail (as an I/O error) every operation once this many writes have been issued.
    pub fail_after_writes: Option<u64>,
    /// Block number of every write issued, in order (index = write number).
    pub log: Vec<u64>,
}

impl MemDev {
    /// A zeroed device of `blocks` 4 KiB blocks.
    pub fn new(blocks: u64) -> Self {
        MemDev {
            blocks,
            durable: HashMap::new(),
            volatile: Vec::new(),
            writes: 0,
            flushes: 0,
            fuas: 0,
            fail_after_writes: None,
            log: Vec::new(),
        }
    }

    fn current(&self, nr: u64) -> Option<&Block> {
        if let Some(p) = self.volatile.iter().rev().find(|p| p.block == nr) {
            return Some(&p.data);
        }
        self.durable.get(&nr).map(|b| &**b)
    }

    /// The device after a power cut: durable content plus the unflushed writes that `keep`
    /// selects (given their index); the write at index `torn` keeps only its first `torn_sectors` sectors.
    pub fn crash(
        &self,
        mut keep: impl FnMut(usize) -> bool,
        torn: Option<(usize, usize)>,
    ) -> MemDev {
        let mut d = MemDev::new(self.blocks);
        d.durable = self.durable.clone();
        for (i, p) in self.volatile.iter().enumerate() {
            if !keep(i) {
                continue;
            }
            let mut data = p.data.clone();
            if let Some((t, sectors)) = torn {
                if t == i {
                    let old = self
                        .durable
                        .get(&p.block)
                        .map(|b| **b)
                        .unwrap_or([0; BLOCK_SIZE]);
                    data[sectors * 512..].copy_from_slice(&old[sectors * 512..]);
                }
            }
            d.durable.insert(p.block, data);
        }
        d
    }

    /// Blocks written durably so far (never-written blocks read as zeros), in no order.
    pub fn durable_blocks(&self) -> impl Iterator<Item = (u64, &Block)> {
        self.durable.iter().map(|(nr, b)| (*nr, &**b))
    }

    /// Writes not yet flushed.
    pub fn unflushed(&self) -> usize {
        self.volatile.len()
    }

    /// Flips one bit of a block, durably (for corruption tests).
    pub fn flip_bit(&mut self, nr: u64, bit: usize) {
        let mut b = self.current(nr).copied().unwrap_or([0; BLOCK_SIZE]);
        b[bit / 8] ^= 1 << (bit % 8);
        self.volatile.retain(|p| p.block != nr);
        self.durable.insert(nr, Box::new(b));
    }

    /// Writes a whole block durably, bypassing the volatile stage.
    pub fn poke(&mut self, nr: u64, b: &Block) {
        self.volatile.retain(|p| p.block != nr);
        self.durable.insert(nr, Box::new(*b));
    }

    /// Reads a block as it currently reads (volatile writes included).
    pub fn peek(&self, nr: u64) -> Block {
        self.current(nr).copied().unwrap_or([0; BLOCK_SIZE])
    }

    /// `e` once the device has died (`fail_after_writes`).
    fn check_fail(&self, e: PdataError) -> PdataResult<()> {
        match self.fail_after_writes {
            Some(n) if self.writes >= n => Err(e),
            _ => Ok(()),
        }
    }
}

impl BlockIo for MemDev {
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> PdataResult<()> {
        if nr >= self.blocks {
            return Err(PdataError::Io { block: nr });
        }
        match self.current(nr) {
            Some(b) => buf.copy_from_slice(b),
            None => buf.fill(0),
        }
        Ok(())
    }

    fn write_block(&mut self, nr: u64, buf: &Block) -> PdataResult<()> {
        if nr >= self.blocks {
            return Err(PdataError::Io { block: nr });
        }
        self.check_fail(PdataError::Io { block: nr })?;
        self.writes += 1;
        self.log.push(nr);
        self.volatile.push(Pending {
            block: nr,
            data: Box::new(*buf),
        });
        Ok(())
    }

    fn flush(&mut self) -> PdataResult<()> {
        self.check_fail(PdataError::Flush)?;
        self.flushes += 1;
        for p in self.volatile.drain(..) {
            self.durable.insert(p.block, p.data);
        }
        Ok(())
    }

    /// Exact REQ_PREFLUSH / REQ_FUA semantics: PREFLUSH makes every write completed before
    /// it durable; FUA makes durable only the blocks of this request (every other volatile
    /// write stays volatile).  Each block of the run is its own volatile write until then, so
    /// a cut can keep any subset of them, or tear one.
    fn write_run(&mut self, nr: u64, bufs: &[Block], preflush: bool, fua: bool) -> PdataResult<()> {
        let n = bufs.len() as u64;
        if n == 0 || nr.checked_add(n).is_none_or(|e| e > self.blocks) {
            return Err(PdataError::Io { block: nr });
        }
        if preflush {
            self.flush()?;
        }
        let first = self.volatile.len();
        for (i, b) in bufs.iter().enumerate() {
            self.write_block(nr + i as u64, b)?;
        }
        if fua {
            self.check_fail(PdataError::Flush)?;
            self.fuas += 1;
            let run: Vec<Pending> = self.volatile.drain(first..).collect();
            for p in run {
                // An older volatile write of the same block is superseded by the durable one.
                self.volatile.retain(|q| q.block != p.block);
                self.durable.insert(p.block, p.data);
            }
        }
        Ok(())
    }

    fn size_blocks(&self) -> u64 {
        self.blocks
    }

    fn crc32c(&self, data: &[u8]) -> u32 {
        crc32c(data)
    }
}

/// A COW device in a file or block device.
pub struct FileDev {
    file: File,
    blocks: u64,
}

impl FileDev {
    /// Opens `path` (read-write unless `readonly`).
    pub fn open(path: &str, readonly: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)?;
        let mut f2 = file.try_clone()?;
        let size = std::io::Seek::seek(&mut f2, std::io::SeekFrom::End(0))?;
        Ok(FileDev {
            file,
            blocks: size / BLOCK_SIZE as u64,
        })
    }

    /// Reads raw bytes.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
}

impl BlockIo for FileDev {
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> PdataResult<()> {
        if nr >= self.blocks {
            return Err(PdataError::Io { block: nr });
        }
        self.file
            .read_exact_at(buf, nr * BLOCK_SIZE as u64)
            .map_err(|_| PdataError::Io { block: nr })
    }

    fn write_block(&mut self, nr: u64, buf: &Block) -> PdataResult<()> {
        if nr >= self.blocks {
            return Err(PdataError::Io { block: nr });
        }
        self.file
            .write_all_at(buf, nr * BLOCK_SIZE as u64)
            .map_err(|_| PdataError::Io { block: nr })
    }

    fn flush(&mut self) -> PdataResult<()> {
        self.file.sync_data().map_err(|_| PdataError::Flush)
    }

    fn size_blocks(&self) -> u64 {
        self.blocks
    }

    fn crc32c(&self, data: &[u8]) -> u32 {
        crc32c(data)
    }
}
