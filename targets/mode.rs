// SPDX-License-Identifier: GPL-2.0

//! Degraded operation: what happens when the COW device or its store fails.

use kernel::prelude::*;

use super::shared::{KStore, Shared, State};
use super::DevT;
use crate::exception_store::format::Error as StoreError;
use crate::exception_store::Store;

impl Shared {
    /// Gives up on the COW device: snapshots fail from now on, the origin keeps working.
    /// After an error that left the in-memory store unusable: reopen it from disk (journal
    /// replay drops the unfinished transaction), mark every snapshot invalid there and
    /// commit, so that origin writes may go on without copy-out and no snapshot is ever
    /// read stale, even after a restart.  If even that fails, snapshots fail from now on
    /// (the origin still works).
    pub(super) fn give_up(&self, st: &mut State, why: &'static str, e: StoreError) {
        st.gave_up = true;
        if st.failed.is_some() {
            return;
        }
        pr_err!(
            "{}: {} ({}); invalidating all snapshots of {}\n",
            DevT(self.key.cow),
            why,
            e,
            DevT(self.key.origin)
        );
        st.raise_event();
        if self.readonly {
            // Nothing may be written: snapshots fail until the next activation.
            st.store = None;
            st.failed = Some(why);
            return;
        }
        match st.store.take().map(|old| Self::reopen_invalidated(old)) {
            Some(Ok(b)) => {
                pr_err!(
                    "{}: snapshots marked invalid on disk; the origin continues\n",
                    DevT(self.key.cow)
                );
                st.store = Some(b);
            }
            Some(Err(e2)) => {
                pr_err!(
                    "{}: cannot record the invalidation ({}); snapshots fail until reactivation\n",
                    DevT(self.key.cow),
                    e2
                );
                st.failed = Some(why);
            }
            None => st.failed = Some(why),
        }
    }

    #[inline(never)]
    fn reopen_invalidated(old: KBox<KStore>) -> core::result::Result<KBox<KStore>, StoreError> {
        let (io, mem, sb) = KBox::into_inner(old).abandon();
        let mut s = Store::open(io, mem, sb)?;
        let live = s.sb().live_mask();
        s.invalidate(live)?;
        s.commit()?;
        KBox::new(s, GFP_NOWAIT | __GFP_NOWARN).map_err(|_| StoreError::Invalid("out of memory"))
    }
}
