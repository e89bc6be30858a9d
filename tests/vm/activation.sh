#!/bin/bash
# Activation and memory with a big store: a COW device holding a million exceptions shared
# by 64 snapshots must activate in well under a second with no scan (a few metadata blocks
# read), through a bounded metadata cache; reads map through the big tree; overwrites of
# chunks already copied for every snapshot copy nothing and, once cached, read no metadata.
# Disks: /dev/vda origin, /dev/vdb COW (6G each, sparse).
. "$(dirname "$0")/lib.sh"
setup_guest
BENCH=$REPO/target/release/shsnap-bench
EXC=1000000
SZ=$(blockdev --getsz /dev/vda)
MiB=$((1024 * 1024))
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
meminfo() { awk '/^(MemAvailable|Slab|VmallocUsed):/ {printf "%s %s ", $1, $2}' /proc/meminfo; }
stat_of() { dmsetup message big 0 stats | tr ' ' '\n' | grep -A1 -x "$1" | tail -1; }

# Origin content: 4 MiB at the start (chunks that will hold exceptions) and 4 MiB far past
# the last exception (chunks still shared with the origin).
FAR=4200  # MiB: chunk 1075200 > $EXC
dd if=/dev/urandom of=/tmp/a bs=1M count=4 status=none
dd if=/dev/urandom of=/tmp/b bs=1M count=4 status=none
dd if=/dev/urandom of=/tmp/c bs=1M count=4 status=none
dd if=/tmp/a of=/dev/vda bs=1M oflag=direct status=none
dd if=/tmp/b of=/dev/vda bs=1M seek=$FAR oflag=direct status=none

section "a store with $EXC exceptions and 64 snapshots"
t0=$(now_ms)
check "populate the COW device" $BENCH populate /dev/vdb $EXC 64
cat /tmp/check.out
echo "  populate took $(( $(now_ms) - t0 )) ms"
check "shsnap check: clean, $EXC exceptions" sh -c "$SHSNAP check /dev/vdb | tee /dev/stderr | grep -q 'clean (64 snapshots, $EXC exceptions'"
cat /tmp/check.out

section "activation"
sync; echo 3 > /proc/sys/vm/drop_caches
dmsetup version >/dev/null   # load dmsetup and its libraries (over 9p) before timing
before=$(meminfo)
t0=$(now_ms)
check "activate the origin" dmsetup create big --table "0 $SZ shared-origin /dev/vda /dev/vdb 8"
ms=$(( $(now_ms) - t0 ))
after=$(meminfo)
mapper_nodes
echo "  activation: $ms ms (dmsetup create, TCG guest)"
echo "  meminfo before: $before"
echo "  meminfo after:  $after"
dmesg | grep 'on COW' | tail -1 | sed 's/^/  dmesg: /'
kus=$(dmesg | grep -o 'activated in [0-9]* us' | tail -1 | grep -o '[0-9]*')
check "activation under one second (dmsetup create $ms ms, target constructor ${kus:-?} us)" test "$ms" -lt 1000 -a "${kus:-999999}" -lt 200000
reads=$(stat_of meta_reads)
echo "  metadata blocks read through the cache at activation: $reads"
check "no scan at activation ($reads cached metadata reads)" test "$reads" -lt 16
check "status: 64 live snapshots, ok" sh -c "dmsetup status big | grep -q ' 64 ok -'"
dmsetup status big
check "list shows 64 ids" sh -c "test \$(dmsetup message big 0 list | wc -w) -eq 64"

section "reads through the big tree"
dmsetup create s0 --table "0 $SZ shared-snapshot $(odev big) 0"
dmsetup create s63 --table "0 $SZ shared-snapshot $(odev big) 63"
mapper_nodes
check "snapshot 0 reads copied chunks from the COW device" cmp <(dd if=/dev/mapper/s0 bs=1M count=4 iflag=direct status=none) <(head -c $((4 * MiB)) /dev/zero)
check "snapshot 63 reads copied chunks from the COW device" cmp <(dd if=/dev/mapper/s63 bs=1M count=4 iflag=direct status=none) <(head -c $((4 * MiB)) /dev/zero)
check "snapshot 0 reads shared chunks from the origin" cmp <(dd if=/dev/mapper/s0 bs=1M skip=$FAR count=4 iflag=direct status=none) /tmp/b
check "origin reads its own data" cmp <(dd if=/dev/mapper/big bs=1M count=4 iflag=direct status=none) /tmp/a

section "overwrites of chunks copied for every snapshot"
c0=$(stat_of copied_chunks)
check "origin overwrite (1024 chunks already copied)" dd if=/tmp/c of=/dev/mapper/big bs=1M count=4 oflag=direct status=none
r0=$(stat_of meta_reads)
check "origin overwrite again" dd if=/tmp/c of=/dev/mapper/big bs=1M count=4 oflag=direct status=none
r1=$(stat_of meta_reads); c1=$(stat_of copied_chunks)
echo "  copied chunks +$((c1 - c0)), metadata reads on the second overwrite +$((r1 - r0))"
check "overwrites copied nothing" test "$c1" -eq "$c0"
check "the second overwrite read no metadata" test "$r1" -eq "$r0"
check "snapshot 63 unchanged" cmp <(dd if=/dev/mapper/s63 bs=1M count=4 iflag=direct status=none) <(head -c $((4 * MiB)) /dev/zero)
check "origin write to shared chunks" dd if=/tmp/c of=/dev/mapper/big bs=1M seek=$FAR count=4 oflag=direct status=none
c2=$(stat_of copied_chunks)
check "it copied 1024 chunks once for 64 snapshots (+$((c2 - c1)))" test $((c2 - c1)) -eq 1024
check "snapshot 63 keeps the old data" cmp <(dd if=/dev/mapper/s63 bs=1M skip=$FAR count=4 iflag=direct status=none) /tmp/b
check "origin has the new data" cmp <(dd if=/dev/mapper/big bs=1M skip=$FAR count=4 iflag=direct status=none) /tmp/c

section "deactivate, check, reactivate"
check "remove the devices" dmsetup remove s0 s63 big
check "shsnap check: clean, $((EXC + 1024)) exceptions" sh -c "$SHSNAP check /dev/vdb | tee /dev/stderr | grep -q 'clean (64 snapshots, $((EXC + 1024)) exceptions'"
cat /tmp/check.out
t0=$(now_ms)
check "reactivate" dmsetup create big --table "0 $SZ shared-origin /dev/vda /dev/vdb 8"
ms=$(( $(now_ms) - t0 ))
echo "  reactivation: $ms ms"
check "reactivation under one second ($ms ms)" test "$ms" -lt 1000
check "remove" dmsetup remove big
check "unload the module" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
