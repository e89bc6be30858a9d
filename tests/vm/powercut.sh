#!/bin/bash
# Power cuts under load, with I/O in flight.  The origin and the COW device sit on ONE
# dm-flakey device (so that both lose power at the same instant): carved from one disk, or
# (every other round) from two disks joined by dm-linear, so that origin and COW are on
# separate devices.  Each round loads the flakey table with an "up" time of 1-3 s: at that
# instant, by the kernel's clock and with nothing suspended, every later write is
# acknowledged and lost (drop_writes).  Meanwhile one loader runs steps: oracle writes to
# the origin and to writable snapshot 2, and creates and deletes of snapshot 3.  Each step
# records its start and end time; a step that ended before the cut must be intact, one that
# started after it must have left no trace, the one in flight may show old or new data per
# block (or, for a create or delete, either outcome).  Then the devices are torn down while
# still dropping, power comes back, the store is reopened (journal replay) and checked, and
# every device is verified against the oracle.  Each cut is one check.
#   ROUNDS=n (default 10; EXTENDED=1: 100)
. "$(dirname "$0")/lib.sh"
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
if [ "${EXTENDED:-0}" = 1 ]; then ROUNDS=${ROUNDS:-100}; else ROUNDS=${ROUNDS:-10}; fi
LEN=65536          # 32 MiB origin
COWLEN=131072      # 64 MiB COW
SEED=${SEED:-$RANDOM}
echo "  seed $SEED (SEED=$SEED replays the cut times)"
RANDOM=$SEED
setup_guest
SZ=$(blockdev --getsz /dev/vda)
now() { date +%s.%N; }
swap() { dmsetup suspend --nolockfs pc && dmsetup load pc --table "$1" && dmsetup resume pc; }
# pbase: one disk, or the first LEN sectors of vda followed by vdb (origin and COW apart).
base_table() {
    if [ "$1" = one ]; then echo "0 $SZ linear /dev/vda 0"
    else printf '0 %s linear /dev/vda 0\n%s %s linear /dev/vdb 0\n' $LEN $LEN $COWLEN; fi
}
BSZ=$((LEN + COWLEN))
dmsetup create pbase --table "$(base_table one)"
dmsetup create pc --table "0 $BSZ linear /dev/mapper/pbase 0"
dmsetup create po --table "0 $LEN linear /dev/mapper/pc 0"
dmsetup create pw --table "0 $COWLEN linear /dev/mapper/pc $LEN"
mapper_nodes
layout() { # one|two: the same origin and COW contents on the other layout
    [ "$1" = "$LAYOUT" ] && return 0
    dd if=/dev/mapper/pc of=/tmp/pc.img bs=1M status=none || return 1
    for d in pw po pc; do dmsetup suspend $d; done
    dmsetup load pbase --table "$(base_table $1)" && dmsetup suspend pbase && dmsetup resume pbase || return 1
    for d in pc po pw; do dmsetup resume $d; done
    dd if=/tmp/pc.img of=/dev/mapper/pc bs=1M oflag=direct status=none || return 1
    LAYOUT=$1
}
LAYOUT=one
dd if=/dev/zero of=/dev/mapper/pc bs=1M count=$((BSZ / 2048)) oflag=direct status=none
up() {
    dmsetup create ho --table "0 $LEN shared-origin /dev/mapper/po /dev/mapper/pw 16" || return 1
    for i in 1 2; do dmsetup create hs$i --table "0 $LEN shared-snapshot $(odev ho) $i" || return 1; done
    mapper_nodes
}
down() { for d in hs3 hs1 hs2 ho; do timeout 60 dmsetup remove $d >/dev/null 2>&1 || dmsetup remove --force $d >/dev/null 2>&1; done; true; }
dev_of() { case $1 in origin) echo /dev/mapper/ho ;; *) echo /dev/mapper/$1 ;; esac; }

# The models as they were before step FIRST: a step saves, before it runs, only what it
# changes (<model>.before.<k>; hs3.absent.<k> where snapshot 3 did not exist), so the state
# of a model before FIRST is the copy saved by the first later step that changed it, or
# the model as it is if none did.  Leaves them as <model>.try (hs3.try absent: no snapshot 3).
state_before() {
    local first=$1 m j
    for m in origin hs2; do
        j=$(awk -v f=$first -v m=$m '$1 >= f && $2 == m {print $1; exit}' /tmp/steps)
        if [ -n "$j" ]; then $ORACLE save $m.before.$j $m.try; else $ORACLE save $m $m.try; fi
    done
    $ORACLE drop hs3.try 2>/dev/null
    j=$(awk -v f=$first '$1 >= f && ($2 == "create" || $2 == "delete") {print $1; exit}' /tmp/steps)
    if [ -n "$j" ]; then
        [ -e /tmp/oracle/hs3.before.$j ] && $ORACLE save hs3.before.$j hs3.try
    elif [ -e /tmp/oracle/hs3 ]; then
        $ORACLE save hs3 hs3.try
    fi
    true
}

# verify_from FIRST [K]: the devices must show the models as they were before step FIRST
# (every earlier step durable, every later one lost), except that step K (= FIRST), if
# given, was in flight: old or new data per block, or either outcome of a create/delete.
# On success the models are made what the devices show.
verify_from() {
    local first=$1 k=${2:-} kind="" m has3 exp3
    [ -n "$k" ] && kind=$(awk -v k=$k '$1 == k {print $2}' /tmp/steps)
    state_before $first
    has3=$(echo " $(dmsetup message ho 0 list) " | grep -q ' 3 ' && echo 1 || echo 0)
    exp3=$([ -e /tmp/oracle/hs3.try ] && echo 1 || echo 0)
    case "$kind" in create|delete) exp3=$has3 ;; esac
    [ "$has3" = "$exp3" ] || return 1
    if [ "$has3" = 1 ]; then
        # Created by the step in flight: what the origin held then.
        [ -e /tmp/oracle/hs3.try ] || $ORACLE save origin.try hs3.try
        dmsetup remove hs3 >/dev/null 2>&1
        dmsetup create hs3 --table "0 $LEN shared-snapshot $(odev ho) 3" && mapper_nodes || return 1
        $ORACLE verify hs3.try /dev/mapper/hs3 || return 1
    fi
    for m in origin hs2; do
        if [ "$kind" = $m ]; then
            $ORACLE verify $m.try $(dev_of $m) --alt $m.intent.$k || return 1
        else
            $ORACLE verify $m.try $(dev_of $m) || return 1
        fi
    done
    $ORACLE verify hs1 /dev/mapper/hs1 || return 1
    # This hypothesis holds: the devices are the truth now.
    for m in origin hs2; do
        $ORACLE save $m.try $m
        [ "$kind" = $m ] && { $ORACLE adopt $m $(dev_of $m) $m.intent.$k || return 1; }
    done
    $ORACLE drop hs3 2>/dev/null
    [ "$has3" = 1 ] && $ORACLE save hs3.try hs3
    return 0
}

check "create origin and two snapshots" sh -c "dmsetup create ho --table '0 $LEN shared-origin /dev/mapper/po /dev/mapper/pw 16' && dmsetup message ho 0 create 1 && dmsetup message ho 0 create 2 && dmsetup remove ho"
$ORACLE init origin $((LEN / 8)); $ORACLE clone origin hs1; $ORACLE clone origin hs2
snap3=0 # whether snapshot 3 exists (its model is hs3)
for r in $(seq 1 $ROUNDS); do
    [ $((r % 2)) = 1 ] && want=one || want=two
    layout $want || { fail "round $r: switching to $want device(s)"; continue; }
    up || { fail "round $r: activation"; break; }
    # The loader.  Step k saves what it is about to change (see state_before), then
    # records "k kind start end" once it has returned.
    rm -f /tmp/stop /tmp/steps; touch /tmp/steps
    (
        k=0; s3=$snap3
        while [ ! -e /tmp/stop ]; do
            k=$((k + 1))
            if [ $((k % 7)) = 0 ]; then
                if [ $s3 = 0 ]; then
                    kind=create; t0=$(now)
                    dmsetup message ho 0 create 3 || exit 0
                    t1=$(now); s3=1
                    $ORACLE clone origin hs3
                else
                    kind=delete; $ORACLE save hs3 hs3.before.$k; t0=$(now)
                    dmsetup message ho 0 delete 3 || exit 0
                    t1=$(now); s3=0
                    $ORACLE drop hs3
                fi
            else
                if [ $((k % 4)) = 0 ]; then kind=hs2; else kind=origin; fi
                t0=$(now)
                $ORACLE write $kind $(dev_of $kind) --count 1 --max 32 --seed $((SEED * 100000 + r * 1000 + k)) --prev $kind.before.$k --intent $kind.intent.$k || exit 0
                t1=$(now)
            fi
            echo "$k $kind $t0 $t1" >> /tmp/steps
        done
    ) > /dev/null 2>&1 &
    load=$!
    sleep 0.5
    # The cut: U seconds after the flakey table is constructed (by the kernel's clock, with
    # the loader running), every write is dropped.  The swap itself suspends pc for a moment;
    # the cut comes later, with nothing suspended.
    U=$((RANDOM % 3 + 1))
    dmsetup suspend --nolockfs pc
    ta=$(now)
    dmsetup load pc --table "0 $BSZ flakey /dev/mapper/pbase 0 $U 3600 1 drop_writes"
    tb=$(now)
    dmsetup resume pc
    cut_a=$(echo "$ta + $U" | bc); cut_b=$(echo "$tb + $U" | bc)
    # Run until a second past the cut, then tear down while still dropping.
    while [ "$(echo "$(now) < $cut_b + 1" | bc)" = 1 ]; do sleep 0.2; done
    touch /tmp/stop; wait $load 2>/dev/null
    down
    swap "0 $BSZ linear /dev/mapper/pbase 0"                      # power back
    if ! $SHSNAP check /dev/mapper/pw > /tmp/check.out 2>&1; then fail "round $r: shsnap check"; cat /tmp/check.out; break; fi
    # Steps: durable (ended before the cut), in flight (overlapping it), lost (after it).
    # The cut instant is known within [cut_a, cut_b] (the time the table load took): each
    # step overlapping that window may be the one in flight, or the cut fell just after it.
    nsteps=$(wc -l < /tmp/steps)
    hyps=""; lastk=0; next=""
    while read -r k kind t0 t1; do
        lastk=$k
        if [ "$(echo "$t1 < $cut_a" | bc)" = 1 ]; then continue; fi
        if [ "$(echo "$t0 <= $cut_b" | bc)" = 1 ]; then hyps="$hyps $k:$k"; else next=$k; break; fi
    done < /tmp/steps
    hyps="$hyps ${next:-$((lastk + 1))}:"
    up || { fail "round $r: reactivation after the cut"; break; }
    ok=0; first=${hyps# }; first=${first%%:*}; kinf=""
    for h in $hyps; do
        if verify_from "${h%:*}" "${h#*:}"; then ok=1; first=${h%:*}; kinf=${h#*:}; break; fi
    done
    how=$([ -n "${kinf:-}" ] && echo "step $kinf ($(awk -v k=$kinf '$1 == k {print $2}' /tmp/steps)) in flight" || echo "none in flight")
    check "cut $r ($LAYOUT device$([ $LAYOUT = two ] && echo s), after ${U}s): $((first - 1)) of $nsteps steps durable, $how: every durable step intact, nothing later visible" test $ok = 1
    snap3=$(echo " $(dmsetup message ho 0 list) " | grep -q ' 3 ' && echo 1 || echo 0)
    [ $ok = 1 ] || dmesg | tail -5
    down
    rm -f /tmp/oracle/*.before.* /tmp/oracle/*.intent.* /tmp/oracle/*.try
    [ $ok = 1 ] || break
done
check "module unloads" rmmod dm_shared_snap
check_dmesg
finish
