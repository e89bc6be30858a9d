//! The replication stream (format v1, `Documentation/stream.md`): a writer, and a reader that
//! returns a record only once it is verified and names the first defect it meets.

use std::boxed::Box;
use std::fmt;
use std::format;
use std::io::{self, Read, Write};
use std::string::String;
use std::vec::Vec;

/// The stream's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"SHSTREAM";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the first record: magic and version.
pub const PREAMBLE: usize = 12;
/// Tag bit: a reader that does not know the tag may skip the record.
pub const TAG_MAY_SKIP: u32 = 0x8000_0000;
/// The header record (always record 0).
pub const TAG_HEADER: u32 = 1;
/// A chunk of data.
pub const TAG_DATA: u32 = 2;
/// The last record: counts and digest.
pub const TAG_END: u32 = 3;
/// Bytes of a record before its payload: tag and length.
pub const RECORD_HEAD: usize = 12;
/// Bytes of a record after its payload: its crc32c.
pub const RECORD_TAIL: usize = 4;
/// Largest payload of any record (a DATA record of the largest chunk fits).
pub const MAX_PAYLOAD: u64 = (1 << 20) + 4096;
/// HEADER payload size.
pub const HEADER_LEN: usize = 112;
/// DATA payload bytes before the data.
pub const DATA_HEAD: usize = 32;
/// END payload size.
pub const END_LEN: usize = 56;

const FLAG_INCREMENTAL: u32 = 1;
const FLAG_RESUMED: u32 = 2;

/// A defect of a stream (or an I/O error while reading it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The first 8 bytes are not the magic.
    BadMagic,
    /// A format version this reader does not know.
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// The stream ends inside the preamble or a record.
    Truncated {
        /// Number of the record being read.
        record: u64,
        /// Where the stream ended.
        offset: u64,
    },
    /// A record length above `MAX_PAYLOAD`, or not the size of its record.
    WrongLength {
        /// Record number.
        record: u64,
        /// Its tag.
        tag: u32,
        /// Its payload length.
        len: u64,
    },
    /// A record's crc32c does not match.
    BadCrc {
        /// Record number.
        record: u64,
        /// Offset of the record in the stream.
        offset: u64,
    },
    /// Record 0 is not a HEADER, or a HEADER comes later.
    Misplaced {
        /// Record number.
        record: u64,
        /// Its tag.
        tag: u32,
    },
    /// A HEADER field out of range.
    BadHeader {
        /// Which.
        reason: &'static str,
    },
    /// A valid record carrying another stream's uuid.
    ForeignRecord {
        /// Record number.
        record: u64,
    },
    /// A DATA record out of sequence or whose chunk does not increase.
    OutOfOrder {
        /// Record number.
        record: u64,
        /// Its sequence number.
        seq: u64,
        /// The sequence number expected.
        expected_seq: u64,
        /// Its chunk.
        chunk: u64,
        /// The previous DATA record's chunk, if any.
        prev_chunk: Option<u64>,
    },
    /// A DATA chunk at or past the origin's end.
    BeyondOrigin {
        /// Record number.
        record: u64,
        /// Its chunk.
        chunk: u64,
    },
    /// An unknown tag without the may-skip bit.
    UnknownRequiredTag {
        /// Record number.
        record: u64,
        /// The tag.
        tag: u32,
    },
    /// The stream ends after a record, without END.
    MissingEnd {
        /// Records read.
        records: u64,
    },
    /// An END count differs from what was read.
    CountMismatch {
        /// Which count.
        what: &'static str,
        /// In END.
        written: u64,
        /// Counted by the reader.
        read: u64,
    },
    /// An END field out of range.
    BadEnd {
        /// Which.
        reason: &'static str,
    },
    /// END's digest differs from the bytes read.
    DigestMismatch {
        /// In END.
        written: u32,
        /// Computed by the reader.
        computed: u32,
    },
    /// Bytes after END.
    TrailingData {
        /// Offset of the first one.
        offset: u64,
    },
    /// Another store, base, target or resume point than the caller expects.
    Foreign {
        /// What differs.
        what: &'static str,
    },
    /// A read error other than the end of the stream.
    Io(String),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use StreamError::*;
        match self {
            BadMagic => write!(f, "bad magic: not a shsnap stream"),
            UnsupportedVersion { version } => write!(f, "unsupported stream version {}", version),
            Truncated { record, offset } => {
                write!(f, "truncated in record {} at byte {}", record, offset)
            }
            WrongLength { record, tag, len } => write!(
                f,
                "record {}: wrong length {} for tag {:#x}",
                record, len, tag
            ),
            BadCrc { record, offset } => {
                write!(f, "record {} (byte {}): bad crc32c", record, offset)
            }
            Misplaced { record, tag } => {
                write!(f, "record {}: tag {:#x} misplaced", record, tag)
            }
            BadHeader { reason } => write!(f, "bad header: {}", reason),
            ForeignRecord { record } => {
                write!(f, "record {}: belongs to another stream", record)
            }
            OutOfOrder {
                record,
                seq,
                expected_seq,
                chunk,
                prev_chunk,
            } => write!(
                f,
                "record {}: out of order: sequence {} (expected {}), chunk {} after {}",
                record,
                seq,
                expected_seq,
                chunk,
                match prev_chunk {
                    Some(c) => format!("chunk {}", c),
                    None => String::from("none"),
                }
            ),
            BeyondOrigin { record, chunk } => {
                write!(f, "record {}: chunk {} beyond the origin", record, chunk)
            }
            UnknownRequiredTag { record, tag } => {
                write!(f, "record {}: unknown required tag {:#x}", record, tag)
            }
            MissingEnd { records } => write!(f, "no END record after {} records", records),
            CountMismatch {
                what,
                written,
                read,
            } => write!(
                f,
                "END count mismatch: {} {} written, {} read",
                what, written, read
            ),
            BadEnd { reason } => write!(f, "bad END: {}", reason),
            DigestMismatch { written, computed } => write!(
                f,
                "digest mismatch: {:#010x} written, {:#010x} computed",
                written, computed
            ),
            TrailingData { offset } => write!(f, "data after END at byte {}", offset),
            Foreign { what } => write!(f, "foreign stream: {} differs", what),
            Io(e) => write!(f, "I/O error: {}", e),
        }
    }
}

impl std::error::Error for StreamError {}

/// A snapshot as a stream names it; with the store uuid, `create_seq` identifies it for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapIdentity {
    /// Creation sequence number (never reused in a store; 0 names no snapshot).
    pub create_seq: u64,
    /// User id (informative only: ids are reused).
    pub id: u32,
}

/// Where a resumed stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePoint {
    /// The stream it continues.
    pub stream_uuid: [u8; 16],
    /// Sequence number of its first DATA record.
    pub seq: u64,
    /// First chunk it may carry.
    pub chunk: u64,
}

/// The HEADER record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The store's uuid.
    pub store_uuid: [u8; 16],
    /// This stream's uuid.
    pub stream_uuid: [u8; 16],
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
    /// Origin size in sectors.
    pub origin_sectors: u64,
    /// The snapshot the stream carries.
    pub target: SnapIdentity,
    /// The base of an incremental stream.
    pub base: Option<SnapIdentity>,
    /// Set for a resumed stream.
    pub resume: Option<ResumePoint>,
}

fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn get16b(b: &[u8], o: usize) -> [u8; 16] {
    b[o..o + 16].try_into().unwrap()
}

impl Header {
    /// Chunks of the origin.
    pub fn chunks(&self) -> u64 {
        self.origin_sectors.div_ceil(self.chunk_sectors as u64)
    }

    /// Bytes of `chunk` (the last one may be short); None past the origin.
    pub fn chunk_len(&self, chunk: u64) -> Option<usize> {
        let cs = self.chunk_sectors as u64;
        let start = chunk.checked_mul(cs)?;
        if start >= self.origin_sectors {
            return None;
        }
        Some(((self.origin_sectors - start).min(cs) * 512) as usize)
    }

    /// The first DATA sequence number and the lowest chunk allowed.
    pub fn start(&self) -> (u64, u64) {
        self.resume.map_or((0, 0), |r| (r.seq, r.chunk))
    }

    /// The 112-byte payload.
    pub fn pack(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..16].copy_from_slice(&self.store_uuid);
        b[16..32].copy_from_slice(&self.stream_uuid);
        b[32..36].copy_from_slice(&self.chunk_sectors.to_le_bytes());
        let flags = if self.base.is_some() {
            FLAG_INCREMENTAL
        } else {
            0
        } | if self.resume.is_some() {
            FLAG_RESUMED
        } else {
            0
        };
        b[36..40].copy_from_slice(&flags.to_le_bytes());
        b[40..48].copy_from_slice(&self.origin_sectors.to_le_bytes());
        b[48..56].copy_from_slice(&self.target.create_seq.to_le_bytes());
        b[56..60].copy_from_slice(&self.target.id.to_le_bytes());
        if let Some(base) = self.base {
            b[60..64].copy_from_slice(&base.id.to_le_bytes());
            b[64..72].copy_from_slice(&base.create_seq.to_le_bytes());
        }
        if let Some(r) = self.resume {
            b[72..88].copy_from_slice(&r.stream_uuid);
            b[88..96].copy_from_slice(&r.seq.to_le_bytes());
            b[96..104].copy_from_slice(&r.chunk.to_le_bytes());
        }
        b
    }

    /// Decodes and validates a payload.
    pub fn unpack(b: &[u8]) -> Result<Header, StreamError> {
        let bad = |reason| Err(StreamError::BadHeader { reason });
        if b.len() != HEADER_LEN {
            return bad("length");
        }
        let flags = get32(b, 36);
        if flags & !(FLAG_INCREMENTAL | FLAG_RESUMED) != 0 {
            return bad("unknown flags");
        }
        if get64(b, 104) != 0 {
            return bad("reserved field not zero");
        }
        let base = if flags & FLAG_INCREMENTAL != 0 {
            Some(SnapIdentity {
                create_seq: get64(b, 64),
                id: get32(b, 60),
            })
        } else {
            if get32(b, 60) != 0 || get64(b, 64) != 0 {
                return bad("base fields set in a full stream");
            }
            None
        };
        let resume = if flags & FLAG_RESUMED != 0 {
            Some(ResumePoint {
                stream_uuid: get16b(b, 72),
                seq: get64(b, 88),
                chunk: get64(b, 96),
            })
        } else {
            if b[72..104].iter().any(|&x| x != 0) {
                return bad("resume fields set in a stream not resumed");
            }
            None
        };
        let h = Header {
            store_uuid: get16b(b, 0),
            stream_uuid: get16b(b, 16),
            chunk_sectors: get32(b, 32),
            origin_sectors: get64(b, 40),
            target: SnapIdentity {
                create_seq: get64(b, 48),
                id: get32(b, 56),
            },
            base,
            resume,
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks the fields' ranges (`BadHeader`).
    pub fn validate(&self) -> Result<(), StreamError> {
        let bad = |reason| Err(StreamError::BadHeader { reason });
        if self.stream_uuid == [0; 16] {
            return bad("stream uuid zero");
        }
        if !self.chunk_sectors.is_power_of_two() || !(8..=2048).contains(&self.chunk_sectors) {
            return bad("chunk size");
        }
        if self.origin_sectors == 0 {
            return bad("origin size zero");
        }
        if self.target.create_seq == 0 {
            return bad("target creation sequence zero");
        }
        if let Some(base) = self.base {
            if base.create_seq == 0 || base.create_seq >= self.target.create_seq {
                return bad("base not older than target");
            }
        }
        if let Some(r) = self.resume {
            if r.stream_uuid == [0; 16] || r.stream_uuid == self.stream_uuid {
                return bad("resumed stream uuid");
            }
            if r.chunk >= self.chunks() {
                return bad("resume chunk beyond the origin");
            }
            // The sequence numbers of the stream's DATA records (at most one per chunk)
            // must not wrap: reader and writer count them on.
            if r.seq.checked_add(self.chunks()).is_none() {
                return bad("resume sequence number out of range");
            }
        }
        Ok(())
    }

    /// Checks that the stream is of store `store_uuid`, carries the snapshot of creation
    /// sequence `target` (if given), and has the base `base` (None: a full stream).
    pub fn check_identity(
        &self,
        store_uuid: &[u8; 16],
        base: Option<u64>,
        target: Option<u64>,
    ) -> Result<(), StreamError> {
        if &self.store_uuid != store_uuid {
            return Err(StreamError::Foreign { what: "store uuid" });
        }
        if self.base.map(|b| b.create_seq) != base {
            return Err(StreamError::Foreign { what: "base" });
        }
        if target.is_some_and(|t| t != self.target.create_seq) {
            return Err(StreamError::Foreign { what: "target" });
        }
        Ok(())
    }

    /// Checks that this stream resumes the transfer `token` names.
    pub fn check_resume(&self, token: &ResumeToken) -> Result<(), StreamError> {
        let foreign = |what| Err(StreamError::Foreign { what });
        self.check_identity(
            &token.store_uuid,
            (token.base_seq != 0).then_some(token.base_seq),
            Some(token.target_seq),
        )?;
        if self.origin_sectors != token.origin_sectors || self.chunk_sectors != token.chunk_sectors
        {
            return foreign("origin or chunk size");
        }
        match self.resume {
            Some(r)
                if r.stream_uuid == token.stream_uuid
                    && r.seq == token.next_seq
                    && r.chunk == token.next_chunk =>
            {
                Ok(())
            }
            _ => foreign("resume point"),
        }
    }
}

/// A verified DATA record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRecord {
    /// Sequence number.
    pub seq: u64,
    /// Chunk index.
    pub chunk: u64,
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

/// Counts of a stream, as END records them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records before END.
    pub records: u64,
    /// DATA records.
    pub data_records: u64,
    /// Data bytes.
    pub data_bytes: u64,
    /// Stream bytes before END.
    pub stream_bytes: u64,
    /// Records skipped (unknown tags with the may-skip bit).
    pub skipped: u64,
    /// The digest: crc32c chained over the preamble and each record before END, each
    /// without its own crc32c.
    pub digest: u32,
}

/// The bytes of one record: tag, length, payload, crc32c.
pub fn encode_record(tag: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_HEAD + payload.len() + RECORD_TAIL);
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(payload);
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// The digest continued over a record from the record's own crc32c, so that each record's
/// bytes are hashed once: `crc32c_append(d, X) == shift_len(X)(d) ^ crc32c(X)`, where the
/// shift (the crc register carried over `len` bytes, a linear map) is a table per byte of
/// the register, built for the length the records have (the DATA records of a stream all
/// have one, but for the last chunk's).
#[derive(Default)]
struct Digester {
    /// The length the tables are for, and the tables.
    shift: Option<(usize, Box<[[u32; 256]; 4]>)>,
}

impl Digester {
    /// Records shorter than this are hashed again rather than given tables.
    const TABLE_MIN: usize = 16 << 10;

    /// `crc32c_append(digest, X)` where `x_crc == crc32c(X)` and `x_len == X.len()`.
    fn append(&mut self, digest: u32, x: &[u8], x_crc: u32) -> u32 {
        let len = x.len();
        if len < Self::TABLE_MIN {
            return crc32c::crc32c_append(digest, x);
        }
        if self.shift.as_ref().is_none_or(|(l, _)| *l != len) {
            let mut t = Box::new([[0u32; 256]; 4]);
            for (i, row) in t.iter_mut().enumerate() {
                for (b, v) in row.iter_mut().enumerate() {
                    *v = crc32c::crc32c_combine((b as u32) << (8 * i), 0, len);
                }
            }
            self.shift = Some((len, t));
        }
        let t = &self.shift.as_ref().expect("built above").1;
        let d = digest;
        t[0][(d & 0xff) as usize]
            ^ t[1][((d >> 8) & 0xff) as usize]
            ^ t[2][((d >> 16) & 0xff) as usize]
            ^ t[3][(d >> 24) as usize]
            ^ x_crc
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Writes a stream; refuses (InvalidInput) whatever would make it invalid.
pub struct StreamWriter<W: Write> {
    w: W,
    header: Header,
    sum: Summary,
    next_seq: u64,
    last_chunk: Option<u64>,
    digester: Digester,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the preamble and the header.
    pub fn new(w: W, header: Header) -> io::Result<Self> {
        header.validate().map_err(|e| invalid(&format!("{}", e)))?;
        let mut s = StreamWriter {
            w,
            header,
            sum: Summary::default(),
            next_seq: header.start().0,
            last_chunk: None,
            digester: Digester::default(),
        };
        let mut pre = [0u8; PREAMBLE];
        pre[..8].copy_from_slice(MAGIC);
        pre[8..].copy_from_slice(&VERSION.to_le_bytes());
        s.put(&pre, PREAMBLE)?;
        s.record(TAG_HEADER, &header.pack())?;
        Ok(s)
    }

    /// Writes `b`, its first `digested` bytes into the digest.
    fn put(&mut self, b: &[u8], digested: usize) -> io::Result<()> {
        self.w.write_all(b)?;
        self.sum.digest = crc32c::crc32c_append(self.sum.digest, &b[..digested]);
        self.sum.stream_bytes += b.len() as u64;
        Ok(())
    }

    /// Writes a record built by `encode_record` (its crc32c last).
    fn put_record(&mut self, rec: &[u8]) -> io::Result<()> {
        self.w.write_all(rec)?;
        let body = rec.len() - RECORD_TAIL;
        self.sum.digest = self
            .digester
            .append(self.sum.digest, &rec[..body], get32(rec, body));
        self.sum.stream_bytes += rec.len() as u64;
        Ok(())
    }

    fn record(&mut self, tag: u32, payload: &[u8]) -> io::Result<()> {
        if payload.len() as u64 > MAX_PAYLOAD {
            return Err(invalid("record too long"));
        }
        self.put_record(&encode_record(tag, payload))?;
        self.sum.records += 1;
        Ok(())
    }

    /// The header written.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Writes chunk `chunk` (above the previous one; `data` of its exact length).
    pub fn data(&mut self, chunk: u64, data: &[u8]) -> io::Result<()> {
        if self.last_chunk.is_some_and(|c| chunk <= c) || chunk < self.header.start().1 {
            return Err(invalid("chunks must increase"));
        }
        if self.header.chunk_len(chunk) != Some(data.len()) {
            return Err(invalid("chunk beyond the origin or of the wrong length"));
        }
        let mut p = Vec::with_capacity(DATA_HEAD + data.len());
        p.extend_from_slice(&self.header.stream_uuid);
        p.extend_from_slice(&self.next_seq.to_le_bytes());
        p.extend_from_slice(&chunk.to_le_bytes());
        p.extend_from_slice(data);
        self.record(TAG_DATA, &p)?;
        self.next_seq += 1;
        self.last_chunk = Some(chunk);
        self.sum.data_records += 1;
        self.sum.data_bytes += data.len() as u64;
        Ok(())
    }

    /// Writes a record that readers may skip (`tag` must have `TAG_MAY_SKIP`).
    pub fn skippable(&mut self, tag: u32, payload: &[u8]) -> io::Result<()> {
        if tag & TAG_MAY_SKIP == 0 {
            return Err(invalid("tag without the may-skip bit"));
        }
        self.record(tag, payload)?;
        self.sum.skipped += 1;
        Ok(())
    }

    /// Writes any record, unchecked (tests: to make invalid streams).
    #[doc(hidden)]
    pub fn raw_record(&mut self, tag: u32, payload: &[u8]) -> io::Result<()> {
        self.record(tag, payload)
    }

    /// Writes END and returns the writer and the stream's counts.
    pub fn finish(mut self) -> io::Result<(W, Summary)> {
        let sum = self.sum;
        let mut p = [0u8; END_LEN];
        p[..16].copy_from_slice(&self.header.stream_uuid);
        p[16..24].copy_from_slice(&sum.records.to_le_bytes());
        p[24..32].copy_from_slice(&sum.data_records.to_le_bytes());
        p[32..40].copy_from_slice(&sum.data_bytes.to_le_bytes());
        p[40..48].copy_from_slice(&sum.stream_bytes.to_le_bytes());
        p[48..52].copy_from_slice(&sum.digest.to_le_bytes());
        self.put_record(&encode_record(TAG_END, &p))?;
        self.w.flush()?;
        Ok((self.w, sum))
    }
}

/// Reads a stream, one verified record at a time.
pub struct StreamReader<R: Read> {
    r: R,
    header: Header,
    sum: Summary,
    next_seq: u64,
    last_chunk: Option<u64>,
    /// Set once the stream is over: Ok = END verified, Err = the defect.
    done: Option<Result<(), StreamError>>,
    digester: Digester,
}

/// Reads until `buf` is full or the input ends; returns the bytes read (fewer than
/// `buf.len()` only at the end).
pub fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `fill`, with a read error as the stream's defect.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, StreamError> {
    fill(r, buf).map_err(|e| StreamError::Io(format!("{}", e)))
}

impl<R: Read> StreamReader<R> {
    /// Reads and verifies the preamble and the header.
    pub fn new(mut r: R) -> Result<Self, StreamError> {
        let mut pre = [0u8; PREAMBLE];
        let n = read_full(&mut r, &mut pre)?;
        // A short preamble is judged on what there is: a wrong magic first.
        if pre[..n.min(8)] != MAGIC[..n.min(8)] {
            return Err(StreamError::BadMagic);
        }
        if n < PREAMBLE {
            return Err(StreamError::Truncated {
                record: 0,
                offset: n as u64,
            });
        }
        let version = get32(&pre, 8);
        if version != VERSION {
            return Err(StreamError::UnsupportedVersion { version });
        }
        let mut s = StreamReader {
            r,
            header: Header {
                store_uuid: [0; 16],
                stream_uuid: [0; 16],
                chunk_sectors: 0,
                origin_sectors: 0,
                target: SnapIdentity {
                    create_seq: 0,
                    id: 0,
                },
                base: None,
                resume: None,
            },
            sum: Summary {
                digest: crc32c::crc32c(&pre),
                stream_bytes: PREAMBLE as u64,
                ..Summary::default()
            },
            next_seq: 0,
            last_chunk: None,
            done: None,
            digester: Digester::default(),
        };
        let (tag, rec) = match s.read_record()? {
            Some(x) => x,
            None => {
                return Err(StreamError::Truncated {
                    record: 0,
                    offset: PREAMBLE as u64,
                })
            }
        };
        if tag != TAG_HEADER {
            return Err(StreamError::Misplaced { record: 0, tag });
        }
        if rec.len() != RECORD_HEAD + HEADER_LEN + RECORD_TAIL {
            return Err(StreamError::WrongLength {
                record: 0,
                tag,
                len: (rec.len() - RECORD_HEAD - RECORD_TAIL) as u64,
            });
        }
        s.header = Header::unpack(&rec[RECORD_HEAD..RECORD_HEAD + HEADER_LEN])?;
        s.next_seq = s.header.start().0;
        s.accept(&rec);
        Ok(s)
    }

    /// The verified header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Counts of what was verified so far (the stream's, once `next_record` returned None).
    pub fn summary(&self) -> Summary {
        self.sum
    }

    /// Whether the stream was read to its verified END.
    pub fn complete(&self) -> bool {
        matches!(self.done, Some(Ok(())))
    }

    /// The token to resume after the last verified DATA record.
    pub fn resume_token(&self) -> ResumeToken {
        let h = &self.header;
        ResumeToken {
            store_uuid: h.store_uuid,
            stream_uuid: h.stream_uuid,
            target_seq: h.target.create_seq,
            base_seq: h.base.map_or(0, |b| b.create_seq),
            next_seq: self.next_seq,
            next_chunk: self.last_chunk.map_or(h.start().1, |c| c + 1),
            origin_sectors: h.origin_sectors,
            chunk_sectors: h.chunk_sectors,
        }
    }

    /// Reads one record and checks its length and crc32c.  None: the stream ends cleanly
    /// before it.  Returns the whole record (head, payload, crc).
    fn read_record(&mut self) -> Result<Option<(u32, Vec<u8>)>, StreamError> {
        let record = self.sum.records;
        let offset = self.sum.stream_bytes;
        let mut head = [0u8; RECORD_HEAD];
        let n = read_full(&mut self.r, &mut head)?;
        if n == 0 {
            return Ok(None);
        }
        if n < RECORD_HEAD {
            return Err(StreamError::Truncated {
                record,
                offset: offset + n as u64,
            });
        }
        let tag = get32(&head, 0);
        let len = get64(&head, 4);
        if len > MAX_PAYLOAD {
            return Err(StreamError::WrongLength { record, tag, len });
        }
        let total = RECORD_HEAD + len as usize + RECORD_TAIL;
        let mut rec = std::vec![0u8; total];
        rec[..RECORD_HEAD].copy_from_slice(&head);
        let n = read_full(&mut self.r, &mut rec[RECORD_HEAD..])?;
        if RECORD_HEAD + n < total {
            return Err(StreamError::Truncated {
                record,
                offset: offset + (RECORD_HEAD + n) as u64,
            });
        }
        let body = total - RECORD_TAIL;
        if crc32c::crc32c(&rec[..body]) != get32(&rec, body) {
            return Err(StreamError::BadCrc { record, offset });
        }
        Ok(Some((tag, rec)))
    }

    /// Counts a verified record (its crc32c, last, checked by `read_record`) into the
    /// digest and the counts.
    fn accept(&mut self, rec: &[u8]) {
        // Without the record's crc32c: a record followed by its own valid crc32c leaves a
        // crc chain where it was, whatever the record holds (the crc residue), so a chain
        // over whole records would miss a record replaced by another valid one.
        let body = rec.len() - RECORD_TAIL;
        self.sum.digest = self
            .digester
            .append(self.sum.digest, &rec[..body], get32(rec, body));
        self.sum.stream_bytes += rec.len() as u64;
        self.sum.records += 1;
    }

    /// The next verified DATA record; None once END is verified and nothing follows it.
    /// After a defect, every call returns it again.
    pub fn next_record(&mut self) -> Result<Option<DataRecord>, StreamError> {
        match &self.done {
            Some(Ok(())) => return Ok(None),
            Some(Err(e)) => return Err(e.clone()),
            None => {}
        }
        match self.step() {
            Ok(Some(d)) => Ok(Some(d)),
            Ok(None) => {
                self.done = Some(Ok(()));
                Ok(None)
            }
            Err(e) => {
                self.done = Some(Err(e.clone()));
                Err(e)
            }
        }
    }

    fn step(&mut self) -> Result<Option<DataRecord>, StreamError> {
        loop {
            let record = self.sum.records;
            let Some((tag, rec)) = self.read_record()? else {
                return Err(StreamError::MissingEnd { records: record });
            };
            let payload = &rec[RECORD_HEAD..rec.len() - RECORD_TAIL];
            let len = payload.len() as u64;
            let wrong = StreamError::WrongLength { record, tag, len };
            match tag {
                TAG_DATA => {
                    if payload.len() < DATA_HEAD {
                        return Err(wrong);
                    }
                    if get16b(payload, 0) != self.header.stream_uuid {
                        return Err(StreamError::ForeignRecord { record });
                    }
                    let seq = get64(payload, 16);
                    let chunk = get64(payload, 24);
                    if seq != self.next_seq
                        || self.last_chunk.is_some_and(|c| chunk <= c)
                        || chunk < self.header.start().1
                    {
                        return Err(StreamError::OutOfOrder {
                            record,
                            seq,
                            expected_seq: self.next_seq,
                            chunk,
                            prev_chunk: self.last_chunk,
                        });
                    }
                    let Some(clen) = self.header.chunk_len(chunk) else {
                        return Err(StreamError::BeyondOrigin { record, chunk });
                    };
                    if payload.len() != DATA_HEAD + clen {
                        return Err(wrong);
                    }
                    let data = payload[DATA_HEAD..].to_vec();
                    self.accept(&rec);
                    self.next_seq += 1;
                    self.last_chunk = Some(chunk);
                    self.sum.data_records += 1;
                    self.sum.data_bytes += clen as u64;
                    return Ok(Some(DataRecord { seq, chunk, data }));
                }
                TAG_END => {
                    if payload.len() != END_LEN {
                        return Err(wrong);
                    }
                    if get16b(payload, 0) != self.header.stream_uuid {
                        return Err(StreamError::ForeignRecord { record });
                    }
                    let s = &self.sum;
                    for (what, o, read) in [
                        ("records", 16, s.records),
                        ("data records", 24, s.data_records),
                        ("data bytes", 32, s.data_bytes),
                        ("stream bytes", 40, s.stream_bytes),
                    ] {
                        let written = get64(payload, o);
                        if written != read {
                            return Err(StreamError::CountMismatch {
                                what,
                                written,
                                read,
                            });
                        }
                    }
                    if get32(payload, 52) != 0 {
                        return Err(StreamError::BadEnd {
                            reason: "reserved field not zero",
                        });
                    }
                    let written = get32(payload, 48);
                    if written != s.digest {
                        return Err(StreamError::DigestMismatch {
                            written,
                            computed: s.digest,
                        });
                    }
                    let end_at = s.stream_bytes + rec.len() as u64;
                    let mut one = [0u8; 1];
                    if read_full(&mut self.r, &mut one)? != 0 {
                        return Err(StreamError::TrailingData { offset: end_at });
                    }
                    return Ok(None);
                }
                TAG_HEADER => return Err(StreamError::Misplaced { record, tag }),
                t if t & TAG_MAY_SKIP != 0 => {
                    self.accept(&rec);
                    self.sum.skipped += 1;
                }
                _ => return Err(StreamError::UnknownRequiredTag { record, tag }),
            }
        }
    }
}

/// Where to resume an interrupted transfer (`Documentation/stream.md`, Resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeToken {
    /// The store.
    pub store_uuid: [u8; 16],
    /// The interrupted stream.
    pub stream_uuid: [u8; 16],
    /// Target creation sequence.
    pub target_seq: u64,
    /// Base creation sequence (0: a full stream).
    pub base_seq: u64,
    /// Sequence number of the next DATA record.
    pub next_seq: u64,
    /// The lowest chunk not yet received.
    pub next_chunk: u64,
    /// Origin size of the stream.
    pub origin_sectors: u64,
    /// Chunk size of the stream.
    pub chunk_sectors: u32,
}

const TOKEN_PREFIX: &str = "shsnap-resume-1:";
/// Bytes of a resume token (its text form is the prefix and their hex).
pub const TOKEN_LEN: usize = 84;

impl ResumeToken {
    /// The 84 bytes of the token, crc32c included (what `shsnap receive` stores as the
    /// origin's receive progress).
    pub fn to_bytes(&self) -> [u8; TOKEN_LEN] {
        let mut b = [0u8; TOKEN_LEN];
        b[0..16].copy_from_slice(&self.store_uuid);
        b[16..32].copy_from_slice(&self.stream_uuid);
        b[32..40].copy_from_slice(&self.target_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.base_seq.to_le_bytes());
        b[48..56].copy_from_slice(&self.next_seq.to_le_bytes());
        b[56..64].copy_from_slice(&self.next_chunk.to_le_bytes());
        b[64..72].copy_from_slice(&self.origin_sectors.to_le_bytes());
        b[72..76].copy_from_slice(&self.chunk_sectors.to_le_bytes());
        let crc = crc32c::crc32c(&b[..80]);
        b[80..84].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses the text form; None if it is not a valid token.
    pub fn parse(s: &str) -> Option<ResumeToken> {
        let hex = s.trim().strip_prefix(TOKEN_PREFIX)?;
        if hex.len() != 2 * TOKEN_LEN || !hex.is_ascii() {
            return None;
        }
        let mut b = [0u8; TOKEN_LEN];
        for (i, x) in b.iter_mut().enumerate() {
            *x = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Self::from_bytes(&b)
    }

    /// Decodes the bytes `to_bytes` makes; None if their length, crc32c or reserved field
    /// is wrong.
    pub fn from_bytes(b: &[u8]) -> Option<ResumeToken> {
        if b.len() != TOKEN_LEN || crc32c::crc32c(&b[..80]) != get32(b, 80) || get32(b, 76) != 0 {
            return None;
        }
        Some(ResumeToken {
            store_uuid: get16b(b, 0),
            stream_uuid: get16b(b, 16),
            target_seq: get64(b, 32),
            base_seq: get64(b, 40),
            next_seq: get64(b, 48),
            next_chunk: get64(b, 56),
            origin_sectors: get64(b, 64),
            chunk_sectors: get32(b, 72),
        })
    }
}

impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(TOKEN_PREFIX)?;
        for x in self.to_bytes() {
            write!(f, "{:02x}", x)?;
        }
        Ok(())
    }
}

/// A uuid as text (8-4-4-4-12 hex digits).
pub fn uuid_str(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|x| format!("{:02x}", x)).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

#[cfg(test)]
mod digester_tests {
    use super::*;

    /// The table shortcut gives exactly `crc32c_append` for every length it serves, from
    /// any register, so the digest is the one Documentation/stream.md defines.
    #[test]
    fn digester_equals_crc32c_append() {
        let mut d = Digester::default();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for len in [
            1,
            Digester::TABLE_MIN - 1,
            Digester::TABLE_MIN,
            65_536 + 44,
            65_536 + 44,
            4097,
            1 << 20,
        ] {
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for _ in 0..20 {
                let digest = next() as u32;
                let want = crc32c::crc32c_append(digest, &data);
                assert_eq!(
                    d.append(digest, &data, crc32c::crc32c(&data)),
                    want,
                    "len {}",
                    len
                );
            }
        }
    }
}
