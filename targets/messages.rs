// SPDX-License-Identifier: GPL-2.0

//! The origin's messages: `create <id>`, `delete <id>`, `list` and `stats`.

use core::fmt::Write;
use kernel::prelude::*;

use super::errors::errno;
use super::origin::Origin;
use super::parse_u32;
use super::shared::{KStore, Shared};
use super::DevT;
use crate::dm::Output;
use crate::exception_store::format::{Error as StoreError, PdataError, MAX_SNAPSHOTS};
use crate::exception_store::Step;

impl Origin {
    /// Handles a message to the origin (`dmsetup message <origin> 0 ...`).
    pub(super) fn handle_message(&self, args: &[&CStr], out: &mut Output) -> Result {
        let sh = &*self.shared;
        let cmd = args.first().and_then(|a| a.to_str().ok()).unwrap_or("");
        match (cmd, args.len()) {
            ("create", 2) | ("delete", 2) => {
                let Some(id) = parse_u32(args[1]) else {
                    pr_err!("{}: invalid snapshot id\n", self.origin.name());
                    return Err(EINVAL);
                };
                if sh.readonly {
                    pr_err!("{}: read-only table: no {}\n", self.origin.name(), cmd);
                    return Err(EROFS);
                }
                let mut st = sh.state.lock();
                let st = &mut *st;
                if st.mode.is_failed() {
                    pr_err!(
                        "{}: COW device failed; snapshots unavailable\n",
                        self.origin.name()
                    );
                    return Err(EIO);
                }
                let Some(store) = st.store.as_mut() else {
                    return Err(EIO);
                };
                if cmd == "create" {
                    // Writes mapped straight through before this point must be on the origin
                    // before the snapshot exists; new ones wait for the lock we hold.
                    sh.writes_inflight.wait_zero();
                    sh.create(store, id)
                } else {
                    let r = sh.delete(store, &st.snap_refs, id);
                    sh.worker.kick();
                    r
                }
            }
            ("stats", 1) => {
                let st = sh.state.lock();
                let s = &st.stats;
                let meta_reads = st.store.as_ref().map_or(0, |s| s.cache_reads());
                let _ = write!(
                    out,
                    "batches {} bios {} copy_jobs {} copied_chunks {} commits {} \
                     plan_us {} copy_us {} commit_us {} release_us {} meta_reads {} passed {}",
                    s.batches,
                    s.bios,
                    s.copy_jobs,
                    s.copied_chunks,
                    s.commits,
                    s.plan_ns / 1000,
                    s.copy_ns / 1000,
                    s.commit_ns / 1000,
                    s.release_ns / 1000,
                    meta_reads,
                    s.passed
                );
                Ok(())
            }
            ("list", 1) => {
                let st = sh.state.lock();
                if let Some(s) = st.store.as_ref() {
                    let mut first = true;
                    for snap in s.sb().snaps.iter().filter(|x| x.is_live()) {
                        let _ = write!(out, "{}{}", if first { "" } else { " " }, snap.id);
                        first = false;
                    }
                }
                Ok(())
            }
            _ => {
                pr_err!(
                    "{}: unknown message (expected create <id>, delete <id>, list or stats)\n",
                    self.origin.name()
                );
                Err(EINVAL)
            }
        }
    }
}

impl Shared {
    pub(super) fn create(&self, store: &mut KStore, id: u32) -> Result {
        match commit_op(store, |s| s.create_snapshot(id).map(|r| r.map(|_| ()))) {
            Ok(()) => {
                pr_info!("{}: created snapshot {}\n", DevT(self.key.origin), id);
                Ok(())
            }
            Err(e) => {
                pr_err!(
                    "{}: cannot create snapshot {}: {}\n",
                    DevT(self.key.origin),
                    id,
                    e
                );
                Err(errno(&e))
            }
        }
    }

    pub(super) fn delete(
        &self,
        store: &mut KStore,
        refs: &[u32; MAX_SNAPSHOTS],
        id: u32,
    ) -> Result {
        if let Some(slot) = store.sb().slot_of(id) {
            if refs[slot] > 0 {
                pr_err!(
                    "{}: snapshot {} has an active device; remove it first\n",
                    DevT(self.key.origin),
                    id
                );
                return Err(EBUSY);
            }
        }
        match commit_op(store, |s| s.delete_snapshot(id)) {
            Ok(()) => {
                pr_info!("{}: deleted snapshot {}\n", DevT(self.key.origin), id);
                Ok(())
            }
            Err(e) => {
                pr_err!(
                    "{}: cannot delete snapshot {}: {}\n",
                    DevT(self.key.origin),
                    id,
                    e
                );
                Err(errno(&e))
            }
        }
    }
}

/// Runs a store operation as its own committed transaction (committing first if the open
/// transaction is full), for messages that must be durable before they answer.
fn commit_op(
    store: &mut KStore,
    mut op: impl FnMut(&mut KStore) -> core::result::Result<Step<()>, StoreError>,
) -> core::result::Result<(), StoreError> {
    if let Step::CommitFirst = op(store)? {
        store.commit()?;
        if let Step::CommitFirst = op(store)? {
            // An empty transaction has room for any operation.
            return Err(PdataError::Bug("transaction full right after a commit").into());
        }
    }
    store.commit()
}
