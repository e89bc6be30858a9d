#!/bin/bash
# Table lifecycle: the origin table replaced (reload + resume) or removed with --force
# while snapshot devices are active and doing I/O; suspend stops background work; a
# read-only table writes nothing; no fixed limit on active origins.
# Runs inside scripts/vm-run --disks 2.
. "$(dirname "$0")/lib.sh"
setup_guest
SZ=$(blockdev --getsz /dev/vda)
LEN=131072 # 64 MiB
origin_up() { dmsetup create lo --table "0 $LEN shared-origin /dev/vda /dev/vdb 16" && mapper_nodes; }
snap_up() { dmsetup create "$1" --table "0 $LEN shared-snapshot $2 $3" && mapper_nodes; }
writes() { cat /sys/block/$1/stat | awk '{print $5}'; } # completed write requests
fresh() { dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none; }

section "origin table replaced while snapshots are active"
fresh
check "create origin" origin_up
dd if=/dev/urandom of=/tmp/a bs=1M count=8 status=none
dd if=/tmp/a of=/dev/mapper/lo bs=1M oflag=direct status=none
dmsetup message lo 0 create 1; dmsetup message lo 0 create 2
check "snapshot 1 by the origin device" snap_up ls1 "$(odev lo)" 1
check "snapshot 2 by the origin's mapped device (older tables)" snap_up ls2 /dev/mapper/lo 2
check "the older form shows the origin device in its table" sh -c "dmsetup table ls2 | grep -q \"shared-snapshot $(odev lo) 2\""
dd if=/dev/urandom of=/dev/mapper/lo bs=1M count=8 oflag=direct status=none
check "snapshot 1 reads its data" cmp <(dd if=/dev/mapper/ls1 bs=1M count=8 iflag=direct status=none) /tmp/a
# A reader and a writer on the snapshots while the origin table goes.
( while dd if=/dev/mapper/ls1 of=/dev/null bs=64k count=128 iflag=direct status=none; do :; done ) &
rpid=$!
( while dd if=/dev/urandom of=/dev/mapper/ls2 bs=64k count=64 oflag=direct conv=nocreat status=none; do :; done ) &
wpid=$!
sleep 2
check "reload the origin with an error table" dmsetup reload lo --table "0 $LEN error"
check "resume it (the shared-origin target is destroyed)" timeout 60 dmsetup resume lo
check "the snapshot reader stops with an error, not a hang" timeout 60 sh -c "while kill -0 $rpid 2>/dev/null; do sleep 0.2; done"
check "the snapshot writer stops with an error, not a hang" timeout 60 sh -c "while kill -0 $wpid 2>/dev/null; do sleep 0.2; done"
check_fails "snapshot reads fail once the origin is gone" dd if=/dev/mapper/ls1 of=/dev/null bs=4k count=1 iflag=direct status=none
check "snapshot status answers" dmsetup status ls1
check "remove the orphaned snapshots" sh -c "timeout 60 dmsetup remove ls1 && timeout 60 dmsetup remove ls2"
check "load the origin table again" sh -c "dmsetup reload lo --table '0 $LEN shared-origin /dev/vda /dev/vdb 16' && dmsetup resume lo"
check "both snapshots are still there" sh -c "[ \"\$(dmsetup message lo 0 list)\" = '1 2' ]"
check "snapshot 1 device again" snap_up ls1 "$(odev lo)" 1
check "snapshot 1 still reads its data" cmp <(dd if=/dev/mapper/ls1 bs=1M count=8 iflag=direct status=none) /tmp/a

section "origin removed with --force while a snapshot is written"
( while [ -b /dev/mapper/ls1 ] && dd if=/dev/urandom of=/dev/mapper/ls1 bs=64k count=64 seek=256 oflag=direct conv=nocreat status=none; do :; done ) &
wpid=$!
sleep 2
check "remove --force the origin" timeout 60 dmsetup remove --force lo
check "the snapshot writer stops, no hang" timeout 60 sh -c "while kill -0 $wpid 2>/dev/null; do sleep 0.2; done"
check "remove the snapshot" timeout 60 dmsetup remove ls1
dmsetup remove lo >/dev/null 2>&1
check "the store is consistent (shsnap check)" $SHSNAP check /dev/vdb

section "suspend with I/O in flight and snapshots active; background work stops"
# The COW device behind dm-delay, so that each commit of the deletion sweep takes long
# enough for the suspend to land in the middle of it.
CSZ=$(blockdev --getsz /dev/vdb)
fresh
dmsetup create cowd --table "0 $CSZ delay /dev/vdb 0 0"; mapper_nodes
check "create origin (4 KiB chunks) over the delayed COW device" sh -c "dmsetup create lo --table '0 $LEN shared-origin /dev/vda /dev/mapper/cowd 8' && dmsetup mknodes"
for i in 1 2 3 4 5; do dmsetup message lo 0 create $i; done
check "64 MiB of first writes (16384 chunks copied once for 5 snapshots)" dd if=/dev/urandom of=/dev/mapper/lo bs=1M count=64 oflag=direct status=none
check "snapshot 5 device" snap_up ls5 "$(odev lo)" 5
check "COW writes now take 300 ms" sh -c "dmsetup reload cowd --table '0 $CSZ delay /dev/vdb 0 0 /dev/vdb 0 300' && dmsetup suspend cowd && dmsetup resume cowd"
( dd if=/dev/urandom of=/dev/mapper/lo bs=64k count=64 seek=512 oflag=direct status=none ) &
wpid=$!
( dd if=/dev/mapper/ls5 of=/dev/null bs=64k count=512 iflag=direct status=none ) &
rpid=$!
for i in 1 2 3 4; do dmsetup message lo 0 delete $i; done
check "suspend the origin during writes, reads and the deletion sweep" timeout 60 dmsetup suspend lo
sleep 1 # writes dm-delay still held at the suspend land now
w0=$(writes vdb)
sleep 4
w1=$(writes vdb)
check "no COW write while suspended ($w0 -> $w1 write requests)" test "$w0" = "$w1"
dmsetup reload cowd --table "0 $CSZ delay /dev/vdb 0 0" && dmsetup suspend cowd && dmsetup resume cowd
check "resume" dmsetup resume lo
check "the in-flight writer finished" timeout 120 sh -c "while kill -0 $wpid 2>/dev/null; do sleep 0.2; done"
check "the in-flight reader finished" timeout 120 sh -c "while kill -0 $rpid 2>/dev/null; do sleep 0.2; done"
check "remove snapshot 5's device and delete it" sh -c "dmsetup remove ls5 && dmsetup message lo 0 delete 5"
check "the sweep resumed and frees every chunk" timeout 300 sh -c "until dmsetup status lo | grep -q '^0 [0-9]* shared-origin 0/'; do sleep 1; done"
dmsetup status lo
check "remove" sh -c "dmsetup remove lo && dmsetup remove cowd"

section "read-only tables write nothing"
fresh
check "a store with a snapshot" sh -c "dmsetup create lo --table '0 $LEN shared-origin /dev/vda /dev/vdb 16' && dmsetup message lo 0 create 1 && dd if=/dev/urandom of=/dev/mapper/lo bs=1M count=4 oflag=direct status=none && dmsetup remove lo"
check "the store is clean" $SHSNAP check /dev/vdb
sha_before=$(dd if=/dev/vdb bs=1M count=64 status=none | sha256sum)
w0=$(writes vdb)
check "create a read-only origin" sh -c "dmsetup create --readonly lo --table '0 $LEN shared-origin /dev/vda /dev/vdb 16' && dmsetup mknodes"
check_fails "create refused on a read-only origin" dmsetup message lo 0 create 50
check_fails "writes to a read-only origin fail" dd if=/dev/zero of=/dev/mapper/lo bs=4k count=1 oflag=direct status=none
check "list works" dmsetup message lo 0 list
check "a snapshot of a read-only origin" sh -c "dmsetup create --readonly ls1 --table '0 $LEN shared-snapshot $(odev lo) 1' && dmsetup mknodes"
check "reads it" dd if=/dev/mapper/ls1 of=/dev/null bs=1M count=8 iflag=direct status=none
check "suspend and resume" sh -c "dmsetup suspend lo && dmsetup resume lo"
check "remove" sh -c "dmsetup remove ls1 && dmsetup remove lo"
w1=$(writes vdb)
check "no write reached the COW device ($w0 -> $w1 write requests)" test "$w0" = "$w1"
check "the COW device is unchanged" test "$(dd if=/dev/vdb bs=1M count=64 status=none | sha256sum)" = "$sha_before"
fresh
check_fails "a read-only table does not format a zeroed COW device" dmsetup create --readonly lo --table "0 $LEN shared-origin /dev/vda /dev/vdb 16"
check "the COW device stays zero" sh -c "! dd if=/dev/vdb bs=4k count=1 status=none | tr -d '\\0' | grep -q ."
dmsetup remove lo >/dev/null 2>&1

section "no fixed limit on active origins"
# 40 small volumes on one RAM disk: 1 MiB origin and 4 MiB COW each.
dd if=/dev/zero of=/dev/ram0 bs=1M count=200 oflag=direct status=none
ok=1
for i in $(seq 0 39); do
    base=$((i * 10240))
    dmsetup create v$i-o --table "0 2048 linear /dev/ram0 $base" || ok=0
    dmsetup create v$i-c --table "0 8192 linear /dev/ram0 $((base + 2048))" || ok=0
    dmsetup mknodes >/dev/null 2>&1
    dmsetup create v$i --table "0 2048 shared-origin /dev/mapper/v$i-o /dev/mapper/v$i-c 16" || { ok=0; echo "  origin $i refused"; }
done
check "40 origins are active at once" test $ok = 1
check "all 40 take a snapshot" sh -c "for i in \$(seq 0 39); do dmsetup message v\$i 0 create 1 || exit 1; done"
for i in $(seq 0 39); do dmsetup remove v$i; dmsetup remove v$i-o; dmsetup remove v$i-c; done 2>/dev/null

check "rmmod" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
