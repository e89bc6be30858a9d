// SPDX-License-Identifier: GPL-2.0

//! The origin's messages: `create`, `delete`, `list`, `stats`, and for replication `info`,
//! `delta` and `progress` (Documentation/targets.md).

use core::fmt::Write;
use kernel::prelude::*;

use super::errors::errno;
use super::origin::Origin;
use super::shared::{KStore, Shared};
use super::DevT;
use super::{parse_hex, parse_u32, parse_u64};
use crate::dm::Output;
use crate::exception_store::format::{Error as StoreError, PdataError, MAX_SNAPSHOTS};
use crate::exception_store::superblock::Progress;
use crate::exception_store::Step;

/// A message that changes the store (committed before it answers).
enum Change {
    Create(u32),
    /// A replica: id, source store uuid, source creation sequence.
    Replica(u32, [u8; 16], u64),
    Delete(u32),
    /// Receive progress: `bytes[..len]`.
    Progress([u8; Progress::MAX], usize),
}

/// The most ranges one `delta` message lists.
const DELTA_MAX_RANGES: usize = 128;
/// The most btree leaves one `delta` message visits.
const DELTA_MAX_LEAVES: usize = 64;

impl Origin {
    /// Handles a message to the origin (`dmsetup message <origin> 0 ...`).
    pub(super) fn handle_message(&self, args: &[&CStr], out: &mut Output) -> Result {
        let cmd = args.first().and_then(|a| a.to_str().ok()).unwrap_or("");
        match (cmd, args.len()) {
            ("create", 2 | 4) | ("delete", 2) | ("progress", 2) => {
                let Some(change) = parse_change(cmd, args) else {
                    pr_err!("{}: invalid arguments to {}\n", self.origin.name(), cmd);
                    return Err(EINVAL);
                };
                self.change(cmd, change)
            }
            ("delta", 4) => self.delta(args, out),
            ("info", 1) => self.info(out),
            ("stats", 1) => {
                let sh = &*self.shared;
                let st = sh.state.lock();
                let s = &st.stats;
                let meta_reads = st.store.as_ref().map_or(0, |s| s.cache_reads());
                let (meta_write_ns, crc_ns) =
                    st.store.as_ref().map_or((0, 0), |s| s.io_ref().times_ns());
                let _ = write!(
                    out,
                    "batches {} bios {} copy_jobs {} copied_chunks {} commits {} \
                     plan_us {} copy_us {} commit_us {} release_us {} meta_reads {} passed {} \
                     meta_write_us {} crc_us {} joined {}",
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
                    s.passed,
                    meta_write_ns / 1000,
                    crc_ns / 1000,
                    s.joined
                );
                Ok(())
            }
            ("list", 1) => {
                let st = self.shared.state.lock();
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
                    "{}: unknown message (expected create, delete, list, info, delta, \
                     progress or stats)\n",
                    self.origin.name()
                );
                Err(EINVAL)
            }
        }
    }

    /// `create`, `delete`, `progress`: one committed transaction each.
    fn change(&self, cmd: &str, change: Change) -> Result {
        let sh = &*self.shared;
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
        match change {
            Change::Create(id) | Change::Replica(id, ..) => {
                // Writes mapped straight through before this point must be on the origin
                // before the snapshot exists; new ones wait for the lock we hold.
                sh.writes_inflight.wait_zero();
                let source = match change {
                    Change::Replica(_, uuid, seq) => Some((uuid, seq)),
                    _ => None,
                };
                sh.create(store, id, source)
            }
            Change::Delete(id) => {
                let r = sh.delete(store, &st.snap_refs, id);
                sh.worker.kick();
                r
            }
            Change::Progress(bytes, len) => commit_op(store, |s| s.set_progress(&bytes[..len]))
                .map_err(|e| {
                    pr_err!(
                        "{}: cannot record receive progress: {}\n",
                        self.origin.name(),
                        e
                    );
                    errno(&e)
                }),
        }
    }

    /// `info`: the identities of the store and its snapshots (Documentation/targets.md).
    fn info(&self, out: &mut Output) -> Result {
        let sh = &*self.shared;
        let st = sh.state.lock();
        let Some(store) = st.store.as_ref() else {
            return Err(EIO);
        };
        let sb = store.sb();
        let _ = write!(out, "store ");
        write_hex(out, &sb.replication_uuid());
        let _ = writeln!(
            out,
            " chunk_sectors {} chunks {} next_seq {}",
            sh.chunk_sectors,
            sh.origin_chunks(),
            sb.next_seq
        );
        let _ = write!(out, "source ");
        if sb.source_uuid == [0; 16] {
            let _ = write!(out, "-");
        } else {
            write_hex(out, &sb.source_uuid);
        }
        let _ = write!(out, "\nprogress ");
        match sb.progress.get() {
            Some(p) if !p.is_empty() => write_hex(out, p),
            _ => {
                let _ = write!(out, "-");
            }
        }
        for s in sb.snaps.iter().filter(|s| s.is_live()) {
            let _ = write!(
                out,
                "\nsnap {} {} {} {}",
                s.id,
                s.create_seq,
                s.source_seq,
                if s.is_invalid() { "invalid" } else { "valid" }
            );
        }
        Ok(())
    }

    /// `delta <from|-> <to> <start_chunk>`: one page of the online delta.
    fn delta(&self, args: &[&CStr], out: &mut Output) -> Result {
        let sh = &*self.shared;
        let from = match args[1].as_bytes() {
            b"-" => None,
            _ => Some(parse_u32(args[1]).ok_or(EINVAL)?),
        };
        let (Some(to), Some(start)) = (parse_u32(args[2]), parse_u64(args[3])) else {
            pr_err!(
                "{}: delta <from|-> <to> <start_chunk>\n",
                self.origin.name()
            );
            return Err(EINVAL);
        };
        if from == Some(to) {
            return Err(EINVAL);
        }
        let chunks = sh.origin_chunks();
        let mut st = sh.state.lock();
        let st = &mut *st;
        if st.mode.is_failed() {
            return Err(EIO);
        }
        let Some(store) = st.store.as_mut() else {
            return Err(EIO);
        };
        let slot = |id| store.sb().slot_of(id).ok_or(ENOENT);
        let to_slot = slot(to)?;
        let Some(from) = from else {
            // Against nothing every chunk differs: one range.
            if store.sb().snaps[to_slot].is_invalid() {
                return Err(EIO);
            }
            if start < chunks {
                let _ = write!(out, "{}+{} ", start, chunks - start);
            }
            let _ = write!(out, "end");
            return Ok(());
        };
        let from_slot = slot(from)?;
        let mut ranges = Ranges::default();
        let r = store.delta(from_slot, to_slot, start, DELTA_MAX_LEAVES, |c| {
            ranges.add(c, out)
        });
        match r {
            Ok(next) => {
                ranges.flush(out);
                match next {
                    Some(n) => {
                        let _ = write!(out, "next {}", n);
                    }
                    None => {
                        let _ = write!(out, "end");
                    }
                }
                Ok(())
            }
            Err(e) => {
                pr_err!("{}: delta {} {}: {}\n", self.origin.name(), from, to, e);
                Err(errno(&e))
            }
        }
    }
}

/// The ranges of a `delta` page, written as they close.
#[derive(Default)]
struct Ranges {
    /// The open range: first chunk, count.
    open: Option<(u64, u64)>,
    written: usize,
}

impl Ranges {
    /// Adds `chunk` (above every chunk added before); false if it would open one range too
    /// many (the page ends before it).
    fn add(&mut self, chunk: u64, out: &mut Output) -> bool {
        match &mut self.open {
            Some((first, n)) if first.checked_add(*n) == Some(chunk) => *n += 1,
            _ => {
                if self.written + usize::from(self.open.is_some()) == DELTA_MAX_RANGES {
                    return false;
                }
                self.flush(out);
                self.open = Some((chunk, 1));
            }
        }
        true
    }

    fn flush(&mut self, out: &mut Output) {
        if let Some((first, n)) = self.open.take() {
            let _ = write!(out, "{}+{} ", first, n);
            self.written += 1;
        }
    }
}

fn write_hex(out: &mut Output, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{:02x}", b);
    }
}

/// Parses the arguments of a store-changing message (`None`: invalid).
fn parse_change(cmd: &str, args: &[&CStr]) -> Option<Change> {
    match (cmd, args.len()) {
        ("create", 2) => Some(Change::Create(parse_u32(args[1])?)),
        ("create", 4) => {
            let mut uuid = [0u8; 16];
            if parse_hex(args[2], &mut uuid)? != 16 {
                return None;
            }
            Some(Change::Replica(
                parse_u32(args[1])?,
                uuid,
                parse_u64(args[3])?,
            ))
        }
        ("delete", 2) => Some(Change::Delete(parse_u32(args[1])?)),
        ("progress", 2) => {
            let mut bytes = [0u8; Progress::MAX];
            let len = match args[1].as_bytes() {
                b"-" => 0,
                _ => parse_hex(args[1], &mut bytes)?,
            };
            Some(Change::Progress(bytes, len))
        }
        _ => None,
    }
}

impl Shared {
    pub(super) fn create(
        &self,
        store: &mut KStore,
        id: u32,
        source: Option<([u8; 16], u64)>,
    ) -> Result {
        let op = |s: &mut KStore| {
            let r = match source {
                Some((uuid, seq)) => s.create_replica(id, uuid, seq),
                None => s.create_snapshot(id),
            };
            r.map(|r| r.map(|_| ()))
        };
        match commit_op(store, op) {
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
