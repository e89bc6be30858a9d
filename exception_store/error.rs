//! What the store can fail with: the persistent-data layer's failures, and the store's own
//! conditions.  Outcomes that are not failures are return values: a mutation that finds the
//! transaction full returns [`Step::CommitFirst`], a lookup that must not read returns
//! `Cached::Miss`.

use crate::pdata::block::Error as PdataError;
use core::fmt;

/// Everything that can go wrong in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The persistent-data layer failed (I/O, corruption, cache exhausted, a bug).  In the
    /// middle of a mutation it poisons the store (see `Store::poisoned`).
    Pdata(PdataError),
    /// The device does not hold a store this code can open.
    NotAStore(&'static str),
    /// No free chunk is left in the COW data area.
    NoDataSpace,
    /// No free block is left in the metadata area.
    NoMetaSpace,
    /// All 64 snapshot slots are in use.
    TooManySnapshots,
    /// A snapshot with this id exists already.
    DuplicateId,
    /// No live snapshot has this id.
    NoSuchSnapshot,
    /// The snapshot was invalidated (its copy could not be kept).
    SnapshotInvalid,
    /// A bad argument.
    Invalid(&'static str),
    /// The store was opened read-only: nothing may be written.
    ReadOnly,
    /// The journal holds committed transactions that a read-only open cannot apply.
    NeedsReplay,
    /// Copying a chunk into the COW data area failed.  The caller copies (the store only
    /// says where), but the copy belongs to the store's transaction: this is the caller's
    /// way to say why it gives up on one.
    DataCopy,
    /// The caller could not allocate memory for the store.
    NoMemory,
}

impl From<PdataError> for Error {
    fn from(e: PdataError) -> Self {
        Error::Pdata(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Pdata(e) => e.fmt(f),
            Error::NotAStore(what) => write!(f, "not a shared-snapshot store: {}", what),
            Error::NoDataSpace => write!(f, "COW device full"),
            Error::NoMetaSpace => write!(f, "metadata area full"),
            Error::TooManySnapshots => write!(f, "too many snapshots (64 at most)"),
            Error::DuplicateId => write!(f, "snapshot id already exists"),
            Error::NoSuchSnapshot => write!(f, "no such snapshot"),
            Error::SnapshotInvalid => write!(f, "snapshot is invalid"),
            Error::Invalid(what) => write!(f, "invalid argument: {}", what),
            Error::ReadOnly => write!(f, "store opened read-only"),
            Error::NeedsReplay => write!(f, "journal needs replay; activate read-write once"),
            Error::DataCopy => write!(f, "I/O error copying data to the COW device"),
            Error::NoMemory => write!(f, "out of memory"),
        }
    }
}

/// Result of store operations.
pub type Result<T> = core::result::Result<T, Error>;

/// What a mutation did.  Not an error: when the transaction is full the mutation changes
/// nothing and says so; the caller commits and calls again.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<T> {
    /// Done; the change is part of the open transaction.
    Done(T),
    /// The transaction is full: nothing was changed; commit, then call again.
    CommitFirst,
}

impl<T> Step<T> {
    /// The step with `f` applied to what it did.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::Done(t) => Step::Done(f(t)),
            Step::CommitFirst => Step::CommitFirst,
        }
    }
}
