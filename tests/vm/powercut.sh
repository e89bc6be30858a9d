#!/bin/bash
# Power cuts under load: origin and COW device are carved from ONE dm-flakey device; at a
# random moment it is switched to drop_writes (every later write is acknowledged and lost,
# as in a power cut), the devices are torn down while still dropping, then the disk comes
# back, the store is reloaded (journal replay), checked, and every device is verified
# against the oracle: acknowledged data is there, nothing half-done is visible.
#   ROUNDS=n (default 20; EXTENDED=1: 100)
. "$(dirname "$0")/lib.sh"
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
if [ "${EXTENDED:-0}" = 1 ]; then ROUNDS=${ROUNDS:-100}; else ROUNDS=${ROUNDS:-20}; fi
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
survived=0; lost=0
for r in $(seq 1 $ROUNDS); do
    up || { fail "round $r: reload"; break; }
    # Load: single-write steps.  Before a step: the model is saved as <dev>.prev and the
    # step's result as <dev>.intent; after it: the step number goes to /tmp/done.
    rm -f /tmp/stop; echo 0 > /tmp/done
    (
        k=0
        while [ ! -e /tmp/stop ]; do
            k=$((k + 1))
            if [ $((k % 4)) = 0 ]; then m=hs2; d=/dev/mapper/hs2; else m=origin; d=/dev/mapper/ho; fi
            echo $m > /tmp/cur
            $ORACLE write $m $d --count 1 --max 32 --seed $((r * 1000 + k)) --prev $m.prev --intent $m.intent || exit 0
            echo $k > /tmp/done
        done
    ) > /dev/null 2>&1 &
    load=$!
    sleep 0.$((RANDOM % 9 + 1))$((RANDOM % 10))
    sleep $((RANDOM % 2))
    touch /tmp/stop; before=$(cat /tmp/done)                     # steps acknowledged before the cut
    swap "0 $SZ flakey /dev/vda 0 0 3600 1 drop_writes"          # the power cut
    wait $load 2>/dev/null
    after=$(cat /tmp/done)
    down                                                          # still dropping
    swap "0 $SZ linear /dev/vda 0"                                # power back
    if $SHSNAP check /dev/mapper/pw > /tmp/check.out 2>&1; then :; else fail "round $r: shsnap check"; cat /tmp/check.out; lost=$((lost + 1)); break; fi
    up || { fail "round $r: reload after the cut"; break; }
    ok=1
    if [ "$after" = "$before" ]; then
        # No step was in flight: every acknowledged write must be there, exactly.
        $ORACLE verify origin /dev/mapper/ho || ok=0
        $ORACLE verify hs2 /dev/mapper/hs2 || ok=0
    else
        # One step was in flight at the cut: each of its blocks holds the old or the new
        # version; the other device must be exact.
        cur=$(cat /tmp/cur)
        for m in origin hs2; do
            d=/dev/mapper/ho; [ $m = hs2 ] && d=/dev/mapper/hs2
            if [ $m = $cur ]; then
                $ORACLE verify $m.prev $d --alt $m.intent || ok=0
                $ORACLE save $m.prev $m
            else
                $ORACLE verify $m $d || ok=0
            fi
        done
    fi
    $ORACLE verify hs1 /dev/mapper/hs1 || ok=0
    echo "  round $r: $before steps acknowledged before the cut, $([ "$after" = "$before" ] && echo none || echo one) in flight: $([ $ok = 1 ] && echo intact || echo WRONG)"
    if [ $ok = 1 ]; then survived=$((survived + 1)); else lost=$((lost + 1)); dmesg | tail -5; fi
    # The disk is the truth now: each block is the old or the new version; adopt it.
    if [ "$after" != "$before" ]; then
        cur=$(cat /tmp/cur); d=/dev/mapper/ho; [ $cur = hs2 ] && d=/dev/mapper/hs2
        $ORACLE adopt $cur $d $cur.intent || ok=0
    fi
    down
    [ $ok = 1 ] || break
done
echo "  power cuts: $survived survived, $lost with wrong data or a failed check"
check "$ROUNDS power cuts survived with every acknowledged write and every snapshot intact" test $survived = $ROUNDS
check "module unloads" rmmod dm_shared_snap
check_dmesg
finish
