#!/bin/bash
# I/O errors and slowness under the store: a COW device that dies, an origin read error
# during copy-out, a slow COW device.  Snapshots become invalid with a clear status, the
# origin keeps its data and keeps serving, nothing hangs, devices can be removed.
. "$(dirname "$0")/lib.sh"
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
LEN=131072
setup_guest
COWSZ=$(blockdev --getsz /dev/vdb)
swap() { # dev table
    dmsetup suspend --nolockfs $1 && dmsetup load $1 --table "$2" && dmsetup resume $1
}
up() { # cow
    dmsetup info ho >/dev/null 2>&1 || { dmsetup create ho --table "0 $LEN shared-origin /dev/mapper/orig $1 16" && mapper_nodes; } || return 1
    dmsetup create hs1 --table "0 $LEN shared-snapshot $(odev ho) 1" 2>/dev/null && mapper_nodes
    true
}
down() { for d in hs1 ho; do timeout 60 dmsetup remove $d >/dev/null 2>&1; done; ! dmsetup info ho >/dev/null 2>&1; }
dmsetup create orig --table "0 $LEN linear /dev/vda 0"
dmsetup create cowf --table "0 $COWSZ linear /dev/vdb 0"
dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
mapper_nodes

section "the COW device dies"
check "origin up" up /dev/mapper/cowf
$ORACLE init origin $((LEN / 8))
$ORACLE write origin /dev/mapper/ho --count 100 --seed 1 >/dev/null
dmsetup message ho 0 create 1 && dmsetup message ho 0 create 2
up /dev/mapper/cowf
$ORACLE clone origin hs1
check "writes with snapshots" $ORACLE write origin /dev/mapper/ho --count 50 --seed 2
check "snapshot correct before the failure" $ORACLE verify hs1 /dev/mapper/hs1
check "COW device switched to the error target" swap cowf "0 $COWSZ error"
check "origin writes go on after the COW failure" timeout 120 $ORACLE write origin /dev/mapper/ho --count 100 --seed 3
check "origin reads what was written" $ORACLE verify origin /dev/mapper/ho
check "status says fail" sh -c "dmsetup status ho | grep -q ' fail '"
check "dmesg names the COW failure" sh -c "dmesg | grep -qE 'copy to the COW device failed|journal commit failed|metadata error'"
check_fails "snapshot I/O fails (EIO)" dd if=/dev/mapper/hs1 of=/dev/null bs=64k count=16 iflag=direct status=none
dmsetup status ho; dmsetup status hs1
check "devices can be removed" down
swap cowf "0 $COWSZ linear /dev/vdb 0"

section "an origin read error during copy-out (COW healthy): invalidation is recorded"
dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
check "origin up on a fresh store" up /dev/mapper/cowf
dmsetup message ho 0 create 1
up /dev/mapper/cowf
$ORACLE init origin $((LEN / 8))
$ORACLE clone origin hs1
check "origin switched to the error target" swap orig "0 $LEN error"
check_fails "an origin write fails (the origin itself is dead)" dd if=/dev/zero of=/dev/mapper/ho bs=64k count=1 oflag=direct status=none
swap orig "0 $LEN linear /dev/vda 0"
check "status names snapshot 1 invalid" sh -c "dmsetup status ho | grep -q 'invalid:1'"
check "snapshot status says invalid" sh -c "dmsetup status hs1 | grep -q invalid"
check "origin writes work again" $ORACLE write origin /dev/mapper/ho --count 30 --seed 5
check "devices can be removed" down
check "after reactivation snapshot 1 is still invalid (recorded on disk)" sh -c "dmsetup create ho --table '0 $LEN shared-origin /dev/mapper/orig /dev/mapper/cowf 16' && dmsetup status ho | grep -q 'invalid:1'"
check "a new snapshot works" sh -c "dmsetup message ho 0 create 7"
down

section "a slow COW device (dm-delay, 30 ms)"
dmsetup create cowd --table "0 $COWSZ delay /dev/vdb 0 30"; mapper_nodes
dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
dd if=/dev/zero of=/dev/mapper/orig bs=1M count=$((LEN / 2048)) oflag=direct status=none
check "origin up on the slow device" up /dev/mapper/cowd
$ORACLE init origin $((LEN / 8))
dmsetup message ho 0 create 1; up /dev/mapper/cowd
$ORACLE clone origin hs1
check "origin writes complete (no hang)" timeout 300 $ORACLE write origin /dev/mapper/ho --count 40 --seed 6
check "snapshot correct on the slow device" $ORACLE verify hs1 /dev/mapper/hs1
check "devices can be removed" down
dmsetup remove cowd; dmsetup remove cowf; dmsetup remove orig
check "module unloads" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
