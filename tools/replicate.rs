//! `shsnap send` and `shsnap receive`: a snapshot of a live origin written as a replication
//! stream (`Documentation/stream.md`) and applied to the origin of another store, through
//! the origin's replication messages `info`, `delta`, `progress` and
//! `create <id> <source_uuid> <source_seq>` (`Documentation/targets.md`).
//!
//! What decides is pure and tested without a kernel: the parsers of what the kernel prints
//! ([`parse_info`], [`parse_delta`], [`parse_origin_table`], [`snapshot_devices`]), the
//! sender's choice of snapshots ([`plan_send`]) and the receiver's accept-or-refuse decision
//! ([`decide`]).  The two loops, [`write_stream`] and [`apply`], reach the kernel through
//! the traits [`Primary`] and [`Secondary`]; [`send`], [`receive`] and [`query`] bind them
//! to the device-mapper ioctls ([`crate::dm_ioctl`]) and the mapped devices.
#![expect(
    clippy::result_large_err,
    reason = "the errors carry the defect and the resume token to print; they end the command"
)]

use crate::dm_ioctl::{self, TargetLine};
use crate::stream::{
    Header, ResumePoint, ResumeToken, SnapIdentity, StreamError, StreamReader, StreamWriter,
    Summary, END_LEN, RECORD_HEAD, RECORD_TAIL,
};
use std::fmt;
use std::format;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::string::{String, ToString};
use std::time::Instant;
use std::vec;
use std::vec::Vec;

/// Data `receive` applies between two durable progress records.
pub const PROGRESS_EVERY: u64 = 64 << 20;
/// Largest read of the snapshot device by `send`: runs of chunks are read this much at once.
const READ_BYTES: usize = 4 << 20;

/// The alignment of `write_stream`'s read buffer: a page, enough for O_DIRECT on any
/// logical block size up to 4 KiB.
const DIRECT_ALIGN: usize = 4096;
/// Largest write of zeros by `receive` (the chunks a full stream does not carry).
const ZERO_BYTES: usize = 1 << 20;
const SECTOR: u64 = 512;

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{:02x}", x)).collect()
}

/// Decodes hex digits (either case); None if the length is odd or a character is no digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A store uuid as the kernel prints it: 32 hex digits.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    unhex(s)?.try_into().ok()
}

fn number<T: core::str::FromStr>(s: &str) -> Option<T> {
    // FromStr of the integers takes a leading '+': the kernel never prints one.
    if s.starts_with('+') {
        return None;
    }
    s.parse().ok()
}

// ---------------------------------------------------------------------------------------
// What the kernel prints.

/// A live snapshot as the origin's `info` message lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapInfo {
    /// User id.
    pub id: u32,
    /// Creation sequence (never reused in its store).
    pub seq: u64,
    /// If a replica: the creation sequence of the snapshot of the source store it is a
    /// complete copy of; 0 otherwise.
    pub source_seq: u64,
    /// False once the snapshot lost data (it fails all I/O).
    pub valid: bool,
}

/// What the origin's `info` message prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// The store's uuid.
    pub uuid: [u8; 16],
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
    /// The origin's chunks (the last one maybe short).
    pub chunks: u64,
    /// The creation sequence the next snapshot will get.
    pub next_seq: u64,
    /// The store the replicas were received from.
    pub source: Option<[u8; 16]>,
    /// The receive progress bytes (`shsnap receive` keeps a resume token there).
    pub progress: Option<Vec<u8>>,
    /// The live snapshots, in slot order.
    pub snaps: Vec<SnapInfo>,
}

impl StoreInfo {
    /// The live snapshot `id`.
    pub fn snap(&self, id: u32) -> Option<&SnapInfo> {
        self.snaps.iter().find(|s| s.id == id)
    }

    /// The live snapshot of creation sequence `seq`.
    pub fn by_seq(&self, seq: u64) -> Option<&SnapInfo> {
        self.snaps.iter().find(|s| s.seq == seq)
    }

    /// The newest replica: the valid snapshot with the highest source sequence (not 0).
    pub fn newest_replica(&self) -> Option<&SnapInfo> {
        self.snaps
            .iter()
            .filter(|s| s.valid && s.source_seq != 0)
            .max_by_key(|s| s.source_seq)
    }

    /// The stored progress as a resume token; None if there is none or it is not a token.
    pub fn progress_token(&self) -> Option<ResumeToken> {
        self.progress.as_deref().and_then(ResumeToken::from_bytes)
    }

    /// An id for a new snapshot: `wanted` if no live snapshot has it, else one above the
    /// highest live id (None if that is past u32).
    pub fn free_id(&self, wanted: u32) -> Option<u32> {
        match self.snaps.iter().map(|s| s.id).max() {
            Some(max) if self.snap(wanted).is_some() => max.checked_add(1),
            _ => Some(wanted),
        }
    }
}

/// Parses what the origin's `info` message prints (`Documentation/targets.md`).  Lines of
/// an unknown kind are skipped (a newer kernel may add some); a known line must have its
/// exact shape.
pub fn parse_info(text: &str) -> Result<StoreInfo, String> {
    let mut store = None;
    let mut source = None;
    let mut progress = None;
    let mut snaps: Vec<SnapInfo> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |what: &str| format!("info line {}: {}: {:?}", n + 1, what, line);
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["store", uuid, "chunk_sectors", cs, "chunks", chunks, "next_seq", next] => {
                if store.is_some() {
                    return Err(bad("a second store line"));
                }
                store = Some((
                    parse_uuid(uuid).ok_or_else(|| bad("bad uuid"))?,
                    number(cs).ok_or_else(|| bad("bad chunk size"))?,
                    number(chunks).ok_or_else(|| bad("bad chunk count"))?,
                    number(next).ok_or_else(|| bad("bad next_seq"))?,
                ));
            }
            ["store", ..] => {
                return Err(bad(
                    "not `store <uuid> chunk_sectors <n> chunks <n> next_seq <n>`",
                ))
            }
            ["source", s] => {
                if source.is_some() {
                    return Err(bad("a second source line"));
                }
                source = Some(match *s {
                    "-" => None,
                    s => Some(parse_uuid(s).ok_or_else(|| bad("bad uuid"))?),
                });
            }
            ["source", ..] => return Err(bad("not `source <uuid>|-`")),
            ["progress", p] => {
                if progress.is_some() {
                    return Err(bad("a second progress line"));
                }
                progress = Some(match *p {
                    "-" => None,
                    p => Some(unhex(p).ok_or_else(|| bad("bad hex"))?),
                });
            }
            ["progress", ..] => return Err(bad("not `progress <hex>|-`")),
            ["snap", id, seq, source_seq, state] => {
                let s = SnapInfo {
                    id: number(id).ok_or_else(|| bad("bad id"))?,
                    seq: number(seq)
                        .filter(|&s| s != 0)
                        .ok_or_else(|| bad("bad creation sequence"))?,
                    source_seq: number(source_seq).ok_or_else(|| bad("bad source sequence"))?,
                    valid: match *state {
                        "valid" => true,
                        "invalid" => false,
                        _ => return Err(bad("neither valid nor invalid")),
                    },
                };
                if snaps.iter().any(|o| o.id == s.id || o.seq == s.seq) {
                    return Err(bad("a second snapshot of this id or creation sequence"));
                }
                snaps.push(s);
            }
            ["snap", ..] => return Err(bad("not `snap <id> <seq> <source_seq> valid|invalid`")),
            _ => {}
        }
    }
    let missing = |what| format!("info: no {} line in {:?}", what, text.trim());
    let (uuid, chunk_sectors, chunks, next_seq) = store.ok_or_else(|| missing("store"))?;
    Ok(StoreInfo {
        uuid,
        chunk_sectors,
        chunks,
        next_seq,
        source: source.ok_or_else(|| missing("source"))?,
        progress: progress.ok_or_else(|| missing("progress"))?,
        snaps,
    })
}

/// One answer of the origin's `delta` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaPage {
    /// Chunk ranges `(first, count)`: increasing, disjoint, not empty, at or after the
    /// start chunk, their ends within u64.
    pub ranges: Vec<(u64, u64)>,
    /// Where to call again (above the start chunk, not inside a range); None: complete.
    pub next: Option<u64>,
}

/// Parses the answer of `delta <from> <to> <start>`: `<first>+<count> ... next <chunk>` or
/// `... end`.
pub fn parse_delta(text: &str, start: u64) -> Result<DeltaPage, String> {
    let bad = |what: String| format!("delta from chunk {}: {}", start, what);
    let mut ranges = Vec::new();
    let mut end = start; // no range may begin below this
    let mut words = text.split_whitespace();
    let next = loop {
        match words.next() {
            None => return Err(bad("no `next` or `end` at the end".to_string())),
            Some("end") => break None,
            Some("next") => {
                let n = words.next().unwrap_or("");
                let next: u64 = number(n).ok_or_else(|| bad(format!("bad next chunk {:?}", n)))?;
                if next <= start || next < end {
                    return Err(bad(format!(
                        "next chunk {} does not move on (ranges end at {})",
                        next, end
                    )));
                }
                break Some(next);
            }
            Some(w) => {
                let range = w.split_once('+').and_then(|(a, b)| {
                    let (first, count): (u64, u64) = (number(a)?, number(b)?);
                    Some((first, count, first.checked_add(count)?))
                });
                let Some((first, count, range_end)) = range.filter(|r| r.1 != 0) else {
                    return Err(bad(format!("bad range {:?}", w)));
                };
                if first < end {
                    return Err(bad(format!(
                        "range {} overlaps or goes back (below chunk {})",
                        w, end
                    )));
                }
                ranges.push((first, count));
                end = range_end;
            }
        }
    };
    if let Some(w) = words.next() {
        return Err(bad(format!("{:?} after the end", w)));
    }
    Ok(DeltaPage { ranges, next })
}

/// The table of an active `shared-origin` device (`dmsetup table NAME`, [`dm_ioctl::table`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginTable {
    /// The origin's size in sectors (the table's length).
    pub sectors: u64,
    /// The origin device under the table (major:minor): what snapshot tables name.
    pub origin_dev: String,
    /// The COW device (major:minor).
    pub cow_dev: String,
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
}

/// Parses `0 <len> shared-origin <origin_dev> <cow_dev> <chunk> [features]`, the one line
/// of an origin's table.
pub fn parse_origin_table(text: &str) -> Result<OriginTable, String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let [line] = lines.as_slice() else {
        return Err(format!(
            "not one shared-origin table line: {:?}",
            text.trim()
        ));
    };
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["0", len, "shared-origin", origin, cow, chunk, ..] => Ok(OriginTable {
            sectors: number(len)
                .filter(|&l| l != 0)
                .ok_or_else(|| format!("bad length in {:?}", line))?,
            origin_dev: origin.to_string(),
            cow_dev: cow.to_string(),
            chunk_sectors: number(chunk).ok_or_else(|| format!("bad chunk size in {:?}", line))?,
        }),
        _ => Err(format!("not a shared-origin table: {:?}", line)),
    }
}

/// An active `shared-snapshot` device, from the tables of all devices ([`dm_ioctl::tables`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTable {
    /// Its dm name.
    pub name: String,
    /// Its length in sectors.
    pub sectors: u64,
    /// The origin device its table names (major:minor).
    pub origin_dev: String,
    /// The snapshot id.
    pub id: u32,
}

/// The devices whose whole table is one `0 <len> shared-snapshot <origin_dev> <id>` target,
/// in the order of `tables` (device name, its targets).
pub fn snapshot_devices(tables: &[(String, Vec<TargetLine>)]) -> Vec<SnapshotTable> {
    let mut out = Vec::new();
    for (name, targets) in tables {
        let [t] = targets.as_slice() else { continue };
        let w: Vec<&str> = t.params.split_whitespace().collect();
        if let (0, "shared-snapshot", [origin, id]) = (t.start, t.ttype.as_str(), w.as_slice()) {
            if let Some(id) = number(id) {
                out.push(SnapshotTable {
                    name: name.clone(),
                    sectors: t.len,
                    origin_dev: origin.to_string(),
                    id,
                });
            }
        }
    }
    out
}

/// [`snapshot_devices`] of the `<name>: <start> <len> <type> <params>` lines of `dmsetup
/// table` (other lines are skipped), sorted by name.
pub fn parse_snapshot_tables(text: &str) -> Vec<SnapshotTable> {
    let mut tables: Vec<(String, Vec<TargetLine>)> = Vec::new();
    let mut lines: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once(": ")).collect();
    lines.sort_by_key(|&(name, _)| name);
    for (name, line) in lines {
        let mut w = line.splitn(4, ' ');
        let (Some(start), Some(len), Some(ttype)) = (
            w.next().and_then(number),
            w.next().and_then(number),
            w.next(),
        ) else {
            continue;
        };
        let t = TargetLine {
            start,
            len,
            ttype: ttype.to_string(),
            params: w.next().unwrap_or("").to_string(),
        };
        match tables.last_mut() {
            Some((n, targets)) if n == name => targets.push(t),
            _ => tables.push((name.to_string(), vec![t])),
        }
    }
    snapshot_devices(&tables)
}

// ---------------------------------------------------------------------------------------
// Sending.

/// The header of the stream `send` writes: the snapshots named by `snap` and `base`, or by
/// the resume token (with which `snap` and `base`, if given, must agree), checked against
/// the store's `info`; the stream uuid is `stream_uuid` (random, not the token's).
pub fn plan_send(
    info: &StoreInfo,
    origin_sectors: u64,
    snap: Option<u32>,
    base: Option<u32>,
    resume: Option<&ResumeToken>,
    stream_uuid: [u8; 16],
) -> Result<Header, String> {
    let live = |id: u32| {
        info.snap(id)
            .ok_or_else(|| format!("no live snapshot {}", id))
    };
    let (target, base, resume) = match resume {
        None => {
            let id = snap.ok_or("--snap or --resume is required")?;
            (live(id)?, base.map(live).transpose()?, None)
        }
        Some(t) => {
            if t.store_uuid != info.uuid {
                return Err(format!(
                    "the resume token is of store {}, this origin's store is {}",
                    hex(&t.store_uuid),
                    hex(&info.uuid)
                ));
            }
            let target = info.by_seq(t.target_seq).ok_or_else(|| {
                format!(
                    "the resume token's target (creation sequence {}) is no longer a live \
                     snapshot: the transfer cannot be resumed, send a full stream",
                    t.target_seq
                )
            })?;
            let token_base = match t.base_seq {
                0 => None,
                seq => Some(info.by_seq(seq).ok_or_else(|| {
                    format!(
                        "the resume token's base (creation sequence {}) is no longer a live \
                         snapshot: the transfer cannot be resumed, send a full stream of \
                         snapshot {}",
                        seq, target.id
                    )
                })?),
            };
            if let Some(id) = snap.filter(|&id| id != target.id) {
                return Err(format!(
                    "--snap {} disagrees with the resume token: its target is snapshot {} \
                     (creation sequence {})",
                    id, target.id, target.seq
                ));
            }
            match (base, token_base) {
                (Some(id), None) => {
                    return Err(format!(
                        "--base {} disagrees with the resume token: it resumes a full stream",
                        id
                    ))
                }
                (Some(id), Some(b)) if id != b.id => {
                    return Err(format!(
                        "--base {} disagrees with the resume token: its base is snapshot {} \
                         (creation sequence {})",
                        id, b.id, b.seq
                    ))
                }
                _ => {}
            }
            if t.chunk_sectors != info.chunk_sectors || t.origin_sectors != origin_sectors {
                return Err(format!(
                    "the resume token's stream has chunks of {} sectors and {} origin sectors, \
                     the origin now {} and {}: send a fresh stream",
                    t.chunk_sectors, t.origin_sectors, info.chunk_sectors, origin_sectors
                ));
            }
            let point = ResumePoint {
                stream_uuid: t.stream_uuid,
                seq: t.next_seq,
                chunk: t.next_chunk,
            };
            (target, token_base, Some(point))
        }
    };
    for s in core::iter::once(target).chain(base) {
        if !s.valid {
            return Err(format!("snapshot {} is invalid", s.id));
        }
    }
    if let Some(b) = base {
        if b.seq >= target.seq {
            return Err(format!(
                "base snapshot {} (creation sequence {}) is not older than snapshot {} \
                 (creation sequence {})",
                b.id, b.seq, target.id, target.seq
            ));
        }
    }
    let h = Header {
        store_uuid: info.uuid,
        stream_uuid,
        chunk_sectors: info.chunk_sectors,
        origin_sectors,
        target: SnapIdentity {
            create_seq: target.seq,
            id: target.id,
        },
        base: base.map(|b| SnapIdentity {
            create_seq: b.seq,
            id: b.id,
        }),
        resume,
    };
    if h.chunks() != info.chunks {
        return Err(format!(
            "info counts {} chunks, the table's {} sectors make {}",
            info.chunks,
            origin_sectors,
            h.chunks()
        ));
    }
    if resume.is_some_and(|r| r.chunk == h.chunks()) {
        return Err(
            "the interrupted transfer has every chunk but not its end: a resumed stream \
             cannot start past the last chunk, send it again without --resume"
                .to_string(),
        );
    }
    h.validate()
        .map_err(|e| format!("cannot write this stream: {}", e))?;
    Ok(h)
}

/// The sending side's kernel: the origin's `delta` message and the target's data.
pub trait Primary {
    /// One call of `delta <from|-> <to> <start>` (snapshot ids).
    fn delta(&mut self, from: Option<u32>, to: u32, start: u64) -> Result<DeltaPage, String>;
    /// Reads `buf.len()` bytes of the target snapshot at byte `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Fails if the target or the base is no longer the snapshot the header names (deleted,
    /// invalidated, its id reused); called after the last `delta`, before END.
    fn check_unchanged(&mut self, h: &Header) -> Result<(), String>;
}

/// The byte offset and length of chunks `first..first + n` of `h`'s origin (the last chunk
/// of the origin may be short); None if past the origin.
fn chunk_span(h: &Header, first: u64, n: u64) -> Option<(u64, usize)> {
    let cs = h.chunk_sectors as u64;
    let start = first.checked_mul(cs)?;
    let end = first.checked_add(n)?.checked_mul(cs)?.min(h.origin_sectors);
    if start >= end {
        return None;
    }
    let len = usize::try_from((end - start).checked_mul(SECTOR)?).ok()?;
    Some((start.checked_mul(SECTOR)?, len))
}

fn write_error(e: io::Error) -> String {
    format!("writing the stream: {}", e)
}

/// Writes the stream of header `h` to `out`: every chunk the `delta` messages list from
/// the header's start chunk, read in runs of up to 4 MiB, then END.  Returns the writer
/// and the stream's counts.
pub fn write_stream<P: Primary, W: Write>(
    p: &mut P,
    h: Header,
    out: W,
) -> Result<(W, Summary), String> {
    let mut w = StreamWriter::new(out, h).map_err(write_error)?;
    let chunks = h.chunks();
    let chunk_bytes = h.chunk_sectors as usize * SECTOR as usize;
    // Aligned for a primary that reads with O_DIRECT.
    let mut storage = vec![0u8; READ_BYTES.max(chunk_bytes) + DIRECT_ALIGN];
    let skip = storage.as_ptr().align_offset(DIRECT_ALIGN);
    let buf = &mut storage[skip..skip + READ_BYTES.max(chunk_bytes)];
    let per_read = (buf.len() / chunk_bytes) as u64;
    let mut start = h.start().1;
    loop {
        let page = p.delta(h.base.map(|b| b.id), h.target.id, start)?;
        for &(first, count) in &page.ranges {
            // parse_delta checked that first + count fits.
            let end = first + count;
            if end > chunks {
                return Err(format!(
                    "delta lists chunks {}-{}, past the origin's {} chunks",
                    first,
                    end - 1,
                    chunks
                ));
            }
            let mut c = first;
            while c < end {
                let n = (end - c).min(per_read);
                let (offset, len) = chunk_span(&h, c, n)
                    .ok_or_else(|| format!("chunks {}-{}: past the origin", c, c + n - 1))?;
                p.read_at(&mut buf[..len], offset).map_err(|e| {
                    format!(
                        "reading chunks {}-{} of snapshot {}: {}",
                        c,
                        c + n - 1,
                        h.target.id,
                        e
                    )
                })?;
                for (chunk, data) in (c..).zip(buf[..len].chunks(chunk_bytes)) {
                    w.data(chunk, data).map_err(write_error)?;
                }
                c += n;
            }
        }
        match page.next {
            Some(next) => start = next,
            None => break,
        }
    }
    p.check_unchanged(&h)?;
    w.finish().map_err(write_error)
}

/// Fails if the snapshots `h` names are not, in `info`, the live and valid snapshots of
/// the same creation sequences.
pub fn check_unchanged(info: &StoreInfo, h: &Header) -> Result<(), String> {
    for s in core::iter::once(h.target).chain(h.base) {
        match info.snap(s.id) {
            None => return Err(format!("snapshot {} was deleted while it was sent", s.id)),
            Some(now) if now.seq != s.create_seq => {
                return Err(format!(
                    "snapshot {} was deleted and created again while it was sent \
                     (creation sequence {}, now {})",
                    s.id, s.create_seq, now.seq
                ))
            }
            Some(now) if !now.valid => {
                return Err(format!(
                    "snapshot {} became invalid while it was sent",
                    s.id
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Receiving.

/// Why `receive` refuses a stream (it has written nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The stream's origin is larger than the secondary.
    TooLarge {
        /// The stream's origin sectors.
        stream: u64,
        /// The secondary's.
        secondary: u64,
    },
    /// A resumed stream, but no receive is pending here.
    NothingToResume,
    /// A resumed stream of another transfer, or another point, than the pending one.
    NotThePending {
        /// What differs (`Header::check_resume`).
        defect: StreamError,
        /// The pending transfer.
        pending: ResumeToken,
    },
    /// An incremental stream whose base is not the newest replica here.
    WrongBase {
        /// What differs (`Header::check_identity`).
        defect: StreamError,
        /// The stream's base: its store and creation sequence.
        base: ([u8; 16], u64),
        /// The newest replica here: its source store and creation sequence.
        newest: Option<([u8; 16], u64)>,
    },
    /// An interrupted receive of another transfer is pending.
    Pending {
        /// Its token.
        pending: ResumeToken,
    },
    /// A full stream of another store than the replicas here (without `--force`).
    OtherStore {
        /// The replicas' source store.
        replicas: [u8; 16],
        /// The stream's store.
        stream: [u8; 16],
    },
    /// A full stream of a snapshot not newer than the newest replica.
    Stale {
        /// The stream's target creation sequence.
        target: u64,
        /// The newest replica's source creation sequence.
        newest: u64,
        /// The newest replica's local id.
        local_id: u32,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Refusal::*;
        match self {
            TooLarge { stream, secondary } => write!(
                f,
                "the stream's origin has {} sectors, the secondary only {}",
                stream, secondary
            ),
            NothingToResume => write!(
                f,
                "a resumed stream, but no interrupted receive is pending here: send a fresh stream"
            ),
            NotThePending { defect, pending } => write!(
                f,
                "{}: the stream does not resume the receive pending here (of creation \
                 sequence {}); `shsnap receive --query` prints its token",
                defect, pending.target_seq
            ),
            WrongBase {
                defect,
                base,
                newest,
            } => {
                write!(
                    f,
                    "{}: the stream is incremental on seq {} of store {}, ",
                    defect,
                    base.1,
                    hex(&base.0)
                )?;
                match newest {
                    Some((store, seq)) => write!(
                        f,
                        "the newest replica here is seq {} of store {}",
                        seq,
                        hex(store)
                    ),
                    None => write!(f, "there is no replica here: send a full stream"),
                }
            }
            Pending { pending } => write!(
                f,
                "an interrupted receive of seq {} is pending: resume it",
                pending.target_seq
            ),
            OtherStore { replicas, stream } => write!(
                f,
                "the replicas here are of store {}, the stream is of store {}: --force to \
                 receive it all the same",
                hex(replicas),
                hex(stream)
            ),
            Stale {
                target,
                newest,
                local_id,
            } if target == newest => write!(
                f,
                "snapshot seq {} is already received here (snapshot {})",
                target, local_id
            ),
            Stale {
                target,
                newest,
                local_id,
            } => write!(
                f,
                "snapshot seq {} is older than the newest replica here (seq {}, snapshot {})",
                target, newest, local_id
            ),
        }
    }
}

/// Whether the secondary (`info`, its size in sectors) takes the stream of header `h`:
///
/// - the stream's origin must fit on the secondary;
/// - a resumed stream must resume the receive pending here (`Header::check_resume`);
/// - a fresh incremental stream must have as base the newest replica here (source store and
///   creation sequence); a pending receive must be of the same target and base (receiving
///   that transfer again from its start is safe: it rewrites a superset);
/// - a fresh full stream rewrites every chunk: it is refused only if it is not newer than
///   the newest replica of its store, or (without `force`) if the replicas here are of
///   another store.
pub fn decide(
    h: &Header,
    info: &StoreInfo,
    secondary_sectors: u64,
    force: bool,
) -> Result<(), Refusal> {
    if h.origin_sectors > secondary_sectors {
        return Err(Refusal::TooLarge {
            stream: h.origin_sectors,
            secondary: secondary_sectors,
        });
    }
    let pending = info.progress_token();
    let newest = info.newest_replica();
    if h.resume.is_some() {
        let pending = pending.ok_or(Refusal::NothingToResume)?;
        return h
            .check_resume(&pending)
            .map_err(|defect| Refusal::NotThePending { defect, pending });
    }
    match h.base {
        Some(base) => {
            let newest = info.source.zip(newest).map(|(s, n)| (s, n.source_seq));
            let defect = match newest {
                Some((store, seq)) => h.check_identity(&store, Some(seq), None).err(),
                None => Some(StreamError::Foreign { what: "base" }),
            };
            if let Some(defect) = defect {
                return Err(Refusal::WrongBase {
                    defect,
                    base: (h.store_uuid, base.create_seq),
                    newest,
                });
            }
            match pending {
                Some(p)
                    if (p.store_uuid, p.target_seq, p.base_seq)
                        != (h.store_uuid, h.target.create_seq, base.create_seq) =>
                {
                    Err(Refusal::Pending { pending: p })
                }
                _ => Ok(()),
            }
        }
        None => match (info.source, newest) {
            (Some(source), Some(_)) if source != h.store_uuid && !force => {
                Err(Refusal::OtherStore {
                    replicas: source,
                    stream: h.store_uuid,
                })
            }
            (Some(source), Some(n))
                if source == h.store_uuid && h.target.create_seq <= n.source_seq =>
            {
                Err(Refusal::Stale {
                    target: h.target.create_seq,
                    newest: n.source_seq,
                    local_id: n.id,
                })
            }
            _ => Ok(()),
        },
    }
}

/// The receiving side's kernel: the secondary origin's device and its progress record.
pub trait Secondary {
    /// Writes `data` at byte `offset` of the secondary origin.
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the writes so far durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
    /// Records `token` durably as the receive progress (the `progress` message).
    fn save_progress(&mut self, token: &ResumeToken) -> Result<(), String>;
}

/// Why `apply` stopped before the end of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The stream has a defect: every record before it is applied, durable, and `token`
    /// (the place after the last one) is the stored progress.
    Defect {
        /// The defect.
        defect: StreamError,
        /// Where to resume.
        token: ResumeToken,
    },
    /// The secondary failed (a write, fdatasync, the progress message).  `token`: the
    /// stored progress, which only claims data that was durable before it was stored.
    Failed {
        /// What failed.
        what: String,
        /// The stored progress of this transfer, if any.
        token: Option<ResumeToken>,
    },
}

/// Applies the stream to the secondary: each DATA record as the reader returns it
/// (verified) at its chunk's place; for a full stream, zeros to the chunks it skips (they
/// read as zeros on the target).  Progress is stored at the start of a fresh stream (from
/// then on the stored progress names this transfer, whatever was pending), then every
/// `every` bytes applied and at a defect, always after an fdatasync: the stored progress
/// never claims data that is not durable.  `saved`: the stored progress a resumed stream
/// continues.  At END, everything is made durable; the caller takes the snapshot.
pub fn apply<R: Read, S: Secondary>(
    r: &mut StreamReader<R>,
    s: &mut S,
    saved: Option<ResumeToken>,
    every: u64,
) -> Result<Summary, ApplyError> {
    let h = *r.header();
    let mut a = Applier {
        s,
        h,
        saved,
        unsaved: 0,
        zeros: Vec::new(),
    };
    if h.resume.is_none() {
        a.checkpoint(r.resume_token())?;
    }
    let full = h.base.is_none();
    let mut next_chunk = h.start().1; // the chunks below it are applied
    loop {
        match r.next_record() {
            Ok(Some(rec)) => {
                if full {
                    a.zero(next_chunk, rec.chunk)?;
                }
                a.write(rec.chunk, &rec.data)?;
                next_chunk = rec.chunk + 1;
                if a.unsaved >= every {
                    a.checkpoint(r.resume_token())?;
                }
            }
            Ok(None) => break,
            Err(defect) => {
                let token = r.resume_token();
                if a.saved != Some(token) {
                    a.checkpoint(token).map_err(|e| match e {
                        ApplyError::Failed { what, token } => ApplyError::Failed {
                            what: format!("{}; then saving the progress: {}", defect, what),
                            token,
                        },
                        e => e,
                    })?;
                }
                return Err(ApplyError::Defect { defect, token });
            }
        }
    }
    if full {
        a.zero(next_chunk, h.chunks())?;
    }
    a.sync()?;
    Ok(r.summary())
}

/// The state of `apply`.
struct Applier<'a, S> {
    s: &'a mut S,
    h: Header,
    /// The stored progress of this transfer.
    saved: Option<ResumeToken>,
    /// Bytes applied since it was stored.
    unsaved: u64,
    /// A buffer of zeros (empty until needed).
    zeros: Vec<u8>,
}

impl<S: Secondary> Applier<'_, S> {
    fn failed(&self, what: String) -> ApplyError {
        ApplyError::Failed {
            what,
            token: self.saved,
        }
    }

    fn sync(&mut self) -> Result<(), ApplyError> {
        self.s
            .sync()
            .map_err(|e| self.failed(format!("fdatasync of the secondary: {}", e)))
    }

    /// Makes what was written durable, then stores `token` as the progress.
    fn checkpoint(&mut self, token: ResumeToken) -> Result<(), ApplyError> {
        self.sync()?;
        self.s.save_progress(&token).map_err(|e| self.failed(e))?;
        self.saved = Some(token);
        self.unsaved = 0;
        Ok(())
    }

    /// Writes the data of `chunk`.
    fn write(&mut self, chunk: u64, data: &[u8]) -> Result<(), ApplyError> {
        let (offset, _) = chunk_span(&self.h, chunk, 1)
            .ok_or_else(|| self.failed(format!("chunk {}: past the origin", chunk)))?;
        self.s
            .write_at(data, offset)
            .map_err(|e| self.failed(format!("writing chunk {} to the secondary: {}", chunk, e)))?;
        self.unsaved += data.len() as u64;
        Ok(())
    }

    /// Writes zeros to chunks `from..to`.
    fn zero(&mut self, from: u64, to: u64) -> Result<(), ApplyError> {
        if from >= to {
            return Ok(());
        }
        let what = || format!("chunks {}-{} (not in the full stream)", from, to - 1);
        let (mut offset, len) = chunk_span(&self.h, from, to - from)
            .ok_or_else(|| self.failed(format!("{}: past the origin", what())))?;
        self.zeros.resize(ZERO_BYTES.min(len), 0);
        let mut left = len;
        while left > 0 {
            let n = left.min(self.zeros.len());
            self.s
                .write_at(&self.zeros[..n], offset)
                .map_err(|e| self.failed(format!("writing zeros to {}: {}", what(), e)))?;
            offset += n as u64;
            left -= n;
        }
        self.unsaved += len as u64;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The device-mapper ioctls and the mapped devices.

/// The dm name of `arg`: a name, or `/dev/mapper/NAME`.
pub fn device_name(arg: &str) -> Result<String, String> {
    let name = arg.strip_prefix("/dev/mapper/").unwrap_or(arg);
    if name.is_empty() || name.contains('/') {
        return Err(format!("{}: not a dm name or /dev/mapper/NAME", arg));
    }
    Ok(name.to_string())
}

/// The message `<words>` to the origin `dev` (at sector 0): what it printed.
fn message(dev: &str, words: &[&str]) -> Result<String, String> {
    dm_ioctl::message(dev, 0, &words.join(" "))
}

fn origin_table(name: &str) -> Result<OriginTable, String> {
    let lines: Vec<String> = dm_ioctl::table(name)?
        .iter()
        .map(|t| t.to_string())
        .collect();
    parse_origin_table(&lines.join("\n")).map_err(|e| format!("{}: {}", name, e))
}

fn store_info(name: &str) -> Result<StoreInfo, String> {
    parse_info(&message(name, &["info"])?).map_err(|e| format!("{}: {}", name, e))
}

/// A `shared-snapshot` device of the snapshot `send` reads; removed when dropped if
/// `send` made it (or found it left by an interrupted `send`).
struct SnapDevice {
    name: String,
    owned: bool,
}

impl SnapDevice {
    /// An active device of snapshot `id` of the origin (any device whose table is that
    /// snapshot, whole), else a read-only one made as `shsnap-send-<origin>-<id>`.
    fn acquire(origin: &str, table: &OriginTable, id: u32) -> Result<SnapDevice, String> {
        let ours = format!("shsnap-send-{}-{}", origin, id);
        let mut all = dm_ioctl::tables()?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let found = snapshot_devices(&all)
            .into_iter()
            .find(|t| t.origin_dev == table.origin_dev && t.id == id && t.sectors >= table.sectors);
        let dev = match found {
            Some(t) => SnapDevice {
                owned: t.name == ours,
                name: t.name,
            },
            None => {
                if dm_ioctl::exists(&ours)? {
                    return Err(format!(
                        "{} exists but is not snapshot {} of {}: remove it",
                        ours, id, origin
                    ));
                }
                let line = TargetLine {
                    start: 0,
                    len: table.sectors,
                    ttype: "shared-snapshot".to_string(),
                    params: format!("{} {}", table.origin_dev, id),
                };
                dm_ioctl::create(&ours, true, &[line])?;
                SnapDevice {
                    name: ours,
                    owned: true,
                }
            }
        };
        dm_ioctl::mknod(&dev.name)?;
        Ok(dev)
    }

    fn path(&self) -> String {
        format!("/dev/mapper/{}", self.name)
    }
}

impl Drop for SnapDevice {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = dm_ioctl::remove(&self.name) {
                std::eprintln!("shsnap send: warning: {}", e);
            }
        }
    }
}

struct DmPrimary {
    origin: String,
    /// The snapshot device, opened with O_DIRECT: the data goes to the stream once, so the
    /// page cache would only add a copy and read-ahead of chunks that are not sent.
    dev: File,
    /// The same device without O_DIRECT, for a read O_DIRECT refuses (a short last chunk
    /// on a device whose logical blocks are larger than a sector).
    buffered: File,
}

impl Primary for DmPrimary {
    fn delta(&mut self, from: Option<u32>, to: u32, start: u64) -> Result<DeltaPage, String> {
        let from = from.map_or("-".to_string(), |id| id.to_string());
        let out = message(
            &self.origin,
            &["delta", &from, &to.to_string(), &start.to_string()],
        )?;
        parse_delta(&out, start).map_err(|e| format!("{}: {}", self.origin, e))
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.dev.read_exact_at(buf, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.buffered.read_exact_at(buf, offset)
            }
            r => r,
        }
    }

    fn check_unchanged(&mut self, h: &Header) -> Result<(), String> {
        check_unchanged(&store_info(&self.origin)?, h)
            .map_err(|e| format!("{}: {}", self.origin, e))
    }
}

/// Bytes of contiguous chunks `DmSecondary` gathers into one write.
const WRITE_BYTES: usize = 1 << 20;

struct DmSecondary {
    name: String,
    dev: File,
    /// Data not written yet: contiguous, from byte `pending_at` (written by `sync`, or when
    /// the next write is not contiguous or the buffer is full).  A chunk per system call
    /// cost the receiver half its speed; what is held here is no less durable than what
    /// the page cache holds, and `sync` writes it before the progress may claim it.
    pending: Vec<u8>,
    pending_at: u64,
}

impl DmSecondary {
    fn new(name: String, dev: File) -> Self {
        DmSecondary {
            name,
            dev,
            pending: Vec::with_capacity(WRITE_BYTES),
            pending_at: 0,
        }
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.dev.write_all_at(&self.pending, self.pending_at)?;
            self.pending.clear();
        }
        Ok(())
    }
}

impl Secondary for DmSecondary {
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let end = self.pending_at + self.pending.len() as u64;
        if self.pending.is_empty() || offset != end || self.pending.len() + data.len() > WRITE_BYTES
        {
            self.write_pending()?;
            self.pending_at = offset;
        }
        if data.len() >= WRITE_BYTES {
            return self.dev.write_all_at(data, offset);
        }
        self.pending.extend_from_slice(data);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.write_pending()?;
        self.dev.sync_data()
    }

    fn save_progress(&mut self, token: &ResumeToken) -> Result<(), String> {
        message(&self.name, &["progress", &hex(&token.to_bytes())]).map(drop)
    }
}

/// What `shsnap send` is asked for.
#[derive(Debug, Clone, Default)]
pub struct SendArgs {
    /// The origin: a dm name or /dev/mapper/NAME.
    pub origin: String,
    /// The snapshot to send (its id).
    pub snap: Option<u32>,
    /// The base of an incremental stream (its id).
    pub base: Option<u32>,
    /// A resume token (text).
    pub resume: Option<String>,
    /// The file to write; None: standard output.
    pub output: Option<String>,
}

/// What `send` sent.
#[derive(Debug, Clone, Copy)]
pub struct SendReport {
    /// The target.
    pub target: SnapIdentity,
    /// The base, if incremental.
    pub base: Option<SnapIdentity>,
    /// The stream's counts (before END).
    pub summary: Summary,
    /// Seconds from start to end.
    pub seconds: f64,
}

impl SendReport {
    /// Bytes of the whole stream, END included.
    pub fn stream_bytes(&self) -> u64 {
        self.summary.stream_bytes + (RECORD_HEAD + END_LEN + RECORD_TAIL) as u64
    }
}

impl fmt::Display for SendReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snapshot {} (seq {}) base {} chunks {} data_bytes {} stream_bytes {} seconds {:.3}",
            self.target.id,
            self.target.create_seq,
            self.base.map_or("-".to_string(), |b| b.id.to_string()),
            self.summary.data_records,
            self.summary.data_bytes,
            self.stream_bytes(),
            self.seconds
        )
    }
}

/// A random stream uuid: not zero, not `not` (the interrupted stream's).
fn new_stream_uuid(not: Option<[u8; 16]>) -> [u8; 16] {
    loop {
        let u: [u8; 16] = rand::random();
        if u != [0; 16] && Some(u) != not {
            return u;
        }
    }
}

/// `shsnap send`: writes the stream of a snapshot of a live origin (full, incremental, or
/// resumed from a token) to a file or to standard output (not a terminal).
pub fn send(a: &SendArgs) -> Result<SendReport, String> {
    let t0 = Instant::now();
    if a.output.is_none() && io::stdout().is_terminal() {
        return Err("standard output is a terminal: redirect it or use -o FILE".to_string());
    }
    let token = match a.resume.as_deref() {
        None => None,
        Some(t) => Some(ResumeToken::parse(t).ok_or(
            "--resume: not a resume token (shsnap-resume-1: and 168 hex digits with a good crc32c)",
        )?),
    };
    let name = device_name(&a.origin)?;
    let table = origin_table(&name)?;
    let info = store_info(&name)?;
    let stream_uuid = new_stream_uuid(token.map(|t| t.stream_uuid));
    let h = plan_send(
        &info,
        table.sectors,
        a.snap,
        a.base,
        token.as_ref(),
        stream_uuid,
    )
    .map_err(|e| format!("{}: {}", name, e))?;
    let out = match a.output.as_deref() {
        Some(path) => File::create(path).map_err(|e| format!("{}: {}", path, e))?,
        None => {
            let fd = io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("standard output: {}", e))?;
            File::from(fd)
        }
    };
    let dev = SnapDevice::acquire(&name, &table, h.target.id)?;
    let summary = {
        // Closed before `dev` goes: a device still open cannot be removed.
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(dev.path())
                .map_err(|e| format!("{}: {}", dev.path(), e))
        };
        let mut p = DmPrimary {
            origin: name,
            dev: open(libc::O_DIRECT)?,
            buffered: open(0)?,
        };
        write_stream(&mut p, h, BufWriter::with_capacity(1 << 20, out))?.1
    };
    drop(dev);
    Ok(SendReport {
        target: h.target,
        base: h.base,
        summary,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What `shsnap receive --query` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryReport {
    /// The store the replicas were received from.
    pub source: Option<[u8; 16]>,
    /// The newest replica: its source creation sequence and local id.
    pub last: Option<(u64, u32)>,
    /// The pending receive's token.
    pub resume: Option<ResumeToken>,
}

impl QueryReport {
    /// From the secondary's `info`.
    pub fn new(info: &StoreInfo) -> QueryReport {
        QueryReport {
            source: info.source,
            last: info.newest_replica().map(|s| (s.source_seq, s.id)),
            resume: info.progress_token(),
        }
    }
}

impl fmt::Display for QueryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(u) => writeln!(f, "source {}", hex(u))?,
            None => writeln!(f, "source -")?,
        }
        match self.last {
            Some((seq, id)) => writeln!(f, "last {} {}", seq, id)?,
            None => writeln!(f, "last -")?,
        }
        match &self.resume {
            Some(t) => write!(f, "resume {}", t),
            None => write!(f, "resume -"),
        }
    }
}

/// `shsnap receive --query`.
pub fn query(secondary: &str) -> Result<QueryReport, String> {
    Ok(QueryReport::new(&store_info(&device_name(secondary)?)?))
}

/// What `receive` received.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveReport {
    /// The new snapshot's id on the secondary.
    pub local_id: u32,
    /// The source store.
    pub source: [u8; 16],
    /// The source snapshot's creation sequence.
    pub source_seq: u64,
    /// The stream's counts.
    pub summary: Summary,
    /// Seconds from start to end.
    pub seconds: f64,
}

impl fmt::Display for ReceiveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received snapshot {} source {}:{} chunks {} data_bytes {} seconds {:.3}",
            self.local_id,
            hex(&self.source),
            self.source_seq,
            self.summary.data_records,
            self.summary.data_bytes,
            self.seconds
        )
    }
}

/// Why `receive` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveError {
    /// Refused before anything was written.
    Refused(Refusal),
    /// The stream has a defect.  `token`: where to resume (stored as the progress), None
    /// if the defect is in the header (nothing was written).
    Defect {
        /// The defect.
        defect: StreamError,
        /// Where to resume.
        token: Option<ResumeToken>,
    },
    /// Anything else.  `token`: the stored progress of this transfer, if any.
    Failed {
        /// What failed.
        what: String,
        /// Where to resume.
        token: Option<ResumeToken>,
    },
}

/// `shsnap receive`: applies the stream read from `input` to the secondary origin and takes
/// the replica snapshot.
/// `checkpoint_every`: bytes applied between two durable progress records.
pub fn receive<R: Read>(
    secondary: &str,
    force: bool,
    checkpoint_every: u64,
    input: R,
) -> Result<ReceiveReport, ReceiveError> {
    let t0 = Instant::now();
    let failed = |what: String| ReceiveError::Failed { what, token: None };
    let name = device_name(secondary).map_err(failed)?;
    let table = origin_table(&name).map_err(failed)?;
    let info = store_info(&name).map_err(failed)?;
    let mut reader = StreamReader::new(input).map_err(|defect| ReceiveError::Defect {
        defect,
        token: None,
    })?;
    let h = *reader.header();
    decide(&h, &info, table.sectors, force).map_err(ReceiveError::Refused)?;
    dm_ioctl::mknod(&name).map_err(failed)?;
    let path = format!("/dev/mapper/{}", name);
    // O_EXCL: a block device mounted or held by another program is refused (EBUSY).
    let dev = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(&path)
        .map_err(|e| {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            failed(format!(
                "{}: {}{}",
                path,
                e,
                if busy {
                    " (mounted or in use: a secondary must not be)"
                } else {
                    ""
                }
            ))
        })?;
    let mut sec = DmSecondary::new(name.clone(), dev);
    let pending = h.resume.and(info.progress_token());
    let summary = apply(&mut reader, &mut sec, pending, checkpoint_every).map_err(|e| match e {
        ApplyError::Defect { defect, token } => ReceiveError::Defect {
            defect,
            token: Some(token),
        },
        ApplyError::Failed { what, token } => ReceiveError::Failed { what, token },
    })?;
    // Every chunk is durable: the replica can be taken.  Its id is chosen now, from the
    // snapshots live now.
    let again = |e: String| {
        failed(format!(
            "{}: every chunk is received and durable, but the replica snapshot was not \
             taken: send the transfer again (the secondary takes it: it is the pending one)",
            e
        ))
    };
    let now = store_info(&name).map_err(again)?;
    let local_id = now
        .free_id(h.target.id)
        .ok_or_else(|| again("no free snapshot id".to_string()))?;
    message(
        &name,
        &[
            "create",
            &local_id.to_string(),
            &hex(&h.store_uuid),
            &h.target.create_seq.to_string(),
        ],
    )
    .map_err(again)?;
    Ok(ReceiveReport {
        local_id,
        source: h.store_uuid,
        source_seq: h.target.create_seq,
        summary,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod dm_secondary_tests {
    use super::*;

    /// Gathered writes land where they were asked to, contiguous or not, large or small,
    /// once `sync` returns.
    #[test]
    fn gathered_writes_land_in_place() {
        let path = std::env::temp_dir().join(format!("shsnap-sec-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut sec = DmSecondary::new("unused".into(), file);
        let mut want = vec![0u8; 6 << 20];
        let mut put = |sec: &mut DmSecondary, off: usize, len: usize, v: u8| {
            want[off..off + len].fill(v);
            sec.write_at(&vec![v; len], off as u64).unwrap();
        };
        for i in 0..200 {
            put(&mut sec, i * 8192, 8192, i as u8 + 1); // contiguous: several buffers
        }
        put(&mut sec, 3 << 20, 512, 0xaa); // a jump
        put(&mut sec, 1 << 20, 4096, 0xbb); // backwards, over earlier data
        put(&mut sec, (3 << 20) + 512, 2 << 20, 0xcc); // contiguous but larger than a buffer
        sec.sync().unwrap();
        let got = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(got.len(), (3 << 20) + 512 + (2 << 20));
        assert!(got == want[..got.len()]);
    }
}
