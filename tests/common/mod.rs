//! Helpers shared by the test binaries.

/// A random seed: from the environment variable `var` if set (to replay a failure), else
/// `default`; always printed so that any failure can be replayed.
pub fn seed(var: &str, default: u64) -> u64 {
    let s = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    println!("seed: {}={} (set {} to replay)", var, s, var);
    s
}
