// SPDX-License-Identifier: GPL-2.0

//! The binding layer: safe Rust types over the device-mapper, bio, dm-io, workqueue and
//! locking C APIs, reached through the small C glue in `dm/glue.c`.
//!
//! It knows no target: a target type implements [`TargetOps`] and registers itself with
//! [`Registration`], which gives the type its own `target_type` and operations table.  All
//! `unsafe` code of the module's driver side lives here.  Per-target state is `Sync` and
//! reached through `&self`: `map` runs on many CPUs at once.
//!
//! One file per kernel object:
//! - [`target`]: target types, their registration and callbacks, `dm_target`, events;
//! - [`bio`]: bios (owned, inside `map`, at completion);
//! - [`device`]: devices opened by a target (reference-counted);
//! - [`io`]: dm-io (synchronous sector I/O, batched sector copies);
//! - [`workqueue`]: a worker with a bio FIFO;
//! - [`sync`]: a mutex with `try_lock`, an in-flight counter, a registry of live objects;
//! - [`misc`]: checksum, random numbers, time.

pub(crate) mod bio;
pub(crate) mod device;
mod ffi;
pub(crate) mod io;
pub(crate) mod misc;
pub(crate) mod sync;
pub(crate) mod target;
pub(crate) mod workqueue;

pub(crate) use bio::{Bio, BioKind, BioRef, MapBio};
pub(crate) use device::Device;
pub(crate) use io::{Copier, SyncIo};
pub(crate) use misc::{crc32c, now_ns, random_u64};
pub(crate) use sync::{Inflight, Registry, TryMutex};
pub(crate) use target::{
    CtrTarget, EventHandle, MapResult, Output, Registration, StatusType, Target, TargetOps,
};
pub(crate) use workqueue::{WorkHandler, Worker};
