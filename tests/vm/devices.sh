#!/bin/bash
# Device geometry: an origin whose size is not a multiple of the chunk size (the last,
# partial chunk is copied only up to the end of the device), and the queue limits of the
# COW device stacked on both targets (logical block size, write cache / flush support).
# Runs inside scripts/vm-run --disks 2.
. "$(dirname "$0")/lib.sh"
setup_guest

section "an origin whose last chunk is partial"
# 1000 sectors: 7 whole chunks of 128 sectors and a last one of 104.
dmsetup create po --table "0 1000 linear /dev/vda 0"; mapper_nodes
dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
dd if=/dev/urandom of=/tmp/a bs=512 count=1000 status=none
dd if=/dev/urandom of=/tmp/b bs=512 count=1000 status=none
dd if=/tmp/a of=/dev/mapper/po bs=512 oflag=direct status=none
check "origin of 1000 sectors, 64 KiB chunks" sh -c "dmsetup create pso --table '0 1000 shared-origin /dev/mapper/po /dev/vdb 128' && dmsetup mknodes"
dmsetup message pso 0 create 1; dmsetup message pso 0 create 2
check "snapshot of it" sh -c "dmsetup create ps1 --table '0 1000 shared-snapshot $(odev pso) 1' && dmsetup mknodes"
check "write the last, partial chunk of the origin" dd if=/tmp/b of=/dev/mapper/pso bs=512 skip=896 seek=896 count=104 oflag=direct status=none
check "no snapshot is invalidated" sh -c "dmsetup status pso | grep -q ' ok -'"
check "the snapshot reads the old data of the last chunk" cmp <(dd if=/dev/mapper/ps1 bs=512 skip=896 count=104 iflag=direct status=none) <(dd if=/tmp/a bs=512 skip=896 count=104 status=none)
check "write the whole origin" dd if=/tmp/b of=/dev/mapper/pso bs=512 count=1000 oflag=direct status=none
check "the snapshot reads all its old data" cmp <(dd if=/dev/mapper/ps1 bs=512 count=1000 iflag=direct status=none) /tmp/a
check "the origin reads the new data" cmp <(dd if=/dev/mapper/pso bs=512 count=1000 iflag=direct status=none) /tmp/b
check "a write to the snapshot's last chunk" dd if=/tmp/b of=/dev/mapper/ps1 bs=512 skip=990 seek=990 count=10 oflag=direct status=none
check "reads back" cmp <(dd if=/dev/mapper/ps1 bs=512 skip=896 count=104 iflag=direct status=none) <(dd if=/tmp/a bs=512 skip=896 count=94 status=none; dd if=/tmp/b bs=512 skip=990 count=10 status=none)
check "snapshot 2, activated now, reads the old data" sh -c "dmsetup create ps2 --table '0 1000 shared-snapshot $(odev pso) 2' && dmsetup mknodes && dd if=/dev/mapper/ps2 bs=512 count=1000 iflag=direct status=none | cmp - /tmp/a"
check "still no snapshot invalidated" sh -c "dmsetup status pso | grep -q ' ok -'"
dmsetup remove ps1; dmsetup remove ps2; dmsetup remove pso; dmsetup remove po
check "shsnap check" $SHSNAP check /dev/vdb

section "queue limits of the COW device stack on both targets"
# Origin: a RAM disk (512-byte sectors, no write cache).  COW: a loop device with 4 KiB
# sectors over a file (a write-back cache that needs flushes).
dd if=/dev/zero of=/tmp/cow.img bs=1M count=64 status=none
LOOP=$(losetup --find --show --sector-size 4096 /tmp/cow.img)
SZ=131072
dmsetup create lo --table "0 $SZ linear /dev/ram1 0"; mapper_nodes
echo "  origin: $(cat /sys/block/ram1/queue/logical_block_size)-byte sectors, $(cat /sys/block/ram1/queue/write_cache); COW: $(cat /sys/block/${LOOP#/dev/}/queue/logical_block_size)-byte sectors, $(cat /sys/block/${LOOP#/dev/}/queue/write_cache)"
check "origin over the RAM disk, COW on the 4 KiB loop device" sh -c "dmsetup create lso --table '0 $SZ shared-origin /dev/mapper/lo $LOOP 8' && dmsetup mknodes"
dmsetup message lso 0 create 1
check "snapshot" sh -c "dmsetup create ls1 --table '0 $SZ shared-snapshot $(odev lso) 1' && dmsetup mknodes"
qdir() { echo /sys/block/$(dmsetup info -c --noheadings -o blkdevname "$1" | tr -d " ")/queue; }
check "the snapshot's logical block size is the COW device's ($(cat $(qdir ls1)/logical_block_size))" test "$(cat $(qdir ls1)/logical_block_size)" = 4096
check "the snapshot passes flushes on: write cache ($(cat $(qdir ls1)/write_cache))" test "$(cat $(qdir ls1)/write_cache)" = "write back"
check "the origin's logical block size is the COW device's too" test "$(cat $(qdir lso)/logical_block_size)" = 4096
check "4 KiB writes to the snapshot" dd if=/dev/urandom of=/dev/mapper/ls1 bs=4k count=64 oflag=direct,sync status=none
check "4 KiB writes to the origin" dd if=/dev/urandom of=/dev/mapper/lso bs=4k count=64 seek=100 oflag=direct status=none
check "status ok" sh -c "dmsetup status lso | grep -q ' ok -'"
dmsetup remove ls1; dmsetup remove lso; dmsetup remove lo; losetup -d $LOOP

check "rmmod" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
