//! Userspace build of the dm-shared-snap core: the very files the kernel module compiles
//! (`pdata/`, the persistent-data layer, and `exception_store/` on top of it), plus std-only
//! helpers for the tools and tests.
#![no_std]
// No unsafe code but in `dm_ioctl` (the ioctl and mknod calls of the tools): forbidden in
// every other module.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

#[forbid(unsafe_code)]
pub mod exception_store;
#[forbid(unsafe_code)]
pub mod pdata;

#[cfg(feature = "std")]
#[forbid(unsafe_code)]
#[path = "tools/host.rs"]
pub mod host;

#[cfg(feature = "std")]
#[forbid(unsafe_code)]
#[path = "tools/check.rs"]
pub mod check;

#[cfg(feature = "std")]
#[forbid(unsafe_code)]
#[path = "tools/forge.rs"]
pub mod forge;

#[cfg(feature = "std")]
#[forbid(unsafe_code)]
#[path = "tools/stream.rs"]
pub mod stream;

#[cfg(feature = "std")]
#[forbid(unsafe_code)]
#[path = "tools/replicate.rs"]
pub mod replicate;

#[cfg(feature = "std")]
#[allow(unsafe_code)]
#[path = "tools/dm_ioctl.rs"]
pub mod dm_ioctl;
