// SPDX-License-Identifier: GPL-2.0

//! The two device-mapper targets over the shared exception store, split by concept:
//!
//! - [`origin`]: `shared-origin`, which maps the origin and owns the COW device;
//! - [`snapshot`]: `shared-snapshot`, which maps one snapshot;
//! - [`shared`]: what an origin shares with its worker and its snapshots ([`Shared`],
//!   its locked [`State`](shared::State)), the registry of active origins and the store's
//!   open/close lifecycle;
//! - [`mode`]: degraded operation, one [`Mode`](mode::Mode) and its transitions;
//! - [`worker`]: the origin's worker (deferred bios in batches, the deletion sweep);
//! - [`messages`]: the origin's messages (`create`, `delete`, `list`, `stats`);
//! - [`bio_ctx`]: what a bio carries in its per-bio word;
//! - [`errors`]: store errors as errnos and constructor messages.
//!
//! This layer may use `dm/`, `exception_store/` and `store_io`; nothing below imports it.

use kernel::prelude::*;

use crate::dm::Target;

mod bio_ctx;
mod errors;
mod messages;
mod mode;
mod origin;
mod shared;
mod snapshot;
mod worker;

pub(crate) use origin::Origin;
pub(crate) use snapshot::Snapshot;

/// A dev_t printed as dm prints devices ("major:minor").
pub(crate) struct DevT(u32);

impl core::fmt::Display for DevT {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}:{}", self.0 >> 20, self.0 & 0xfffff)
    }
}

/// At module unload, after both target types are unregistered: frees the registry of
/// active origins (empty by then).
pub(crate) fn free_origins() {
    shared::ORIGINS.free();
}

pub(crate) fn parse_u32(s: &CStr) -> Option<u32> {
    let s = s.to_str().ok()?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

pub(crate) fn parse_u64(s: &CStr) -> Option<u64> {
    let s = s.to_str().ok()?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Decodes hex digits (two per byte) into `out`; returns the bytes written, `None` if `s`
/// is not hex of at most `out.len()` bytes.
pub(crate) fn parse_hex(s: &CStr, out: &mut [u8]) -> Option<usize> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 || s.len() / 2 > out.len() {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(s.len() / 2)
}

pub(crate) fn fail(t: &Target, msg: &'static CStr, e: Error) -> Error {
    t.set_error(msg);
    e
}
