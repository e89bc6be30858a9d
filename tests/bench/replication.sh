#!/bin/bash
# Replication benchmark body, run inside the VM by `scripts/bench --replication`.  One VM
# run, side by side, on RAM disks (so that the ratios measure the tools and the module, not
# a disk):
#   full:  `shsnap send` of a snapshot of a VOL_MB volume (to /dev/null)  vs  dd of the
#          snapshot device (to /dev/null);
#   recv:  `shsnap send | shsnap receive` into a secondary origin  vs  dd of the snapshot
#          device onto a raw device of the same size;
#   incr:  after changing CHANGE_PCT % of the volume's chunks (random 64 KiB writes), the
#          incremental `shsnap send --base`  vs  the full send (target: under 3 %), and vs
#          the same delta found by reading both snapshot devices whole (`shsnap compare`);
#          and the incremental send | receive.
# Prints lines `repl,<rep>,<measure>,<seconds>,<bytes>`.
. "$(dirname "$0")/../vm/lib.sh"
set +u
VOL_MB=${VOL_MB:-1024}
CHANGE_PCT=${CHANGE_PCT:-1}
CHUNK=${CHUNK:-128}
REPS=${REPS:-3}
setup_guest
set -o pipefail
# The guest reads the host's tree over 9p: after the drop_caches that precedes every measure
# each exec would read its binary again from the host, a cost of the harness that a machine
# with the binary on a local disk does not pay (0.3-0.6 s per exec under TCG). Binaries run
# from tmpfs, which drop_caches does not evict; the measures run in this shell, not a child.
cp "$SHSNAP" /tmp/shsnap && SHSNAP=/tmp/shsnap
for b in dd; do cp "$(command -v $b)" /tmp/$b; done
PATH=/tmp:$PATH

VOL=$((VOL_MB * 2048))           # sectors
COW=$((VOL / 4))
teardown() { dmsetup remove_all --force >/dev/null 2>&1; dmsetup remove_all >/dev/null 2>&1; }
# The shell's own clock: `$(date +%s.%N)` would fork and exec (0.1-0.2 s under TCG) between
# the end of the command and the reading of the clock, and count it.
now() { echo "$EPOCHREALTIME"; }
emit() { echo "repl,$REP,$1,$2,$3"; }
# timed <measure> <bytes> cmd...: runs cmd (a shell string) in this shell, emits its wall
# time.
timed() {
    local m=$1 b=$2 t0 t1; shift 2
    sync; echo 3 > /proc/sys/vm/drop_caches
    t0=$(now)
    eval "$*" || { echo "FAILED: $*"; return 1; }
    t1=$(now)
    emit "$m" "$(echo "$t1 - $t0" | bc)" "$b"
}
send_field() { awk -v f="$1" '/^shsnap send:/ { for (i = 1; i < NF; i++) if ($i == f) print $(i + 1) }' /tmp/send.err; }
sent_bytes() { send_field stream_bytes; }

for REP in $(seq 1 $REPS); do
    teardown
    # ram0: primary origin + COW; ram1: secondary origin + COW, and the raw dd target.
    dmsetup create po --table "0 $VOL linear /dev/ram0 0"
    dmsetup create pc --table "0 $COW linear /dev/ram0 $VOL"
    dmsetup create so --table "0 $VOL linear /dev/ram1 0"
    dmsetup create sc --table "0 $COW linear /dev/ram1 $VOL"
    dmsetup create raw --table "0 $VOL linear /dev/ram1 $((VOL + COW))"
    mapper_nodes
    for c in pc sc; do dd if=/dev/zero of=/dev/mapper/$c bs=1M count=1 oflag=direct status=none; done
    fio --name=fill --filename=/dev/mapper/po --rw=write --bs=1M --direct=1 --size=${VOL_MB}M >/dev/null
    dmsetup create p --table "0 $VOL shared-origin /dev/mapper/po /dev/mapper/pc $CHUNK"
    dmsetup create s --table "0 $VOL shared-origin /dev/mapper/so /dev/mapper/sc $CHUNK"
    mapper_nodes
    dmsetup message p 0 create 1
    dmsetup create s1 --readonly --table "0 $VOL shared-snapshot $(odev p) 1"
    mapper_nodes
    bytes=$((VOL * 512))

    timed dd_read $bytes "dd if=/dev/mapper/s1 of=/dev/null bs=1M iflag=direct status=none"
    timed send_full $bytes "$SHSNAP send p --snap 1 2>/tmp/send.err >/dev/null"
    emit send_full_in_tool "$(send_field seconds)" $bytes
    timed dd_copy $bytes "dd if=/dev/mapper/s1 of=/dev/mapper/raw bs=1M iflag=direct oflag=direct status=none"
    timed send_receive_full $bytes "$SHSNAP send p --snap 1 2>/tmp/send.err | $SHSNAP receive s >/tmp/recv.out"
    echo "  full stream: $(sent_bytes) bytes; $(cat /tmp/recv.out)"

    # Change CHANGE_PCT % of the chunks: 64 KiB random writes, each chunk at most once.
    chunks=$((VOL / CHUNK))
    nchg=$((chunks * CHANGE_PCT / 100))
    fio --name=chg --filename=/dev/mapper/p --rw=randwrite --bs=$((CHUNK * 512)) --direct=1 \
        --size=${VOL_MB}M --io_size=$((nchg * CHUNK * 512)) --randseed=$REP >/dev/null
    dmsetup message p 0 create 2
    dmsetup create s2 --readonly --table "0 $VOL shared-snapshot $(odev p) 2"
    mapper_nodes
    timed send_incr $((nchg * CHUNK * 512)) "$SHSNAP send p --snap 2 --base 1 2>/tmp/send.err >/dev/null"
    echo "  incremental stream: $(sent_bytes) bytes for $nchg changed chunks"
    # The send's own time, from its first query to its last write (no process start).
    emit send_incr_in_tool "$(send_field seconds)" $((nchg * CHUNK * 512))
    timed compare_whole $((2 * bytes)) "$SHSNAP compare -q --chunk-sectors $CHUNK /dev/mapper/s1 /dev/mapper/s2 >/tmp/cmp.out; [ \$? -le 1 ]"
    echo "  compare: $(cat /tmp/cmp.out)"
    timed send_receive_incr $((nchg * CHUNK * 512)) "$SHSNAP send p --snap 2 --base 1 2>/tmp/send.err | $SHSNAP receive s >/tmp/recv.out"
    echo "  $(cat /tmp/recv.out)"
    # The replica reads what its source reads.
    sid=$(dmsetup message s 0 info | awk '$1 == "snap" && $4 == 2 { print $2 }')
    dmsetup create r2 --readonly --table "0 $VOL shared-snapshot $(odev s) $sid" && mapper_nodes
    if $SHSNAP compare -q --chunk-sectors $CHUNK /dev/mapper/s2 /dev/mapper/r2 >/tmp/cmp.out; then
        echo "  replica identical to its source"
    else
        echo "  REPLICA DIFFERS: $(cat /tmp/cmp.out)"
    fi
done
teardown
echo "replication benchmark done"
