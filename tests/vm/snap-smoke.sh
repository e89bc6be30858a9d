#!/bin/bash
# Quick snapshot check: origin, 3 snapshots, writes, reads, status.
. "$(dirname "$0")/lib.sh"
setup_guest
SZ=$(blockdev --getsz /dev/vda)
dmsetup create so --table "0 $SZ shared-origin /dev/vda /dev/vdb 16"; mapper_nodes
dd if=/dev/urandom of=/tmp/a bs=1M count=8 status=none
dd if=/tmp/a of=/dev/mapper/so bs=1M oflag=direct status=none
check "create 1" dmsetup message so 0 create 1
dmsetup create s1 --table "0 $SZ shared-snapshot /dev/mapper/so 1"; mapper_nodes
dd if=/dev/urandom of=/tmp/b bs=1M count=8 status=none
check "origin write after snapshot" dd if=/tmp/b of=/dev/mapper/so bs=1M oflag=direct status=none
check "origin has new data" cmp <(dd if=/dev/mapper/so bs=1M count=8 iflag=direct status=none) /tmp/b
check "snapshot has old data" cmp <(dd if=/dev/mapper/s1 bs=1M count=8 iflag=direct status=none) /tmp/a
dmsetup status so; dmsetup status s1; dmsetup message so 0 list
check "snapshot write" dd if=/tmp/b of=/dev/mapper/s1 bs=4k count=100 oflag=direct status=none
check "snapshot reads its write" cmp <(dd if=/dev/mapper/s1 bs=4k count=100 iflag=direct status=none) <(dd if=/tmp/b bs=4k count=100 status=none)
check "snapshot rest unchanged" cmp <(dd if=/dev/mapper/s1 bs=4k skip=100 count=1948 iflag=direct status=none) <(dd if=/tmp/a bs=4k skip=100 count=1948 status=none)
check "origin unchanged by snapshot write" cmp <(dd if=/dev/mapper/so bs=1M count=8 iflag=direct status=none) /tmp/b
dmsetup status so; dmsetup status s1
check_fails "delete of active snapshot refused" dmsetup message so 0 delete 1
check "remove s1" dmsetup remove s1
check "delete 1" dmsetup message so 0 delete 1
check "remove origin" dmsetup remove so

section "COW device full"
dmsetup create smallcow --table "0 16384 linear /dev/vdb 0"; mapper_nodes
dd if=/dev/zero of=/dev/mapper/smallcow bs=1M count=1 oflag=direct status=none
check "origin with an 8 MiB COW device" dmsetup create sf --table "0 65536 shared-origin /dev/vda /dev/mapper/smallcow 16"
mapper_nodes
dmsetup message sf 0 create 1; dmsetup message sf 0 create 2
ev0=$(dmsetup info -c --noheadings -o events sf 2>/dev/null)
dd if=/dev/urandom of=/tmp/big bs=1M count=32 status=none
check "32 MiB of origin writes go on when the COW device fills" dd if=/tmp/big of=/dev/mapper/sf bs=1M count=32 oflag=direct status=none
check "origin holds what was written" sh -c "dd if=/dev/mapper/sf bs=1M count=32 iflag=direct status=none | cmp - /tmp/big"
check "status names the invalidated snapshots" sh -c "dmsetup status sf | grep -q 'invalid:1,2'"
check "dmesg says the COW device is full" sh -c "dmesg | grep -q 'COW device full'"
ev1=$(dmsetup info -c --noheadings -o events sf 2>/dev/null)
check "a dm event was raised ($ev0 -> $ev1)" test "${ev1:-0}" -gt "${ev0:-0}"
dmsetup create sf1 --table "0 65536 shared-snapshot /dev/mapper/sf 1"; mapper_nodes
check_fails "reading an invalid snapshot fails" dd if=/dev/mapper/sf1 of=/dev/null bs=4k count=1 iflag=direct status=none
dmsetup status sf; dmsetup status sf1
dmsetup remove sf1; dmsetup remove sf; dmsetup remove smallcow
check "rmmod" rmmod dm_shared_snap
check_dmesg
dmesg | grep -i shared | tail
finish
