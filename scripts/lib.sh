# Shared helpers for the project's scripts (sourced, not run).
log() { echo "[$(date +%H:%M:%S)] $(basename "$0"): $*" >&2; }
die() { log "error: $*"; exit 1; }
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"
DMSS_CACHE=${DMSS_CACHE:-$HOME/.cache/dm-shared-snap}
# Debian's rustc-web ships the library sources kbuild needs; rustup's does not.
DMSS_RUSTC=${DMSS_RUSTC:-/usr/bin/rustc}
DMSS_BINDGEN=${DMSS_BINDGEN:-$HOME/.cargo/bin/bindgen}
