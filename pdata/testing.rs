//! Test helpers for the unit tests of this layer (compiled only by `cargo test`): an
//! in-memory block device (heap cache memory is `cache::VecMem`), so the tests need nothing
//! above `pdata`.

use super::block::{Block, BlockIo, Error, Result, BLOCK_SIZE};
use std::collections::HashMap;

/// A device whose writes are durable at once; unwritten blocks read as zeroes.
pub struct TestDev {
    pub blocks: u64,
    pub data: HashMap<u64, Block>,
}

impl TestDev {
    pub fn new(blocks: u64) -> Self {
        TestDev {
            blocks,
            data: HashMap::new(),
        }
    }

    pub fn peek(&self, nr: u64) -> Block {
        self.data.get(&nr).copied().unwrap_or([0; BLOCK_SIZE])
    }
}

impl BlockIo for TestDev {
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> Result<()> {
        if nr >= self.blocks {
            return Err(Error::Io { block: nr });
        }
        *buf = self.peek(nr);
        Ok(())
    }
    fn write_block(&mut self, nr: u64, buf: &Block) -> Result<()> {
        if nr >= self.blocks {
            return Err(Error::Io { block: nr });
        }
        self.data.insert(nr, *buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn size_blocks(&self) -> u64 {
        self.blocks
    }
    fn crc32c(&self, data: &[u8]) -> u32 {
        crc32c::crc32c(data)
    }
}
