#!/bin/bash
# Crafted metadata with valid checksums (crc32c is not a signature): `shsnap forge` edits
# one field of a good store (sequence numbers, counters and offsets near u64::MAX, key
# order, levels, child pointers, shares, one COW chunk used twice...) and recomputes the
# checksum.  Each forged store is loaded and used (snapshot reads, origin and snapshot
# writes, create, delete); the module must refuse it or fail the I/O cleanly: no panic, no
# oops, no hang, and the origin keeps working whenever the load succeeds.
# Runs inside scripts/vm-run --disks 2.
. "$(dirname "$0")/lib.sh"
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
LEN=131072   # 64 MiB origin
if [ "${EXTENDED:-0}" = 1 ]; then ROUNDS=${ROUNDS:-3}; else ROUNDS=${ROUNDS:-1}; fi
SEED=${SEED:-1}
echo "  seeds $SEED..$((SEED + ROUNDS - 1)) per kind (SEED=... replays)"
setup_guest
load() { dmsetup create ho --table "0 $LEN shared-origin /dev/vda /dev/vdb 16" 2>/dev/null; }
unload() { for d in hs1 hs2 ho; do timeout 60 dmsetup remove $d >/dev/null 2>&1 || dmsetup remove --force $d >/dev/null 2>&1; done; true; }

section "a good store to forge"
dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
check "load on a zeroed COW device" load
mapper_nodes
$ORACLE init origin $((LEN / 8))
$ORACLE write origin /dev/mapper/ho --count 100 --seed 3 >/dev/null
for i in 1 2; do dmsetup message ho 0 create $i; done
$ORACLE write origin /dev/mapper/ho --count 300 --seed 4 >/dev/null
dmsetup create hs2 --table "0 $LEN shared-snapshot $(odev ho) 2"; mapper_nodes
$ORACLE clone origin hs2
$ORACLE write hs2 /dev/mapper/hs2 --count 100 --seed 5 >/dev/null
unload
check "shsnap check: the good store is clean" $SHSNAP check /dev/vdb
data_start=$($SHSNAP layout /dev/vdb | awk '$1 == "data_start" {print $2}')
dd if=/dev/vdb of=/tmp/meta.img bs=4096 count=$data_start status=none
restore() { dd if=/tmp/meta.img of=/dev/vdb bs=4096 conv=notrunc,fsync status=none; blockdev --flushbufs /dev/vdb; }

kinds=$($SHSNAP forge --list | awk '{print $1}')
check "shsnap forge lists its kinds ($(echo $kinds | wc -w))" test -n "$kinds"
refused=0; loaded=0; bad=0
for kind in $kinds; do
    for s in $(seq $SEED $((SEED + ROUNDS - 1))); do
        restore
        what=$($SHSNAP forge /dev/vdb --kind $kind --seed $s 2>&1) || { echo "  $kind/$s: forge: $what"; continue; }
        blockdev --flushbufs /dev/vdb
        if timeout 60 dmsetup create ho --table "0 $LEN shared-origin /dev/vda /dev/vdb 16" 2>/dev/null; then
            loaded=$((loaded + 1)); mapper_nodes
            # Use every path: snapshot reads and writes, origin writes, create, delete, and the
            # replication messages.
            timeout 60 dmsetup create hs1 --table "0 $LEN shared-snapshot $(odev ho) 1" 2>/dev/null && mapper_nodes
            timeout 60 dd if=/dev/mapper/hs1 of=/dev/null bs=1M iflag=direct status=none 2>/dev/null
            timeout 60 dd if=/dev/urandom of=/dev/mapper/hs1 bs=64k count=16 oflag=direct status=none 2>/dev/null
            timeout 120 $ORACLE write origin /dev/mapper/ho --count 200 --max 64 --seed 9 >/dev/null 2>&1
            timeout 60 dmsetup message ho 0 create 7 >/dev/null 2>&1
            # The replication messages walk the whole tree and the snapshot table.
            timeout 60 dmsetup message ho 0 info >/dev/null 2>&1
            next=0
            for _ in $(seq 1 200); do
                out=$(timeout 60 dmsetup message ho 0 delta 1 7 $next 2>/dev/null) || break
                case $out in *next\ *) next=${out##*next } ;; *) break ;; esac
            done
            timeout 60 dmsetup message ho 0 progress 0123 >/dev/null 2>&1
            dmsetup remove hs1 >/dev/null 2>&1
            timeout 60 dmsetup message ho 0 delete 1 >/dev/null 2>&1
            sleep 0.5
            if ! timeout 60 dd if=/dev/mapper/ho of=/dev/null bs=1M count=4 iflag=direct status=none; then
                bad=$((bad + 1)); echo "  $kind/$s ($what): the origin stopped serving reads"
            fi
            unload
        else
            refused=$((refused + 1))
        fi
        if dmesg | grep -qE "$BAD_KMSG"; then bad=$((bad + 1)); echo "  $kind/$s ($what): kernel report"; break 2; fi
    done
done
echo "  forged stores: $refused refused at load, $loaded loaded and used"
check "every forged store was refused or failed cleanly (no report, origin alive)" test $bad = 0
check "module unloads" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
