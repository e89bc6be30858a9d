#!/bin/bash
# The main job, shown step by step: an origin, snapshots between writes, a write to a
# snapshot, verification of every device against the oracle, status, and an offline delta.
. "$(dirname "$0")/lib.sh"
CTL=$REPO/scripts/shsnap-ctl
export SHSNAP_CTL_DIR=/tmp/shsnap-ctl
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
setup_guest
run() { echo "\$ $*"; "$@"; }
SZ=$(blockdev --getsz /dev/vda)
BLOCKS=$((SZ / 8))

section "an origin on /dev/vda with its shared COW store on /dev/vdb (64 KiB chunks)"
run $CTL origin-create vol /dev/vda /dev/vdb 128
$ORACLE init vol $BLOCKS
check "write 64 random extents to the origin" $ORACLE write vol /dev/mapper/vol --count 64 --seed 1
for snap in monday tuesday wednesday; do
    section "snapshot $snap, then more origin writes"
    run $CTL create vol $snap
    run $CTL activate vol $snap >/dev/null
    $ORACLE clone vol $snap
    check "write 64 more extents to the origin" $ORACLE write vol /dev/mapper/vol --count 64 --seed $RANDOM
done
section "snapshots are writable"
check "write 16 extents to tuesday" $ORACLE write tuesday /dev/mapper/vol-tuesday --count 16 --seed 7
section "verify every device block by block"
check "origin reads its latest writes" $ORACLE verify vol /dev/mapper/vol
for snap in monday tuesday wednesday; do
    check "snapshot $snap reads its point in time" $ORACLE verify $snap /dev/mapper/vol-$snap
done
section "status"
run $CTL list vol
run $CTL status vol
run dmsetup status
section "one copy per chunk, whatever the number of snapshots"
dmsetup status vol | awk '{ split($4, d, "/"); print "COW chunks used: " d[1] " for 3 snapshots" }'
section "offline: check the COW device and compute what changed between monday and the origin"
for snap in monday tuesday wednesday; do run $CTL deactivate vol $snap; done
run $CTL origin-remove vol
check "shsnap check" $REPO/target/release/shsnap check /dev/vdb
run $REPO/target/release/shsnap delta /dev/vdb 1 origin | tail -1
run $REPO/target/release/shsnap delta /dev/vdb 1 3 | tail -1
rmmod dm_shared_snap
check_dmesg
finish
