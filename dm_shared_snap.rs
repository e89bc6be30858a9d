// SPDX-License-Identifier: GPL-2.0

//! dm-shared-snap: device-mapper targets for many long-lived snapshots of one volume.
//!
//! `shared-origin` maps the origin and owns the COW device, which holds ONE
//! exception store shared by up to 64 snapshots; `shared-snapshot` maps one snapshot.  An
//! origin write to a chunk still shared with snapshots copies the chunk once, whatever the
//! number of snapshots, commits the new exception through the journal, and only then lets
//! the write reach the origin.
//!
//! Concurrency: `map` never waits for I/O.  It answers from cached metadata under a try-lock
//! and otherwise defers the bio to the origin's worker, which handles bios in batches: plan
//! (metadata changes in memory), copy chunks (dm-io, one buffer), commit (one journal transaction for
//! the batch), wait for snapshot reads still reading the origin, then release the bios.
//!
//! Layers: `pdata/` (persistent data) under `exception_store/` (the store), `store_io` (its
//! kernel I/O and memory), `dm/` (the device-mapper binding layer), and `targets/` (the two
//! targets) on top.

use kernel::c_str;
use kernel::prelude::*;

mod dm;
// The core's `pub` items are the Cargo crate's API (lib.rs); here they are crate-visible.
// Items only the tools use carry their own `dead_code` expectation.
#[allow(unreachable_pub)]
mod exception_store;
#[allow(unreachable_pub)]
mod pdata;
mod store_io;
mod targets;

use dm::Registration;
use targets::{Origin, Snapshot};

module! {
    type: DmSharedSnapModule,
    name: "dm_shared_snap",
    author: "dm-shared-snap developers",
    description: "device-mapper shared snapshots: one exception store for up to 64 snapshots",
    license: "GPL",
}

struct DmSharedSnapModule {
    origin: Option<Registration<Origin>>,
    snapshot: Option<Registration<Snapshot>>,
}

impl kernel::Module for DmSharedSnapModule {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let origin = Registration::new(c_str!("shared-origin"), [1, 0, 0])?;
        let snapshot = Registration::new(c_str!("shared-snapshot"), [1, 0, 0])?;
        pr_info!("shared-snapshot targets registered\n");
        Ok(DmSharedSnapModule {
            origin: Some(origin),
            snapshot: Some(snapshot),
        })
    }
}

impl Drop for DmSharedSnapModule {
    fn drop(&mut self) {
        drop(self.snapshot.take());
        drop(self.origin.take());
        targets::free_origins();
    }
}
