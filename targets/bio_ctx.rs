// SPDX-License-Identifier: GPL-2.0

//! What a bio of the targets carries in its per-bio word (`dm`'s u64 tag): whom it belongs
//! to and which in-flight counter it holds, decremented at its completion.

/// A bio's context.  Its binary encoding in the per-bio word is private to this file.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct BioCtx {
    /// Counted in `Shared::writes_inflight` (an origin write sent to the origin).
    pub(super) write_counted: bool,
    /// Counted in `Shared::snap_reads` (a snapshot read sent on).
    pub(super) read_counted: bool,
    /// The slot of the snapshot the bio belongs to; None for an origin bio.
    pub(super) snap_slot: Option<u8>,
}

const WRITE_COUNTED: u64 = 1;
const READ_COUNTED: u64 = 2;
const SNAP: u64 = 1 << 8;
const SLOT_SHIFT: u32 = 16;

impl BioCtx {
    /// An origin write counted in `writes_inflight`.
    pub(super) fn counted_write() -> Self {
        BioCtx {
            write_counted: true,
            ..Self::default()
        }
    }

    /// A bio of the snapshot in `slot`.
    pub(super) fn snap(slot: usize) -> Self {
        BioCtx {
            snap_slot: Some(slot as u8),
            ..Self::default()
        }
    }

    /// The snapshot slot (0 for an origin bio).
    pub(super) fn slot(self) -> usize {
        self.snap_slot.map_or(0, usize::from)
    }

    /// The per-bio word.
    pub(super) fn to_tag(self) -> u64 {
        let mut tag = 0;
        if self.write_counted {
            tag |= WRITE_COUNTED;
        }
        if self.read_counted {
            tag |= READ_COUNTED;
        }
        if let Some(slot) = self.snap_slot {
            tag |= SNAP | ((slot as u64) << SLOT_SHIFT);
        }
        tag
    }

    /// The context a per-bio word holds.
    pub(super) fn from_tag(tag: u64) -> Self {
        BioCtx {
            write_counted: tag & WRITE_COUNTED != 0,
            read_counted: tag & READ_COUNTED != 0,
            snap_slot: (tag & SNAP != 0).then(|| ((tag >> SLOT_SHIFT) & 63) as u8),
        }
    }
}
