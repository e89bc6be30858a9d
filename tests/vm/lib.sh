# Helpers for VM tests (sourced inside the guest).  Each test counts checks and ends with
# "N passed, M failed"; a failed check makes the script exit non-zero.
set -u
export DM_DISABLE_UDEV=1
PASSED=0
FAILED=0
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
MODULE=$REPO/dm-shared-snap.ko
SHSNAP=${SHSNAP:-$REPO/target/release/shsnap}

pass() { PASSED=$((PASSED + 1)); echo "  ok   $*"; }
fail() { FAILED=$((FAILED + 1)); echo "  FAIL $*"; }
check() { # check "description" command...
    local what=$1; shift
    if "$@" > /tmp/check.out 2>&1; then pass "$what"; else fail "$what"; sed 's/^/       /' /tmp/check.out | tail -5; fi
}
check_fails() { # the command must fail
    local what=$1; shift
    if "$@" > /tmp/check.out 2>&1; then fail "$what (succeeded)"; else pass "$what"; fi
}
section() { echo "== $*"; }

# BAD_KMSG: the kernel log lines that fail a test.
. "$REPO/scripts/lib.sh"
# The whole kernel log since boot, streamed to a file (to the host when run by vm-run, so
# that a guest that dies still leaves its log).  The ring buffer is never cleared: checks
# that need "since now" use kmark/ksince.
KMSG_LOG=${DMSS_RUN:-/tmp}/kmsg.log

setup_guest() {
    dmesg -w > "$KMSG_LOG" 2>&1 &
    mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
    [ -w /sys/kernel/debug/kmemleak ] && echo clear > /sys/kernel/debug/kmemleak
    modprobe dm-mod 2>/dev/null || true
    insmod "$MODULE" || { echo "insmod failed"; exit 1; }
}

mapper_nodes() { dmsetup mknodes >/dev/null 2>&1 || true; }

# kmark: writes a unique mark to the kernel log; ksince: the kernel log after the last mark.
KMARK=0
kmark() { KMARK=$((KMARK + 1)); echo "dmss-test-mark $$.$KMARK" > /dev/kmsg; }
ksince() { dmesg | sed -n "/dmss-test-mark $$.$KMARK\$/,\$p" | tail -n +2; }

# The origin device (major:minor) under the active shared-origin table $1: what snapshot
# tables name.
# DMSS_LEGACY_SNAP=1 names the origin's mapped device instead, as modules before the
# snapshot took the origin device required (to run these tests against such a module).
odev() {
    if [ "${DMSS_LEGACY_SNAP:-0}" = 1 ]; then echo "/dev/mapper/$1"; return; fi
    dmsetup table "$1" | awk '$3 == "shared-origin" { print $4; exit }'
}

# Fails the check if the kernel log shows a bug, a warning, a lockdep report or a leak.
# Reads the whole log since boot (the streamed file and the ring buffer).
check_dmesg() {
    local what=${1:-dmesg clean}
    sleep 1
    if { cat "$KMSG_LOG"; dmesg; } | grep -E "$BAD_KMSG" > /tmp/dmesg.bad; then
        fail "$what"; sed 's/^/       /' /tmp/dmesg.bad | head -20; dmesg | tail -40 | sed 's/^/       /'
    else
        pass "$what"
    fi
}

check_kmemleak() {
    local k=/sys/kernel/debug/kmemleak
    [ -w $k ] || { echo "  (kmemleak not available)"; return 0; }
    sleep 6
    echo scan > $k; sleep 1; echo scan > $k
    if grep -A30 unreferenced $k | grep -qE 'dmss_|dm_shared_snap|shared_snap'; then
        fail "kmemleak: module leaks"; grep -A30 unreferenced $k | head -60 | sed 's/^/       /'
    else
        pass "kmemleak: no leak from the module"
    fi
}

finish() {
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}
