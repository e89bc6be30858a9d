//! Userspace build of the dm-shared-snap core: the very files the kernel module compiles
//! (`pdata/`, the persistent-data layer, and `exception_store/` on top of it), plus std-only
//! helpers for the tools and tests.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod exception_store;
pub mod pdata;

#[cfg(feature = "std")]
#[path = "tools/host.rs"]
pub mod host;

#[cfg(feature = "std")]
#[path = "tools/check.rs"]
pub mod check;

#[cfg(feature = "std")]
#[path = "tools/forge.rs"]
pub mod forge;

#[cfg(feature = "std")]
#[path = "tools/stream.rs"]
pub mod stream;

#[cfg(feature = "std")]
#[path = "tools/replicate.rs"]
pub mod replicate;
