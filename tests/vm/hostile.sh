#!/bin/bash
# Hostile input: foreign and damaged COW devices, a truncated COW device, and a generated
# corpus of malformed table lines and messages.  Every case must be refused (or fail its
# I/O) with a clear message, never an oops, and the module must keep working.
. "$(dirname "$0")/lib.sh"
ORACLE="$REPO/target/release/shsnap-oracle --state /tmp/oracle"
LEN=131072   # 64 MiB origin
setup_guest
load() { dmsetup create ho --table "0 $LEN shared-origin /dev/vda ${1:-/dev/vdb} 16" 2>/tmp/load.err; }
unload() { for d in hs1 hs2 ho; do dmsetup remove $d >/dev/null 2>&1; done; true; }
refused() { # description dmesg-pattern [cow]
    kmark
    if load "${3:-}"; then fail "$1: loaded"; unload; return; fi
    if ksince | grep -q "$2"; then pass "$1: refused ($(ksince | grep -o 'shared-origin: .*' | head -1))"; else fail "$1: no '$2' in dmesg"; ksince | tail -3; fi
}
flip() { # dev block byte
    python3 -c "
import os, sys
f = os.open('$1', os.O_RDWR)
off = $2 * 4096 + $3
b = os.pread(f, 1, off)
os.pwrite(f, bytes([b[0] ^ 0x10]), off)
os.fsync(f)"
}

section "foreign devices"
mkfs.ext4 -q -F /dev/vdb >/dev/null 2>&1; sync; blockdev --flushbufs /dev/vdb
refused "ext4 on the COW device" "no shared-snapshot store"
dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
dmsetup create dsnap --table "0 $LEN snapshot /dev/vda /dev/vdb P 16" && dmsetup remove dsnap
refused "a dm-snapshot store on the COW device" "no shared-snapshot store"
dd if=/dev/urandom of=/dev/vdb bs=1M count=4 oflag=direct status=none
refused "random data on the COW device" "no shared-snapshot store"

section "a good store to damage"
dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
check "load on a zeroed COW device (formats)" load
mapper_nodes
$ORACLE init origin $((LEN / 8))
$ORACLE write origin /dev/mapper/ho --count 100 --seed 3 >/dev/null
for i in 1 2; do dmsetup message ho 0 create $i; done
dmsetup create hs1 --table "0 $LEN shared-snapshot $(odev ho) 1"; mapper_nodes
$ORACLE clone origin hs1
$ORACLE write origin /dev/mapper/ho --count 300 --seed 4 >/dev/null
unload
check "shsnap check: the good store is clean" $SHSNAP check /dev/vdb
eval "$($SHSNAP layout /dev/vdb | awk '{print $1 "=" $2}')"
echo "  layout: state=$state journal=$journal meta_bitmap=$meta_bitmap data_bitmap=$data_bitmap root=$btree_root depth=$btree_depth data_start=$data_start"
dd if=/dev/vdb of=/tmp/meta.img bs=4096 count=$data_start status=none
restore() { dd if=/tmp/meta.img of=/dev/vdb bs=4096 conv=notrunc,fsync status=none; blockdev --flushbufs /dev/vdb; }

section "bit flips in every metadata block type"
damaged() { # description block byte [block2]
    restore
    flip /dev/vdb $2 $3
    [ -n "${4:-}" ] && flip /dev/vdb $4 $3
    blockdev --flushbufs /dev/vdb
    check_fails "$1: shsnap check reports it" $SHSNAP check /dev/vdb
    kmark
    if load; then
        mapper_nodes
        # Loaded (the block is read lazily): I/O touching it must fail cleanly.
        dmsetup create hs1 --table "0 $LEN shared-snapshot $(odev ho) 1" 2>/dev/null && mapper_nodes
        dd if=/dev/mapper/hs1 of=/dev/null bs=1M iflag=direct status=none 2>/dev/null
        $ORACLE write origin /dev/mapper/ho --count 300 --max 64 --seed 9 >/dev/null 2>&1
        if ksince | grep -qiE "corrupt|checksum"; then pass "$1: detected on use ($(ksince | grep -oiE '[^:]*(corrupt|checksum)[^(]*' | head -1))"; else fail "$1: not detected"; fi
        check "$1: origin keeps serving reads" dd if=/dev/mapper/ho of=/dev/null bs=1M count=4 iflag=direct status=none
        unload
    else
        pass "$1: load refused ($(ksince | grep -o 'shared-origin: .*' | head -1))"
    fi
}
damaged "superblock" 0 200
damaged "state block" $state 600
damaged "both journal headers" 1 40 2
damaged "metadata bitmap" $meta_bitmap 300
damaged "data bitmap" $data_bitmap 300
damaged "btree root" $btree_root 100
restore
flip /dev/vdb 1 40
check "one damaged journal header is tolerated (two copies)" load
unload

section "truncated COW device"
restore
dmsetup create trunc --table "0 $(( $(blockdev --getsz /dev/vdb) / 2 )) linear /dev/vdb 0"
refused "COW device cut to half its size" "truncated" /dev/mapper/trunc
dmsetup remove trunc

section "generated corpus of malformed table lines and messages"
restore
tokens=(0 1 2 16 7 4096 2048 -1 abc /dev/vda /dev/vdb /dev/mapper/ho /dev/null 99999999999999999999 "" x%sx 0x10 8 3 feature)
refused_n=0; accepted=0
RANDOM=42
for i in $(seq 1 300); do
    n=$((RANDOM % 7)); args=""
    for _ in $(seq 1 $n); do args="$args ${tokens[$((RANDOM % ${#tokens[@]}))]}"; done
    [ $((i % 2)) = 0 ] && ty=shared-origin || ty=shared-snapshot
    if dmsetup create mal --table "0 $LEN $ty$args" >/dev/null 2>&1; then
        accepted=$((accepted + 1)); dmsetup remove mal
    else
        refused_n=$((refused_n + 1))
    fi
done
echo "  300 generated table lines: $refused_n refused, $accepted valid and accepted"
check "most generated table lines are refused" test $refused_n -ge 250
check "origin still loads after the corpus" load
mapper_nodes
msgs=(create delete list stats "" junk 5 4294967296 -5 "create" "create 1 2" "delete" "delete 99" "list x" "create abc" "create 0x1")
bad=0; ok=0
for i in $(seq 1 200); do
    m=${msgs[$((RANDOM % ${#msgs[@]}))]}
    [ $((RANDOM % 3)) = 0 ] && m="$m ${tokens[$((RANDOM % ${#tokens[@]}))]}"
    if dmsetup message ho 0 $m >/dev/null 2>&1; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
done
echo "  200 generated messages: $bad refused, $ok accepted"
check "the origin still works after the message corpus" $ORACLE verify origin /dev/mapper/ho
unload
check "shsnap check after the corpus" $SHSNAP check /dev/vdb
check "module unloads" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
