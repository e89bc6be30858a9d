# Shared helpers for the project's scripts (sourced, not run).
log() { echo "[$(date +%H:%M:%S)] $(basename "$0"): $*" >&2; }
die() { log "error: $*"; exit 1; }
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"
DMSS_CACHE=${DMSS_CACHE:-$HOME/.cache/dm-shared-snap}
# Debian's rustc-web ships the library sources kbuild needs; rustup's does not.
DMSS_RUSTC=${DMSS_RUSTC:-/usr/bin/rustc}
DMSS_BINDGEN=${DMSS_BINDGEN:-$HOME/.cargo/bin/bindgen}
# Kernel log lines that fail a VM test (a bug, a warning, a lockdep report, a hung task, a
# sanitizer or refcount report); used in the guest (tests/vm/lib.sh) and by vm-run on the
# host.
BAD_KMSG='BUG:|Oops|WARNING:|possible circular locking|possible recursive locking|INFO: task .* blocked|kernel BUG|general protection|UBSAN|KASAN|refcount_t|Kernel panic|self-detected stall|soft lockup'
