//! Persistent data: the bottom layer of the core.  Metadata blocks (header, checksums, block
//! I/O), the block cache, the journal, the space maps and a btree generic over its value type.
//! Nothing here knows about snapshots or exceptions, and nothing here imports a layer above
//! (`scripts/check-layers` enforces it).

pub mod block;
pub mod btree;
pub mod cache;
pub mod journal;
pub mod space_map;

#[cfg(test)]
mod testing;
