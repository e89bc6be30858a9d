#!/bin/bash
# Power cuts under load: origin and COW device are carved from ONE dm-flakey device; at a
# random moment it is switched to drop_writes (every later write is acknowledged and lost,
# as in a power cut), the devices are torn down while still dropping, then the disk comes
# back, the store is reloaded (journal replay), checked, and every device is verified
# against the oracle: acknowledged data is there, nothing half-done is visible.
#   ROUNDS=n (default 20)
. "$(dirname "$0")/lib.sh"
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
ROUNDS=${ROUNDS:-20}
LEN=65536          # 32 MiB origin
COWLEN=131072      # 64 MiB COW
setup_guest
SZ=$(blockdev --getsz /dev/vda)
swap() { dmsetup suspend --nolockfs pc && dmsetup load pc --table "$1" && dmsetup resume pc; }
dmsetup create pc --table "0 $SZ linear /dev/vda 0"
dmsetup create po --table "0 $LEN linear /dev/mapper/pc 0"
dmsetup create pw --table "0 $COWLEN linear /dev/mapper/pc $LEN"
mapper_nodes
dd if=/dev/zero of=/dev/mapper/pc bs=1M count=$(( (LEN + COWLEN) / 2048 )) oflag=direct status=none
up() {
    dmsetup create ho --table "0 $LEN shared-origin /dev/mapper/po /dev/mapper/pw 16" || return 1
    for i in 1 2; do dmsetup create hs$i --table "0 $LEN shared-snapshot /dev/mapper/ho $i" || return 1; done
    mapper_nodes
}
down() { for d in hs1 hs2 ho; do timeout 60 dmsetup remove $d >/dev/null 2>&1 || dmsetup remove --force $d >/dev/null 2>&1; done; true; }

check "create origin and two snapshots" sh -c "dmsetup create ho --table '0 $LEN shared-origin /dev/mapper/po /dev/mapper/pw 16' && dmsetup message ho 0 create 1 && dmsetup message ho 0 create 2 && dmsetup remove ho"
$ORACLE init origin $((LEN / 8)); $ORACLE clone origin hs1; $ORACLE clone origin hs2
for m in origin hs2; do $ORACLE save $m $m.intent; done
survived=0; lost=0
for r in $(seq 1 $ROUNDS); do
    up || { fail "round $r: reload"; break; }
    # Load: single-write steps, each saving its intent first and its result after.
    (
        k=0
        while :; do
            k=$((k + 1))
            if [ $((k % 4)) = 0 ]; then
                $ORACLE write hs2 /dev/mapper/hs2 --count 1 --max 16 --seed $((r * 1000 + k)) --intent hs2.intent || exit 0
            else
                $ORACLE write origin /dev/mapper/ho --count 1 --max 32 --seed $((r * 1000 + k)) --intent origin.intent || exit 0
            fi
        done
    ) > /dev/null 2>&1 &
    load=$!
    sleep 0.$((RANDOM % 9 + 1))$((RANDOM % 10))
    sleep $((RANDOM % 3))
    swap "0 $SZ flakey /dev/vda 0 0 3600 1 drop_writes"          # the power cut
    sleep 0.3
    kill $load 2>/dev/null; wait $load 2>/dev/null
    down                                                          # still dropping
    swap "0 $SZ linear /dev/vda 0"                                # power back
    if $SHSNAP check /dev/mapper/pw > /tmp/check.out 2>&1; then :; else fail "round $r: shsnap check"; cat /tmp/check.out; lost=$((lost + 1)); continue; fi
    up || { fail "round $r: reload after the cut"; break; }
    ok=1
    $ORACLE verify origin /dev/mapper/ho --alt origin.intent || ok=0
    $ORACLE verify hs1 /dev/mapper/hs1 || ok=0
    $ORACLE verify hs2 /dev/mapper/hs2 --alt hs2.intent || ok=0
    if [ $ok = 1 ]; then survived=$((survived + 1)); else lost=$((lost + 1)); echo "  round $r: data wrong"; dmesg | tail -5; fi
    # The disk is the truth now: each block is the old or the new version; adopt it.
    $ORACLE adopt origin /dev/mapper/ho origin.intent || ok=0
    $ORACLE adopt hs2 /dev/mapper/hs2 hs2.intent || ok=0
    for m in origin hs2; do $ORACLE save $m $m.intent; done
    down
    [ $ok = 1 ] || break
done
echo "  power cuts: $survived survived, $lost with wrong data or a failed check"
check "$ROUNDS power cuts survived with every acknowledged write and every snapshot intact" test $survived = $ROUNDS
check "module unloads" rmmod dm_shared_snap
check_dmesg
finish
