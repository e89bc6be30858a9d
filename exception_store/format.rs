//! The store's format constants, and the block primitives of `pdata::block` re-exported for
//! the kernel target and the tools (this layer is the API they use).  See
//! Documentation/format.md for the layout.  `Error` and `Result` here are the store's; the
//! persistent-data layer's (what a `BlockIo` returns) are `PdataError` and `PdataResult`.

pub use super::error::{Error, Result};
pub use crate::pdata::block::*;
pub use crate::pdata::block::{Error as PdataError, Result as PdataResult};
pub use crate::pdata::btree::MAX_DEPTH;

/// Format version written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Most snapshots (bit slots) one store can hold.
pub const MAX_SNAPSHOTS: usize = 64;
