//! Tests of the replication stream (`tools/stream.rs`, `Documentation/stream.md`): round
//! trips, every single-bit flip and every truncation of a small stream, reordered, spliced,
//! forged and unknown records, identity checks and resume tokens.  Whatever the damage, the
//! reader must refuse the stream and return only a prefix of the records written.

mod common;
use common::seed;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use shsnap_core::stream::*;
use std::collections::BTreeMap;
use std::io::Cursor;

const STORE: [u8; 16] = [0x5a; 16];

fn header(stream: u8, chunk_sectors: u32, origin_sectors: u64, base: bool) -> Header {
    Header {
        store_uuid: STORE,
        stream_uuid: [stream; 16],
        chunk_sectors,
        origin_sectors,
        target: SnapIdentity {
            create_seq: 9,
            id: 3,
        },
        base: base.then_some(SnapIdentity {
            create_seq: 4,
            id: 3,
        }),
        resume: None,
    }
}

/// Writes a stream of `chunks` of `h` with random data; a skippable record after the
/// first DATA record if `skippable`.  Returns the bytes and the records written.
fn make(
    h: Header,
    chunks: &[u64],
    rng: &mut SmallRng,
    skippable: bool,
) -> (Vec<u8>, Vec<DataRecord>) {
    let mut w = StreamWriter::new(Vec::new(), h).unwrap();
    let mut recs = Vec::new();
    let (mut seq, _) = h.start();
    for (i, &c) in chunks.iter().enumerate() {
        let mut data = vec![0u8; h.chunk_len(c).unwrap()];
        rng.fill_bytes(&mut data);
        w.data(c, &data).unwrap();
        recs.push(DataRecord {
            seq,
            chunk: c,
            data,
        });
        seq += 1;
        if skippable && i == 0 {
            w.skippable(TAG_MAY_SKIP | 0x77, b"a record from the future")
                .unwrap();
        }
    }
    let (bytes, sum) = w.finish().unwrap();
    assert_eq!(sum.data_records, chunks.len() as u64);
    (bytes, recs)
}

/// The small stream the exhaustive tests damage: 8-sector chunks, an origin of 19 sectors
/// (3 chunks, the last 1536 bytes), incremental, all 3 chunks and one skippable record.
fn small(rng: &mut SmallRng) -> (Vec<u8>, Vec<DataRecord>) {
    make(header(1, 8, 19, true), &[0, 1, 2], rng, true)
}

/// Reads a whole stream: the records returned, and the summary or the defect.
fn read_all(bytes: &[u8]) -> (Vec<DataRecord>, Result<Summary, StreamError>) {
    let mut r = match StreamReader::new(Cursor::new(bytes)) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Err(e)),
    };
    let mut out = Vec::new();
    loop {
        match r.next_record() {
            Ok(Some(d)) => out.push(d),
            Ok(None) => {
                assert!(r.complete());
                return (out, Ok(r.summary()));
            }
            Err(e) => {
                assert!(!r.complete());
                // The defect sticks.
                assert_eq!(r.next_record(), Err(e.clone()));
                return (out, Err(e));
            }
        }
    }
}

/// Byte ranges of the records (preamble excluded).
fn spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut o = PREAMBLE;
    while o < bytes.len() {
        let len = u64::from_le_bytes(bytes[o + 4..o + 12].try_into().unwrap()) as usize;
        let end = o + RECORD_HEAD + len + RECORD_TAIL;
        out.push((o, end));
        o = end;
    }
    out
}

/// The defect's variant name, to count kinds.
fn kind(e: &StreamError) -> String {
    format!("{:?}", e)
        .split([' ', '(', '{'])
        .next()
        .unwrap()
        .to_string()
}

fn assert_prefix(got: &[DataRecord], all: &[DataRecord], what: &str) {
    assert!(
        got.len() <= all.len() && got == &all[..got.len()],
        "{}: returned records that were not written",
        what
    );
}

#[test]
fn round_trip() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0001));
    let cases: Vec<(Header, Vec<u64>)> = vec![
        (header(1, 8, 19, true), vec![0, 1, 2]),
        (header(2, 8, 19, false), vec![2]),
        (header(3, 8, 19, false), vec![]),
        (
            header(4, 16, 16 * 1000, true),
            (0..1000).step_by(7).collect(),
        ),
        (header(5, 2048, 2048 * 3 + 8, false), vec![0, 3]),
        (header(6, 128, 1, true), vec![0]),
    ];
    for (h, chunks) in cases {
        for skippable in [false, true] {
            let (bytes, recs) = make(h, &chunks, &mut rng, skippable && !chunks.is_empty());
            let (got, res) = read_all(&bytes);
            let sum = res.unwrap_or_else(|e| panic!("{:?}: {}", h, e));
            assert_eq!(got, recs);
            assert_eq!(sum.data_records, recs.len() as u64);
            assert_eq!(
                sum.data_bytes,
                recs.iter().map(|r| r.data.len() as u64).sum::<u64>()
            );
            let end = spans(&bytes).last().unwrap().0;
            assert_eq!(sum.stream_bytes, end as u64);
            let mut digest = crc32c::crc32c(&bytes[..PREAMBLE]);
            for (s, e) in &spans(&bytes)[..spans(&bytes).len() - 1] {
                digest = crc32c::crc32c_append(digest, &bytes[*s..*e - RECORD_TAIL]);
            }
            assert_eq!(sum.digest, digest);
            let r = StreamReader::new(Cursor::new(&bytes)).unwrap();
            assert_eq!(r.header(), &h);
        }
    }
}

#[test]
fn every_bit_flip_is_detected() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0002));
    let (bytes, recs) = small(&mut rng);
    assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut flips = 0u64;
    let mut buf = bytes.clone();
    for byte in 0..bytes.len() {
        for bit in 0..8 {
            buf[byte] ^= 1 << bit;
            let (got, res) = read_all(&buf);
            let what = format!("bit {} of byte {}", bit, byte);
            let e = match res {
                Ok(_) => panic!("{}: flipped stream accepted", what),
                Err(e) => e,
            };
            assert_prefix(&got, &recs, &what);
            *kinds.entry(kind(&e)).or_default() += 1;
            buf[byte] ^= 1 << bit;
            flips += 1;
        }
    }
    println!(
        "{} bytes, {} single-bit flips, all refused: {:?}",
        bytes.len(),
        flips,
        kinds
    );
    assert_eq!(flips, bytes.len() as u64 * 8);
}

#[test]
fn truncation_at_every_offset_is_detected() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0003));
    let (bytes, recs) = small(&mut rng);
    let boundaries: Vec<usize> = spans(&bytes).iter().map(|s| s.1).collect();
    for cut in 0..bytes.len() {
        let (got, res) = read_all(&bytes[..cut]);
        let what = format!("cut at {}", cut);
        match res {
            Ok(_) => panic!("{}: truncated stream accepted", what),
            Err(StreamError::MissingEnd { .. }) => assert!(boundaries.contains(&cut), "{}", what),
            Err(StreamError::Truncated { offset, .. }) => assert_eq!(offset, cut as u64),
            Err(e) => panic!("{}: {}", what, e),
        }
        assert_prefix(&got, &recs, &what);
    }
    println!("{} truncations refused", bytes.len());
}

/// Replaces the records at `spans` indexes by `with` (each a byte vector).
fn rebuild(bytes: &[u8], f: impl Fn(&[Vec<u8>]) -> Vec<Vec<u8>>) -> Vec<u8> {
    let recs: Vec<Vec<u8>> = spans(bytes)
        .iter()
        .map(|&(s, e)| bytes[s..e].to_vec())
        .collect();
    let mut out = bytes[..PREAMBLE].to_vec();
    for r in f(&recs) {
        out.extend_from_slice(&r);
    }
    out
}

#[test]
fn reordered_dropped_and_duplicated_records_are_detected() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0004));
    let (bytes, recs) = make(header(1, 8, 64, false), &[0, 1, 2, 5, 7], &mut rng, false);
    // Records: 0 header, 1..=5 data, 6 end.
    let swapped = rebuild(&bytes, |r| {
        let mut v = r.to_vec();
        v.swap(2, 3);
        v
    });
    let (got, res) = read_all(&swapped);
    assert_eq!(got, recs[..1]);
    assert_eq!(
        res.unwrap_err(),
        StreamError::OutOfOrder {
            record: 2,
            seq: 2,
            expected_seq: 1,
            chunk: 2,
            prev_chunk: Some(0)
        }
    );
    let dropped = rebuild(&bytes, |r| [&r[..3], &r[4..]].concat());
    let (got, res) = read_all(&dropped);
    assert_eq!(got, recs[..2]);
    assert!(matches!(
        res,
        Err(StreamError::OutOfOrder {
            record: 3,
            seq: 3,
            expected_seq: 2,
            ..
        })
    ));
    let duplicated = rebuild(&bytes, |r| [&r[..4], &r[3..]].concat());
    let (got, res) = read_all(&duplicated);
    assert_eq!(got, recs[..3]);
    assert!(matches!(
        res,
        Err(StreamError::OutOfOrder {
            record: 4,
            seq: 2,
            expected_seq: 3,
            ..
        })
    ));
    // The last DATA record dropped: its END counts no longer match... but the sequence is
    // intact, so END catches it.
    let last_dropped = rebuild(&bytes, |r| [&r[..5], &r[6..]].concat());
    let (got, res) = read_all(&last_dropped);
    assert_eq!(got, recs[..4]);
    assert!(matches!(
        res,
        Err(StreamError::CountMismatch {
            what: "records",
            ..
        })
    ));
    // A second header.
    let twice = rebuild(&bytes, |r| [&r[..2], &r[..1], &r[2..]].concat());
    let (got, res) = read_all(&twice);
    assert_eq!(got, recs[..1]);
    assert_eq!(
        res.unwrap_err(),
        StreamError::Misplaced {
            record: 2,
            tag: TAG_HEADER
        }
    );
    // No header.
    let headless = rebuild(&bytes, |r| r[1..].to_vec());
    assert_eq!(
        read_all(&headless).1.unwrap_err(),
        StreamError::Misplaced {
            record: 0,
            tag: TAG_DATA
        }
    );
}

#[test]
fn records_of_another_stream_are_detected() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0005));
    // Two streams of the same snapshot pair and chunks: only the stream uuid differs.
    let (a, recs) = make(header(1, 8, 64, true), &[0, 1, 2, 3], &mut rng, false);
    let (b, _) = make(header(2, 8, 64, true), &[0, 1, 2, 3], &mut rng, false);
    let rb: Vec<Vec<u8>> = spans(&b).iter().map(|&(s, e)| b[s..e].to_vec()).collect();
    for i in 1..rb.len() {
        let spliced = rebuild(&a, |r| {
            let mut v = r.to_vec();
            v[i] = rb[i].clone();
            v
        });
        let (got, res) = read_all(&spliced);
        assert_eq!(got, recs[..i - 1]);
        assert_eq!(
            res.unwrap_err(),
            StreamError::ForeignRecord { record: i as u64 }
        );
    }
    // B's header on A's records.
    let spliced = rebuild(&a, |r| {
        let mut v = r.to_vec();
        v[0] = rb[0].clone();
        v
    });
    let (got, res) = read_all(&spliced);
    assert!(got.is_empty());
    assert_eq!(res.unwrap_err(), StreamError::ForeignRecord { record: 1 });
}

#[test]
fn forged_records_with_valid_crcs_are_detected() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0006));
    let h = header(1, 8, 19, false);
    let (bytes, recs) = make(h, &[0, 1, 2], &mut rng, false);
    let data = |seq: u64, chunk: u64, len: usize| {
        let mut p = h.stream_uuid.to_vec();
        p.extend_from_slice(&seq.to_le_bytes());
        p.extend_from_slice(&chunk.to_le_bytes());
        p.extend(std::iter::repeat_n(0xab, len));
        encode_record(TAG_DATA, &p)
    };
    let with = |i: usize, rec: Vec<u8>| {
        rebuild(&bytes, |r| {
            let mut v = r.to_vec();
            v[i] = rec.clone();
            v
        })
    };
    // Record 2 (seq 1, chunk 1) with other data, same length: returned (it is valid on its
    // own), but END's digest does not match.
    let (got, res) = read_all(&with(2, data(1, 1, 4096)));
    assert_eq!(got.len(), 3);
    assert_eq!(got[..1], recs[..1]);
    assert!(
        matches!(res, Err(StreamError::DigestMismatch { .. })),
        "{:?}",
        res
    );
    // Wrong lengths: a full chunk short, the last chunk long.
    let (got, res) = read_all(&with(2, data(1, 1, 4095)));
    assert_eq!(got, recs[..1]);
    assert_eq!(
        res.unwrap_err(),
        StreamError::WrongLength {
            record: 2,
            tag: TAG_DATA,
            len: 32 + 4095
        }
    );
    let (_, res) = read_all(&with(3, data(2, 2, 4096)));
    assert_eq!(
        res.unwrap_err(),
        StreamError::WrongLength {
            record: 3,
            tag: TAG_DATA,
            len: 32 + 4096
        }
    );
    // Beyond the origin.
    let (_, res) = read_all(&with(3, data(2, 3, 4096)));
    assert_eq!(
        res.unwrap_err(),
        StreamError::BeyondOrigin {
            record: 3,
            chunk: 3
        }
    );
    // Right sequence, chunk not increasing.
    let (_, res) = read_all(&with(2, data(1, 0, 4096)));
    assert!(matches!(
        res,
        Err(StreamError::OutOfOrder {
            record: 2,
            chunk: 0,
            prev_chunk: Some(0),
            ..
        })
    ));
    // END forged: counts, reserved field, digest.
    let sp = spans(&bytes);
    let (es, ee) = *sp.last().unwrap();
    let end = bytes[es + RECORD_HEAD..ee - RECORD_TAIL].to_vec();
    let forged_end = |o: usize, v: u32| {
        let mut p = end.clone();
        let x = u32::from_le_bytes(p[o..o + 4].try_into().unwrap()) ^ v;
        p[o..o + 4].copy_from_slice(&x.to_le_bytes());
        with(sp.len() - 1, encode_record(TAG_END, &p))
    };
    for (o, what) in [
        (16, "records"),
        (24, "data records"),
        (32, "data bytes"),
        (40, "stream bytes"),
    ] {
        let (got, res) = read_all(&forged_end(o, 1));
        assert_eq!(got, recs);
        assert!(matches!(res, Err(StreamError::CountMismatch { what: w, .. }) if w == what));
    }
    assert!(matches!(
        read_all(&forged_end(48, 1)).1,
        Err(StreamError::DigestMismatch { .. })
    ));
    assert!(matches!(
        read_all(&forged_end(52, 1)).1,
        Err(StreamError::BadEnd { .. })
    ));
    // END of the wrong length, and a payload length above the limit.
    let mut p = end.clone();
    p.push(0);
    assert!(matches!(
        read_all(&with(sp.len() - 1, encode_record(TAG_END, &p))).1,
        Err(StreamError::WrongLength { tag: TAG_END, .. })
    ));
    let mut huge = bytes.clone();
    huge[sp[1].0 + 4..sp[1].0 + 12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    assert_eq!(
        read_all(&huge).1.unwrap_err(),
        StreamError::WrongLength {
            record: 1,
            tag: TAG_DATA,
            len: MAX_PAYLOAD + 1
        }
    );
    // Bytes after END.
    let mut trailing = bytes.clone();
    trailing.push(0);
    let (got, res) = read_all(&trailing);
    assert_eq!(got, recs);
    assert_eq!(
        res.unwrap_err(),
        StreamError::TrailingData {
            offset: bytes.len() as u64
        }
    );
    // Preamble.
    let mut m = bytes.clone();
    m[0] = b'X';
    assert_eq!(read_all(&m).1.unwrap_err(), StreamError::BadMagic);
    let mut v = bytes.clone();
    v[8] = 2;
    assert_eq!(
        read_all(&v).1.unwrap_err(),
        StreamError::UnsupportedVersion { version: 2 }
    );
    // Header fields out of range, with a valid crc.
    let hp = h.pack();
    for (o, x, reason) in [
        (32usize, 4u8, "chunk size"),
        (36, 4, "unknown flags"),
        (48, 9, "target creation sequence zero"),
        (64, 1, "base fields set in a full stream"),
        (104, 1, "reserved field not zero"),
    ] {
        let mut p = hp;
        p[o] ^= x;
        let (_, res) = read_all(&with(0, encode_record(TAG_HEADER, &p)));
        assert_eq!(
            res.unwrap_err(),
            StreamError::BadHeader { reason },
            "header byte {}",
            o
        );
    }
}

#[test]
fn unknown_skippable_tag_is_skipped() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0007));
    let (bytes, recs) = small(&mut rng);
    let (got, res) = read_all(&bytes);
    let sum = res.unwrap();
    assert_eq!(got, recs);
    assert_eq!(sum.skipped, 1);
    assert_eq!(sum.records, 1 + 3 + 1);
}

#[test]
fn unknown_required_tag_is_refused() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0008));
    let h = header(1, 8, 64, false);
    let mut w = StreamWriter::new(Vec::new(), h).unwrap();
    let mut data = vec![0u8; 4096];
    rng.fill_bytes(&mut data);
    w.data(0, &data).unwrap();
    w.raw_record(0x42, b"must be understood").unwrap();
    w.data(1, &data).unwrap();
    assert!(w.skippable(0x42, b"").is_err());
    let (bytes, _) = w.finish().unwrap();
    let (got, res) = read_all(&bytes);
    assert_eq!(got.len(), 1);
    assert_eq!(
        res.unwrap_err(),
        StreamError::UnknownRequiredTag {
            record: 2,
            tag: 0x42
        }
    );
}

#[test]
fn writer_refuses_invalid_streams() {
    let h = header(1, 8, 19, false);
    let mut w = StreamWriter::new(Vec::new(), h).unwrap();
    assert!(w.data(1, &[0; 4096]).is_ok());
    assert!(w.data(1, &[0; 4096]).is_err(), "same chunk twice");
    assert!(w.data(0, &[0; 4096]).is_err(), "chunk going back");
    assert!(w.data(2, &[0; 4096]).is_err(), "last chunk too long");
    assert!(w.data(3, &[0; 512]).is_err(), "beyond the origin");
    assert!(w.data(2, &[0; 1536]).is_ok());
    let mut bad = h;
    bad.chunk_sectors = 12;
    assert!(StreamWriter::new(Vec::new(), bad).is_err());
    let mut bad = h;
    bad.base = Some(SnapIdentity {
        create_seq: 9,
        id: 1,
    });
    assert!(
        StreamWriter::new(Vec::new(), bad).is_err(),
        "base not older than target"
    );
}

#[test]
fn resumed_sequence_numbers_do_not_wrap() {
    // A resumed header whose sequence numbers would wrap before the last chunk: refused
    // (the reader and the writer count them on, with overflow checks).
    let mut h = header(1, 8, 64, false);
    let chunks = h.chunks();
    for (seq, ok) in [(u64::MAX - chunks, true), (u64::MAX - chunks + 1, false)] {
        h.resume = Some(ResumePoint {
            stream_uuid: [2; 16],
            seq,
            chunk: 0,
        });
        let res = Header::unpack(&h.pack());
        if ok {
            assert_eq!(res, Ok(h));
        } else {
            assert_eq!(
                res,
                Err(StreamError::BadHeader {
                    reason: "resume sequence number out of range"
                })
            );
            assert!(StreamWriter::new(Vec::new(), h).is_err());
        }
    }
}

#[test]
fn identity_checks() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_0009));
    let (bytes, _) = small(&mut rng);
    let r = StreamReader::new(Cursor::new(&bytes)).unwrap();
    let h = r.header();
    assert_eq!(h.check_identity(&STORE, Some(4), Some(9)), Ok(()));
    assert_eq!(h.check_identity(&STORE, Some(4), None), Ok(()));
    let other = [0xa5; 16];
    assert_eq!(
        h.check_identity(&other, Some(4), Some(9)),
        Err(StreamError::Foreign { what: "store uuid" })
    );
    // The base's id (3) was reused for the target: the creation sequence tells them apart.
    assert_eq!(
        h.check_identity(&STORE, Some(3), Some(9)),
        Err(StreamError::Foreign { what: "base" })
    );
    assert_eq!(
        h.check_identity(&STORE, None, Some(9)),
        Err(StreamError::Foreign { what: "base" })
    );
    assert_eq!(
        h.check_identity(&STORE, Some(4), Some(8)),
        Err(StreamError::Foreign { what: "target" })
    );
}

#[test]
fn resume_after_a_cut() {
    let s = seed("SHSNAP_STREAM_SEED", 0x5eed_000a);
    let mut rng = SmallRng::seed_from_u64(s);
    let h = header(1, 8, 8 * 40, true);
    let chunks: Vec<u64> = (0..40).filter(|_| rng.gen_bool(0.5)).collect();
    let (bytes, recs) = make(h, &chunks, &mut rng, false);
    let sp = spans(&bytes);
    for &(start, end) in &sp[1..] {
        // The stream is cut in the middle of a record after the header.
        let cut = (start + end) / 2;
        let mut r = StreamReader::new(Cursor::new(&bytes[..cut])).unwrap();
        let mut got = Vec::new();
        let err = loop {
            match r.next_record() {
                Ok(Some(d)) => got.push(d),
                Ok(None) => panic!("cut stream accepted"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StreamError::Truncated { .. }));
        let text = r.resume_token().to_string();
        let token = ResumeToken::parse(&text).unwrap();
        assert_eq!(token, r.resume_token());
        assert_eq!(token.next_seq, got.len() as u64);
        // The sender resumes with a stream of its own.
        let mut h2 = header(2, h.chunk_sectors, h.origin_sectors, true);
        h2.resume = Some(ResumePoint {
            stream_uuid: token.stream_uuid,
            seq: token.next_seq,
            chunk: token.next_chunk,
        });
        let mut w = StreamWriter::new(Vec::new(), h2).unwrap();
        for d in &recs[got.len()..] {
            w.data(d.chunk, &d.data).unwrap();
        }
        let (b2, _) = w.finish().unwrap();
        let mut r2 = StreamReader::new(Cursor::new(&b2)).unwrap();
        assert_eq!(r2.header().check_resume(&token), Ok(()));
        while let Some(d) = r2.next_record().unwrap() {
            got.push(d);
        }
        assert_eq!(got, recs);
        // A resumed stream of another point, or for another interrupted stream, is refused.
        let mut t = token;
        t.next_chunk += 1;
        assert_eq!(
            r2.header().check_resume(&t),
            Err(StreamError::Foreign {
                what: "resume point"
            })
        );
        let mut t = token;
        t.stream_uuid[0] ^= 1;
        assert_eq!(
            r2.header().check_resume(&t),
            Err(StreamError::Foreign {
                what: "resume point"
            })
        );
        let mut t = token;
        t.base_seq = 0;
        assert_eq!(
            r2.header().check_resume(&t),
            Err(StreamError::Foreign { what: "base" })
        );
    }
    // Damaged tokens are refused.
    let text = ResumeToken {
        store_uuid: STORE,
        stream_uuid: [1; 16],
        target_seq: 9,
        base_seq: 4,
        next_seq: 7,
        next_chunk: 12,
        origin_sectors: 320,
        chunk_sectors: 8,
    }
    .to_string();
    assert!(ResumeToken::parse(&text).is_some());
    for i in 0..text.len() {
        let mut t = text.clone().into_bytes();
        t[i] = if t[i] == b'0' { b'1' } else { b'0' };
        assert!(
            ResumeToken::parse(std::str::from_utf8(&t).unwrap()).is_none(),
            "byte {}",
            i
        );
    }
    assert!(ResumeToken::parse(&text[..text.len() - 2]).is_none());
}

#[test]
fn verify_stream_command() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_STREAM_SEED", 0x5eed_000b));
    let (bytes, _) = small(&mut rng);
    let dir = std::env::temp_dir().join(format!("shsnap-stream-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, content: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shsnap"))
            .arg("verify-stream")
            .arg(&p)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = run("good", &bytes);
    assert_eq!(code, Some(0), "{}", stdout);
    assert!(
        stdout.contains("verified 5 records (3 data, 1 skipped)"),
        "{}",
        stdout
    );
    assert!(
        stdout.contains("base creation sequence 4 (id 3)"),
        "{}",
        stdout
    );
    let mut bad = bytes.clone();
    bad[1000] ^= 0x10;
    let (code, stdout, stderr) = run("flipped", &bad);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("record 1 (byte 140): bad crc32c"),
        "{}",
        stderr
    );
    assert!(
        stdout.contains("resume token shsnap-resume-1:"),
        "{}",
        stdout
    );
    let (code, _, stderr) = run("cut", &bytes[..bytes.len() - 1]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("truncated in record 5"), "{}", stderr);
    std::fs::remove_dir_all(&dir).unwrap();
}
