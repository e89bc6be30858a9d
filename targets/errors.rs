// SPDX-License-Identifier: GPL-2.0

//! Store errors as the targets report them: the errno of a failed message, and the errno
//! and `ti->error` message of a store that cannot be opened.  (A bio the worker fails gets
//! EIO whatever the store's error: a snapshot that lost data, or whose store failed, fails
//! its I/O.)

use kernel::c_str;
use kernel::prelude::*;

use crate::exception_store::format::Error as StoreError;

/// The errno of a store operation that failed (the `create` and `delete` messages).
pub(super) fn errno(e: &StoreError) -> Error {
    match e {
        StoreError::DuplicateId => EEXIST,
        StoreError::TooManySnapshots => ENOSPC,
        StoreError::NoSuchSnapshot => ENOENT,
        _ => EIO,
    }
}

/// The errno and ti->error message for a store that cannot be opened.
pub(super) fn open_error(e: StoreError) -> (&'static CStr, Error) {
    match e {
        StoreError::NotAStore(_) => (
            c_str!("COW device holds no shared-snapshot store (foreign data, wrong version or truncated)"),
            EINVAL,
        ),
        StoreError::Corrupt { .. } => (
            c_str!("COW device metadata is corrupt (see dmesg, run shsnap check)"),
            EINVAL,
        ),
        StoreError::Io { .. } => (c_str!("I/O error reading the COW device"), EIO),
        StoreError::Invalid(_) => (c_str!("COW device too small for a store"), EINVAL),
        _ => (c_str!("cannot open the exception store"), EINVAL),
    }
}
