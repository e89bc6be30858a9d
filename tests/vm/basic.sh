#!/bin/bash
# Pipeline test: load the module, pass I/O through the origin, refuse malformed tables,
# remove everything, unload, and check the kernel log.  Runs inside scripts/vm-run --disks 2.
. "$(dirname "$0")/lib.sh"
ORIGIN=/dev/vda
COW=/dev/vdb
setup_guest
SZ=$(blockdev --getsz $ORIGIN)

section "origin passes I/O through"
check "create origin" dmsetup create ss-origin --table "0 $SZ shared-origin $ORIGIN $COW 16"
mapper_nodes
head -c $((4 << 20)) /dev/urandom > /tmp/pattern
check "write pattern through /dev/mapper/ss-origin" dd if=/tmp/pattern of=/dev/mapper/ss-origin bs=1M seek=3 oflag=direct conv=fsync status=none
check "read back through the mapped device" cmp <(dd if=/dev/mapper/ss-origin bs=1M skip=3 count=4 iflag=direct status=none) /tmp/pattern
check "read back from the raw origin disk" cmp <(dd if=$ORIGIN bs=1M skip=3 count=4 iflag=direct status=none) /tmp/pattern
check "table shows the line" sh -c "dmsetup table ss-origin | grep -q 'shared-origin 253:\|shared-origin [0-9]*:[0-9]* [0-9]*:[0-9]* 16'"
check "status answers" dmsetup status ss-origin

section "malformed table lines are refused"
bad_tables=(
    "0 $SZ shared-origin"
    "0 $SZ shared-origin $ORIGIN"
    "0 $SZ shared-origin $ORIGIN $COW"
    "0 $SZ shared-origin $ORIGIN $COW 12"
    "0 $SZ shared-origin $ORIGIN $COW 4"
    "0 $SZ shared-origin $ORIGIN $COW 4096"
    "0 $SZ shared-origin $ORIGIN $COW abc"
    "0 $SZ shared-origin $ORIGIN $COW 16 1"
    "0 $SZ shared-origin $ORIGIN $COW 16 1 nosuchfeature"
    "0 $SZ shared-origin $ORIGIN $COW 16 x"
    "0 $SZ shared-origin /dev/nonexistent $COW 16"
    "0 $SZ shared-origin $ORIGIN /dev/nonexistent 16"
    "0 $SZ shared-origin $ORIGIN $ORIGIN 16"
    "0 $((SZ * 2)) shared-origin $ORIGIN $COW 16"
    "0 $SZ shared-snapshot"
    "0 $SZ shared-snapshot /dev/mapper/ss-origin"
    "0 $SZ shared-snapshot /dev/mapper/ss-origin notanumber"
    "0 $SZ shared-snapshot /dev/mapper/ss-origin 1 extra"
    "0 $SZ shared-snapshot /dev/mapper/ss-origin 12345"
    "0 $SZ shared-snapshot $COW 1"
    "0 $SZ shared-snapshot $ORIGIN 1"
    "0 $SZ shared-origin $ORIGIN /dev/ram0 16"
    "0 $(blockdev --getsz $COW) shared-origin $COW /dev/ram0 16"
    "0 $SZ shared-origin /dev/ram0 $COW 16"
    "0 $SZ shared-snapshot /dev/mapper/ss-origin -1"
)
i=0
for t in "${bad_tables[@]}"; do
    i=$((i + 1))
    check_fails "refused: $t" dmsetup create ss-bad$i --table "$t"
    dmsetup remove ss-bad$i >/dev/null 2>&1 || true
done
check "each refusal logged a reason" sh -c "dmesg | grep -cE 'table: [0-9:]+: shared-(origin|snapshot): ' | awk '{exit !(\$1 >= ${#bad_tables[@]})}'"
check "a zeroed device named by a refused second origin was not formatted" sh -c "! dd if=/dev/ram0 bs=4k count=1 status=none | tr -d '\\0' | grep -q ."
check "origin still works after the refusals" cmp <(dd if=/dev/mapper/ss-origin bs=1M skip=3 count=4 iflag=direct status=none) /tmp/pattern

section "teardown"
check "module refuses to unload while in use" sh -c "! rmmod dm_shared_snap"
check "remove origin" dmsetup remove ss-origin
check "unload module" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
