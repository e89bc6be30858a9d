#!/bin/bash
# Benchmark body, run inside the VM by scripts/bench.  Prints CSV lines
#   csv,<backing>,<target>,<nsnap>,<workload>,<rep>,<MB/s>
# Targets: raw, linear (dm-linear over the origin: what any dm target costs here), shared
# (dm-shared-snap), snapshot (dm-snapshot, one COW per snapshot), thin (dm-thin pool, thin
# volume, thin snapshots).  Same chunk/block size for all.  shared_prev: dm-shared-snap
# built from an earlier revision (PREV_MODULE=<path of its .ko>, set by `PREV=<rev>
# scripts/bench`), measured exactly as `shared`, its module swapped in for its points.
. "$(dirname "$0")/../vm/lib.sh"
set +u
# Region written per point.  Big enough that fio's millisecond clock does not quantise the
# result (16 MiB at 1 GB/s is 16 ms: 1000, 941, 889 ... MB/s were the only values seen).
REGION_MB_RAM=${REGION_MB_RAM:-${REGION_MB:-128}}
REGION_MB_VIRTIO=${REGION_MB_VIRTIO:-${REGION_MB:-64}}
REGION_MB_LOOP=${REGION_MB_LOOP:-${REGION_MB:-64}}
# Random 4 KiB writes: this many MiB at random offsets over the region (each block at most
# once), so that a slow random point does not take minutes.
RAND_MB=${RAND_MB:-16}
CHUNK=${CHUNK:-128}                  # sectors (64 KiB: dm-thin's minimum block)
NS=${NS:-"0 1 2 4 8 16 32 64"}
SNAP_MAX=${SNAP_MAX:-16}             # dm-snapshot: one COW each, gets slow fast
REPS=${REPS:-3}
PREV_MODULE=${PREV_MODULE:-}
TARGETS=${TARGETS:-"raw linear shared${PREV_MODULE:+ shared_prev} snapshot thin"}
WORKLOADS=${WORKLOADS:-"seq rand qd32"}
BACKINGS=${BACKINGS:-"ram virtio loop"}
setup_guest

fio_bw() { # fio args... -> MB/s
    # One aggregate over all jobs: bytes of every job over the longest runtime.
    fio --direct=1 --output-format=json --group_reporting --size=${REGION_MB}M "$@" 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
print("%.1f" % ((j["write"]["bw"] + j["read"]["bw"]) / 1024.0))'
}

teardown() {
    dmsetup remove_all --force >/dev/null 2>&1
    dmsetup remove_all >/dev/null 2>&1
}

# use_module <path>: the dm-shared-snap module loaded for the next points.
LOADED=$MODULE
use_module() {
    [ "$1" = "$LOADED" ] && return 0
    teardown
    rmmod dm_shared_snap || { echo "rmmod failed"; exit 1; }
    insmod "$1" || { echo "insmod $1 failed"; exit 1; }
    LOADED=$1
}

# Sectors of one dm-snapshot COW: a copy of the region plus its exception area (1/256 of
# the data at 4 KiB chunks, less at 64 KiB) and the header.
cow_sectors() { echo $(( R + R / 8 + 4096 )); }

# setup <target> <n>: prefilled origin with n snapshots; sets DEV.
setup() {
    local t=$1 n=$2 i
    teardown
    dd if=/dev/zero of=$B bs=4k count=1 oflag=direct status=none
    case $t in
        raw)
            DEV=$A ;;
        linear)
            dmsetup create bo --table "0 $R linear $A 0" || return 1
            DEV=/dev/mapper/bo ;;
        shared|shared_prev)
            dmsetup create bo --table "0 $R shared-origin $A $B $CHUNK" || return 1
            DEV=/dev/mapper/bo ;;
        snapshot)
            local cs=$(cow_sectors)
            for i in $(seq 1 $n); do
                dmsetup create bc$i --table "0 $cs linear $B $(( (i - 1) * cs ))" || return 1
                dd if=/dev/zero of=/dev/mapper/bc$i bs=4k count=1 oflag=direct status=none
            done
            dmsetup create bo --table "0 $R snapshot-origin $A" || return 1
            DEV=/dev/mapper/bo ;;
        thin)
            dmsetup create btm --table "0 32768 linear $B 0" || return 1
            dd if=/dev/zero of=/dev/mapper/btm bs=4k count=1 oflag=direct status=none
            local ds=$(( BSZ - 32768 ))
            dmsetup create btd --table "0 $ds linear $B 32768" || return 1
            dmsetup create bp --table "0 $ds thin-pool /dev/mapper/btm /dev/mapper/btd $CHUNK 0 1 skip_block_zeroing" || return 1
            dmsetup message bp 0 "create_thin 0" || return 1
            dmsetup create bo --table "0 $R thin /dev/mapper/bp 0" || return 1
            DEV=/dev/mapper/bo ;;
    esac
    mapper_nodes
    # Prefill the region (so that writes after the snapshots break sharing).
    dd if=/tmp/fill of=$DEV bs=1M count=$REGION_MB oflag=direct status=none || return 1
    for i in $(seq 1 $n); do
        case $t in
            shared|shared_prev) dmsetup message bo 0 create $i ;;
            snapshot)
                dmsetup suspend bo
                dmsetup create bs$i --table "0 $R snapshot $A /dev/mapper/bc$i P $CHUNK"
                dmsetup resume bo ;;
            thin)
                dmsetup suspend bo
                dmsetup message bp 0 "create_snap $i 0"
                dmsetup resume bo ;;
        esac || return 1
    done
    return 0
}

emit() { echo "csv,$BACKING,$1,$2,$3,$4,$5"; }

# The worker's counters after a shared-snapshot point: where its time went.
stats() { [ $1 = shared -o $1 = shared_prev ] && echo "stats $BACKING $1 N=$2 $3: $(dmsetup message bo 0 stats)"; true; }
# ... and before it, after the point's setup: the summary subtracts these (format, creates).
stats0() { [ $1 = shared -o $1 = shared_prev ] && echo "stats0 $BACKING $1 N=$2 $3: $(dmsetup message bo 0 stats)"; true; }

# PERF=1: every first-write point runs under `perf record -a` (cpu-clock: TCG has no PMU)
# and its top symbols are printed as `perf <backing> <target> N=<n> <workload>: ...` lines.
PERF=${PERF:-0}
perf_start() {
    [ "$PERF" = 1 ] || return 0
    perf record -a -g -e cpu-clock -F 2000 -o /tmp/perf.data >/dev/null 2>&1 &
    PERF_PID=$!
    sleep 1
}
perf_stop() { # target n workload
    [ "$PERF" = 1 ] || return 0
    kill -INT $PERF_PID; wait $PERF_PID 2>/dev/null
    perf report -i /tmp/perf.data --kallsyms=/proc/kallsyms --stdio --no-children -g none \
        --sort sym --percent-limit 0.7 2>/dev/null | grep -v '^#' | grep -v '^$' | head -45 |
        sed "s/^/perf $BACKING $1 N=$2 $3: /"
    rm -f /tmp/perf.data
}

run_point() { # target n rep
    local t=$1 n=$2 rep=$3 bw
    if [ $t = shared_prev ]; then use_module "$PREV_MODULE"; else use_module "$MODULE"; fi
    for w in $WORKLOADS; do
        setup $t $n || { echo "setup $t $n failed"; return 1; }
        case $w in
            seq)
                stats0 $t $n seq_first
                perf_start
                emit $t $n seq_first $rep "$(fio_bw --name=s --filename=$DEV --rw=write --bs=1M --ioengine=psync)"
                perf_stop $t $n seq_first
                stats $t $n seq_first
                emit $t $n seq_over $rep "$(fio_bw --name=s --filename=$DEV --rw=write --bs=1M --ioengine=psync)" ;;
            rand)
                # The same seed twice: the second pass writes exactly the blocks of the first.
                stats0 $t $n rand_first
                perf_start
                emit $t $n rand_first $rep "$(fio_bw --name=r --filename=$DEV --rw=randwrite --bs=4k --ioengine=psync --io_size=${RAND_MB}M --randseed=$rep)"
                perf_stop $t $n rand_first
                stats $t $n rand_first
                emit $t $n rand_over $rep "$(fio_bw --name=r --filename=$DEV --rw=randwrite --bs=4k --ioengine=psync --io_size=${RAND_MB}M --randseed=$rep)"
                emit $t $n read_after_rand $rep "$(fio_bw --name=q --filename=$DEV --rw=read --bs=1M --ioengine=psync)" ;;
            qd32)
                stats0 $t $n qd32_seq_first
                emit $t $n qd32_seq_first $rep "$(fio_bw --name=p --filename=$DEV --rw=write --bs=1M --ioengine=libaio --iodepth=32 --numjobs=4 --size=$((REGION_MB / 4))M --offset_increment=$((REGION_MB / 4))M)"
                stats $t $n qd32_seq_first
                setup $t $n || return 1
                stats0 $t $n qd32_rand_first
                emit $t $n qd32_rand_first $rep "$(fio_bw --name=p --filename=$DEV --rw=randwrite --bs=4k --ioengine=libaio --iodepth=32 --numjobs=4 --size=$((REGION_MB / 4))M --io_size=$((RAND_MB / 4))M --offset_increment=$((REGION_MB / 4))M)"
                stats $t $n qd32_rand_first ;;
        esac
    done
}

# Loop devices over files on a tmpfs: what many test setups and small deployments use.
LOOPFS=/tmp/bench-loop
loop_up() {
    local cow_mb=$(( ($(cow_sectors) * SNAP_MAX + 2047) / 2048 + 64 ))
    mkdir -p $LOOPFS
    mount -t tmpfs -o size=$((REGION_MB + cow_mb + 64))M bench-loop $LOOPFS || return 1
    truncate -s ${REGION_MB}M $LOOPFS/origin && truncate -s ${cow_mb}M $LOOPFS/cow || return 1
    A=$(losetup -f --show $LOOPFS/origin) && B=$(losetup -f --show $LOOPFS/cow)
}
loop_down() {
    teardown
    losetup -D
    umount $LOOPFS 2>/dev/null || true
}
# Gives the RAM disks' pages back (brd frees discarded pages) before the next backing.
ram_down() { teardown; blkdiscard /dev/ram0 2>/dev/null; blkdiscard /dev/ram1 2>/dev/null; true; }

for BACKING in $BACKINGS; do
    case $BACKING in
        ram) A=/dev/ram0; B=/dev/ram1; REGION_MB=$REGION_MB_RAM ;;
        virtio) A=/dev/vda; B=/dev/vdb; REGION_MB=$REGION_MB_VIRTIO ;;
        loop) REGION_MB=$REGION_MB_LOOP; R=$((REGION_MB * 2048)); loop_up || { echo "loop backing setup failed"; exit 1; } ;;
        *) echo "unknown backing $BACKING"; exit 1 ;;
    esac
    R=$((REGION_MB * 2048))          # sectors
    BSZ=$(blockdev --getsz $B)
    need=$(( SNAP_MAX * $(cow_sectors) ))
    [ $BSZ -ge $need ] || { echo "COW device $B too small for $SNAP_MAX dm-snapshot COWs of $REGION_MB MiB"; exit 1; }
    dd if=/dev/urandom of=/tmp/fill bs=1M count=$REGION_MB status=none
    # Touch every block of the COW/pool device once, so that no target pays for the RAM
    # disk allocating pages (or the sparse file growing) during a measurement.
    dd if=/dev/zero of=$B bs=1M count=$((BSZ / 2048)) oflag=direct status=none
    echo "started $(date +%T)"
    echo "backing $BACKING: origin $A, COW/pool $B ($((BSZ / 2048)) MiB), region $REGION_MB MiB, chunk $CHUNK sectors"
    for rep in $(seq 1 $REPS); do
        # Every other repeat runs the targets in reverse order, so that no target always
        # follows the same one (module swaps, the RAM disk's state).
        ts=$TARGETS
        [ $((rep % 2)) = 0 ] && ts=$(echo $TARGETS | tr ' ' '\n' | tac | tr '\n' ' ')
        for t in $ts; do
            for n in $NS; do
                [ $t = raw -o $t = linear ] && [ $n != 0 ] && continue
                [ $t = snapshot ] && [ $n -gt $SNAP_MAX ] && continue
                [ $t = snapshot ] && [ $n = 0 ] && continue
                run_point $t $n $rep
            done
        done
    done
    echo "backing $BACKING done $(date +%T)"
    case $BACKING in
        ram) ram_down ;;
        loop) loop_down ;;
    esac
done
teardown
use_module "$MODULE"
rmmod dm_shared_snap
check_dmesg "dmesg clean after the benchmark"
finish
