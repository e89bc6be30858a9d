#!/bin/bash
# shsnap send | shsnap receive between two origins (Documentation/stream.md, "send and
# receive"): full and incremental transfers checked block for block against the source
# snapshot, the replica snapshots and --query, refusals, a cut stream resumed with its
# token, a receiver killed with SIGKILL and resumed, a broken pipe on the sender, a token
# whose base was deleted, and a mounted secondary.
. "$(dirname "$0")/lib.sh"
setup_guest
PSZ=$((48 * 2048 + 3))    # 48 MiB and 3 sectors: the last 8 KiB chunk is short
CH=16
NCH=$(( (PSZ + CH - 1) / CH ))
COW=131072
# Primary p on vda; secondary s (8 sectors larger) on vdb; secondary t on ram0.
dmsetup create po --table "0 $PSZ linear /dev/vda 0"
dmsetup create pc --table "0 $COW linear /dev/vda $PSZ"
dmsetup create so --table "0 $((PSZ + 8)) linear /dev/vdb 0"
dmsetup create sc --table "0 $COW linear /dev/vdb $((PSZ + 8))"
dmsetup create to --table "0 $PSZ linear /dev/ram0 0"
dmsetup create tc --table "0 $COW linear /dev/ram0 $PSZ"
mapper_nodes
for c in pc sc tc; do dd if=/dev/zero of=/dev/mapper/$c bs=1M count=1 oflag=direct status=none; done
dmsetup create p --table "0 $PSZ shared-origin /dev/mapper/po /dev/mapper/pc $CH"
dmsetup create s --table "0 $((PSZ + 8)) shared-origin /dev/mapper/so /dev/mapper/sc $CH"
dmsetup create t --table "0 $PSZ shared-origin /dev/mapper/to /dev/mapper/tc $CH"
mapper_nodes
BYTES=$((PSZ * 512))
dd if=/dev/urandom of=/dev/mapper/p bs=1M count=48 oflag=direct status=none
dd if=/dev/urandom of=/dev/mapper/p bs=512 count=3 seek=$((PSZ - 3)) oflag=direct status=none
uuid=$(dmsetup message p 0 info | awk '$1 == "store" { print $2 }')

# same_as SNAP DEV: the first BYTES of DEV are snapshot SNAP of p.
same_as() {
    dmsetup create pcmp --readonly --table "0 $PSZ shared-snapshot $(odev p) $1" && mapper_nodes
    cmp -n $BYTES /dev/mapper/pcmp "$2"; local rc=$?
    dmsetup remove pcmp; return $rc
}
# replica_same SNAP SEC: SEC's replica of p's snapshot SNAP reads as SNAP.
replica_same() {
    local seq id
    seq=$(dmsetup message p 0 info | awk -v s="$1" '$1 == "snap" && $2 == s { print $3 }')
    id=$(dmsetup message "$2" 0 info | awk -v q="$seq" '$1 == "snap" && $4 == q { print $2 }')
    [ -n "$id" ] || return 1
    dmsetup create rcmp --readonly --table "0 $PSZ shared-snapshot $(odev "$2") $id" && mapper_nodes
    same_as "$1" /dev/mapper/rcmp; local rc=$?
    dmsetup remove rcmp; return $rc
}
no_send_device() { ! dmsetup ls | grep -q shsnap-send; }
token_of() { sed -n 's/^shsnap receive: resume token: //p' "$1"; }

section "full"
dmsetup message p 0 create 5
check "send --snap 5 | receive s" bash -c "set -o pipefail; $SHSNAP send p --snap 5 2>/tmp/send.err | $SHSNAP receive s >/tmp/recv.out"
cat /tmp/send.err /tmp/recv.out
check "the send line" grep -qE "^shsnap send: snapshot 5 \(seq 1\) base - chunks $NCH data_bytes $BYTES stream_bytes [0-9]+ seconds [0-9.]+$" /tmp/send.err
check "the receive line" grep -qE "^received snapshot 5 source $uuid:1 chunks $NCH data_bytes $BYTES seconds [0-9.]+$" /tmp/recv.out
check "s holds snapshot 5" same_as 5 /dev/mapper/s
check "s's replica 5 reads as p's snapshot 5" replica_same 5 s
check "the sectors of s past the origin are untouched" cmp -n 4096 -i $BYTES:0 /dev/mapper/s /dev/zero
check "no send device left" no_send_device
$SHSNAP receive s --query | tee /tmp/q
check "--query" sh -c "[ \"\$(cat /tmp/q)\" = \"\$(printf 'source $uuid\nlast 1 5\nresume -')\" ]"

section "incremental"
dd if=/dev/urandom of=/dev/mapper/p bs=64k count=40 seek=100 oflag=direct status=none
dd if=/dev/urandom of=/dev/mapper/p bs=512 count=3 seek=$((PSZ - 3)) oflag=direct status=none
dmsetup message p 0 create 6
check "send --snap 6 --base 5 | receive s" bash -c "set -o pipefail; $SHSNAP send p --snap 6 --base 5 2>/tmp/send.err | $SHSNAP receive s >/tmp/recv.out"
cat /tmp/send.err /tmp/recv.out
check "only the changed chunks are sent" grep -q "base 5 chunks 321 " /tmp/send.err
check "s holds snapshot 6" same_as 6 /dev/mapper/s
check "s's replica 6 reads as p's snapshot 6" replica_same 6 s
check "s's replica 5 still reads as p's snapshot 5" replica_same 5 s
check "--query names the newest replica" sh -c "$SHSNAP receive s --query | grep -qx 'last 2 6'"

section "refusals"
$SHSNAP send p --snap 6 2>/dev/null | $SHSNAP receive s 2>/tmp/err; rc=$?; cat /tmp/err
check "a snapshot already received is refused" sh -c "[ $rc = 1 ] && grep -q '^shsnap receive: refused: snapshot seq 2 is already received here' /tmp/err"
$SHSNAP send p --snap 6 --base 5 2>/dev/null | $SHSNAP receive s 2>/tmp/err; rc=$?; cat /tmp/err
check "an incremental stream on an older base is refused" sh -c "[ $rc = 1 ] && grep -q 'refused: foreign stream: base differs' /tmp/err"
check_fails "a base newer than the target is refused" $SHSNAP send p --snap 5 --base 6 -o /tmp/x
check_fails "an unknown snapshot is refused" $SHSNAP send p --snap 99 -o /tmp/x
$SHSNAP send p --snap 6 2>/dev/null | $SHSNAP receive t >/dev/null
dmsetup message p 0 create 7
$SHSNAP send p --snap 7 2>/dev/null | $SHSNAP receive /dev/mapper/s 2>/tmp/err >/dev/null; rc=$?
check "a full stream newer than the replicas is taken (by /dev/mapper path)" test $rc = 0

section "a cut stream, resumed"
# Drop the snapshots already compared, and change 16 MiB.
dmsetup message p 0 delete 5; dmsetup message p 0 delete 6
dd if=/dev/urandom of=/dev/mapper/p bs=1M count=16 seek=20 oflag=direct status=none
dmsetup message p 0 create 8
$SHSNAP send p --snap 8 --base 7 -o /tmp/s8
head -c 8000000 /tmp/s8 | $SHSNAP receive s >/tmp/recv.out 2>/tmp/err; rc=$?; cat /tmp/err
check "a cut stream: exit 1 with a resume token" sh -c "[ $rc = 1 ] && grep -q '^shsnap receive: truncated' /tmp/err && [ -n \"\$(sed -n 's/^shsnap receive: resume token: //p' /tmp/err)\" ] && [ ! -s /tmp/recv.out ]"
tok=$(token_of /tmp/err)
check "--query shows the token" sh -c "$SHSNAP receive s --query | grep -qx 'resume $tok'"
dmsetup message p 0 create 9
$SHSNAP send p --snap 9 --base 7 2>/dev/null | $SHSNAP receive s 2>/tmp/err; cat /tmp/err
check "another transfer is refused while one is pending" grep -q 'refused: an interrupted receive of seq 4 is pending: resume it' /tmp/err
check "send --resume | receive" bash -c "set -o pipefail; $SHSNAP send p --resume '$tok' 2>/tmp/send.err | $SHSNAP receive s >/tmp/recv.out"
cat /tmp/send.err /tmp/recv.out
check "s holds snapshot 8" same_as 8 /dev/mapper/s
check "s's replica 8 reads as p's snapshot 8" replica_same 8 s

section "a receiver killed, resumed"
# 40 MB of the stream (past the first progress records, every 8 MiB), then the receiver
# waits for more on a fifo held open, and is killed.
rm -f /tmp/fifo; mkfifo /tmp/fifo
$SHSNAP receive t --checkpoint-mb 8 </tmp/fifo >/dev/null 2>&1 &
rpid=$!
exec 9>/tmp/fifo
$SHSNAP send p --snap 8 2>/dev/null | head -c 40000000 >&9
sleep 5
kill -9 $rpid; wait $rpid 2>/dev/null
exec 9>&-
tok=$($SHSNAP receive t --query | sed -n 's/^resume //p')
check "the killed receive left a resume token" test -n "$tok" -a "$tok" != -
check "send --resume | receive after the kill" bash -c "set -o pipefail; $SHSNAP send p --resume '$tok' 2>/dev/null | $SHSNAP receive t >/dev/null"
check "t holds snapshot 8" same_as 8 /dev/mapper/t
check "t's replica 8 reads as p's snapshot 8" replica_same 8 t

section "sender errors"
$SHSNAP send p --snap 9 2>/tmp/err | head -c 100 >/dev/null; rc=${PIPESTATUS[0]}; cat /tmp/err
check "a broken pipe: exit 1" sh -c "[ $rc = 1 ] && grep -q 'writing the stream: Broken pipe' /tmp/err"
check "no send device left after the error" no_send_device
# A token of a transfer of 10 on base 8 (the header and part of a record), then 8 deleted.
dd if=/dev/urandom of=/dev/mapper/p bs=1M count=4 seek=1 oflag=direct status=none
dmsetup message p 0 create 10
$SHSNAP send p --snap 10 --base 8 -o /tmp/s10 2>/dev/null
head -c 300 /tmp/s10 | $SHSNAP receive s 2>/tmp/err
tok=$(token_of /tmp/err)
dmsetup message p 0 delete 8
$SHSNAP send p --resume "$tok" 2>/tmp/err >/dev/null; rc=$?; cat /tmp/err
check "resuming after the base was deleted names it" sh -c "[ $rc = 1 ] && grep -q 'base (creation sequence 4) is no longer a live snapshot' /tmp/err"

section "a mounted secondary"
mkfs.ext4 -q -F /dev/mapper/t && mkdir -p /tmp/mnt-t && mount /dev/mapper/t /tmp/mnt-t
$SHSNAP send p --snap 9 2>/dev/null | $SHSNAP receive t 2>/tmp/err; rc=$?; cat /tmp/err
check "receive refuses a mounted secondary" sh -c "[ $rc = 1 ] && grep -q 'mounted or in use' /tmp/err"
umount /tmp/mnt-t

dmsetup remove_all >/dev/null 2>&1
check "rmmod" rmmod dm_shared_snap
check_dmesg
finish
