//! `shsnap compare A B`: the chunks whose content differs between two devices (or files),
//! found by reading both whole.  What replication would cost without a store that knows its
//! delta (the benchmark's baseline), and the tests' independent check of the online delta
//! and of replicas.

use shsnap_core::stream::fill;
use std::fs::File;

/// Bytes read from each side per step.
const STEP: usize = 1 << 20;

/// The chunk ranges `[first, end)` of `chunk_bytes` that differ between `a` and `b`, and the
/// bytes compared.  A chunk past the end of one of them differs when the other has it.
pub fn compare(a: &str, b: &str, chunk_bytes: usize) -> Result<(Vec<(u64, u64)>, u64), String> {
    if chunk_bytes == 0 || !STEP.is_multiple_of(chunk_bytes) {
        return Err(format!(
            "chunk size must divide {} bytes and not be 0",
            STEP
        ));
    }
    let open = |p: &str| File::open(p).map_err(|e| format!("{}: {}", p, e));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; STEP], vec![0u8; STEP]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut chunk = 0u64;
    let mut total = 0u64;
    loop {
        let na = fill(&mut fa, &mut ba).map_err(|e| format!("{}: {}", a, e))?;
        let nb = fill(&mut fb, &mut bb).map_err(|e| format!("{}: {}", b, e))?;
        let n = na.max(nb);
        if n == 0 {
            return Ok((out, total));
        }
        total += n as u64;
        for off in (0..n).step_by(chunk_bytes) {
            let end = (off + chunk_bytes).min(n);
            let same = end <= na.min(nb) && ba[off..end] == bb[off..end];
            if !same {
                match out.last_mut() {
                    Some(last) if last.1 == chunk => last.1 += 1,
                    _ => out.push((chunk, chunk + 1)),
                }
            }
            chunk += 1;
        }
        if na < STEP || nb < STEP {
            // One side ended: whatever the other still has differs.
            if na != nb {
                continue;
            }
            return Ok((out, total));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(name: &str, data: &[u8]) -> String {
        let p =
            std::env::temp_dir().join(format!("shsnap-compare-{}-{}", std::process::id(), name));
        File::create(&p).unwrap().write_all(data).unwrap();
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn finds_exactly_the_chunks_that_differ() {
        let mut a = vec![0u8; 3 * STEP + 5000];
        for (i, x) in a.iter_mut().enumerate() {
            *x = (i * 7 % 251) as u8;
        }
        let mut b = a.clone();
        b[0] ^= 1; // chunk 0
        b[4096 * 2 + 17] ^= 1; // chunk 2
        b[4096 * 3] ^= 1; // chunk 3
        b[STEP - 1] ^= 1; // last chunk of the first step (255)
        b[3 * STEP + 4999] ^= 1; // the short last chunk (768 + 1)
        let (pa, pb) = (file("a", &a), file("b", &b));
        let (r, n) = compare(&pa, &pb, 4096).unwrap();
        assert_eq!(r, vec![(0, 1), (2, 4), (255, 256), (769, 770)]);
        assert_eq!(n, a.len() as u64);
        // A shorter side: its missing chunks differ.
        let pc = file("c", &a[..STEP + 4096]);
        let (r, _) = compare(&pa, &pc, 4096).unwrap();
        assert_eq!(r, vec![(257, 770)]);
        let (r, _) = compare(&pa, &pa, 4096).unwrap();
        assert!(r.is_empty());
        for p in [pa, pb, pc] {
            let _ = std::fs::remove_file(p);
        }
    }
}
