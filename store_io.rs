// SPDX-License-Identifier: GPL-2.0

//! The exception store's kernel adapters: metadata block I/O over dm-io ([`MetaIo`], the
//! core's `BlockIo`) and the cache's memory ([`CacheMemory`], the core's `CacheMem`).

use core::cell::Cell;

use kernel::prelude::*;

use crate::dm::{self, Device, SyncIo};
use crate::exception_store::cache::{CacheMem, Parts, Slot, SCRATCH_BLOCKS};
use crate::exception_store::format::{self as fmt_, Block, BLOCK_SECTORS, BLOCK_SIZE};

/// Synchronous metadata I/O to the COW device (the store's `BlockIo`).
pub(crate) struct MetaIo {
    io: SyncIo,
    blocks: u64,
    /// Nanoseconds spent in metadata writes and flushes (submission to completion) and in
    /// checksums, since activation: for the `stats` message.
    write_ns: u64,
    crc_ns: Cell<u64>,
}

impl MetaIo {
    /// I/O to `dev` (whose size fixes the store's device size).
    pub(crate) fn new(dev: &Device) -> Result<Self> {
        let io = SyncIo::new(dev)?;
        let blocks = io.sectors() / BLOCK_SECTORS;
        Ok(MetaIo {
            io,
            blocks,
            write_ns: 0,
            crc_ns: Cell::new(0),
        })
    }

    /// Nanoseconds spent waiting for metadata writes and flushes, and computing checksums.
    pub(crate) fn times_ns(&self) -> (u64, u64) {
        (self.write_ns, self.crc_ns.get())
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut SyncIo) -> T) -> T {
        let t0 = dm::now_ns();
        let r = f(&mut self.io);
        self.write_ns = self.write_ns.wrapping_add(dm::now_ns().wrapping_sub(t0));
        r
    }
}

fn sector_of(nr: u64) -> u64 {
    nr * BLOCK_SECTORS
}

impl fmt_::BlockIo for MetaIo {
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> fmt_::PdataResult<()> {
        if nr >= self.blocks {
            return Err(fmt_::PdataError::Io { block: nr });
        }
        self.io
            .read(sector_of(nr), buf)
            .map_err(|_| fmt_::PdataError::Io { block: nr })
    }

    fn write_block(&mut self, nr: u64, buf: &Block) -> fmt_::PdataResult<()> {
        if nr >= self.blocks {
            return Err(fmt_::PdataError::Io { block: nr });
        }
        self.timed(|io| io.write(sector_of(nr), buf, false, false))
            .map_err(|_| fmt_::PdataError::Io { block: nr })
    }

    fn write_run(
        &mut self,
        nr: u64,
        bufs: &[Block],
        preflush: bool,
        fua: bool,
    ) -> fmt_::PdataResult<()> {
        let n = bufs.len() as u64;
        if n == 0 || nr + n > self.blocks {
            return Err(fmt_::PdataError::Io { block: nr });
        }
        // One request over the contiguous blocks.
        self.timed(|io| io.write(sector_of(nr), bufs.as_flattened(), preflush, fua))
            .map_err(|_| fmt_::PdataError::Io { block: nr })
    }

    fn flush(&mut self) -> fmt_::PdataResult<()> {
        self.timed(|io| io.flush())
            .map_err(|_| fmt_::PdataError::Flush)
    }

    fn size_blocks(&self) -> u64 {
        self.blocks
    }

    fn crc32c(&self, data: &[u8]) -> u32 {
        let t0 = dm::now_ns();
        let crc = dm::crc32c(data);
        self.crc_ns.set(
            self.crc_ns
                .get()
                .wrapping_add(dm::now_ns().wrapping_sub(t0)),
        );
        crc
    }
}

/// Cache memory for the store: blocks from vmalloc (page-aligned, as they are 4 KiB each),
/// bookkeeping from kmalloc.
pub(crate) struct CacheMemory {
    blocks: VVec<Block>,
    slots: KVec<Slot>,
    buckets: KVec<u32>,
    pending: KVec<u64>,
}

impl CacheMemory {
    /// Memory for a cache of `n` blocks.
    pub(crate) fn new(n: usize) -> Result<Self> {
        Ok(CacheMemory {
            blocks: VVec::from_elem([0; BLOCK_SIZE], n + SCRATCH_BLOCKS, GFP_KERNEL)?,
            slots: KVec::from_elem(Slot::new(), n, GFP_KERNEL)?,
            buckets: KVec::from_elem(0u32, (2 * n).next_power_of_two(), GFP_KERNEL)?,
            pending: KVec::from_elem(0u64, 1024, GFP_KERNEL)?,
        })
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.blocks.len() * BLOCK_SIZE
            + self.slots.len() * core::mem::size_of::<Slot>()
            + self.buckets.len() * 4
            + self.pending.len() * 8
    }
}

impl CacheMem for CacheMemory {
    fn parts(&mut self) -> Parts<'_> {
        Parts {
            blocks: self.blocks.as_mut_slice(),
            slots: &mut self.slots,
            buckets: &mut self.buckets,
            pending: &mut self.pending,
        }
    }
    fn blocks(&self) -> &[Block] {
        self.blocks.as_slice()
    }
    fn slots(&self) -> &[Slot] {
        &self.slots
    }
}
