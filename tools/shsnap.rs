//! `shsnap`: offline tools for a dm-shared-snap COW device, in the spirit of
//! thin-provisioning-tools: format, check, dump, delta, verify-stream; and the replication
//! of a live origin's snapshots: send, receive (`tools/replicate.rs`).

use clap::{Parser, Subcommand};
use serde::Serialize;
use shsnap_core::check::{self, Report};
use shsnap_core::exception_store::format::BLOCK_SIZE;
use shsnap_core::exception_store::{format, FormatParams};
use shsnap_core::host::FileDev;
use shsnap_core::replicate;
use std::process::ExitCode;

mod compare;

#[derive(Parser)]
#[command(
    name = "shsnap",
    version,
    about = "Tools for dm-shared-snap COW devices"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a new, empty exception store (destroys what the device holds).
    Format {
        /// Chunk size in 512-byte sectors (power of two, 8 to 2048).
        #[arg(long, default_value_t = 16)]
        chunk_sectors: u32,
        /// Metadata area size in 4 KiB blocks (default: about 1/32 of the chunks).
        #[arg(long, default_value_t = 0)]
        meta_blocks: u64,
        /// The COW device or image.
        dev: String,
    },
    /// Check checksums, btree, bitmaps, space accounting and journal; exit 0 only if clean.
    Check {
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
        /// The COW device or image.
        dev: String,
    },
    /// Print the superblock, snapshots and every exception.
    Dump {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The COW device or image.
        dev: String,
    },
    /// Replay a dm-log-writes log onto a device (entries FROM..=TO), or list its entries.
    ReplayLog {
        /// The log device of dm-log-writes.
        log: String,
        /// The device to write the replayed data to.
        #[arg(long)]
        target: Option<String>,
        /// First entry to replay.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Last entry to replay (inclusive; default: all).
        #[arg(long)]
        to: Option<u64>,
        /// Print the entries instead: index, flags, sector, sectors, mark.
        #[arg(long)]
        list: bool,
    },
    /// Where the metadata lives: block numbers by type (for tests and debugging).
    Layout {
        /// The COW device or image.
        dev: String,
    },
    /// Chunk ranges whose content differs between snapshot A and snapshot B (or "origin").
    Delta {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The COW device or image.
        dev: String,
        /// Snapshot id.
        a: String,
        /// Snapshot id, or "origin".
        b: String,
    },
    /// Chunk ranges whose content differs between two devices or files, read whole (what
    /// a delta costs without the store; checks a replica against its source).
    Compare {
        /// Chunk size in 512-byte sectors.
        #[arg(long, default_value_t = 128)]
        chunk_sectors: u32,
        /// Print only the summary line.
        #[arg(long, short)]
        quiet: bool,
        /// First device or file.
        a: String,
        /// Second device or file.
        b: String,
    },
    /// Check a replication stream (Documentation/stream.md) record by record; exit 0 only if
    /// it is whole and valid, 1 naming the first defect, 2 if it cannot be opened.
    VerifyStream {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The stream file, or "-" for standard input.
        file: String,
    },
    /// Write a snapshot of a live origin as a replication stream (Documentation/stream.md,
    /// "send and receive"): full, incremental (--base), or resumed from a token.
    Send {
        /// The shared-origin device: a dm name or /dev/mapper/NAME.
        origin: String,
        /// The snapshot to send (its id).
        #[arg(long, value_name = "ID", required_unless_present = "resume")]
        snap: Option<u32>,
        /// Send only the chunks that differ from this older snapshot (an incremental stream).
        #[arg(long, value_name = "ID")]
        base: Option<u32>,
        /// Continue an interrupted transfer from the token `shsnap receive` printed.
        #[arg(long, value_name = "TOKEN")]
        resume: Option<String>,
        /// Write the stream to FILE instead of standard output (which must not be a terminal).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<String>,
    },
    /// Apply a replication stream read on standard input to a secondary origin, then take
    /// the replica snapshot; exit 1 on a refusal or a defect (with a resume token).
    Receive {
        /// The secondary's shared-origin device: a dm name or /dev/mapper/NAME.
        secondary: String,
        /// Print the replicas' source store, the newest replica and the pending resume
        /// token, and exit (standard input is not read).
        #[arg(long)]
        query: bool,
        /// Receive a full stream even if the replicas here are of another store.
        #[arg(long)]
        force: bool,
        /// MiB applied between two durable progress records (each costs a flush of the
        /// secondary and a commit of its store): how much an interrupted transfer may
        /// have to send again.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        checkpoint_mb: u64,
    },
    /// Write a stream of chunks of a raw image as the target's content (for tests).
    #[command(hide = true)]
    MakeStream {
        /// The image read as the snapshot's content (its size is the origin size).
        image: String,
        /// The stream file to write, or "-" for standard output.
        out: String,
        /// Chunk size in sectors.
        #[arg(long, default_value_t = 16)]
        chunk_sectors: u32,
        /// Chunks to send: "0,3-5,9" (default: all).
        #[arg(long)]
        chunks: Option<String>,
        /// Store uuid, 32 hex digits (default: random).
        #[arg(long)]
        store_uuid: Option<String>,
        /// Target creation sequence.
        #[arg(long, default_value_t = 1)]
        target_seq: u64,
        /// Base creation sequence (an incremental stream).
        #[arg(long)]
        base_seq: Option<u64>,
    },
    /// Forge one metadata structure with valid checksums (for tests: the store must refuse
    /// or survive it); prints what was forged.  Forges home blocks: close the store first.
    Forge {
        /// The COW device or image (changed in place).
        #[arg(required_unless_present = "list")]
        dev: Option<String>,
        /// Chooses the kind (unless --kind) and the target.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// One of the kinds --list prints.
        #[arg(long)]
        kind: Option<String>,
        /// Print the kinds of forgery and exit.
        #[arg(long)]
        list: bool,
    },
}

fn open(dev: &str, readonly: bool) -> Result<FileDev, ExitCode> {
    FileDev::open(dev, readonly).map_err(|e| {
        eprintln!("shsnap: {}: {}", dev, e);
        ExitCode::from(2)
    })
}

fn print_errors(r: &Report) {
    for e in &r.errors {
        eprintln!("error: {}", e);
    }
}

#[derive(Serialize)]
struct DumpOut<'a> {
    report: &'a Report,
    exceptions: Vec<DumpException>,
}

#[derive(Serialize)]
struct DumpException {
    chunk: u64,
    cow: u64,
    share: String,
    snapshots: Vec<u32>,
}

#[derive(Serialize)]
struct DeltaOut {
    chunk_sectors: u32,
    ranges: Vec<(u64, u64)>,
    chunks: u64,
}

#[derive(Serialize)]
struct VerifyOut {
    good: bool,
    defect: Option<String>,
    store_uuid: Option<String>,
    stream_uuid: Option<String>,
    target_seq: Option<u64>,
    target_id: Option<u32>,
    base_seq: Option<u64>,
    base_id: Option<u32>,
    resumes_stream: Option<String>,
    resumes_seq: Option<u64>,
    resumes_chunk: Option<u64>,
    chunk_sectors: Option<u32>,
    origin_sectors: Option<u64>,
    records: u64,
    data_records: u64,
    skipped: u64,
    data_bytes: u64,
    stream_bytes: u64,
    digest: Option<String>,
    resume_token: Option<String>,
}

fn verify_stream(file: &str, json: bool) -> Result<ExitCode, ExitCode> {
    use shsnap_core::stream::{uuid_str, StreamReader};
    let input: Box<dyn std::io::Read> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).map_err(|e| {
            eprintln!("shsnap: {}: {}", file, e);
            ExitCode::from(2)
        })?)
    };
    let input = std::io::BufReader::with_capacity(1 << 20, input);
    let mut out = VerifyOut {
        good: false,
        defect: None,
        store_uuid: None,
        stream_uuid: None,
        target_seq: None,
        target_id: None,
        base_seq: None,
        base_id: None,
        resumes_stream: None,
        resumes_seq: None,
        resumes_chunk: None,
        chunk_sectors: None,
        origin_sectors: None,
        records: 0,
        data_records: 0,
        skipped: 0,
        data_bytes: 0,
        stream_bytes: 0,
        digest: None,
        resume_token: None,
    };
    match StreamReader::new(input) {
        Err(e) => out.defect = Some(e.to_string()),
        Ok(mut r) => {
            let h = *r.header();
            out.store_uuid = Some(uuid_str(&h.store_uuid));
            out.stream_uuid = Some(uuid_str(&h.stream_uuid));
            out.target_seq = Some(h.target.create_seq);
            out.target_id = Some(h.target.id);
            out.base_seq = h.base.map(|b| b.create_seq);
            out.base_id = h.base.map(|b| b.id);
            out.resumes_stream = h.resume.map(|p| uuid_str(&p.stream_uuid));
            out.resumes_seq = h.resume.map(|p| p.seq);
            out.resumes_chunk = h.resume.map(|p| p.chunk);
            out.chunk_sectors = Some(h.chunk_sectors);
            out.origin_sectors = Some(h.origin_sectors);
            loop {
                match r.next_record() {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        out.good = true;
                        break;
                    }
                    Err(e) => {
                        out.defect = Some(e.to_string());
                        out.resume_token = Some(r.resume_token().to_string());
                        break;
                    }
                }
            }
            let s = r.summary();
            out.records = s.records;
            out.data_records = s.data_records;
            out.skipped = s.skipped;
            out.data_bytes = s.data_bytes;
            out.stream_bytes = s.stream_bytes;
            out.digest = out.good.then(|| format!("{:08x}", s.digest));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
    } else {
        let o = &out;
        if let (Some(store), Some(stream)) = (&o.store_uuid, &o.stream_uuid) {
            println!("store {}", store);
            println!("stream {}", stream);
            println!(
                "target creation sequence {} (id {})",
                o.target_seq.unwrap_or(0),
                o.target_id.unwrap_or(0)
            );
            match (o.base_seq, o.base_id) {
                (Some(s), Some(id)) => println!("base creation sequence {} (id {})", s, id),
                _ => println!("base none (a full stream)"),
            }
            if let Some(from) = &o.resumes_stream {
                println!(
                    "resumes stream {} at sequence {} chunk {}",
                    from,
                    o.resumes_seq.unwrap_or(0),
                    o.resumes_chunk.unwrap_or(0)
                );
            }
            println!(
                "chunk {} sectors, origin {} sectors",
                o.chunk_sectors.unwrap_or(0),
                o.origin_sectors.unwrap_or(0)
            );
        }
        println!(
            "{} {} records ({} data, {} skipped), {} data bytes, {} stream bytes{}",
            if o.good { "verified" } else { "read" },
            o.records,
            o.data_records,
            o.skipped,
            o.data_bytes,
            o.stream_bytes,
            o.digest
                .as_ref()
                .map(|d| format!(", digest {}", d))
                .unwrap_or_default()
        );
        if let Some(t) = &o.resume_token {
            println!("resume token {}", t);
        }
    }
    match &out.defect {
        None => {
            if !json {
                println!("{}: good", file);
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(d) => {
            eprintln!("shsnap: verify-stream {}: {}", file, d);
            Err(ExitCode::from(1))
        }
    }
}

/// Parses "0,3-5,9" into sorted, distinct chunk numbers.
fn parse_chunks(s: &str) -> Option<Vec<u64>> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 1 << 32 {
                    return None;
                }
                v.extend(a..=b);
            }
            None => v.push(part.trim().parse().ok()?),
        }
    }
    v.sort_unstable();
    v.dedup();
    Some(v)
}

#[allow(clippy::too_many_arguments)]
fn make_stream(
    image: &str,
    out: &str,
    chunk_sectors: u32,
    chunks: Option<&str>,
    store_uuid: Option<&str>,
    target_seq: u64,
    base_seq: Option<u64>,
) -> Result<ExitCode, ExitCode> {
    use shsnap_core::stream::{Header, SnapIdentity, StreamWriter};
    use std::os::unix::fs::FileExt;
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("shsnap: make-stream: {}: {}", what, e);
        ExitCode::from(2)
    };
    let f = std::fs::File::open(image).map_err(|e| fail(image, &e))?;
    let size = f.metadata().map_err(|e| fail(image, &e))?.len();
    let store_uuid = match store_uuid {
        None => rand::random(),
        Some(s) => {
            let s = s.replace('-', "");
            let mut u = [0u8; 16];
            if s.len() != 32 || !s.is_ascii() {
                return Err(fail("--store-uuid", &"not 32 hex digits"));
            }
            for (i, x) in u.iter_mut().enumerate() {
                *x = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                    .map_err(|e| fail("--store-uuid", &e))?;
            }
            u
        }
    };
    let h = Header {
        store_uuid,
        stream_uuid: rand::random::<[u8; 16]>().map(|x| x | 1),
        chunk_sectors,
        origin_sectors: size / 512,
        target: SnapIdentity {
            create_seq: target_seq,
            id: 0,
        },
        base: base_seq.map(|s| SnapIdentity {
            create_seq: s,
            id: 0,
        }),
        resume: None,
    };
    let list = match chunks {
        Some(c) => parse_chunks(c).ok_or_else(|| fail("--chunks", &"not a list like 0,3-5"))?,
        None => (0..h.chunks()).collect(),
    };
    let w: Box<dyn std::io::Write> = if out == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(out).map_err(|e| fail(out, &e))?)
    };
    let w = std::io::BufWriter::with_capacity(1 << 20, w);
    let mut w = StreamWriter::new(w, h).map_err(|e| fail("header", &e))?;
    let mut buf = Vec::new();
    for c in list {
        let Some(len) = h.chunk_len(c) else {
            return Err(fail("--chunks", &format!("chunk {} beyond the image", c)));
        };
        buf.resize(len, 0);
        f.read_exact_at(&mut buf, c * chunk_sectors as u64 * 512)
            .map_err(|e| fail(image, &e))?;
        w.data(c, &buf).map_err(|e| fail(out, &e))?;
    }
    let (_, sum) = w.finish().map_err(|e| fail(out, &e))?;
    eprintln!(
        "wrote {} data records, {} data bytes, {} stream bytes",
        sum.data_records, sum.data_bytes, sum.stream_bytes
    );
    Ok(ExitCode::SUCCESS)
}

fn send(args: replicate::SendArgs) -> Result<ExitCode, ExitCode> {
    match replicate::send(&args) {
        Ok(report) => {
            eprintln!("shsnap send: {}", report);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("shsnap send: {}", e);
            Err(ExitCode::from(1))
        }
    }
}

fn receive(
    secondary: &str,
    query: bool,
    force: bool,
    checkpoint_every: u64,
) -> Result<ExitCode, ExitCode> {
    use replicate::ReceiveError;
    if query {
        return match replicate::query(secondary) {
            Ok(q) => {
                println!("{}", q);
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("shsnap receive: {}", e);
                Err(ExitCode::from(1))
            }
        };
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("shsnap receive: standard input is a terminal: pipe a stream into it");
        return Err(ExitCode::from(1));
    }
    let input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin().lock());
    let token = match replicate::receive(secondary, force, checkpoint_every, input) {
        Ok(report) => {
            println!("{}", report);
            return Ok(ExitCode::SUCCESS);
        }
        Err(ReceiveError::Refused(why)) => {
            eprintln!("shsnap receive: refused: {}", why);
            None
        }
        Err(ReceiveError::Defect { defect, token }) => {
            eprintln!("shsnap receive: {}", defect);
            token
        }
        Err(ReceiveError::Failed { what, token }) => {
            eprintln!("shsnap receive: {}", what);
            token
        }
    };
    if let Some(t) = token {
        eprintln!("shsnap receive: resume token: {}", t);
    }
    Err(ExitCode::from(1))
}

fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    match cli.cmd {
        Cmd::Compare {
            chunk_sectors,
            quiet,
            a,
            b,
        } => {
            let cb = chunk_sectors as usize * 512;
            let (ranges, bytes) = compare::compare(&a, &b, cb).map_err(|e| {
                eprintln!("shsnap compare: {}", e);
                ExitCode::from(2)
            })?;
            let chunks: u64 = ranges.iter().map(|(s, e)| e - s).sum();
            if !quiet {
                for (s, e) in &ranges {
                    println!("{}+{}", s, e - s);
                }
            }
            println!(
                "{} chunks differ of {} ({} bytes compared)",
                chunks,
                bytes.div_ceil(cb as u64),
                bytes
            );
            Ok(ExitCode::from(u8::from(chunks != 0)))
        }
        Cmd::Send {
            origin,
            snap,
            base,
            resume,
            output,
        } => send(replicate::SendArgs {
            origin,
            snap,
            base,
            resume,
            output,
        }),
        Cmd::Receive {
            secondary,
            query,
            force,
            checkpoint_mb,
        } => receive(&secondary, query, force, checkpoint_mb << 20),
        Cmd::VerifyStream { json, file } => verify_stream(&file, json),
        Cmd::MakeStream {
            image,
            out,
            chunk_sectors,
            chunks,
            store_uuid,
            target_seq,
            base_seq,
        } => make_stream(
            &image,
            &out,
            chunk_sectors,
            chunks.as_deref(),
            store_uuid.as_deref(),
            target_seq,
            base_seq,
        ),
        Cmd::Forge {
            dev,
            seed,
            kind,
            list,
        } => {
            if list {
                for (k, what) in shsnap_core::forge::KINDS {
                    println!("{:<20} {}", k, what);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let dev = dev.unwrap_or_default();
            let mut d = open(&dev, false)?;
            match shsnap_core::forge::forge(&mut d, seed, kind.as_deref()) {
                Ok(what) => {
                    println!("{}", what);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("shsnap forge: {}: {}", dev, e);
                    Err(ExitCode::from(1))
                }
            }
        }
        Cmd::Format {
            chunk_sectors,
            meta_blocks,
            dev,
        } => {
            let mut d = open(&dev, false)?;
            let mut scratch = [0u8; BLOCK_SIZE];
            let p = FormatParams {
                chunk_sectors,
                store_id: rand::random::<u64>() | 1,
                uuid: rand::random(),
                meta_blocks,
            };
            match format(&mut d, &p, &mut scratch) {
                Ok(sb) => {
                    println!(
                        "formatted {}: chunk {} sectors, {} data chunks, {} metadata blocks, journal {} blocks",
                        dev, chunk_sectors, sb.layout.data_chunks, sb.layout.meta_blocks, sb.layout.journal_blocks
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("shsnap: format {}: {}", dev, e);
                    Err(ExitCode::from(1))
                }
            }
        }
        Cmd::Check { json, dev } => {
            let (r, _) = check::check_with(open(&dev, true)?, false);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap());
            } else {
                print_errors(&r);
                println!(
                    "{}: {} ({} snapshots, {} exceptions, depth {}, data {}/{}, metadata {}/{}, journal transactions replayed {}, {})",
                    dev,
                    if r.errors.is_empty() { "clean" } else { "CORRUPT" },
                    r.snapshots.len(),
                    r.exceptions,
                    r.depth,
                    r.data_used,
                    r.data_total,
                    r.meta_used,
                    r.meta_total,
                    r.replayed,
                    if r.clean { "closed cleanly" } else { "not closed cleanly" }
                );
            }
            Ok(if r.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Dump { json, dev } => {
            let (r, map) = check::check(open(&dev, true)?);
            let Some((sb, map)) = map else {
                print_errors(&r);
                return Err(ExitCode::from(1));
            };
            let ids = |share: u64| -> Vec<u32> {
                (0..64)
                    .filter(|i| share & (1 << i) != 0 && sb.snaps[*i].flags != 0)
                    .map(|i| sb.snaps[i].id)
                    .collect()
            };
            if json {
                let exceptions = map
                    .values()
                    .flatten()
                    .map(|e| DumpException {
                        chunk: e.chunk,
                        cow: e.cow,
                        share: format!("{:#x}", e.share),
                        snapshots: ids(e.share),
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&DumpOut {
                        report: &r,
                        exceptions
                    })
                    .unwrap()
                );
            } else {
                println!(
                    "uuid {} chunk_sectors {} data {}/{} metadata {}/{} depth {}",
                    r.uuid,
                    r.chunk_sectors,
                    r.data_used,
                    r.data_total,
                    r.meta_used,
                    r.meta_total,
                    r.depth
                );
                if let Some(src) = &r.source_uuid {
                    println!(
                        "replication source {} progress {} bytes",
                        src, r.progress_bytes
                    );
                }
                for s in &r.snapshots {
                    print!(
                        "snapshot id {} slot {} {} seq {} owned {}",
                        s.id, s.slot, s.state, s.create_seq, s.owned
                    );
                    if s.source_seq != 0 {
                        print!(" replica of seq {}", s.source_seq);
                    }
                    println!();
                }
                for e in map.values().flatten() {
                    println!(
                        "exception chunk {} cow {} share {:#018x} snapshots {:?}",
                        e.chunk,
                        e.cow,
                        e.share,
                        ids(e.share)
                    );
                }
                print_errors(&r);
            }
            Ok(if r.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::ReplayLog {
            log,
            target,
            from,
            to,
            list,
        } => replay_log(&log, target.as_deref(), from, to, list),
        Cmd::Layout { dev } => {
            let (r, map) = check::check(open(&dev, true)?);
            let Some((sb, _)) = map else {
                print_errors(&r);
                return Err(ExitCode::from(1));
            };
            let l = sb.layout;
            println!("superblock 0");
            println!("journal_header 1");
            println!("journal_header 2");
            println!("state 3");
            println!("journal {}", l.journal_start);
            println!("meta_bitmap {}", l.meta_bitmap_start);
            println!("data_bitmap {}", l.data_bitmap_start);
            println!("btree_root {}", sb.root.block);
            println!("btree_depth {}", sb.root.depth);
            println!("data_start {}", l.data_start);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Delta { json, dev, a, b } => {
            let (r, map) = check::check(open(&dev, true)?);
            let Some((sb, map)) = map else {
                print_errors(&r);
                return Err(ExitCode::from(1));
            };
            let slot = |s: &str| -> Result<Option<usize>, ExitCode> {
                if s == "origin" {
                    return Ok(None);
                }
                let id: u32 = s.parse().map_err(|_| {
                    eprintln!("shsnap: {}: not a snapshot id", s);
                    ExitCode::from(2)
                })?;
                sb.slot_of(id).map(Some).ok_or_else(|| {
                    eprintln!("shsnap: no live snapshot {}", id);
                    ExitCode::from(2)
                })
            };
            let ranges = check::delta(&map, slot(&a)?, slot(&b)?);
            let chunks = ranges.iter().map(|(s, e)| e - s).sum();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&DeltaOut {
                        chunk_sectors: r.chunk_sectors,
                        ranges,
                        chunks
                    })
                    .unwrap()
                );
            } else {
                let cs = r.chunk_sectors as u64;
                for (s, e) in &ranges {
                    println!("chunks {}-{} sectors {}-{}", s, e - 1, s * cs, e * cs - 1);
                }
                println!("{} chunks differ ({} KiB)", chunks, chunks * cs / 2);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

const LOG_MAGIC: u64 = 0x6a736677736872;
const LOG_FLUSH: u64 = 1;
const LOG_FUA: u64 = 2;
const LOG_DISCARD: u64 = 4;
const LOG_MARK: u64 = 8;

/// Reads a dm-log-writes log (format of drivers/md/dm-log-writes.c: a super in the first
/// logical sector, then per entry one sector {le64 sector, nr_sectors, flags, data_len}
/// followed by nr_sectors of data; mark names inline after the entry header).
fn replay_log(
    log: &str,
    target: Option<&str>,
    from: u64,
    to: Option<u64>,
    list: bool,
) -> Result<ExitCode, ExitCode> {
    use std::os::unix::fs::FileExt;
    let err = |e: std::io::Error| {
        eprintln!("shsnap: {}", e);
        ExitCode::from(2)
    };
    let f = std::fs::File::open(log).map_err(err)?;
    let mut sup = [0u8; 28];
    f.read_exact_at(&mut sup, 0).map_err(err)?;
    let le = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if le(&sup, 0) != LOG_MAGIC || le(&sup, 8) != 1 {
        eprintln!("shsnap: {}: not a dm-log-writes log", log);
        return Err(ExitCode::from(2));
    }
    let nr = le(&sup, 16);
    let ss = u32::from_le_bytes(sup[24..28].try_into().unwrap()) as u64;
    let out = match target {
        Some(t) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(t)
                .map_err(err)?,
        ),
        None => None,
    };
    let last = to.unwrap_or(nr.saturating_sub(1)).min(nr.saturating_sub(1));
    let mut pos = 1u64; // in logical sectors
    let mut hdr = vec![0u8; ss as usize];
    let mut data = Vec::new();
    let mut applied = 0u64;
    for i in 0..nr {
        if i > last {
            break;
        }
        f.read_exact_at(&mut hdr, pos * ss).map_err(err)?;
        let (sector, n, flags, dlen) = (le(&hdr, 0), le(&hdr, 8), le(&hdr, 16), le(&hdr, 24));
        pos += 1;
        let has_data = flags & (LOG_DISCARD | LOG_MARK) == 0 && n > 0;
        if list {
            let mut kinds = Vec::new();
            for (bit, name) in [
                (LOG_FLUSH, "flush"),
                (LOG_FUA, "fua"),
                (LOG_DISCARD, "discard"),
                (LOG_MARK, "mark"),
            ] {
                if flags & bit != 0 {
                    kinds.push(name);
                }
            }
            let mark = if flags & LOG_MARK != 0 {
                String::from_utf8_lossy(&hdr[32..32 + (dlen as usize).min(ss as usize - 32)])
                    .into_owned()
            } else {
                String::new()
            };
            println!(
                "{} {} {} {} {}",
                i,
                if kinds.is_empty() {
                    "write".into()
                } else {
                    kinds.join(",")
                },
                sector,
                n,
                mark
            );
        } else if i >= from && has_data {
            if let Some(o) = out.as_ref() {
                data.resize((n * ss) as usize, 0);
                f.read_exact_at(&mut data, pos * ss).map_err(err)?;
                o.write_all_at(&data, sector * ss).map_err(err)?;
                applied += 1;
            }
        }
        if has_data {
            pos += n;
        }
    }
    if let Some(o) = out {
        o.sync_all().map_err(err)?;
        eprintln!(
            "replayed {} writes (entries {}..={} of {})",
            applied, from, last, nr
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(c) | Err(c) => c,
    }
}
