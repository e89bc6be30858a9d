#!/bin/bash
# Real scale: sparse multi-TiB origin and COW devices, a store filled to 99.5% of its data
# area with fragmented allocation by `shsnap-bench populate` (about 16.7 million exceptions
# with 256 KiB chunks on a 4 TiB COW device: the first 512 data-bitmap blocks solid, so the
# first allocation after every activation crosses more bitmap blocks than the metadata
# cache holds (issue 11, item 5); then a free chunk every 4; COW chunks handed out in a
# scattered order; shares: most exceptions shared by all 60 snapshots, some by one, some by
# the oldest only).  Then: activation time and memory, shsnap check, reads through the big
# tree, copy-outs, creates, deletes and the sweep over the whole tree, a power cut
# (dm-flakey drop_writes under origin and COW) during a sweep, reactivation with journal
# replay, copy-outs again, check clean, no snapshot invalidated.
# Disks: /dev/vda origin, /dev/vdb COW (4T each, sparse).
#   EXTENDED=1: also waits for the sweep of a populated snapshot (rewrites every leaf).
. "$(dirname "$0")/lib.sh"
setup_guest
BENCH=$REPO/target/release/shsnap-bench
CH=512                       # sectors: 256 KiB chunks
CHK=$((CH / 2))              # KiB per chunk
SNAPS=60                     # populated snapshots (ids and slots 0..59): 4 slots left
SZ=$(blockdev --getsz /dev/vda)
CSZ=$(blockdev --getsz /dev/vdb)
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
meminfo() { awk '/^(MemAvailable|Slab|VmallocUsed):/ {printf "%s %s ", $1, $2}' /proc/meminfo; }
stat_of() { dmsetup message big 0 stats | tr ' ' '\n' | grep -A1 -x "$1" | tail -1; }
used() { dmsetup status big | awk '{split($4, a, "/"); print a[1]}'; }
status_ok() { dmsetup status big | grep -q ' ok -$'; }
info() { awk -v k="$1" '{for (i = 1; i <= NF; i++) if (split($i, a, "=") == 2 && a[1] == k) print a[2]}' /tmp/populate.out; }
MiB() { echo $(( $1 * CHK / 1024 )); }  # chunk -> MiB offset (chunks are 1/4 MiB)
# Origin and COW each under a linear table, so that a power cut can swap in dm-flakey.
dmsetup create porig --table "0 $SZ linear /dev/vda 0"
dmsetup create pcow --table "0 $CSZ linear /dev/vdb 0"
mapper_nodes
ORIG=/dev/mapper/porig COW=/dev/mapper/pcow
TABLE="0 $SZ shared-origin $ORIG $COW $CH"
activate() {
    local t0; t0=$(now_ms)
    dmsetup create big --table "$TABLE" || return 1
    ACT_MS=$(( $(now_ms) - t0 ))
    ACT_US=$(dmesg | grep -o 'activated in [0-9]* us' | tail -1 | grep -o '[0-9]*')
    mapper_nodes
}
snap() { dmsetup create "s$1" --table "0 $SZ shared-snapshot $(odev big) $1"; }
snaps() { snap "$1" && snap "$2"; }
TIME=$(command -v /usr/bin/time || true)  # GNU time, for the peak RSS (if installed)
rd() { dd if="$1" bs=1M skip="$2" count="${3:-8}" iflag=direct status=none; }
wr() { dd if="$1" of="$2" bs=1M seek="$3" count=8 oflag=direct conv=fsync status=none; }

section "populate a $((CSZ / 2 / 1024 / 1024)) GiB COW device"
t0=$(now_ms)
check "populate: 99.5% of the data area, fragmented" sh -c "$([ -n "$TIME" ] && echo "$TIME -f 'populate: %e s, peak RSS %M KiB'") $BENCH populate $COW --chunk-sectors $CH --occupancy 99.5 --snapshots $SNAPS --stride 1.07 --split-every 11 --partial-every 7 --full-blocks 512 --hole-every 4 --scatter > /tmp/populate.out 2>&1; rc=\$?; cat /tmp/populate.out; exit \$rc"
cat /tmp/check.out
POP_MS=$(( $(now_ms) - t0 ))
EXC=$(info exceptions); LAST=$(info last_chunk); FULL=$(info full_bitmaps)
echo "  populate took $POP_MS ms: $EXC exceptions, last origin chunk $LAST, $FULL full data-bitmap blocks"
check "as many full data-bitmap blocks ($FULL) as the metadata cache has slots (512)" test "${FULL:-0}" -ge 512
check "the populated range fits the origin (last chunk $LAST of $((SZ / CH)))" test $(( ${LAST:-999999999999} + 20000 )) -lt $((SZ / CH))
t0=$(now_ms)
check "shsnap check: clean, $EXC exceptions" sh -c "$SHSNAP check $COW | tee /dev/stderr | grep -q 'clean ($SNAPS snapshots, $EXC exceptions'"
cat /tmp/check.out
CHECK_MS=$(( $(now_ms) - t0 ))
echo "  shsnap check took $CHECK_MS ms"

# Origin content before activation: region A inside the populated range (chunks with and
# without exceptions), region B past it (chunks shared with the origin by every snapshot).
A=$(MiB 8000000); B=$(( $(MiB ${LAST:-0}) + 64 )); C=$((B + 64)); D=$((B + 128)); E=$((B + 192))
for f in r1 r2 r3 r4 r5; do dd if=/dev/urandom of=/tmp/$f bs=1M count=8 status=none; done
wr /tmp/r1 $ORIG $A; wr /tmp/r1 $ORIG $B

section "activation"
sync; echo 3 > /proc/sys/vm/drop_caches
dmsetup version >/dev/null
before=$(meminfo)
check "activate the origin" activate
after=$(meminfo)
echo "  activation: $ACT_MS ms (dmsetup create), target constructor ${ACT_US:-?} us"
echo "  meminfo before: $before"
echo "  meminfo after:  $after"
dmesg | grep 'on COW' | tail -1 | sed 's/^/  dmesg: /'
check "activation under one second ($ACT_MS ms)" test "$ACT_MS" -lt 1000 -a "${ACT_US:-999999}" -lt 500000
check "status: $SNAPS live snapshots, ok" sh -c "dmsetup status big | grep -q ' $SNAPS ok -\$'"
dmsetup status big | sed 's/^/  status: /'

section "reads through the big tree"
check "activate snapshots 0 and $((SNAPS - 1))" snaps 0 $((SNAPS - 1))
mapper_nodes
L=$((SNAPS - 1))
rd /dev/mapper/s0 $A > /tmp/s0A; rd /dev/mapper/s$L $A > /tmp/sLA
check "snapshot 0 reads region B (no exception) from the origin" cmp <(rd /dev/mapper/s0 $B) /tmp/r1
check "snapshot $L reads region B from the origin" cmp <(rd /dev/mapper/s$L $B) /tmp/r1
check "snapshots read region A from COW chunks and origin chunks (neither all zero nor all origin)" bash -c "! cmp -s /tmp/s0A /tmp/r1 && ! cmp -s /tmp/s0A <(head -c 8388608 /dev/zero)"

section "copy-outs: the first allocations cross $FULL full bitmap blocks"
c0=$(stat_of copied_chunks); r0=$(stat_of meta_reads)
check "origin write over region B (32 chunks shared by all)" wr /tmp/r2 /dev/mapper/big $B
c1=$(stat_of copied_chunks); r1=$(stat_of meta_reads)
echo "  copied chunks +$((c1 - c0)), metadata reads +$((r1 - r0))"
check "32 chunks copied once for $SNAPS snapshots (+$((c1 - c0)))" test $((c1 - c0)) -eq 32
check "origin write over region A (partially copied chunks)" wr /tmp/r2 /dev/mapper/big $A
c2=$(stat_of copied_chunks)
echo "  region A: copied chunks +$((c2 - c1))"
check "no snapshot invalidated" status_ok
check "snapshot 0 keeps region B" cmp <(rd /dev/mapper/s0 $B) /tmp/r1
check "snapshot $L keeps region B" cmp <(rd /dev/mapper/s$L $B) /tmp/r1
check "snapshot 0 keeps region A" cmp <(rd /dev/mapper/s0 $A) /tmp/s0A
check "snapshot $L keeps region A" cmp <(rd /dev/mapper/s$L $A) /tmp/sLA
check "origin reads its new data" bash -c "cmp <(dd if=/dev/mapper/big bs=1M skip=$A count=8 iflag=direct status=none) /tmp/r2 && cmp <(dd if=/dev/mapper/big bs=1M skip=$B count=8 iflag=direct status=none) /tmp/r2"

section "creates, deletes, sweep over the whole tree"
check "create snapshot 100" dmsetup message big 0 create 100
check "origin write over region B: copied for snapshot 100 only" wr /tmp/r3 /dev/mapper/big $B
check "create snapshot 101" dmsetup message big 0 create 101
check "activate snapshots 100 and 101" snaps 100 101
mapper_nodes
check "snapshot 101 writes region C (its own copies)" wr /tmp/r4 /dev/mapper/s101 $C
check "snapshot 100 reads region B as it was" cmp <(rd /dev/mapper/s100 $B) /tmp/r2
check "snapshot 101 reads its writes" cmp <(rd /dev/mapper/s101 $C) /tmp/r4
o100=$(dmsetup status s100 | awk '{print $NF}'); o101=$(dmsetup status s101 | awk '{print $NF}')
echo "  snapshot 100 owns $o100 chunks alone, snapshot 101 owns $o101"
check "no snapshot invalidated" status_ok
dmsetup remove s100 s101
u0=$(used); want=$((u0 - o100 - o101))
t0=$(now_ms)
check "delete snapshots 100 and 101" sh -c "dmsetup message big 0 delete 100 && dmsetup message big 0 delete 101"
for i in $(seq 1 3600); do [ "$(used)" = "$want" ] && break; sleep 1; done
SWEEP_MS=$(( $(now_ms) - t0 ))
echo "  sweep over $(info leaves) leaves: data used $u0 -> $(used) in $SWEEP_MS ms"
check "the sweep freed what 100 and 101 owned (data used $u0 -> $want)" test "$(used)" = "$want"
check "list: $SNAPS ids" sh -c "test \$(dmsetup message big 0 list | wc -w) -eq $SNAPS"
check "no snapshot invalidated" status_ok

section "power cut during a sweep, reactivation"
# Snapshot 59 shares nearly every exception: its sweep rewrites every leaf.
check "delete populated snapshot 59 (its device removed first)" sh -c "dmsetup remove s$L && dmsetup message big 0 delete 59"
if [ "${EXTENDED:-0}" = 1 ]; then
    # Wait for that sweep (no commit for 10 s), then start another one for the cut.
    t0=$(now_ms); u0=$(used); prev=-1
    while c=$(stat_of commits); [ "$c" != "$prev" ]; do prev=$c; sleep 10; done
    echo "  sweep of populated snapshot 59: data used $u0 -> $(used) in $(( $(now_ms) - t0 )) ms"
    check "delete populated snapshot 57" dmsetup message big 0 delete 57
fi
sleep 5  # the cut falls in the middle of the sweep
sync
cut() { # $1: the target of both tables
    dmsetup suspend --nolockfs pcow && dmsetup suspend --nolockfs porig &&
        dmsetup load porig --table "0 $SZ $([ "$1" = flakey ] && echo "flakey /dev/vda 0 0 3600 1 drop_writes" || echo "linear /dev/vda 0")" &&
        dmsetup load pcow --table "0 $CSZ $([ "$1" = flakey ] && echo "flakey /dev/vdb 0 0 3600 1 drop_writes" || echo "linear /dev/vdb 0")" &&
        dmsetup resume porig && dmsetup resume pcow
}
check "power cut: origin and COW drop every write from now" cut flakey
# Acknowledged and lost: a copy-out, a create.
wr /tmp/r5 /dev/mapper/big $D
dmsetup message big 0 create 102
sleep 2
for d in s0 s$L; do dmsetup remove $d >/dev/null 2>&1; done
timeout 120 dmsetup remove big >/dev/null 2>&1 || dmsetup remove --force big
check "power back" cut linear
check "shsnap check after the cut: consistent (journal replayed in memory)" $SHSNAP check $COW
cat /tmp/check.out
sync; echo 3 > /proc/sys/vm/drop_caches
before=$(meminfo)
check "reactivate (journal replay)" activate
after=$(meminfo)
echo "  reactivation: $ACT_MS ms (dmsetup create), target constructor ${ACT_US:-?} us"
echo "  meminfo before: $before"
echo "  meminfo after:  $after"
dmesg | grep 'on COW' | tail -1 | sed 's/^/  dmesg: /'
check "no snapshot invalidated after the cut" status_ok
check "snapshot 102 (created after the cut) is gone, 0 and $((SNAPS - 2)) are there" sh -c "l=\" \$(dmsetup message big 0 list) \"; case \"\$l\" in *' 102 '*) exit 1;; esac; case \"\$l\" in *' 0 '*) ;; *) exit 1;; esac; case \"\$l\" in *' $((SNAPS - 2)) '*) ;; *) exit 1;; esac"
check "activate snapshots 0 and $((SNAPS - 2))" snaps 0 $((SNAPS - 2))
mapper_nodes
M=$((SNAPS - 2))
check "snapshot 0 keeps regions A and B" bash -c "cmp <(dd if=/dev/mapper/s0 bs=1M skip=$A count=8 iflag=direct status=none) /tmp/s0A && cmp <(dd if=/dev/mapper/s0 bs=1M skip=$B count=8 iflag=direct status=none) /tmp/r1"
check "snapshot $M keeps region B" cmp <(rd /dev/mapper/s$M $B) /tmp/r1
check "the origin has region B as written before the cut" cmp <(rd /dev/mapper/big $B) /tmp/r3
c0=$(stat_of copied_chunks)
check "copy-outs after reactivation (region E, 32 chunks)" wr /tmp/r5 /dev/mapper/big $E
c1=$(stat_of copied_chunks)
check "32 chunks copied (+$((c1 - c0)))" test $((c1 - c0)) -eq 32
check "snapshot $M reads region E from before" cmp <(rd /dev/mapper/s$M $E) <(head -c 8388608 /dev/zero)
check "no snapshot invalidated" status_ok
dmsetup status big | sed 's/^/  status: /'

section "deactivate, check"
check "remove the devices" dmsetup remove s0 s$M big
t0=$(now_ms)
check "shsnap check: clean, closed cleanly" sh -c "$SHSNAP check $COW | tee /dev/stderr | grep -q 'clean (.*, closed cleanly)'"
cat /tmp/check.out
echo "  shsnap check took $(( $(now_ms) - t0 )) ms"
dmsetup remove pcow porig
check "unload the module" rmmod dm_shared_snap
echo "  figures: COW $((CSZ / 2 / 1024 / 1024)) GiB, chunk $CHK KiB, $EXC exceptions ($FULL full data-bitmap blocks), populate $POP_MS ms, check $CHECK_MS ms, sweep $SWEEP_MS ms, reactivation after the cut $ACT_MS ms"
check_dmesg
check_kmemleak
finish
