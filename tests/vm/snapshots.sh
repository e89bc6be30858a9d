#!/bin/bash
# The product test: 64 writable snapshots of one origin sharing one COW device, checked
# block by block against an oracle; persistence across device removal and module reload;
# deletion; concurrent fio with verification on the origin and several snapshots.
# Runs inside scripts/vm-run --disks 2.
. "$(dirname "$0")/lib.sh"
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
NSNAP=${NSNAP:-64}
MB=${ORIGIN_MB:-8}
CHUNK=${CHUNK:-16}
LEN=$((MB * 2048))
BLOCKS=$((MB * 256))
setup_guest

origin_up() { dmsetup create so --table "0 $LEN shared-origin /dev/vda /dev/vdb $CHUNK" && mapper_nodes; }
snap_up() { dmsetup create s$1 --table "0 $LEN shared-snapshot $(odev so) $1" && mapper_nodes; }
verify_all() { # label
    local bad=0
    $ORACLE verify origin /dev/mapper/so || bad=1
    for i in $(seq 1 $NSNAP); do
        [ -e /dev/mapper/s$i ] || continue
        $ORACLE verify s$i /dev/mapper/s$i || bad=1
    done
    [ $bad = 0 ]
}

section "origin and $NSNAP snapshots between rounds of writes"
check "create origin ($MB MiB, chunk $CHUNK sectors)" origin_up
$ORACLE init origin $BLOCKS
check "initial writes to the origin" $ORACLE write origin /dev/mapper/so --count 200 --seed 1
ok=1
SEED=${SEED:-42}
echo "  snapshot choice seed $SEED (SEED=... replays it)"
RANDOM=$SEED
declare -A written
for i in $(seq 1 $NSNAP); do
    dmsetup message so 0 create $i || ok=0
    snap_up $i || ok=0
    $ORACLE clone origin s$i
    $ORACLE write origin /dev/mapper/so --count 20 --seed $((100 + i)) || ok=0
    # write to two earlier snapshots (writable snapshots: in place, split, new exception),
    # spread over all of them
    for j in $(( RANDOM % i + 1 )) $(( RANDOM % i + 1 )); do
        written[$j]=1
        $ORACLE write s$j /dev/mapper/s$j --count 4 --seed $((1000 * i + j)) || ok=0
    done
    # halfway, all of them (the check after the rounds verifies the end)
    if [ $i = $((NSNAP / 2)) ]; then
        verify_all || ok=0
        echo "  round $i: $(dmsetup status so)"
    fi
done
check "$NSNAP rounds of create, origin writes and snapshot writes" test $ok = 1
check "the rounds wrote to ${#written[@]} different snapshots" test "${#written[@]}" -ge $((NSNAP / 2))
check "every snapshot and the origin read what the oracle says" verify_all
[ $NSNAP = 64 ] && check_fails "a 65th snapshot is refused" dmsetup message so 0 create 1000
check_fails "a duplicate id is refused" dmsetup message so 0 create 5
check "list shows $NSNAP ids" sh -c "[ \$(dmsetup message so 0 list | wc -w) = $NSNAP ]"
check "status reports $NSNAP snapshots" sh -c "dmsetup status so | awk '{exit !(\$6 == $NSNAP && \$7 == \"ok\")}'"
dmsetup status so; dmsetup status s1

section "persistence: remove all devices, reload the module, recreate"
rm_all() { for i in $(seq 1 $NSNAP); do dmsetup remove s$i 2>/dev/null; done; dmsetup remove so; }
check "remove all devices" rm_all
check "unload module" rmmod dm_shared_snap
if [ -x "$SHSNAP" ]; then
    check "shsnap check: COW device clean after shutdown" $SHSNAP check /dev/vdb
fi
check "reload module" insmod "$MODULE"
check "recreate origin" origin_up
ok=1; for i in $(seq 1 $NSNAP); do snap_up $i || ok=0; done
check "recreate $NSNAP snapshots" test $ok = 1
check "all devices read the same after reload" verify_all

section "delete"
for i in 3 17 40; do
    [ $i -le $NSNAP ] || continue
    dmsetup remove s$i
    check "delete snapshot $i" dmsetup message so 0 delete $i
    $ORACLE drop s$i
done
sleep 2
check "the others are intact after deletion" verify_all
if [ $NSNAP -ge 40 ]; then
    check "a new snapshot can be taken after deletes" dmsetup message so 0 create 2000
    snap_up 2000 && $ORACLE clone origin s2000
    check "new snapshot reads the origin" $ORACLE verify s2000 /dev/mapper/s2000
    dmsetup remove s2000
fi

section "concurrent fio on the origin and snapshots (verify=crc32c)"
if command -v fio >/dev/null; then
    FIOJOBS=""
    for d in so s1 s2 s8 s33; do
        [ -e /dev/mapper/$d ] || continue
        FIOJOBS="$FIOJOBS --name=$d --filename=/dev/mapper/$d"
    done
    check "fio: 5 jobs, random writes with crc32c verification" fio --ioengine=psync --direct=1 --rw=randwrite --bs=4k --size=$((MB / 2))M --offset=$((MB / 2))M \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 $FIOJOBS --output=/tmp/fio.out
    tail -3 /tmp/fio.out
    # fio overwrote the second half of those devices: the untouched snapshots must not change.
    ok=1
    for i in $(seq 1 $NSNAP); do
        case $i in 1|2|8|33|3|17|40) continue ;; esac
        [ -e /dev/mapper/s$i ] || continue
        $ORACLE verify s$i /dev/mapper/s$i || ok=0
    done
    check "snapshots fio did not touch are unchanged" test $ok = 1
fi

section "teardown"
dmsetup status so
check "remove all devices" sh -c "for i in \$(seq 1 $NSNAP); do dmsetup remove s\$i 2>/dev/null; done; dmsetup remove so"
check "unload module" rmmod dm_shared_snap
[ -x "$SHSNAP" ] && check "shsnap check: clean" $SHSNAP check /dev/vdb
check_dmesg
check_kmemleak
finish
