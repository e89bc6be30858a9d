//! `shsnap-oracle`: the data oracle of the VM tests.  It writes recognisable 4 KiB blocks to
//! block devices with O_DIRECT and keeps a model of what every device (origin, snapshots)
//! must read; `verify` compares a device with its model block by block.
//!
//! Block content: the block's tag (u64) and index (u64), then a fill derived from both;
//! tag 0 means "never written" and reads as zeros.

use clap::{Parser, Subcommand};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;

const BS: usize = 4096;
const O_DIRECT: i32 = 0o40000;

#[derive(Parser)]
#[command(
    name = "shsnap-oracle",
    about = "Data oracle for dm-shared-snap VM tests"
)]
struct Cli {
    /// Model directory (one binary file of u64 tags per device).
    #[arg(long, default_value = "/tmp/oracle")]
    state: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a model: device NAME of BLOCKS blocks, all zeros.
    Init { name: String, blocks: u64 },
    /// NAME2 starts as a copy of NAME (a snapshot of it).
    Clone { name: String, name2: String },
    /// Forget NAME.
    Drop { name: String },
    /// COUNT random writes of 1..=MAX blocks to DEV, recorded under NAME.
    Write {
        name: String,
        dev: String,
        #[arg(long, default_value_t = 20)]
        count: u64,
        #[arg(long, default_value_t = 16)]
        max: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Before writing, save the model as it will be after these writes under this name
        /// (the "intent": after a power cut each block is either the old or the new state).
        #[arg(long)]
        intent: Option<String>,
        /// Before writing, save the current model under this name.
        #[arg(long)]
        prev: Option<String>,
        /// Writes of this invocation never overlap (every block is old or final).
        #[arg(long)]
        disjoint: bool,
        /// Every write starts and ends on a multiple of this many blocks (a chunk).
        #[arg(long, default_value_t = 1)]
        align: u64,
    },
    /// Check that DEV reads exactly what the model of NAME says (or, block by block, what
    /// model ALT says: for states between two known points).
    Verify {
        name: String,
        dev: String,
        #[arg(long)]
        alt: Option<String>,
    },
    /// After a power cut: make NAME's model match DEV block by block, taking ALT's value
    /// where the device holds it (fails if a block matches neither).
    Adopt {
        name: String,
        dev: String,
        alt: String,
    },
    /// Save the model of NAME as NAME2 (a checkpoint).
    Save { name: String, name2: String },
}

#[repr(C, align(4096))]
struct Aligned([u8; BS * 64]);

fn fill(buf: &mut [u8], tag: u64, idx: u64) {
    if tag == 0 {
        buf.fill(0);
        return;
    }
    buf[..8].copy_from_slice(&tag.to_le_bytes());
    buf[8..16].copy_from_slice(&idx.to_le_bytes());
    let mut x = tag ^ idx.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    for c in buf[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// The models touched by one invocation (name -> tag per block; None = deleted).
type Model = BTreeMap<String, Option<Vec<u64>>>;

fn load(dir: &str, name: &str) -> Vec<u64> {
    let b = std::fs::read(format!("{}/{}", dir, name)).unwrap_or_else(|_| {
        eprintln!("shsnap-oracle: no model {}", name);
        std::process::exit(2)
    });
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn save(dir: &str, m: &Model) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, v) in m {
        let p = format!("{}/{}", dir, name);
        match v {
            Some(v) => std::fs::write(
                &p,
                v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            )
            .unwrap(),
            None => {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// The number of `write` invocations made so far with this state directory (then one more).
fn next_serial(dir: &str) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let p = format!("{}/.serial", dir);
    let n = std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    std::fs::write(&p, n.to_string()).unwrap();
    n
}

fn open(dev: &str, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| {
            eprintln!("shsnap-oracle: {}: {}", dev, e);
            std::process::exit(2)
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let dir = cli.state.clone();
    let mut m = Model::new();
    let mut buf = Box::new(Aligned([0; BS * 64]));
    match cli.cmd {
        Cmd::Init { name, blocks } => {
            m.insert(name, Some(vec![0; blocks as usize]));
        }
        Cmd::Clone { name, name2 } => {
            m.insert(name2, Some(load(&dir, &name)));
        }
        Cmd::Drop { name } => {
            m.insert(name, None);
        }
        Cmd::Write {
            name,
            dev,
            count,
            max,
            seed,
            intent,
            prev,
            disjoint,
            align,
        } => {
            let f = open(&dev, true);
            // Tags are unique across invocations, and replayable: the seed and a counter of
            // the writes made with this state directory.
            let serial = next_serial(&dir);
            let mut rng = SmallRng::seed_from_u64(seed ^ serial << 32);
            let v = m
                .entry(name.clone())
                .or_insert_with(|| Some(load(&dir, &name)))
                .as_mut()
                .unwrap();
            let n = v.len() as u64;
            let mut plan: Vec<(u64, u64, u64)> = Vec::new();
            while (plan.len() as u64) < count {
                let a = align.clamp(1, 64);
                let len = rng.gen_range(1..=max.min(64).min(n)).div_ceil(a) * a;
                if len > n {
                    eprintln!("shsnap-oracle: --align {} does not fit {} blocks", a, n);
                    std::process::exit(2)
                }
                let start = rng.gen_range(0..=(n - len) / a) * a;
                if disjoint
                    && plan
                        .iter()
                        .any(|&(s, l, _)| start < s + l && s < start + len)
                {
                    continue;
                }
                plan.push((start, len, rng.gen::<u64>() | 1));
            }
            if let Some(prev) = prev {
                let mut pm = Model::new();
                pm.insert(prev, Some(v.clone()));
                save(&dir, &pm);
            }
            if let Some(intent) = intent {
                let mut after = v.clone();
                for &(start, len, tag) in &plan {
                    for i in 0..len {
                        after[(start + i) as usize] = tag;
                    }
                }
                let mut im = Model::new();
                im.insert(intent, Some(after));
                save(&dir, &im);
            }
            for &(start, len, tag) in &plan {
                for i in 0..len {
                    fill(
                        &mut buf.0[i as usize * BS..(i as usize + 1) * BS],
                        tag,
                        start + i,
                    );
                }
                f.write_all_at(&buf.0[..len as usize * BS], start * BS as u64)
                    .unwrap_or_else(|e| {
                        eprintln!("shsnap-oracle: write {} at block {}: {}", dev, start, e);
                        std::process::exit(1)
                    });
                for i in 0..len {
                    v[(start + i) as usize] = tag;
                }
            }
        }
        Cmd::Adopt { name, dev, alt } => {
            let f = open(&dev, false);
            let mut v = load(&dir, &name);
            let a = load(&dir, &alt);
            let mut want = vec![0u8; BS];
            for i in 0..v.len() {
                f.read_exact_at(&mut buf.0[..BS], (i * BS) as u64).unwrap();
                fill(&mut want, v[i], i as u64);
                if buf.0[..BS] == want[..] {
                    continue;
                }
                fill(&mut want, a[i], i as u64);
                if buf.0[..BS] != want[..] {
                    eprintln!("{}: block {} matches neither model", name, i);
                    return ExitCode::from(1);
                }
                v[i] = a[i];
            }
            m.insert(name, Some(v));
        }
        Cmd::Save { name, name2 } => {
            m.insert(name2, Some(load(&dir, &name)));
        }
        Cmd::Verify { name, dev, alt } => {
            let f = open(&dev, false);
            let v = load(&dir, &name);
            let alt = alt.map(|a| load(&dir, &a));
            let mut want2 = vec![0u8; BS];
            let mut want = vec![0u8; BS];
            let mut bad = 0u64;
            let mut i = 0usize;
            while i < v.len() {
                let n = (v.len() - i).min(64);
                if let Err(e) = f.read_exact_at(&mut buf.0[..n * BS], (i * BS) as u64) {
                    eprintln!("shsnap-oracle: read {} at block {}: {}", dev, i, e);
                    return ExitCode::from(1);
                }
                for k in 0..n {
                    fill(&mut want, v[i + k], (i + k) as u64);
                    let alt_ok = alt.as_ref().is_some_and(|a| {
                        fill(
                            &mut want2,
                            a.get(i + k).copied().unwrap_or(0),
                            (i + k) as u64,
                        );
                        buf.0[k * BS..(k + 1) * BS] == want2[..]
                    });
                    if buf.0[k * BS..(k + 1) * BS] != want[..] && !alt_ok {
                        if bad < 5 {
                            let got =
                                u64::from_le_bytes(buf.0[k * BS..k * BS + 8].try_into().unwrap());
                            eprintln!(
                                "{}: block {}: expected tag {:#x}, read tag {:#x}",
                                name,
                                i + k,
                                v[i + k],
                                got
                            );
                        }
                        bad += 1;
                    }
                }
                i += n;
            }
            if bad > 0 {
                eprintln!("{}: {} of {} blocks wrong", name, bad, v.len());
                return ExitCode::from(1);
            }
            return ExitCode::SUCCESS;
        }
    }
    save(&dir, &m);
    ExitCode::SUCCESS
}
