#!/bin/bash
# Snapshot reads racing writes that unshare their chunk.  One snapshot read is held in
# flight deterministically (blk-throttle: the reader alone runs in a cgroup with a tiny
# io.max read rate on the device it reads; the worker's copies are not in that cgroup)
# while writes overtake it.  A read must never return data newer than its snapshot.
# Runs inside scripts/vm-run --disks 2.
. "$(dirname "$0")/lib.sh"
setup_guest
LEN=131072 # 64 MiB, chunks of 64 KiB
CG=/sys/fs/cgroup
mountpoint -q $CG || mount -t cgroup2 none $CG
echo +io > $CG/cgroup.subtree_control 2>/dev/null
mkdir -p $CG/slow
devno() { printf '%d:%d' "$(stat -L -c '0x%t' "$1")" "$(stat -L -c '0x%T' "$1")"; }
held_read() { # device-to-throttle snapshot-device out: reads 4 KiB at 0 in the slow cgroup
    echo "$(devno "$1") rbps=1024" > $CG/slow/io.max
    sh -c "echo \$\$ > $CG/slow/cgroup.procs; exec dd if=$2 of=$3 bs=4k count=1 iflag=direct status=none" &
}
fresh() {
    for d in rs1 rs2 ro; do dmsetup remove $d 2>/dev/null; done
    dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
    dmsetup create ro --table "0 $LEN shared-origin /dev/vda /dev/vdb 128" && mapper_nodes
}
snap_up() { dmsetup create "$1" --table "0 $LEN shared-snapshot $(odev ro) $2" && mapper_nodes; }
for f in a b c; do dd if=/dev/urandom of=/tmp/$f bs=64k count=1 status=none; done
check "io.max is available (blk-throttle)" test -e $CG/slow/io.max

section "(a) a snapshot read of the origin, held while the snapshot's write unshares the chunk and the origin overwrites it"
check "origin" fresh
dd if=/tmp/a of=/dev/mapper/ro bs=64k count=1 oflag=direct status=none
dmsetup message ro 0 create 1
check "snapshot 1" snap_up rs1 1
held_read /dev/vda /dev/mapper/rs1 /tmp/read.a; rpid=$!
sleep 1
check "the snapshot read is held in flight" kill -0 $rpid
# The snapshot writes another part of chunk 0: the worker copies the chunk from the origin
# (not throttled) and the chunk is no longer shared with the origin...
dd if=/tmp/b of=/dev/mapper/rs1 bs=4k count=1 seek=8 oflag=direct status=none &
spid=$!
sleep 1
# ...so an origin write to it may go straight to the origin.
dd if=/tmp/c of=/dev/mapper/ro bs=64k count=1 oflag=direct status=none &
opid=$!
wait $rpid $spid $opid
check "the held read returns the snapshot's data, not the newer origin data" cmp /tmp/read.a <(head -c 4096 /tmp/a)
check "the origin holds the new data" cmp <(dd if=/dev/mapper/ro bs=64k count=1 iflag=direct status=none) /tmp/c
check "the snapshot holds its write over its old data" cmp <(dd if=/dev/mapper/rs1 bs=4k count=16 iflag=direct status=none) <(head -c 32768 /tmp/a; head -c 4096 /tmp/b; tail -c +36865 /tmp/a)

section "(b) a snapshot read of a shared COW chunk, held while its write unshares it and the other sharer writes in place"
check "origin" fresh
dd if=/tmp/a of=/dev/mapper/ro bs=64k count=1 oflag=direct status=none
dmsetup message ro 0 create 1; dmsetup message ro 0 create 2
# Chunk 0 is copied once, for both snapshots: one COW chunk shared by 1 and 2.
dd if=/tmp/b of=/dev/mapper/ro bs=64k count=1 oflag=direct status=none
check "snapshot 1" snap_up rs1 1
check "snapshot 2" snap_up rs2 2
held_read /dev/vdb /dev/mapper/rs1 /tmp/read.b; rpid=$!
sleep 1
check "the snapshot read is held in flight" kill -0 $rpid
# Snapshot 1 writes another part of chunk 0: it gets a copy of its own, and snapshot 2 now
# owns the shared COW chunk alone...
dd if=/tmp/b of=/dev/mapper/rs1 bs=4k count=1 seek=8 oflag=direct status=none &
spid=$!
sleep 1
# ...so snapshot 2 may write it in place.
dd if=/tmp/c of=/dev/mapper/rs2 bs=64k count=1 oflag=direct status=none &
tpid=$!
wait $rpid $spid $tpid
check "the held read returns snapshot 1's data, not snapshot 2's newer write" cmp /tmp/read.b <(head -c 4096 /tmp/a)
check "snapshot 2 holds its write" cmp <(dd if=/dev/mapper/rs2 bs=64k count=1 iflag=direct status=none) /tmp/c
check "snapshot 1 holds its write over its old data" cmp <(dd if=/dev/mapper/rs1 bs=4k count=16 iflag=direct status=none) <(head -c 32768 /tmp/a; head -c 4096 /tmp/b; tail -c +36865 /tmp/a)
for d in /dev/vda /dev/vdb; do echo "$(devno $d) rbps=max" > $CG/slow/io.max; done

dmsetup remove rs1; dmsetup remove rs2; dmsetup remove ro
check "rmmod" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
