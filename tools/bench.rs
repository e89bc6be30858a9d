//! Core benchmark: metadata time per origin write against the number of snapshots and the
//! number of exceptions already in the store (in memory, no data I/O).  An origin write must
//! cost the same with 1 or 64 snapshots and grow only with log(exceptions).
//!
//! `shsnap-bench [EXCEPTIONS]` runs the benchmark; `shsnap-bench populate <cow-dev>
//! <exceptions> <snapshots> [options]` writes a store of that size to a device, for the
//! kernel activation and scale tests: by default 4 KiB chunks, snapshots 0..S, origin chunks
//! 0..E copied for all of them; options spread, fragment and share it otherwise (see
//! `populate.rs`; `shsnap-bench populate` alone prints them).  It is built bottom-up and
//! streamed: memory does not grow with the store, and only metadata blocks are written.

use shsnap_core::exception_store::format::BLOCK_SIZE;
use shsnap_core::exception_store::superblock::Super;
use shsnap_core::exception_store::{format, FormatParams, OriginWrite, Step, Store};
use shsnap_core::host::{MemDev, VecMem};

mod populate;
use std::time::Instant;

fn store(exceptions: u64, snaps: u32) -> Store<MemDev, VecMem, Box<Super>> {
    let chunks = exceptions + 200_000;
    let blocks = chunks + chunks / 16 + 10_000;
    filled(MemDev::new(blocks), exceptions, snaps, 2)
}

/// Formats `dev` (4 KiB chunks), creates snapshots 0..snaps and copies origin chunks
/// 0, stride, 2*stride, ... (`exceptions` of them) for all of them.
fn filled(
    mut dev: MemDev,
    exceptions: u64,
    snaps: u32,
    stride: u64,
) -> Store<MemDev, VecMem, Box<Super>> {
    let mut scratch = [0u8; BLOCK_SIZE];
    format(
        &mut dev,
        &FormatParams {
            chunk_sectors: 8,
            store_id: 42,
            uuid: [0; 16],
            meta_blocks: 0,
        },
        &mut scratch,
    )
    .unwrap();
    let mut s = Store::open(dev, VecMem::new(1024), Box::new(Super::empty())).unwrap();
    for id in 0..snaps {
        assert!(matches!(s.create_snapshot(id).unwrap(), Step::Done(_)));
    }
    s.commit().unwrap();
    // Fill: every other chunk gets an exception, so new writes land between existing keys.
    for i in 0..exceptions {
        if s.needs_commit() {
            s.commit().unwrap();
        }
        assert!(matches!(
            s.origin_write(i * stride).unwrap(),
            Step::Done(OriginWrite::Copy(_))
        ));
    }
    s.commit().unwrap();
    s
}

/// Activation of a store holding many exceptions and 64 snapshots: blocks read and time.
fn activation(exceptions: u64) {
    let s = store(exceptions, 64);
    let (dev, _, _) = s.close().unwrap();
    let t = Instant::now();
    let s = Store::open(dev, VecMem::new(512), Box::new(Super::empty())).unwrap();
    let el = t.elapsed();
    println!(
        "activation: store with {} exceptions and 64 snapshots opened in {:.3} ms reading {} metadata blocks (no scan; cache {} blocks)",
        exceptions,
        el.as_secs_f64() * 1e3,
        s.cache_reads() + 4,
        512
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("populate") {
        if let Err(e) = populate::populate(&args[2..]) {
            eprintln!("shsnap-bench populate: {}", e);
            std::process::exit(1);
        }
        return;
    }
    let big: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    activation(big);
    println!("exceptions,snapshots,ns_per_copying_write,ns_per_overwrite,ns_per_commit_of_64,cache_reads_per_write");
    for &exc in &[1_000u64, big] {
        for &snaps in &[1u32, 64] {
            let mut s = store(exc, snaps);
            let n = 20_000u64;
            let r0 = s.cache_reads();
            let mut plan_ns = 0u128;
            let mut commit_ns = 0u128;
            let mut commits = 0u64;
            for i in 0..n {
                let chunk = (i * 7919 % exc.max(n)) * 2 + 1; // between existing exceptions
                if s.needs_commit() || i % 64 == 63 {
                    let t = Instant::now();
                    s.commit().unwrap();
                    commit_ns += t.elapsed().as_nanos();
                    commits += 1;
                }
                let t = Instant::now();
                let r = s.origin_write(chunk).unwrap();
                plan_ns += t.elapsed().as_nanos();
                assert!(matches!(r, Step::Done(OriginWrite::Copy(_))));
            }
            s.commit().unwrap();
            let reads = s.cache_reads() - r0;
            // Overwrites of chunks already copied for every snapshot: no metadata change.
            let t = Instant::now();
            for i in 0..n {
                let chunk = (i * 7919 % exc.max(n)) * 2 + 1;
                assert_eq!(
                    s.origin_write(chunk).unwrap(),
                    Step::Done(OriginWrite::NoCopy)
                );
            }
            let over_ns = t.elapsed().as_nanos();
            println!(
                "{},{},{},{},{},{:.3}",
                exc,
                snaps,
                plan_ns / n as u128,
                over_ns / n as u128,
                commit_ns / commits.max(1) as u128,
                reads as f64 / n as f64
            );
        }
    }
}
