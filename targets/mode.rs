// SPDX-License-Identifier: GPL-2.0

//! Degraded operation: the origin's [`Mode`], moved only by [`Shared::set_mode`] (as
//! dm-thin moves its pool between modes), and [`Shared::give_up`], what the targets do when
//! the COW device or its store fails.

use kernel::prelude::*;

use super::shared::{KStore, Shared, State};
use super::DevT;
use crate::exception_store::format::Error as StoreError;
use crate::exception_store::Store;

/// How an origin works, as far as its COW device and store let it.
///
/// The store (`State::store`) is there in every mode but `Failed`.  The origin itself works
/// in every mode: only snapshots and their I/O are given up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// The store works: snapshots are kept.
    Write,
    /// As `Write`, but snapshots were invalidated (COW device full) and that is not
    /// committed yet: until it is, an origin write that needs no copy only because of it
    /// must wait for the commit (the worker does not send it on at once).  Back to `Write`
    /// once the batch commits.
    InvalidationPending,
    /// The batch in progress lost its store (an error left it unusable; it was reopened
    /// from disk with every snapshot invalid, committed): the batch's copies and commit are
    /// void and its snapshot bios fail.  At the next batch, back to `Write`, or to
    /// `InvalidationPending` if `pending` (an invalidation not committed when it gave up).
    GaveUp {
        /// An invalidation was pending when the batch gave up, or came after.
        pending: bool,
    },
    /// The COW device was given up (`why`): there is no store any more; snapshots fail,
    /// the origin keeps working.  Final: only a new table leaves it.
    Failed {
        /// The reason, shown by the origin's status (`- - - fail <why>`).
        why: &'static str,
    },
}

impl Mode {
    /// The COW device was given up: no store.
    pub(super) fn is_failed(self) -> bool {
        matches!(self, Mode::Failed { .. })
    }

    /// The batch in progress lost its store (or there is none): its copies and commit are
    /// void, its snapshot bios fail, and it drains snapshot reads before it releases.
    pub(super) fn batch_lost(self) -> bool {
        matches!(self, Mode::GaveUp { .. } | Mode::Failed { .. })
    }

    /// Snapshots were invalidated and that is not committed yet.
    pub(super) fn invalidation_pending(self) -> bool {
        matches!(
            self,
            Mode::InvalidationPending | Mode::GaveUp { pending: true }
        )
    }
}

impl Shared {
    /// Moves the origin to mode `new`, with what goes with the transition:
    ///
    /// - `Failed` is final: nothing leaves it (a later failure changes nothing, not even
    ///   the reason);
    /// - to `Failed`: the store goes (whoever had to close it took it first);
    /// - to `InvalidationPending` (snapshots were invalidated; the caller logged which):
    ///   inside a batch that gave up, remembered as `GaveUp { pending: true }`;
    /// - to `GaveUp`: keeps an invalidation still pending;
    /// - to `Write` (the batch committed, or a new batch starts after one that gave up):
    ///   from `GaveUp { pending: true }`, to `InvalidationPending`;
    /// - every transition but to `Write` raises a dm event (snapshots were invalidated, or
    ///   the store failed).
    pub(super) fn set_mode(&self, st: &mut State, new: Mode) {
        let old = st.mode;
        let next = match (old, new) {
            (Mode::Failed { .. }, _) => return,
            (Mode::GaveUp { .. }, Mode::InvalidationPending) => Mode::GaveUp { pending: true },
            (Mode::GaveUp { pending: true }, Mode::Write) => Mode::InvalidationPending,
            (_, Mode::GaveUp { pending }) => Mode::GaveUp {
                pending: pending || old.invalidation_pending(),
            },
            (_, new) => new,
        };
        if next.is_failed() {
            st.store = None;
        }
        st.mode = next;
        if new != Mode::Write {
            st.raise_event();
        }
    }

    /// Gives up on the COW device: snapshots fail from now on, the origin keeps working.
    /// After an error that left the in-memory store unusable: reopen it from disk (journal
    /// replay drops the unfinished transaction), mark every snapshot invalid there and
    /// commit, so that origin writes may go on without copy-out and no snapshot is ever
    /// read stale, even after a restart.  If even that fails, snapshots fail from now on
    /// (the origin still works).
    pub(super) fn give_up(&self, st: &mut State, why: &'static str, e: StoreError) {
        if st.mode.is_failed() {
            return;
        }
        pr_err!(
            "{}: {} ({}); invalidating all snapshots of {}\n",
            DevT(self.key.cow),
            why,
            e,
            DevT(self.key.origin)
        );
        if self.readonly {
            // Nothing may be written: snapshots fail until the next activation.
            self.set_mode(st, Mode::Failed { why });
            return;
        }
        match st.store.take().map(|old| Self::reopen_invalidated(old)) {
            Some(Ok(b)) => {
                pr_err!(
                    "{}: snapshots marked invalid on disk; the origin continues\n",
                    DevT(self.key.cow)
                );
                st.store = Some(b);
                self.set_mode(st, Mode::GaveUp { pending: false });
            }
            Some(Err(e2)) => {
                pr_err!(
                    "{}: cannot record the invalidation ({}); snapshots fail until reactivation\n",
                    DevT(self.key.cow),
                    e2
                );
                self.set_mode(st, Mode::Failed { why });
            }
            None => self.set_mode(st, Mode::Failed { why }),
        }
    }

    #[inline(never)]
    fn reopen_invalidated(old: KBox<KStore>) -> core::result::Result<KBox<KStore>, StoreError> {
        let (io, mem, sb) = KBox::into_inner(old).abandon();
        let mut s = Store::open(io, mem, sb)?;
        let live = s.sb().live_mask();
        s.invalidate(live)?;
        s.commit()?;
        KBox::new(s, GFP_NOWAIT | __GFP_NOWARN).map_err(|_| StoreError::NoMemory)
    }
}
