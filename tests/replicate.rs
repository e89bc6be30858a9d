//! Tests of `shsnap send` and `shsnap receive` without a kernel (`tools/replicate.rs`): the
//! parsers of what the origin's messages and dmsetup print, the sender's plan, the
//! receiver's accept-or-refuse decision, and the two loops against an in-memory primary
//! (two images and a delta) and secondary (an image whose writes are durable only once
//! synced): full, incremental, with gaps, cut at many places, the secondary "crashing"
//! there and the transfer resumed from the stored progress.

mod common;
use common::seed;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use shsnap_core::dm_ioctl::TargetLine;
use shsnap_core::replicate::*;
use shsnap_core::stream::*;
use std::io::{self, Cursor};

const PRIMARY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const STORE: [u8; 16] = [0x5a; 16];
const OTHER: [u8; 16] = [0x0b; 16];

// ---------------------------------------------------------------------------------------
// Parsers.

#[test]
fn info_parses() {
    let text = "store 5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a chunk_sectors 16 chunks 1000 next_seq 12\n\
                source 0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b\n\
                progress -\n\
                snap 4 3 0 valid\n\
                snap 9 7 21 valid\n\
                snap 2 8 25 invalid\n\
                snap 5 11 22 valid\n";
    let i = parse_info(text).unwrap();
    assert_eq!(i.uuid, STORE);
    assert_eq!((i.chunk_sectors, i.chunks, i.next_seq), (16, 1000, 12));
    assert_eq!(i.source, Some(OTHER));
    assert_eq!(i.progress, None);
    assert_eq!(i.snaps.len(), 4);
    assert_eq!(
        i.snap(9),
        Some(&SnapInfo {
            id: 9,
            seq: 7,
            source_seq: 21,
            valid: true
        })
    );
    assert_eq!(i.by_seq(11).map(|s| s.id), Some(5));
    // The newest replica is valid: snapshot 2 (source seq 25) is not.
    assert_eq!(i.newest_replica().map(|s| s.id), Some(5));
    assert_eq!(i.free_id(3), Some(3));
    assert_eq!(i.free_id(5), Some(10));
    assert_eq!(
        QueryReport::new(&i).to_string(),
        "source 0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b\nlast 22 5\nresume -"
    );
    // No snapshots, no source; unknown lines are skipped.
    let empty = parse_info(&format!(
        "store {} chunk_sectors 8 chunks 1 next_seq 1\nsource -\nprogress -\nfuture 1 2 3\n",
        PRIMARY
    ))
    .unwrap();
    assert_eq!((empty.source, empty.snaps.len()), (None, 0));
    assert_eq!(empty.newest_replica(), None);
    assert_eq!(
        QueryReport::new(&empty).to_string(),
        "source -\nlast -\nresume -"
    );
    let full = StoreInfo {
        snaps: vec![SnapInfo {
            id: u32::MAX,
            seq: 1,
            source_seq: 0,
            valid: true,
        }],
        ..empty
    };
    assert_eq!(full.free_id(u32::MAX), None);
}

#[test]
fn info_refuses_malformed_text() {
    let head = format!("store {} chunk_sectors 8 chunks 4 next_seq 3\n", PRIMARY);
    let tail = "source -\nprogress -\n";
    for (text, what) in [
        (String::new(), "no store line"),
        (format!("{}progress -\n", head), "no source line"),
        (format!("{}source -\n", head), "no progress line"),
        (format!("{}{}{}", head, head, tail), "a second store line"),
        (
            format!("store 5a5a chunk_sectors 8 chunks 4 next_seq 3\n{}", tail),
            "bad uuid",
        ),
        (
            format!("store {} chunk_sectors 8 chunks 4\n{}", PRIMARY, tail),
            "not `store",
        ),
        (
            format!(
                "store {} chunk_sectors +8 chunks 4 next_seq 3\n{}",
                PRIMARY, tail
            ),
            "bad chunk size",
        ),
        (format!("{}source xyz\nprogress -\n", head), "bad uuid"),
        (format!("{}source -\nprogress abc\n", head), "bad hex"),
        (format!("{}source -\nprogress 0g\n", head), "bad hex"),
        (
            format!("{}{}snap 1 0 0 valid\n", head, tail),
            "bad creation sequence",
        ),
        (
            format!("{}{}snap 1 2 0 ok\n", head, tail),
            "neither valid nor invalid",
        ),
        (format!("{}{}snap 1 2 0\n", head, tail), "not `snap"),
        (format!("{}{}snap -1 2 0 valid\n", head, tail), "bad id"),
        (
            format!("{}{}snap 1 2 0 valid\nsnap 1 3 0 valid\n", head, tail),
            "a second snapshot",
        ),
        (
            format!("{}{}snap 1 2 0 valid\nsnap 4 2 0 valid\n", head, tail),
            "a second snapshot",
        ),
    ] {
        let e = parse_info(&text).unwrap_err();
        assert!(e.contains(what), "{:?}: {} (expected {:?})", text, e, what);
    }
}

#[test]
fn delta_parses() {
    assert_eq!(
        parse_delta("0+3 5+1 6+2 next 100\n", 0).unwrap(),
        DeltaPage {
            ranges: vec![(0, 3), (5, 1), (6, 2)],
            next: Some(100)
        }
    );
    assert_eq!(
        parse_delta("end\n", 7).unwrap(),
        DeltaPage {
            ranges: vec![],
            next: None
        }
    );
    assert_eq!(
        parse_delta("7+1 end", 7).unwrap().ranges,
        vec![(7, 1)],
        "a range at the start chunk"
    );
    assert_eq!(parse_delta("next 9", 8).unwrap().next, Some(9));
    let max = format!("{}+1 end", u64::MAX - 1);
    assert_eq!(
        parse_delta(&max, 0).unwrap().ranges,
        vec![(u64::MAX - 1, 1)]
    );
    for (text, start, what) in [
        ("", 0, "no `next` or `end`"),
        ("0+3", 0, "no `next` or `end`"),
        ("0+3 next", 0, "bad next chunk"),
        ("0+3 next x", 0, "bad next chunk"),
        ("0+3 next 2", 0, "does not move on"),
        ("next 5", 5, "does not move on"),
        ("0+0 end", 0, "bad range"),
        ("0-3 end", 0, "bad range"),
        ("+0+3 end", 0, "bad range"),
        ("a+3 end", 0, "bad range"),
        ("0+3 2+1 end", 0, "overlaps or goes back"),
        ("5+1 3+1 end", 0, "overlaps or goes back"),
        ("3+1 end", 4, "overlaps or goes back"),
        (&max.replace("+1", "+2"), 0, "bad range"),
        ("0+1 end 3+1", 0, "after the end"),
        ("0+1 next 4 end", 0, "after the end"),
    ] {
        let e = parse_delta(text, start).unwrap_err();
        assert!(e.contains(what), "{:?}: {} (expected {:?})", text, e, what);
    }
}

#[test]
fn tables_parse() {
    let t = parse_origin_table("0 2097152 shared-origin 254:0 254:1 16\n").unwrap();
    assert_eq!(
        t,
        OriginTable {
            sectors: 2097152,
            origin_dev: "254:0".into(),
            cow_dev: "254:1".into(),
            chunk_sectors: 16
        }
    );
    assert!(parse_origin_table("0 8 shared-origin 254:0 254:1 16 0\n").is_ok());
    for bad in [
        "",
        "0 8 linear 254:0 0\n",
        "0 0 shared-origin 254:0 254:1 16\n",
        "8 8 shared-origin 254:0 254:1 16\n",
        "0 8 shared-origin 254:0 254:1 16\n8 8 linear 254:0 0\n",
    ] {
        assert!(parse_origin_table(bad).is_err(), "{:?}", bad);
    }
    let listing = "vol-monday: 0 2097152 shared-snapshot 254:0 3\n\
                   split: 0 8 shared-snapshot 254:0 4\n\
                   split: 8 8 linear 7:0 0\n\
                   odd: 8 8 shared-snapshot 254:0 5\n\
                   shsnap-send-vol-7: 0 2097152 shared-snapshot 254:0 7\n\
                   No devices found\n";
    assert_eq!(
        parse_snapshot_tables(listing),
        vec![
            SnapshotTable {
                name: "shsnap-send-vol-7".into(),
                sectors: 2097152,
                origin_dev: "254:0".into(),
                id: 7
            },
            SnapshotTable {
                name: "vol-monday".into(),
                sectors: 2097152,
                origin_dev: "254:0".into(),
                id: 3
            },
        ]
    );
    // The same from the ioctls' tables: a device of more than one target, or whose one
    // target does not start at 0 or is not `<origin_dev> <id>`, is no snapshot device.
    let t = |start, len, ttype: &str, params: &str| TargetLine {
        start,
        len,
        ttype: ttype.into(),
        params: params.into(),
    };
    let tables = vec![
        (
            "vol-monday".to_string(),
            vec![t(0, 2097152, "shared-snapshot", "254:0 3")],
        ),
        (
            "split".to_string(),
            vec![
                t(0, 8, "shared-snapshot", "254:0 4"),
                t(8, 8, "linear", "7:0 0"),
            ],
        ),
        (
            "odd".to_string(),
            vec![t(8, 8, "shared-snapshot", "254:0 5")],
        ),
        (
            "extra".to_string(),
            vec![t(0, 8, "shared-snapshot", "254:0 5 x")],
        ),
        (
            "bad-id".to_string(),
            vec![t(0, 8, "shared-snapshot", "254:0 +5")],
        ),
        (
            "origin".to_string(),
            vec![t(0, 8, "shared-origin", "254:0 254:1 16")],
        ),
        ("empty".to_string(), vec![]),
        (
            "shsnap-send-vol-7".to_string(),
            vec![t(0, 2097152, "shared-snapshot", "254:0 7")],
        ),
    ];
    assert_eq!(
        snapshot_devices(&tables),
        vec![
            SnapshotTable {
                name: "vol-monday".into(),
                sectors: 2097152,
                origin_dev: "254:0".into(),
                id: 3
            },
            SnapshotTable {
                name: "shsnap-send-vol-7".into(),
                sectors: 2097152,
                origin_dev: "254:0".into(),
                id: 7
            },
        ]
    );
    assert_eq!(
        t(0, 8, "shared-origin", "254:0 254:1 16").to_string(),
        "0 8 shared-origin 254:0 254:1 16"
    );
    assert_eq!(device_name("/dev/mapper/vol").unwrap(), "vol");
    assert_eq!(device_name("vol").unwrap(), "vol");
    assert!(device_name("/dev/dm-0").is_err());
    assert!(device_name("/dev/mapper/").is_err());
}

fn token(store: [u8; 16], target_seq: u64, base_seq: u64, next_chunk: u64) -> ResumeToken {
    ResumeToken {
        store_uuid: store,
        stream_uuid: [0x77; 16],
        target_seq,
        base_seq,
        next_seq: next_chunk / 2,
        next_chunk,
        origin_sectors: 64,
        chunk_sectors: 8,
    }
}

/// A secondary's info text: source, progress, then snapshots `(id, seq, source_seq)`.
fn secondary_info(
    source: Option<[u8; 16]>,
    progress: Option<&ResumeToken>,
    snaps: &[(u32, u64, u64)],
) -> StoreInfo {
    let mut text = format!(
        "store {} chunk_sectors 8 chunks 100 next_seq 50\nsource {}\nprogress {}\n",
        hex(&[0xcc; 16]),
        source.map_or("-".into(), |s| hex(&s)),
        progress.map_or("-".into(), |t| hex(&t.to_bytes())),
    );
    for (id, seq, source_seq) in snaps {
        text += &format!("snap {} {} {} valid\n", id, seq, source_seq);
    }
    parse_info(&text).unwrap()
}

#[test]
fn resume_token_round_trips_through_the_progress_hex() {
    let t = token(STORE, 9, 4, 33);
    let bytes = t.to_bytes();
    assert_eq!(bytes.len(), TOKEN_LEN);
    const _: () = assert!(TOKEN_LEN <= 128, "the origin stores at most 128 bytes");
    assert_eq!(ResumeToken::from_bytes(&bytes), Some(t));
    // As `shsnap receive` stores it and `info` prints it back.
    let i = secondary_info(Some(STORE), Some(&t), &[]);
    assert_eq!(i.progress.as_deref(), Some(&bytes[..]));
    assert_eq!(i.progress_token(), Some(t));
    assert_eq!(
        QueryReport::new(&i).to_string().lines().last().unwrap(),
        format!("resume {}", t)
    );
    assert_eq!(ResumeToken::parse(&t.to_string()), Some(t));
    // The kernel may print the hex in upper case.
    let upper = parse_info(&format!(
        "store {} chunk_sectors 8 chunks 1 next_seq 1\nsource -\nprogress {}\n",
        PRIMARY,
        hex(&bytes).to_uppercase()
    ))
    .unwrap();
    assert_eq!(upper.progress_token(), Some(t));
    // Damaged or foreign progress bytes are no token: `--query` prints `resume -`.
    for i in 0..TOKEN_LEN {
        let mut b = bytes;
        b[i] ^= 0x10;
        assert_eq!(ResumeToken::from_bytes(&b), None, "byte {}", i);
    }
    assert_eq!(ResumeToken::from_bytes(&bytes[..83]), None);
    let mut i = secondary_info(None, None, &[]);
    i.progress = Some(b"not a token".to_vec());
    assert_eq!(i.progress_token(), None);
    assert!(QueryReport::new(&i).to_string().ends_with("resume -"));
}

// ---------------------------------------------------------------------------------------
// The sender's plan.

fn primary_info() -> StoreInfo {
    parse_info(&format!(
        "store {} chunk_sectors 8 chunks 8 next_seq 12\nsource -\nprogress -\n\
         snap 3 4 0 valid\nsnap 7 9 0 valid\nsnap 8 10 0 invalid\nsnap 2 11 0 valid\n",
        PRIMARY
    ))
    .unwrap()
}

#[test]
fn plan_send_names_the_snapshots() {
    let i = primary_info();
    let u = [0x33; 16];
    let h = plan_send(&i, 60, Some(7), Some(3), None, u).unwrap();
    assert_eq!(h.store_uuid, STORE);
    assert_eq!(h.stream_uuid, u);
    assert_eq!((h.chunk_sectors, h.origin_sectors, h.chunks()), (8, 60, 8));
    assert_eq!(
        h.target,
        SnapIdentity {
            create_seq: 9,
            id: 7
        }
    );
    assert_eq!(
        h.base,
        Some(SnapIdentity {
            create_seq: 4,
            id: 3
        })
    );
    assert_eq!(h.resume, None);
    let full = plan_send(&i, 60, Some(7), None, None, u).unwrap();
    assert_eq!(full.base, None);
    for (snap, base, what) in [
        (None, None, "--snap or --resume is required"),
        (Some(5), None, "no live snapshot 5"),
        (Some(7), Some(5), "no live snapshot 5"),
        (Some(8), None, "snapshot 8 is invalid"),
        (Some(2), Some(8), "snapshot 8 is invalid"),
        (Some(3), Some(7), "not older"),
        (Some(7), Some(7), "not older"),
    ] {
        let e = plan_send(&i, 60, snap, base, None, u).unwrap_err();
        assert!(e.contains(what), "{:?} {:?}: {}", snap, base, e);
    }
    // The origin's size (the table's) and `info`'s chunk count must agree.
    let e = plan_send(&i, 72, Some(7), None, None, u).unwrap_err();
    assert!(
        e.contains("info counts 8 chunks, the table's 72 sectors make 9"),
        "{}",
        e
    );
}

#[test]
fn plan_send_resumes_from_a_token() {
    let i = primary_info();
    let u = [0x33; 16];
    let t = ResumeToken {
        store_uuid: STORE,
        stream_uuid: [0x44; 16],
        target_seq: 9,
        base_seq: 4,
        next_seq: 2,
        next_chunk: 5,
        origin_sectors: 60,
        chunk_sectors: 8,
    };
    let h = plan_send(&i, 60, None, None, Some(&t), u).unwrap();
    assert_eq!((h.target.id, h.base.map(|b| b.id)), (7, Some(3)));
    assert_eq!(
        h.resume,
        Some(ResumePoint {
            stream_uuid: [0x44; 16],
            seq: 2,
            chunk: 5
        })
    );
    assert_eq!(h.stream_uuid, u);
    // The header a receiver checks against the token it stored.
    assert_eq!(h.check_resume(&t), Ok(()));
    assert!(plan_send(&i, 60, Some(7), Some(3), Some(&t), u).is_ok());
    let full = ResumeToken { base_seq: 0, ..t };
    assert_eq!(
        plan_send(&i, 60, Some(7), None, Some(&full), u)
            .unwrap()
            .base,
        None
    );
    for (snap, base, tok, sectors, what) in [
        (Some(2), None, t, 60, "--snap 2 disagrees"),
        (None, Some(2), t, 60, "--base 2 disagrees"),
        (None, Some(3), full, 60, "it resumes a full stream"),
        (
            None,
            None,
            ResumeToken {
                store_uuid: OTHER,
                ..t
            },
            60,
            "is of store 0b0b",
        ),
        (
            None,
            None,
            ResumeToken { target_seq: 5, ..t },
            60,
            "target (creation sequence 5) is no longer",
        ),
        (
            None,
            None,
            ResumeToken { base_seq: 6, ..t },
            60,
            "base (creation sequence 6) is no longer",
        ),
        (
            None,
            None,
            ResumeToken {
                target_seq: 10,
                base_seq: 0,
                ..t
            },
            60,
            "snapshot 8 is invalid",
        ),
        (None, None, t, 64, "send a fresh stream"),
        (
            None,
            None,
            ResumeToken {
                chunk_sectors: 16,
                ..t
            },
            60,
            "send a fresh stream",
        ),
        (
            None,
            None,
            ResumeToken { next_chunk: 8, ..t },
            60,
            "every chunk but not its end",
        ),
        (
            None,
            None,
            ResumeToken { next_chunk: 9, ..t },
            60,
            "resume chunk beyond the origin",
        ),
        (
            None,
            None,
            ResumeToken {
                next_seq: u64::MAX - 3,
                ..t
            },
            60,
            "resume sequence number out of range",
        ),
    ] {
        let e = plan_send(&i, sectors, snap, base, Some(&tok), u).unwrap_err();
        assert!(e.contains(what), "{:?}: {} (expected {:?})", tok, e, what);
    }
}

#[test]
fn unchanged_snapshots_are_checked_before_end() {
    let i = primary_info();
    let h = plan_send(&i, 60, Some(7), Some(3), None, [1; 16]).unwrap();
    assert_eq!(check_unchanged(&i, &h), Ok(()));
    let mut gone = i.clone();
    gone.snaps.retain(|s| s.id != 3);
    assert!(check_unchanged(&gone, &h)
        .unwrap_err()
        .contains("snapshot 3 was deleted"));
    let mut again = gone.clone();
    again.snaps.push(SnapInfo {
        id: 3,
        seq: 12,
        source_seq: 0,
        valid: true,
    });
    assert!(check_unchanged(&again, &h)
        .unwrap_err()
        .contains("deleted and created again"));
    let mut invalid = i.clone();
    invalid.snaps[1].valid = false;
    assert!(check_unchanged(&invalid, &h)
        .unwrap_err()
        .contains("snapshot 7 became invalid"));
}

// ---------------------------------------------------------------------------------------
// The receiver's decision.

fn hdr(store: [u8; 16], target: u64, base: Option<u64>, sectors: u64) -> Header {
    Header {
        store_uuid: store,
        stream_uuid: [0x99; 16],
        chunk_sectors: 8,
        origin_sectors: sectors,
        target: SnapIdentity {
            create_seq: target,
            id: 7,
        },
        base: base.map(|s| SnapIdentity {
            create_seq: s,
            id: 3,
        }),
        resume: None,
    }
}

#[test]
fn decide_fresh_incremental() {
    let h = hdr(STORE, 9, Some(4), 64);
    // The newest valid replica is the base: taken; the size must fit.
    let here = secondary_info(Some(STORE), None, &[(1, 2, 2), (5, 3, 4)]);
    assert_eq!(decide(&h, &here, 64, false), Ok(()));
    assert_eq!(
        decide(&h, &here, 63, false),
        Err(Refusal::TooLarge {
            stream: 64,
            secondary: 63
        })
    );
    // The base is a replica, but not the newest one.
    let newer = secondary_info(Some(STORE), None, &[(1, 2, 4), (5, 3, 6)]);
    let e = decide(&h, &newer, 64, false).unwrap_err();
    assert_eq!(
        e,
        Refusal::WrongBase {
            defect: StreamError::Foreign { what: "base" },
            base: (STORE, 4),
            newest: Some((STORE, 6))
        }
    );
    assert_eq!(
        e.to_string(),
        format!(
            "foreign stream: base differs: the stream is incremental on seq 4 of store {0}, \
             the newest replica here is seq 6 of store {0}",
            PRIMARY
        )
    );
    // Replicas of another store; none at all; the base replica invalid.
    let other = secondary_info(Some(OTHER), None, &[(5, 3, 4)]);
    assert!(matches!(
        decide(&h, &other, 64, false),
        Err(Refusal::WrongBase {
            defect: StreamError::Foreign { what: "store uuid" },
            ..
        })
    ));
    let none = secondary_info(None, None, &[(5, 3, 0)]);
    let e = decide(&h, &none, 64, true).unwrap_err();
    assert!(matches!(e, Refusal::WrongBase { newest: None, .. }));
    assert!(e.to_string().contains("send a full stream"), "{}", e);
    let mut invalid = here.clone();
    invalid.snaps[1].valid = false;
    assert!(matches!(
        decide(&h, &invalid, 64, false),
        Err(Refusal::WrongBase { .. })
    ));
    // A pending receive of the same transfer may be restarted; of another, not.
    let same = secondary_info(Some(STORE), Some(&token(STORE, 9, 4, 3)), &[(5, 3, 4)]);
    assert_eq!(decide(&h, &same, 64, false), Ok(()));
    for t in [
        token(STORE, 10, 4, 3),
        token(STORE, 9, 2, 3),
        token(OTHER, 9, 4, 3),
        token(STORE, 9, 0, 3),
    ] {
        let pending = secondary_info(Some(STORE), Some(&t), &[(5, 3, 4)]);
        let e = decide(&h, &pending, 64, false).unwrap_err();
        assert_eq!(e, Refusal::Pending { pending: t });
        assert_eq!(
            e.to_string(),
            format!(
                "an interrupted receive of seq {} is pending: resume it",
                t.target_seq
            )
        );
    }
}

#[test]
fn decide_fresh_full() {
    let h = hdr(STORE, 9, None, 64);
    // An empty secondary; replicas of the same store, older; a pending receive of
    // anything (a full stream rewrites every chunk).
    for here in [
        secondary_info(None, None, &[]),
        secondary_info(None, None, &[(1, 1, 0)]),
        secondary_info(Some(STORE), None, &[(1, 2, 4)]),
        secondary_info(Some(STORE), Some(&token(STORE, 12, 4, 5)), &[(1, 2, 4)]),
        secondary_info(Some(OTHER), Some(&token(OTHER, 3, 0, 5)), &[]),
    ] {
        assert_eq!(decide(&h, &here, 64, false), Ok(()), "{:?}", here);
    }
    // Replicas of another store: only with --force.
    let other = secondary_info(Some(OTHER), None, &[(1, 2, 40)]);
    let e = decide(&h, &other, 64, false).unwrap_err();
    assert_eq!(
        e,
        Refusal::OtherStore {
            replicas: OTHER,
            stream: STORE
        }
    );
    assert!(e.to_string().contains("--force"), "{}", e);
    assert_eq!(decide(&h, &other, 64, true), Ok(()));
    // Stale, or already received (--force does not change that).
    for (newest, what) in [
        (9, "already received here (snapshot 1)"),
        (12, "older than"),
    ] {
        let here = secondary_info(Some(STORE), None, &[(1, 2, newest), (4, 3, 2)]);
        for force in [false, true] {
            let e = decide(&h, &here, 64, force).unwrap_err();
            assert_eq!(
                e,
                Refusal::Stale {
                    target: 9,
                    newest,
                    local_id: 1
                }
            );
            assert!(e.to_string().contains(what), "{}", e);
        }
    }
    assert!(matches!(
        decide(&h, &secondary_info(None, None, &[]), 8, false),
        Err(Refusal::TooLarge { .. })
    ));
}

#[test]
fn decide_resumed() {
    let t = token(STORE, 9, 4, 3);
    let mut h = hdr(STORE, 9, Some(4), 64);
    h.resume = Some(ResumePoint {
        stream_uuid: t.stream_uuid,
        seq: t.next_seq,
        chunk: t.next_chunk,
    });
    let here = secondary_info(Some(STORE), Some(&t), &[(5, 3, 4)]);
    assert_eq!(decide(&h, &here, 64, false), Ok(()));
    assert_eq!(
        decide(
            &h,
            &secondary_info(Some(STORE), None, &[(5, 3, 4)]),
            64,
            false
        ),
        Err(Refusal::NothingToResume)
    );
    for (other, what) in [
        (ResumeToken { next_chunk: 4, ..t }, "resume point"),
        (ResumeToken { next_seq: 2, ..t }, "resume point"),
        (
            ResumeToken {
                stream_uuid: [1; 16],
                ..t
            },
            "resume point",
        ),
        (
            ResumeToken {
                target_seq: 10,
                ..t
            },
            "target",
        ),
        (
            ResumeToken {
                origin_sectors: 72,
                ..t
            },
            "origin or chunk size",
        ),
    ] {
        let pending = secondary_info(Some(STORE), Some(&other), &[(5, 3, 4)]);
        let e = decide(&h, &pending, 64, false).unwrap_err();
        assert!(
            matches!(&e, Refusal::NotThePending { defect: StreamError::Foreign { what: w }, pending: p } if *w == what && *p == other),
            "{:?}",
            e
        );
    }
    assert!(matches!(
        decide(&h, &here, 63, false),
        Err(Refusal::TooLarge { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// The loops, against an in-memory primary and secondary.

/// The primary: the target's image, and the base's for an incremental delta.
struct Images {
    h: Header,
    target: Vec<u8>,
    base: Option<Vec<u8>>,
    /// Ranges per `delta` answer (the kernel's is 128).
    page: usize,
    /// Lengths of the reads.
    reads: Vec<usize>,
}

impl Images {
    fn chunk(&self, img: &[u8], c: u64) -> Vec<u8> {
        let cb = self.h.chunk_sectors as usize * 512;
        let start = c as usize * cb;
        img[start..(start + cb).min(img.len())].to_vec()
    }
}

impl Primary for Images {
    fn delta(&mut self, from: Option<u32>, to: u32, start: u64) -> Result<DeltaPage, String> {
        assert_eq!(from, self.h.base.map(|b| b.id));
        assert_eq!(to, self.h.target.id);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for c in start..self.h.chunks() {
            let differs = match &self.base {
                None => true,
                Some(b) => self.chunk(b, c) != self.chunk(&self.target, c),
            };
            if !differs {
                continue;
            }
            if let Some((first, count)) = ranges.last_mut() {
                if *first + *count == c {
                    *count += 1;
                    continue;
                }
            }
            if ranges.len() == self.page {
                return Ok(DeltaPage {
                    ranges,
                    next: Some(c),
                });
            }
            ranges.push((c, 1));
        }
        Ok(DeltaPage { ranges, next: None })
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // The real primary reads with O_DIRECT.
        assert_eq!(
            buf.as_ptr() as usize % 4096,
            0,
            "read buffer not page-aligned"
        );
        self.reads.push(buf.len());
        let o = offset as usize;
        buf.copy_from_slice(&self.target[o..o + buf.len()]);
        Ok(())
    }

    fn check_unchanged(&mut self, _: &Header) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Write(u64, usize),
    Sync,
    Save(ResumeToken),
}

/// The secondary: writes reach `image` at once and `durable` only at a sync.
#[derive(Clone)]
struct Disk {
    image: Vec<u8>,
    durable: Vec<u8>,
    events: Vec<Event>,
    progress: Option<ResumeToken>,
    /// Fail the write of this number (counted from 0), once.
    fail_write: Option<usize>,
}

impl Disk {
    fn new(image: Vec<u8>) -> Disk {
        Disk {
            durable: image.clone(),
            image,
            events: Vec::new(),
            progress: None,
            fail_write: None,
        }
    }

    /// A power cut: what was not synced is lost.
    fn crash(&mut self) {
        self.image = self.durable.clone();
    }
}

impl Secondary for Disk {
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let writes = self
            .events
            .iter()
            .filter(|e| matches!(e, Event::Write(..)))
            .count();
        if self.fail_write == Some(writes) {
            self.fail_write = None;
            return Err(io::Error::other("injected write error"));
        }
        let o = offset as usize;
        assert!(
            o + data.len() <= self.image.len(),
            "write past the secondary"
        );
        self.image[o..o + data.len()].copy_from_slice(data);
        self.events.push(Event::Write(offset, data.len()));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.durable = self.image.clone();
        self.events.push(Event::Sync);
        Ok(())
    }

    fn save_progress(&mut self, token: &ResumeToken) -> Result<(), String> {
        // The data the progress claims must be durable before it: nothing written since
        // the last sync.
        assert_eq!(self.image, self.durable, "progress saved before a sync");
        assert_eq!(self.events.last(), Some(&Event::Sync));
        self.progress = Some(*token);
        self.events.push(Event::Save(*token));
        Ok(())
    }
}

fn random(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// A primary whose target has `sectors` of random data and, if `incremental`, a base that
/// differs from it in about a third of the chunks; snapshot 7 (seq 9) on base 3 (seq 4).
fn primary(rng: &mut SmallRng, sectors: u64, incremental: bool) -> (Images, StoreInfo) {
    let info = parse_info(&format!(
        "store {} chunk_sectors 8 chunks {} next_seq 12\nsource -\nprogress -\n\
         snap 3 4 0 valid\nsnap 7 9 0 valid\n",
        PRIMARY,
        sectors.div_ceil(8)
    ))
    .unwrap();
    let h = plan_send(
        &info,
        sectors,
        Some(7),
        incremental.then_some(3),
        None,
        [1; 16],
    )
    .unwrap();
    let target = random(rng, sectors as usize * 512);
    let base = incremental.then(|| {
        let mut b = target.clone();
        for c in 0..h.chunks() as usize {
            if rng.next_u32().is_multiple_of(3) {
                let end = ((c + 1) * 4096).min(b.len());
                b[c * 4096..end].fill(0xbb);
            }
        }
        b
    });
    let images = Images {
        h,
        target,
        base,
        page: 3,
        reads: Vec::new(),
    };
    (images, info)
}

/// The stream of `h` from `p`.
fn stream_of(p: &mut Images, h: Header) -> Vec<u8> {
    write_stream(p, h, Vec::new()).unwrap().0
}

/// A secondary of `sectors` holding the base (incremental) or garbage, with a replica of
/// the base if incremental.
fn secondary(p: &Images, sectors: usize) -> (Disk, StoreInfo) {
    let mut image = vec![0xee; sectors * 512];
    if let Some(b) = &p.base {
        image[..b.len()].copy_from_slice(b);
    }
    let info = match p.base {
        Some(_) => secondary_info(Some(STORE), None, &[(1, 2, 4)]),
        None => secondary_info(None, None, &[]),
    };
    (Disk::new(image), info)
}

/// Receives `bytes` as `shsnap receive` would: decide, then apply.
#[expect(clippy::result_large_err, reason = "apply's error, as it is")]
fn receive_bytes(
    bytes: &[u8],
    disk: &mut Disk,
    info: &StoreInfo,
    every: u64,
) -> Result<Summary, ApplyError> {
    let mut r = StreamReader::new(Cursor::new(bytes)).unwrap();
    let sectors = disk.image.len() as u64 / 512;
    decide(r.header(), info, sectors, false).unwrap();
    let pending = r.header().resume.and(info.progress_token());
    apply(&mut r, disk, pending, every)
}

#[test]
fn full_and_incremental_round_trips() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_REPLICATE_SEED", 0x5eed_0101));
    // An origin whose last chunk is short, on a larger secondary.
    for incremental in [false, true] {
        let sectors = 8 * 300 + 3;
        let (mut p, _) = primary(&mut rng, sectors, incremental);
        let h = p.h;
        let bytes = stream_of(&mut p, h);
        let (mut disk, info) = secondary(&p, sectors as usize + 16);
        let tail = disk.image[p.target.len()..].to_vec();
        let sum = receive_bytes(&bytes, &mut disk, &info, 64 << 20).unwrap();
        assert_eq!(disk.image[..p.target.len()], p.target[..]);
        assert_eq!(disk.image[p.target.len()..], tail[..], "past the origin");
        assert_eq!(disk.durable, disk.image, "durable at the end");
        let differ = match &p.base {
            None => h.chunks(),
            Some(b) => (0..h.chunks())
                .filter(|&c| p.chunk(b, c) != p.chunk(&p.target, c))
                .count() as u64,
        };
        assert_eq!(sum.data_records, differ);
        if incremental {
            assert!(differ > 50 && differ < 250, "{} chunks differ", differ);
        }
        // Progress was saved once, at the start, before any write.
        assert!(matches!(&disk.events[..2], [Event::Sync, Event::Save(t)] if t.next_chunk == 0));
        assert_eq!(
            disk.events
                .iter()
                .filter(|e| matches!(e, Event::Save(_)))
                .count(),
            1
        );
    }
}

#[test]
fn runs_of_chunks_are_read_in_large_reads() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_REPLICATE_SEED", 0x5eed_0102));
    // 2500 chunks of 4 KiB (about 10 MiB), one range per page.
    let (mut p, _) = primary(&mut rng, 8 * 2500 - 5, false);
    p.page = 1;
    let h = p.h;
    let bytes = stream_of(&mut p, h);
    assert!(p
        .reads
        .iter()
        .all(|&n| n >= 1 << 20 || n == p.reads[p.reads.len() - 1]));
    assert_eq!(p.reads.len(), 3, "{:?}", p.reads);
    assert_eq!(
        p.reads.iter().sum::<usize>(),
        p.target.len(),
        "the last chunk is short"
    );
    let mut r = StreamReader::new(Cursor::new(&bytes)).unwrap();
    let mut n = 0;
    while let Some(rec) = r.next_record().unwrap() {
        assert_eq!(rec.chunk, n);
        assert_eq!(rec.data, p.chunk(&p.target, n));
        n += 1;
    }
    assert_eq!(n, 2500);
}

#[test]
fn a_bad_delta_stops_the_stream() {
    struct Bad(DeltaPage);
    impl Primary for Bad {
        fn delta(&mut self, _: Option<u32>, _: u32, _: u64) -> Result<DeltaPage, String> {
            Ok(self.0.clone())
        }
        fn read_at(&mut self, buf: &mut [u8], _: u64) -> io::Result<()> {
            buf.fill(1);
            Ok(())
        }
        fn check_unchanged(&mut self, _: &Header) -> Result<(), String> {
            Err("snapshot 3 was deleted while it was sent".into())
        }
    }
    let h = hdr(STORE, 9, Some(4), 64);
    let past = DeltaPage {
        ranges: vec![(6, 3)],
        next: None,
    };
    let e = write_stream(&mut Bad(past), h, Vec::new()).unwrap_err();
    assert!(
        e.contains("delta lists chunks 6-8, past the origin's 8 chunks"),
        "{}",
        e
    );
    let changed = DeltaPage {
        ranges: vec![(6, 2)],
        next: None,
    };
    let e = write_stream(&mut Bad(changed), h, Vec::new()).unwrap_err();
    assert!(e.contains("was deleted"), "{}", e);
}

#[test]
fn a_write_error_on_the_stream_is_an_error() {
    #[derive(Debug)]
    struct Broken;
    impl io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_REPLICATE_SEED", 0x5eed_0103));
    let (mut p, _) = primary(&mut rng, 64, false);
    let h = p.h;
    let e = write_stream(&mut p, h, Broken).unwrap_err();
    assert!(e.starts_with("writing the stream: "), "{}", e);
}

#[test]
fn a_full_stream_zeroes_the_chunks_it_does_not_carry() {
    let h = hdr(STORE, 9, None, 8 * 5 + 2); // chunks 0-5, the last one 1 KiB
    let mut w = StreamWriter::new(Vec::new(), h).unwrap();
    w.data(1, &[1; 4096]).unwrap();
    w.data(3, &[3; 4096]).unwrap();
    let (bytes, _) = w.finish().unwrap();
    let mut disk = Disk::new(vec![0xee; 64 * 512]);
    receive_bytes(&bytes, &mut disk, &secondary_info(None, None, &[]), 1 << 30).unwrap();
    let mut want = vec![0u8; 42 * 512];
    want[4096..8192].fill(1);
    want[3 * 4096..4 * 4096].fill(3);
    assert_eq!(disk.image[..42 * 512], want[..]);
    assert!(disk.image[42 * 512..].iter().all(|&x| x == 0xee));
}

/// Cuts the stream of a transfer at many places; at each, the secondary loses what was not
/// synced, then the transfer resumes from the stored progress (or, if the cut left only
/// END missing, is sent again) and must end with the target's content.
fn cut_and_resume(incremental: bool, seed_default: u64) {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_REPLICATE_SEED", seed_default));
    let sectors = 8 * 40 + 5;
    let (mut p, pinfo) = primary(&mut rng, sectors, incremental);
    let h = p.h;
    let bytes = stream_of(&mut p, h);
    let every = 3 * 4096;
    let mut cuts: Vec<usize> = (200..bytes.len()).step_by(911).collect();
    cuts.extend([bytes.len() - 1, bytes.len() - 72, bytes.len() - 73]);
    let mut sent_again = 0;
    for cut in cuts {
        let (mut disk, info) = secondary(&p, sectors as usize);
        let Err(ApplyError::Defect { defect, token }) =
            receive_bytes(&bytes[..cut], &mut disk, &info, every)
        else {
            panic!("cut at {}: no defect", cut);
        };
        assert!(
            matches!(
                defect,
                StreamError::Truncated { .. } | StreamError::MissingEnd { .. }
            ),
            "cut at {}: {}",
            cut,
            defect
        );
        assert_eq!(disk.progress, Some(token), "cut at {}", cut);
        disk.crash();
        // What the progress claims is there.
        let claimed = (token.next_chunk * 4096).min(p.target.len() as u64) as usize;
        assert_eq!(disk.image[..claimed], p.target[..claimed], "cut at {}", cut);
        // The secondary now shows the progress; the sender answers the token.
        let mut info = info.clone();
        info.progress = Some(token.to_bytes().to_vec());
        let again = match plan_send(&pinfo, sectors, None, None, Some(&token), [2; 16]) {
            Ok(resumed) => stream_of(&mut p, resumed),
            Err(e) => {
                // Every chunk arrived but not END: the same transfer, sent again from
                // its start (the secondary takes it: it is the pending one).
                assert!(e.contains("every chunk but not its end"), "{}", e);
                assert_eq!(token.next_chunk, h.chunks());
                sent_again += 1;
                bytes.clone()
            }
        };
        receive_bytes(&again, &mut disk, &info, every).unwrap();
        assert_eq!(disk.image, p.target, "cut at {}", cut);
    }
    if !incremental {
        assert_eq!(sent_again, 2, "the cuts inside and before END");
    }
}

#[test]
fn a_cut_full_transfer_resumes() {
    cut_and_resume(false, 0x5eed_0104);
}

#[test]
fn a_cut_incremental_transfer_resumes() {
    cut_and_resume(true, 0x5eed_0105);
}

#[test]
fn progress_is_saved_only_after_a_sync() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_REPLICATE_SEED", 0x5eed_0106));
    let (mut p, _) = primary(&mut rng, 8 * 20, false);
    let h = p.h;
    let bytes = stream_of(&mut p, h);
    let (mut disk, info) = secondary(&p, 8 * 20);
    receive_bytes(&bytes, &mut disk, &info, 2 * 4096).unwrap();
    // Disk::save_progress asserts that nothing was written since the last sync; here, the
    // cadence: the start, then every two chunks.
    let saves: Vec<u64> = disk
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Save(t) => Some(t.next_chunk),
            _ => None,
        })
        .collect();
    assert_eq!(saves, (0..=20).step_by(2).collect::<Vec<u64>>());
}

#[test]
fn a_write_error_keeps_the_last_durable_progress() {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_REPLICATE_SEED", 0x5eed_0107));
    let (mut p, _) = primary(&mut rng, 8 * 20, false);
    let h = p.h;
    let bytes = stream_of(&mut p, h);
    let (mut disk, info) = secondary(&p, 8 * 20);
    disk.fail_write = Some(7);
    let e = receive_bytes(&bytes, &mut disk, &info, 3 * 4096).unwrap_err();
    let ApplyError::Failed { what, token } = e else {
        panic!("{:?}", e);
    };
    assert!(
        what.contains("writing chunk 7 to the secondary: injected write error"),
        "{}",
        what
    );
    assert_eq!(token.map(|t| t.next_chunk), Some(6));
    assert_eq!(disk.progress, token);
}

#[test]
fn a_resumed_stream_after_a_defect_mid_stream() {
    // A stream damaged in the middle (a flipped bit): the records before are applied and
    // the progress points after them.
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_REPLICATE_SEED", 0x5eed_0108));
    let (mut p, pinfo) = primary(&mut rng, 8 * 30, true);
    let h = p.h;
    let mut bytes = stream_of(&mut p, h);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 4;
    let (mut disk, info) = secondary(&p, 8 * 30);
    let Err(ApplyError::Defect { defect, token }) =
        receive_bytes(&bytes, &mut disk, &info, 1 << 30)
    else {
        panic!("no defect");
    };
    assert!(!matches!(defect, StreamError::Io(_)), "{}", defect);
    assert!(token.next_chunk > 0 && token.next_chunk < h.chunks());
    assert_eq!(disk.progress, Some(token));
    disk.crash();
    let mut info = info;
    info.progress = Some(token.to_bytes().to_vec());
    let resumed = plan_send(&pinfo, 8 * 30, Some(7), Some(3), Some(&token), [3; 16]).unwrap();
    let again = stream_of(&mut p, resumed);
    // While it is pending, a fresh incremental stream of another transfer is refused.
    let other = hdr(STORE, 10, Some(4), 8 * 30);
    assert_eq!(
        decide(&other, &info, 8 * 30, false),
        Err(Refusal::Pending { pending: token })
    );
    receive_bytes(&again, &mut disk, &info, 1 << 30).unwrap();
    assert_eq!(disk.image, p.target);
}

/// The receiver killed (SIGKILL, a power cut) at every write: no progress is saved then;
/// what was not synced is lost; the transfer resumes from the stored progress.
fn kill_and_resume(incremental: bool, seed_default: u64) {
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_REPLICATE_SEED", seed_default));
    let sectors = 8 * 25 + 1;
    let (mut p, pinfo) = primary(&mut rng, sectors, incremental);
    let h = p.h;
    let bytes = stream_of(&mut p, h);
    let writes = {
        let (mut disk, info) = secondary(&p, sectors as usize);
        receive_bytes(&bytes, &mut disk, &info, u64::MAX).unwrap();
        disk.events
            .iter()
            .filter(|e| matches!(e, Event::Write(..)))
            .count()
    };
    for kill in 0..writes {
        let (mut disk, info) = secondary(&p, sectors as usize);
        disk.fail_write = Some(kill);
        let Err(ApplyError::Failed { token, .. }) =
            receive_bytes(&bytes, &mut disk, &info, 4 * 4096)
        else {
            panic!("killed at write {}: no failure", kill);
        };
        assert_eq!(token, disk.progress, "killed at write {}", kill);
        let token = token.expect("progress is stored before the first write");
        disk.crash();
        let mut info = info;
        info.progress = Some(token.to_bytes().to_vec());
        let resumed = plan_send(&pinfo, sectors, None, None, Some(&token), [2; 16]).unwrap();
        receive_bytes(&stream_of(&mut p, resumed), &mut disk, &info, 4 * 4096).unwrap();
        assert_eq!(disk.image, p.target, "killed at write {}", kill);
    }
}

#[test]
fn a_killed_full_receive_resumes() {
    kill_and_resume(false, 0x5eed_0109);
}

#[test]
fn a_killed_incremental_receive_resumes() {
    kill_and_resume(true, 0x5eed_010a);
}
