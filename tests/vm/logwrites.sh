#!/bin/bash
# Replayed-log test (the xfstests dm-log-writes method): origin and COW device are carved
# by two linear targets from ONE dm-log-writes device, so writes, flushes and FUAs to both
# land in one ordered log.  A workload with an oracle (origin writes, snapshot writes,
# creates, deletes, a flush and a mark after each step) runs; then the log is replayed with
# `shsnap replay-log` to every mark and to flush/FUA entries between them; at each point
# the replayed disk is checked (shsnap check) and the target is loaded on a throwaway
# dm-snapshot of it and verified: at a mark, exactly the model of that step; at a flush
# between marks, each block old or new, and no snapshot half-created or half-deleted.
#   FLUSH_POINTS=n: flush points checked between marks (default 12; EXTENDED=1: all)
. "$(dirname "$0")/lib.sh"
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
STEPS=${STEPS:-12}
FLUSH_POINTS=${FLUSH_POINTS:-12}
LEN=65536        # 32 MiB origin
COWLEN=131072    # 64 MiB COW
setup_guest
fsync_dev() { python3 -c "import os; fd = os.open('$1', os.O_RDONLY); os.fsync(fd)"; }

section "workload on dm-log-writes"
dd if=/dev/zero of=/dev/vdb bs=1M count=1 oflag=direct status=none
check "log-writes device" dmsetup create lw --table "0 $((LEN + COWLEN)) log-writes /dev/vda /dev/vdb"
dmsetup create lo --table "0 $LEN linear /dev/mapper/lw 0"
dmsetup create lc --table "0 $COWLEN linear /dev/mapper/lw $LEN"
mapper_nodes
dmsetup message lw 0 mark start
check "origin on the logged devices" dmsetup create ho --table "0 $LEN shared-origin /dev/mapper/lo /dev/mapper/lc 16"
mapper_nodes
$ORACLE init origin $((LEN / 8))
ok=1
for k in $(seq 1 $STEPS); do
    case $((k % 4)) in
        1) dmsetup message ho 0 create $k && $ORACLE save origin s$k && $ORACLE save origin c$k ;;
        3) old=$((k - 2)); [ $old -gt 4 ] && dmsetup message ho 0 delete $((old - 4)) && $ORACLE drop s$((old - 4)) ;;
    esac
    $ORACLE write origin /dev/mapper/ho --count 6 --max 32 --disjoint --seed $k || ok=0
    # a write to the newest snapshot through its own device
    last=$(( (k - 1) / 4 * 4 + 1 ))
    if dmsetup create hsw --table "0 $LEN shared-snapshot $(odev ho) $last" 2>/dev/null; then
        mapper_nodes
        $ORACLE write s$last /dev/mapper/hsw --count 2 --max 16 --disjoint --seed $((k + 500)) || ok=0
        fsync_dev /dev/mapper/hsw
        dmsetup remove hsw
    fi
    fsync_dev /dev/mapper/ho
    # model of everything acknowledged and flushed so far
    $ORACLE save origin m$k.origin
    for s in $(dmsetup message ho 0 list); do $ORACLE save s$s m$k.s$s; done
    dmsetup message ho 0 list > /tmp/oracle/m$k.list
    dmsetup message lw 0 mark m$k
done
check "workload steps" test $ok = 1
dmsetup remove ho; dmsetup remove lo; dmsetup remove lc; dmsetup remove lw

section "replay the log to every mark and to flush points between them"
$SHSNAP replay-log /dev/vdb --list > /tmp/log.list
echo "  log: $(wc -l < /tmp/log.list) entries, $(grep -c ' mark ' /tmp/log.list) marks, $(grep -cE ' (flush|fua|flush,fua) ' /tmp/log.list) flush/FUA entries"
# checkpoints: "<entry> <mark-name or -> <previous mark step>"
awk '$2 == "mark" && ($5 == "start" || $5 ~ /^m[0-9]+$/) { print $1, $5 }' /tmp/log.list > /tmp/marks
awk '$2 ~ /flush|fua/ { print $1 }' /tmp/log.list > /tmp/flushes
nfl=$(wc -l < /tmp/flushes)
stride=$(( nfl / FLUSH_POINTS + 1 )); [ "${EXTENDED:-0}" = 1 ] && stride=1
{ awk '{print $1, $2}' /tmp/marks; awk -v s=$stride 'NR % s == 0 { print $1, "-" }' /tmp/flushes; } | sort -n > /tmp/points
dd if=/dev/zero of=/dev/vdc bs=1M count=$(( (LEN + COWLEN) / 2048 )) oflag=direct status=none
pos=0; cur=""; points=0; bad=0; marks_ok=0; flush_ok=0
while read -r entry name; do
    $SHSNAP replay-log /dev/vdb --target /dev/vdc --from $pos --to $entry 2>/dev/null || { fail "replay to $entry"; break; }
    pos=$((entry + 1))
    [ "$name" != "-" ] && [ "$name" != start ] && cur=$name
    [ "$name" = start ] && continue
    formatted=$(dd if=/dev/vdc bs=4096 skip=$((LEN / 8)) count=1 status=none | od -An -tx1 | tr -d ' \n' | grep -qv '^0*$' && echo y || echo n)
    [ $formatted = n ] && continue       # before the store was formatted: nothing to check
    points=$((points + 1))
    dd if=/dev/zero of=/dev/vdd bs=1M count=1 oflag=direct status=none
    dmsetup create rs --table "0 $((LEN + COWLEN)) snapshot /dev/vdc /dev/vdd N 8"
    dmsetup create rlo --table "0 $LEN linear /dev/mapper/rs 0"
    dmsetup create rlc --table "0 $COWLEN linear /dev/mapper/rs $LEN"
    mapper_nodes
    pt_ok=1
    $SHSNAP check /dev/mapper/rlc > /tmp/chk 2>&1 || { pt_ok=0; echo "  entry $entry: shsnap check failed"; cat /tmp/chk | head -5; }
    if dmsetup create rho --table "0 $LEN shared-origin /dev/mapper/rlo /dev/mapper/rlc 16" 2>/tmp/load.err; then
        mapper_nodes
        ids=$(dmsetup message rho 0 list)
        if [ "$name" != "-" ]; then
            step=${name#m}
            [ "$ids" = "$(cat /tmp/oracle/m$step.list)" ] || { pt_ok=0; echo "  $name: snapshots [$ids], expected [$(cat /tmp/oracle/m$step.list)]"; }
            $ORACLE verify m$step.origin /dev/mapper/rlo >/dev/null || { pt_ok=0; echo "  $name: origin differs"; }
            for s in $ids; do
                dmsetup create rhs --table "0 $LEN shared-snapshot $(odev rho) $s" && mapper_nodes
                $ORACLE verify m$step.s$s /dev/mapper/rhs >/dev/null 2>&1 || { pt_ok=0; echo "  $name: snapshot $s differs"; }
                dmsetup remove rhs
            done
            [ $pt_ok = 1 ] && marks_ok=$((marks_ok + 1))
        else
            # between marks (after ${cur:-start}): state of the previous mark or the next one,
            # block by block; every snapshot either fully there or not at all.
            pstep=${cur#m}; [ -z "$cur" ] && pstep=0; nstep=$((pstep + 1))
            [ -e /tmp/oracle/m$nstep.origin ] || nstep=$pstep
            if [ $pstep -gt 0 ]; then
                $ORACLE verify m$pstep.origin /dev/mapper/rlo --alt m$nstep.origin >/dev/null 2>&1 || { pt_ok=0; echo "  entry $entry: origin neither m$pstep nor m$nstep"; }
            fi
            for s in $ids; do
                dmsetup create rhs --table "0 $LEN shared-snapshot $(odev rho) $s" && mapper_nodes
                # before: its state at the previous mark, or at its creation if created since
                ref=m$pstep.s$s; [ -e /tmp/oracle/$ref ] || ref=c$s
                alt=m$nstep.s$s; [ -e /tmp/oracle/$alt ] || alt=$ref
                [ -e /tmp/oracle/$ref ] && { $ORACLE verify $ref /dev/mapper/rhs --alt $alt >/dev/null 2>&1 || { pt_ok=0; echo "  entry $entry: snapshot $s neither m$pstep nor m$nstep"; }; }
                dmsetup remove rhs
            done
            [ $pt_ok = 1 ] && flush_ok=$((flush_ok + 1))
        fi
        dmsetup remove rho
    else
        pt_ok=0; echo "  entry $entry: load failed: $(cat /tmp/load.err)"
    fi
    dmsetup remove rlc; dmsetup remove rlo; dmsetup remove rs
    [ $pt_ok = 1 ] || bad=$((bad + 1))
done < /tmp/points
echo "  replayed to $points points: $marks_ok marks and $flush_ok flush points verified, $bad wrong"
check "every replayed point is consistent and holds every acknowledged write" test $bad = 0 -a $points -gt 0
check "every mark verified exactly" test $marks_ok -ge $((STEPS - 1))

# Whole-chunk writes to a snapshot whose chunks are still shared with the origin: each one
# maps a new COW chunk with a FUA commit before its own data is flushed.  Replayed to every
# flush/FUA entry, the snapshot must read, chunk by chunk, its data before or after the
# write: never the new chunk's earlier content (zeros here).
section "whole-chunk snapshot writes, replayed at every flush"
WLEN=4096 WCOW=8192
dd if=/dev/zero of=/dev/vdb bs=1M count=1 oflag=direct status=none
dmsetup create lw --table "0 $((WLEN + WCOW)) log-writes /dev/vda /dev/vdb"
dmsetup create lo --table "0 $WLEN linear /dev/mapper/lw 0"
dmsetup create lc --table "0 $WCOW linear /dev/mapper/lw $WLEN"
mapper_nodes
dmsetup message lw 0 mark start
dd if=/dev/zero of=/dev/mapper/lc bs=4096 count=1 oflag=direct status=none
dmsetup create ho --table "0 $WLEN shared-origin /dev/mapper/lo /dev/mapper/lc 16" && mapper_nodes
$ORACLE init w.origin $((WLEN / 8))
ok=1
$ORACLE write w.origin /dev/mapper/ho --count $((WLEN / 512)) --max 64 --align 64 --disjoint --seed 7 || ok=0
dmsetup message ho 0 create 1 && $ORACLE save w.origin w.s1 || ok=0
dmsetup create hsw --table "0 $WLEN shared-snapshot $(odev ho) 1" && mapper_nodes || ok=0
fsync_dev /dev/mapper/ho
dmsetup message lw 0 mark before
$ORACLE write w.s1 /dev/mapper/hsw --count 16 --max 2 --align 2 --disjoint --seed 8 --prev w.before || ok=0
fsync_dev /dev/mapper/hsw
dmsetup message lw 0 mark after
dmsetup remove hsw; dmsetup remove ho; dmsetup remove lo; dmsetup remove lc; dmsetup remove lw
check "workload of whole-chunk snapshot writes" test $ok = 1
$SHSNAP replay-log /dev/vdb --list > /tmp/log.list
before=$(awk '$2 == "mark" && $5 == "before" { print $1 }' /tmp/log.list)
awk -v b="$before" '$1 > b && $2 ~ /flush|fua/ { print $1 }' /tmp/log.list > /tmp/points
awk '$2 == "mark" && $5 == "after" { print $1 }' /tmp/log.list >> /tmp/points
dd if=/dev/zero of=/dev/vdc bs=1M count=$(( (WLEN + WCOW) / 2048 )) oflag=direct status=none
pos=0 points=0 bad=0
while read -r entry; do
    $SHSNAP replay-log /dev/vdb --target /dev/vdc --from $pos --to $entry 2>/dev/null || { bad=$((bad + 1)); break; }
    pos=$((entry + 1)) points=$((points + 1))
    dd if=/dev/zero of=/dev/vdd bs=1M count=1 oflag=direct status=none
    dmsetup create rs --table "0 $((WLEN + WCOW)) snapshot /dev/vdc /dev/vdd N 8"
    dmsetup create rlo --table "0 $WLEN linear /dev/mapper/rs 0"
    dmsetup create rlc --table "0 $WCOW linear /dev/mapper/rs $WLEN"
    dmsetup create rho --table "0 $WLEN shared-origin /dev/mapper/rlo /dev/mapper/rlc 16"
    dmsetup create rhs --table "0 $WLEN shared-snapshot $(odev rho) 1"
    mapper_nodes
    if ! $ORACLE verify w.origin /dev/mapper/rlo >/dev/null 2>&1; then
        bad=$((bad + 1)); echo "  entry $entry: origin differs"
    elif ! $ORACLE verify w.before /dev/mapper/rhs --alt w.s1 > /tmp/verify.out 2>&1; then
        bad=$((bad + 1)); echo "  entry $entry: snapshot 1 neither before nor after: $(head -2 /tmp/verify.out)"
    fi
    for d in rhs rho rlc rlo rs; do dmsetup remove $d; done
done < /tmp/points
echo "  replayed to $points points after the snapshot was created, $bad wrong"
check "a snapshot chunk is old or new at every flush, never stale" test $bad = 0 -a $points -ge 16
check "module unloads" rmmod dm_shared_snap
check_dmesg
finish
