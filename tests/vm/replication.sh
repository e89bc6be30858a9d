#!/bin/bash
# shellcheck disable=SC1091,SC2015,SC2016,SC2034  # checks run eval '...' on variables set around them
# Replication (issue 13): `shsnap send` / `shsnap receive` and the `shsnap-ctl replicate`
# loop between a primary origin (with a writable snapshot) and a secondary origin in one
# guest, through a local transport ("shsnap-ctl receive sec").  Expected content: the sha256
# of the primary origin taken just before each snapshot is made (nothing writes the origin
# meanwhile); the main rounds also check that the primary's snapshots read so.
#  1. ROUNDS (10) rounds: fio random writes of random sizes to the primary origin and to a
#     writable snapshot, then `shsnap-ctl replicate --rounds 1 --keep 4`; after each, every
#     replica on the secondary reads (sha256 of the whole device) as its source.
#  2. Refused streams (`shsnap send -o FILE`, then `shsnap receive < FILE`): incremental on a
#     base that is not the secondary's newest replica (never replicated; an older replica),
#     of another store (full, incremental, and a forged header that differs only in the
#     store uuid): exit 1 naming the defect, nothing written (same identities and progress,
#     replicas intact).  A bit flipped in the middle of a DATA record, a stream truncated
#     inside one: exit 1 naming the defect, no new snapshot, every replica intact; then
#     replicate resumes from the receiver's token.
#  3. CUTS (9; EXTENDED=1: 20) interruptions at random points (a cut point in the
#     transport stops the stream after a random 128 KiB..1.9 MiB of a stream of at least 2 MiB): the sender
#     killed, the receiver killed, or a power cut of the secondary (dm-flakey drop_writes
#     under its origin and COW devices, the stream goes on into the void, the receiver is
#     killed, the secondary origin removed and recreated from what its disks hold).  After
#     each, the secondary's newest replica is the one before the interruption and reads as
#     its source; then replicate again, which resumes the pending transfer (a pending token
#     must be resumed), and the new replicas read as their sources (every replica, every
#     fourth cut and at the end).
#  4. The online delta (`delta` message, every page) against a chunk-by-chunk comparison of
#     the two snapshot devices, on random workloads with chunks written again with the same
#     data (16 KiB chunks): no chunk that differs is missing; the false positives are
#     counted and must be chunks written again with identical data.
# Devices: 4 disks (or fewer: the regions are carved round-robin by linear tables); the
# secondary's origin and COW each sit on a linear table that dm-flakey replaces in a cut.
#   SEED=n replays the random choices; ORIGIN_MB (8), ROUNDS (10), CUTS (9, three of each kind;
#   EXTENDED=1: 20).
. "$(dirname "$0")/lib.sh"
CTL=$REPO/scripts/shsnap-ctl
export SHSNAP_CTL_DIR=/tmp/shsnap-ctl
REAL_SHSNAP=$SHSNAP
MB=${ORIGIN_MB:-8}
LEN=$((MB * 2048))          # origin sectors
COWLEN=$((64 * 2048))       # 64 MiB COW devices
XCOWLEN=$((64 * 2048))      # the other store's (then the delta section's)
CH=128                      # 64 KiB chunks
DCH=32                      # 16 KiB chunks for the delta section
ROUNDS=${ROUNDS:-10}
if [ "${EXTENDED:-0}" = 1 ]; then CUTS=${CUTS:-20}; else CUTS=${CUTS:-9}; fi
KEEP=4
TO="$CTL receive sec"
RLOGF=$SHSNAP_CTL_DIR/pri.replicate.log
SEED=${SEED:-$RANDOM}
echo "  seed $SEED (SEED=$SEED replays the random choices)"
RANDOM=$SEED
T0=$EPOCHSECONDS
elapsed() { echo "$((EPOCHSECONDS - T0)) s"; }
# Processes are slow in a TCG guest (dmsetup about half a second): the helpers below use
# bash builtins where they can, and this instead of sleep(1).
exec {SNOOZE}<> <(:)
snooze() { read -r -t "$1" -u "$SNOOZE" _ || true; }
setup_guest
rm -rf "$SHSNAP_CTL_DIR" /tmp/cut /tmp/streams
mkdir -p /tmp/cut /tmp/streams

# The shsnap that shsnap-ctl runs: records the pid of each send and receive (then becomes
# the real shsnap), so that a test can kill exactly that process.
cat > /tmp/shsnap-wrap <<EOF
#!/bin/sh
case "\${1:-}" in
    send) echo \$\$ > /tmp/cut/send.pid ;;
    receive) case " \$* " in *" --query "*) ;; *) echo \$\$ > /tmp/cut/recv.pid ;; esac ;;
esac
exec $(printf '%q' "$REAL_SHSNAP") "\$@"
EOF
chmod +x /tmp/shsnap-wrap
export SHSNAP=/tmp/shsnap-wrap
# cutpoint K: the transport's cut point.  Passes the first K 4-KiB blocks of its input on,
# then says "point" on the FIFO /tmp/cut/ev and waits for a line on the FIFO /tmp/cut/go
# before passing the rest; an input shorter than that (a --query reads /dev/null) passes
# whole.
cat > /tmp/cutpoint <<'EOF'
#!/bin/sh
k=$1 h=/tmp/cut/head.$$
dd bs=4096 count="$k" iflag=fullblock of="$h" status=none || exit 1
n=$(stat -c %s "$h")
cat "$h" || { rm -f "$h"; exit 1; }
rm -f "$h"
[ "$n" -ge $((k * 4096)) ] || exit 0
echo point > /tmp/cut/ev
read -r _ < /tmp/cut/go
exec cat
EOF
chmod +x /tmp/cutpoint
mkfifo /tmp/cut/ev /tmp/cut/go
exec {EV}<> /tmp/cut/ev
# chunkdiff A B CHUNK_BYTES: the chunks whose content differs (O_DIRECT reads).
cat > /tmp/chunkdiff.py <<'EOF'
import mmap, os, sys
a, b, cs = sys.argv[1], sys.argv[2], int(sys.argv[3])
fa = os.open(a, os.O_RDONLY | os.O_DIRECT)
fb = os.open(b, os.O_RDONLY | os.O_DIRECT)
size = os.lseek(fa, 0, os.SEEK_END)
assert size == os.lseek(fb, 0, os.SEEK_END) and size % (1 << 20) == 0
ba, bb = mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 1 << 20)
for off in range(0, size, 1 << 20):
    assert os.preadv(fa, [ba], off) == 1 << 20 and os.preadv(fb, [bb], off) == 1 << 20
    for i in range(0, 1 << 20, cs):
        if ba[i:i + cs] != bb[i:i + cs]:
            print((off + i) // cs)
EOF
# rewrite DEV CHUNK_BYTES CHUNK...: writes each chunk (or, for odd chunk numbers, its
# second 4 KiB) again with the data it holds (O_DIRECT).
# rewrite DEV CHUNK_BYTES stride N: writes 4 KiB of random data at the start of every Nth
# chunk (many short ranges: the delta takes several pages).
cat > /tmp/rewrite.py <<'EOF'
import mmap, os, sys
dev, cs = sys.argv[1], int(sys.argv[2])
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, cs)
small = mmap.mmap(-1, 4096)
if sys.argv[3] == "stride":
    for c in range(0, os.lseek(fd, 0, os.SEEK_END) // cs, int(sys.argv[4])):
        small[:] = os.urandom(4096)
        os.pwritev(fd, [small], c * cs)
    os.fsync(fd)
    sys.exit(0)
for c in map(int, sys.argv[3:]):
    if c % 2:
        os.preadv(fd, [small], c * cs + 4096)
        os.pwritev(fd, [small], c * cs + 4096)
    else:
        os.preadv(fd, [buf], c * cs)
        os.pwritev(fd, [buf], c * cs)
os.fsync(fd)
EOF

# ---------------------------------------------------------------------------------------
# Devices.
read -r -a DISKS <<< "${DMSS_DISKS:-/dev/vda /dev/vdb /dev/vdc /dev/vdd}"
declare -A RDEV ROFF RLEN DOFF
NEXT=0
carve() { # name sectors: a linear device on the next disk (round-robin) with room
    local i=$((NEXT % ${#DISKS[@]})) d off
    NEXT=$((NEXT + 1))
    d=${DISKS[$i]}; off=${DOFF[$i]:-0}
    [ $((off + $2)) -le "$(blockdev --getsz "$d")" ] || { echo "$d is too small for $1"; return 1; }
    RDEV[$1]=$d; ROFF[$1]=$off; RLEN[$1]=$2; DOFF[$i]=$((off + $2))
    dmsetup create "$1" --table "0 $2 linear $d $off"
}
table_of() { # region linear|flakey
    if [ "$2" = flakey ]; then echo "0 ${RLEN[$1]} flakey ${RDEV[$1]} ${ROFF[$1]} 0 3600 1 drop_writes"
    else echo "0 ${RLEN[$1]} linear ${RDEV[$1]} ${ROFF[$1]}"; fi
}
power() { # off|on: the secondary's origin and COW devices drop every write from now on / work again
    local t=linear
    [ "$1" = off ] && t=flakey
    dmsetup suspend --nolockfs s_c s_o &&
        dmsetup load s_o --table "$(table_of s_o $t)" && dmsetup load s_c --table "$(table_of s_c $t)" &&
        dmsetup resume s_o s_c
}
zero_head() { dd if=/dev/zero of="$1" bs=1M count=1 oflag=direct status=none; }

section "devices: ${#DISKS[@]} disks carved into primary, secondary and other store ($MB MiB origins, 64 KiB chunks)"
ok=1
for r in "p_o $LEN" "p_c $COWLEN" "s_o $LEN" "s_c $COWLEN" "x_o $LEN" "x_c $XCOWLEN"; do
    # shellcheck disable=SC2086
    carve $r || ok=0
done
mapper_nodes
for r in p_c s_c x_c; do zero_head /dev/mapper/$r || ok=0; done
check "linear regions on ${DISKS[*]}" test $ok = 1
dd if=/dev/urandom of=/dev/mapper/p_o bs=1M count="$MB" oflag=direct status=none
check "primary origin pri (random data) and secondary origin sec" sh -c "'$CTL' origin-create pri /dev/mapper/p_o /dev/mapper/p_c $CH && '$CTL' origin-create sec /dev/mapper/s_o /dev/mapper/s_c $CH"
check "writable snapshot work of the primary, activated" sh -c "'$CTL' create pri work && '$CTL' activate pri work"
mapper_nodes

# ---------------------------------------------------------------------------------------
# Helpers.
# (Few processes per helper: each costs tens of ms in a TCG guest.)
# load ORIGIN: its `info` message as L_IDS (ids in slot order), L_SEQ[id], L_SRC[id],
# L_ST[id], L_NEXT (the next creation sequence).
declare -A L_SEQ L_SRC L_ST ODEV
load() {
    local out w i
    L_IDS=(); L_SEQ=(); L_SRC=(); L_ST=(); L_NEXT=""
    out=$(dmsetup message "$1" 0 info) || return 1
    while read -r -a w; do
        case "${w[0]:-}" in
            store) for ((i = 2; i + 1 < ${#w[@]}; i++)); do [ "${w[i]}" != next_seq ] || L_NEXT=${w[i + 1]}; done ;;
            snap) L_IDS+=("${w[1]}"); L_SEQ[${w[1]}]=${w[2]}; L_SRC[${w[1]}]=${w[3]}; L_ST[${w[1]}]=${w[4]} ;;
        esac
    done <<< "$out"
}
snaps_info() { load "$1" || return 1; local id; for id in "${L_IDS[@]}"; do echo "$id ${L_SEQ[$id]} ${L_SRC[$id]} ${L_ST[$id]}"; done; }
next_seq() { load "$1" && echo "$L_NEXT"; }
id_of_seq() { load "$1" || return 1; local id; for id in "${L_IDS[@]}"; do [ "${L_SEQ[$id]}" != "$2" ] || { echo "$id"; return 0; }; done; }
newest() { # the secondary's newest valid replica: "source_seq id" (of the last load sec, or a new one)
    [ "${1:-}" = loaded ] || load sec || return 1
    local id best=0 bid=""
    for id in "${L_IDS[@]}"; do
        if [ "${L_ST[$id]}" = valid ] && [ "${L_SRC[$id]}" -gt "$best" ]; then best=${L_SRC[$id]}; bid=$id; fi
    done
    [ -z "$bid" ] || echo "$best $bid"
}
dev_sha() { local sum; read -r sum _ < <(dd if="$1" bs=1M iflag=direct status=none | sha256sum); echo "$sum"; }
# hash_snaps ORIGIN ID...: SUMS[id], the sha256 of each whole snapshot device; the devices
# are made read-only by one `dmsetup create --concise` and removed by one `dmsetup remove`.
declare -A SUMS
hash_snaps() {
    local o=$1 id n sum spec="" names=() bad=0
    shift
    SUMS=()
    [ $# -gt 0 ] || return 0
    [ -n "${ODEV[$o]:-}" ] || ODEV[$o]=$(odev "$o")
    for id in "$@"; do
        n=chk-$o-$id; names+=("$n"); spec+="${spec:+;}$n,,,ro,0 $LEN shared-snapshot ${ODEV[$o]} $id"
    done
    if ! dmsetup create --concise "$spec" > /dev/null; then
        echo "cannot activate snapshots $* of $o"
        for n in "${names[@]}"; do dmsetup remove "$n" > /dev/null 2>&1; done
        return 1
    fi
    for n in "${names[@]}"; do [ -b "/dev/mapper/$n" ] || { dmsetup mknodes > /dev/null 2>&1; break; }; done
    for id in "$@"; do
        sum=""
        read -r sum _ < <(dd if="/dev/mapper/chk-$o-$id" bs=1M iflag=direct status=none | sha256sum)
        if [ ${#sum} = 64 ]; then SUMS[$id]=$sum; else echo "cannot read snapshot $id of $o"; bad=1; fi
    done
    if ! dmsetup remove "${names[@]}" > /dev/null 2>&1; then
        snooze 1
        for n in "${names[@]}"; do [ ! -e "/dev/mapper/$n" ] || dmsetup remove "$n" > /dev/null 2>&1 || bad=1; done
    fi
    return $bad
}
# The expected content of the primary's snapshots: before a replicate run, mark() records
# the origin's sha256 (unless nothing wrote the origin since the last mark) and where the
# replication log ends; after it, assign() gives that sha256 to the snapshot each round
# took meanwhile (the log's "round N: snapshot NAME (seq S) ..." lines, of rounds that
# succeeded or failed), NEW_SEQS.
declare -A PHASH
VERIFIED=0; NEWEST=""; MARK_LINES=0; NEW_SEQS=()
mark() { # [same]
    local lines=()
    [ "${1:-}" = same ] || MARK_SHA=$(dev_sha /dev/mapper/pri)
    MARK_LINES=0
    [ ! -f "$RLOGF" ] || { mapfile -t lines < "$RLOGF"; MARK_LINES=${#lines[@]}; }
}
assign() {
    local l seq new=()
    NEW_SEQS=()
    [ ! -f "$RLOGF" ] || mapfile -t -s "$MARK_LINES" new < "$RLOGF"
    for l in "${new[@]}"; do
        [[ $l =~ \ round\ [0-9]+:\ snapshot\ [^\ ]+\ \(seq\ ([0-9]+)\)\  ]] || continue
        seq=${BASH_REMATCH[1]}
        [ -n "${PHASH[$seq]:-}" ] || { PHASH[$seq]=$MARK_SHA; NEW_SEQS+=("$seq"); }
    done
}
# The primary's snapshots of NEW_SEQS read as the origin did.
primary_reads_as_origin() {
    local id ids=()
    load pri
    for id in "${L_IDS[@]}"; do [[ " ${NEW_SEQS[*]} " != *" ${L_SEQ[$id]} "* ]] || ids+=("$id"); done
    echo "primary snapshots of seq ${NEW_SEQS[*]}: ids ${ids[*]}"
    [ ${#ids[@]} -gt 0 ] && hash_snaps pri "${ids[@]}" || return 1
    for id in "${ids[@]}"; do
        [ "${SUMS[$id]}" = "$MARK_SHA" ] || { echo "primary snapshot $id differs from the origin it was taken of"; return 1; }
    done
}
# Every valid replica on the secondary with a source sequence above ABOVE (default 0: all)
# reads as its source; VERIFIED: how many were compared.
# Every valid replica on the secondary with a source sequence above ABOVE (default 0: all)
# reads as its source; VERIFIED: how many were compared; NEWEST: the newest replica's
# "source_seq id".
verify_secondary() { # [above]
    local above=${1:-0} id src n=0 bad=0 ids=()
    load sec
    NEWEST=$(newest loaded)
    for id in "${L_IDS[@]}"; do
        src=${L_SRC[$id]}
        [ "$src" != 0 ] && [ "$src" -gt "$above" ] || continue
        n=$((n + 1))
        if [ "${L_ST[$id]}" != valid ]; then echo "replica $id (source seq $src) is invalid"; bad=1; continue; fi
        if [ -z "${PHASH[$src]:-}" ]; then echo "replica $id: no expected content for source seq $src"; bad=1; continue; fi
        ids+=("$id")
    done
    VERIFIED=$n
    echo "$n replicas compared"
    [ $n -gt 0 ] && hash_snaps sec "${ids[@]}" || return 1
    for id in "${ids[@]}"; do
        src=${L_SRC[$id]}
        [ "${SUMS[$id]}" = "${PHASH[$src]}" ] || { echo "replica $id (source seq $src) differs from its source"; bad=1; }
    done
    [ $bad = 0 ]
}
# The secondary's newest replica is of source sequence WANT and reads as its source.
newest_intact() { # want
    local n; n=$(newest)
    echo "newest replica: source seq ${n% *} (id ${n#* }), expected seq $1"
    [ "${n% *}" = "$1" ] || return 1
    hash_snaps sec "${n#* }" || return 1
    [ "${SUMS[${n#* }]}" = "${PHASH[$1]:-none}" ]
}
replicate() { timeout 300 "$CTL" replicate pri --to "$TO" --rounds 1 --keep $KEEP "$@"; }
last_round() { local l r=""; while IFS= read -r l; do [[ $l == *" round "[0-9]*": snapshot "* ]] && r=${l#* }; done < "$RLOGF"; echo "$r"; }
fio_run() { # fio arguments (jobs); random data, direct I/O
    fio --ioengine=psync --direct=1 --rw=randwrite --refill_buffers --randseed="$RANDOM" \
        --size="${MB}M" --output=/tmp/fio.out "$@"
}
fio_chunks() { fio_run --name=origin --filename=/dev/mapper/pri --bs=64k --io_size=2M; }  # 32 distinct chunks
pending_token() { # the secondary's pending resume token, or -
    local k v
    while read -r k v _; do [ "$k" != resume ] || { echo "$v"; return 0; }; done < <(timeout 60 "$REAL_SHSNAP" receive sec --query)
}
reap() { # devices a killed sender left (shsnap-send-*) and ours (chk-*)
    local d
    while read -r d _; do
        case "$d" in shsnap-send-*|chk-*) ;; *) continue ;; esac
        echo "  (removing $d)"; dmsetup remove "$d" >/dev/null 2>&1 || dmsetup remove --force "$d" >/dev/null 2>&1
    done < <(dmsetup ls 2>/dev/null)
    true
}

# ---------------------------------------------------------------------------------------
section "$ROUNDS rounds: fio random writes to the origin and the writable snapshot, then replicate (keep $KEEP)"
for r in $(seq 1 "$ROUNDS"); do
    osz=$(( (RANDOM % 6 + 1) * 512 )); wsz=$(( (RANDOM % 4 + 1) * 256 ))
    check "round $r: fio: random writes of 4-128 KiB, $osz KiB to the origin and $wsz KiB to the writable snapshot" \
        fio_run --bsrange=4k-128k --name=origin --filename=/dev/mapper/pri --io_size=${osz}k \
            --name=snapshot --filename=/dev/mapper/pri-work --io_size=${wsz}k
    mark
    check "round $r: shsnap-ctl replicate --rounds 1 --keep $KEEP" replicate
    assign
    echo "  $(last_round)"
    if [ "$r" = 1 ] || [ "$r" = "$ROUNDS" ]; then
        check "round $r: the new snapshot on the primary reads as the origin did, and every replica on the secondary as its source" \
            eval 'primary_reads_as_origin && verify_secondary'
    else
        check "round $r: every replica on the secondary reads as its source" verify_secondary
    fi
    echo "  $VERIFIED replicas on the secondary ($(elapsed))"
done
NKEEP=$((ROUNDS < KEEP ? ROUNDS : KEEP))
check "the secondary keeps $NKEEP replicas (--keep $KEEP)" test "$(snaps_info sec | awk '$3 != 0' | wc -l)" = $NKEEP
check "the primary keeps $NKEEP repl-* snapshots" test "$("$CTL" list pri | awk '$2 ~ /^repl-/' | wc -l)" = $NKEEP
check "the secondary names its replicas repl-<source seq>" sh -c "'$CTL' list sec | awk 'NR > 1 && \$2 !~ /^repl-[0-9]+\$/ { exit 1 }'"
"$CTL" list sec | sed 's/^/  /'

# ---------------------------------------------------------------------------------------
section "refused streams: nothing applied"
REFUSED=0
receive_file() { # stream file: shsnap receive on the secondary; RC, /tmp/recv.err
    RC=0; : > /tmp/recv.err
    [ -s "$1" ] || { echo "no stream file $1"; RC=2; return 2; }
    timeout 120 "$REAL_SHSNAP" receive /dev/mapper/sec < "$1" > /tmp/recv.out 2> /tmp/recv.err || RC=$?
    cat /tmp/recv.err
    return $RC
}
names_defect() { [ "$RC" = 1 ] && grep -qiE "$1" /tmp/recv.err; }
show_err() { grep -v 'resume token' /tmp/recv.err | head -2 | sed 's/^/       /'; }
# refuse WHAT FILE PATTERN: a stream refused before anything is written.
refuse() {
    dmsetup message sec 0 info > /tmp/sec.before
    check_fails "$1: shsnap receive refuses it" receive_file "$2"
    check "$1: exit 1, the message names the defect (/$3/)" names_defect "$3"
    show_err
    check "$1: nothing written (same snapshots, source and progress), the newest replica intact" \
        eval 'dmsetup message sec 0 info | diff /tmp/sec.before - && newest_intact "$(newest | cut -d" " -f1)"'
    REFUSED=$((REFUSED + 1))
}
send_file() { # out args...: shsnap send pri args -o out
    timeout 120 "$REAL_SHSNAP" send /dev/mapper/pri "$@" 2> /tmp/send.err || { cat /tmp/send.err; return 1; }
    cat /tmp/send.err
}
read -r P _ <<< "$(newest)"
read -r P2 _ <<< "$(snaps_info sec | awk '$3 != 0 && $4 == "valid" { print $3, $1 }' | sort -n | tail -2 | head -1)"
PB=$(id_of_seq pri "$P"); PB2=$(id_of_seq pri "${P2:-0}")
echo "  the secondary's newest replica: source seq $P (primary id $PB); the one before: seq $P2 (primary id ${PB2:-none})"
fio_chunks; "$CTL" create pri swapa > /dev/null
fio_chunks; "$CTL" create pri swapb > /dev/null
XA=$("$CTL" list pri | awk '$2 == "swapa" { print $1 }'); XB=$("$CTL" list pri | awk '$2 == "swapb" { print $1 }')
check "shsnap send: swapb incremental on swapa (never replicated), and on the secondary's older replica (seq $P2)" \
    eval 'send_file --snap "$XB" --base "$XA" -o /tmp/streams/swap1 && send_file --snap "$XB" --base "$PB2" -o /tmp/streams/swap2'
refuse "base never replicated" /tmp/streams/swap1 'base'
refuse "base an older replica" /tmp/streams/swap2 'base'
"$CTL" delete pri swapb > /dev/null; "$CTL" delete pri swapa > /dev/null
# Another store: a second primary.
dd if=/dev/urandom of=/dev/mapper/x_o bs=1M count="$MB" oflag=direct status=none
check "another store (oth): origin, snapshots o1 and o2, full and incremental streams" eval '
    "$CTL" origin-create oth /dev/mapper/x_o /dev/mapper/x_c $CH > /dev/null && "$CTL" create oth o1 > /dev/null &&
    dd if=/dev/urandom of=/dev/mapper/oth bs=64k count=8 seek=3 oflag=direct conv=notrunc status=none && "$CTL" create oth o2 > /dev/null &&
    timeout 120 "$REAL_SHSNAP" send /dev/mapper/oth --snap "$(id_of_seq oth 1)" -o /tmp/streams/oth1 &&
    timeout 120 "$REAL_SHSNAP" send /dev/mapper/oth --snap "$(id_of_seq oth 2)" --base "$(id_of_seq oth 1)" -o /tmp/streams/oth2'
refuse "full stream of another store" /tmp/streams/oth1 'store'
refuse "incremental stream of another store" /tmp/streams/oth2 'store'
truncate -s $((LEN * 512)) /tmp/streams/image
check "forged stream: the secondary's identities (base seq $P, target seq $((P + 1))) but another store uuid" \
    "$REAL_SHSNAP" make-stream /tmp/streams/image /tmp/streams/forged --chunks 0,3 --chunk-sectors $CH \
        --store-uuid "$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')" --target-seq $((P + 1)) --base-seq "$P"
refuse "forged store uuid" /tmp/streams/forged 'store'
dmsetup remove oth

# damaged NAME KIND: a stream with a defect past its header: refused at the defect, no new
# snapshot, every replica intact; then replicate resumes from the token.
damaged() {
    local name=$1 kind=$2 n size off
    fio_chunks
    mark
    FID=$("$CTL" create pri "$name"); FID=${FID##*(id }; FID=${FID%)}
    load pri; [ -z "${L_SEQ[$FID]:-}" ] || PHASH[${L_SEQ[$FID]}]=$MARK_SHA
    read -r P _ <<< "$NEWEST"; PB=$(id_of_seq pri "$P")
    check "$name: shsnap send snapshot $name incremental on the secondary's newest replica (seq $P) -o FILE, verify-stream good" \
        eval 'send_file --snap "$FID" --base "$PB" -o /tmp/streams/$name && "$REAL_SHSNAP" verify-stream /tmp/streams/$name'
    n=$(awk '/^shsnap send: snapshot/ { for (i = 1; i < NF; i++) if ($i == "chunks") print $(i + 1) }' /tmp/send.err)
    size=$(stat -c %s "/tmp/streams/$name")
    # preamble 12 + HEADER 128; each DATA record 12 + 32 + chunk + 4.
    off=$((140 + (${n:-1} / 2) * (48 + CH * 512)))
    if [ "$kind" = flip ]; then
        off=$((off + 44 + CH * 256))
        python3 -c "import sys; f = open(sys.argv[1], 'r+b'); f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([b[0] ^ 0x10]))" "/tmp/streams/$name" "$off"
        pat=crc
    else
        truncate -s $((off + 1000)) "/tmp/streams/$name"
        pat=truncat
    fi
    echo "  $name: $n chunks, $size bytes; $kind at byte $off"
    check_fails "$name: verify-stream finds the defect" "$REAL_SHSNAP" verify-stream "/tmp/streams/$name"
    snaps_info sec > /tmp/sec.before
    check_fails "$name: shsnap receive refuses it" receive_file "/tmp/streams/$name"
    check "$name: exit 1, the message names the defect (/$pat/) and gives a resume token" \
        eval 'names_defect "$pat" && grep -q "resume token: shsnap-resume-1:" /tmp/recv.err'
    show_err
    check "$name: no new snapshot, every replica reads as its source" eval 'snaps_info sec | diff /tmp/sec.before - && verify_secondary'
    REFUSED=$((REFUSED + 1))
    mark same
    check "$name: replicate resumes the interrupted transfer and goes on" replicate
    assign
    echo "  $(last_round)"
    check "$name: the round resumed, the new replicas read as their sources" \
        eval '[[ "$(last_round)" == *" resumed "[1-9]* ]] && verify_secondary "$P"'
}
damaged flip1 flip
damaged trunc1 truncate
echo "  $REFUSED streams refused ($(elapsed))"

# ---------------------------------------------------------------------------------------
section "$CUTS interruptions at random points: sender killed, receiver killed, power cut of the secondary"
INTERRUPTED=0; RESUMED_TOKENS=0
[ -n "$NEWEST" ] || NEWEST=$(newest)   # (set by each verify_secondary)
for i in $(seq 1 "$CUTS"); do
    case $(( (i - 1) % 3 )) in 0) kind=sender ;; 1) kind=receiver ;; 2) kind=power ;; esac
    read -r P _ <<< "$NEWEST"   # the newest replica, as the last verification found it
    fio_chunks
    rm -f /tmp/cut/send.pid /tmp/cut/recv.pid
    while read -r -t 0 -u "$EV"; do read -r -u "$EV" _ || break; done   # nothing left from before
    K=$((RANDOM % 448 + 32))
    mark
    # The run says "done <exit status>" on the event FIFO when it ends; the cut point says
    # "point" there first if the stream gets that far.
    ( timeout -s KILL 180 "$CTL" replicate pri --to "/tmp/cutpoint $K | $TO" --rounds 1 --keep $KEEP --retries 0 \
        > /tmp/cut/rep.out 2>&1 < /dev/null; echo "done $?" > /tmp/cut/ev ) &
    rp=$!
    ev=timeout; rc=none
    read -r -t 240 -u "$EV" ev rc || true
    point=0
    if [ "$ev" = point ]; then
        point=1; INTERRUPTED=$((INTERRUPTED + 1))
        case $kind in
            sender) kill -KILL "$(cat /tmp/cut/send.pid 2> /dev/null)" ;;
            receiver) snooze "0.$((RANDOM % 5))"; kill -KILL "$(cat /tmp/cut/recv.pid 2> /dev/null)" ;;
            power) power off || echo "  (power off failed)" ;;
        esac
        echo go 1<> /tmp/cut/go   # the rest of the stream (into a dead receiver, or into the void)
        if [ "$kind" = power ]; then
            snooze "0.$((RANDOM % 10))"; kill -KILL "$(cat /tmp/cut/recv.pid 2> /dev/null)" 2> /dev/null
        fi
        ev=timeout; rc=none
        read -r -t 240 -u "$EV" ev rc || true
    fi
    wait "$rp"
    assign
    echo "  cut $i ($kind after $((K * 4)) KiB): $([ $point = 1 ] && echo interrupted || echo "NOT interrupted ($ev)"), replicate exit $rc"
    grep -E 'refused|round [0-9]+: (transfer|query)' /tmp/cut/rep.out | head -3 | sed 's/^/    /'
    if [ "$kind" = power ]; then
        # Reboot: the secondary goes while still dropping writes, power comes back, the
        # origin is made again from what its disks hold (journal replay).
        timeout 60 dmsetup remove sec > /dev/null 2>&1 || dmsetup remove --force sec > /dev/null 2>&1
        power on || echo "  (power on failed)"
        blockdev --flushbufs /dev/mapper/s_c 2> /dev/null   # shsnap check reads through the page cache
        check "cut $i: shsnap check: the secondary's store is consistent after the cut" "$REAL_SHSNAP" check /dev/mapper/s_c
        check "cut $i: the secondary comes back (journal replay)" "$CTL" origin-create sec /dev/mapper/s_o /dev/mapper/s_c $CH
    fi
    check "cut $i: the secondary's newest complete replica is still seq $P and reads as its source" newest_intact "$P"
    tok=$(pending_token)
    [ "$kind" = sender ] && check "cut $i: the receiver kept a resume token" test -n "$tok" -a "$tok" != -
    [ -n "$tok" ] && [ "$tok" != - ] && RESUMED_TOKENS=$((RESUMED_TOKENS + 1))
    mark same
    check "cut $i: replicate again" replicate
    assign
    echo "    $(last_round)"
    check "cut $i: $([ -n "$tok" ] && [ "$tok" != - ] && echo "the pending transfer was resumed" || echo "no transfer was pending")" \
        eval '[ -z "$tok" ] || [ "$tok" = - ] || [[ "$(last_round)" == *" resumed "[1-9]* ]]'
    if [ $((i % 4)) = 0 ] || [ "$i" = "$CUTS" ]; then
        check "cut $i: every replica reads as its source" verify_secondary
    else
        check "cut $i: the new replicas read as their sources" verify_secondary "$P"
    fi
done
echo "  $INTERRUPTED of $CUTS transfers interrupted at the cut point, $RESUMED_TOKENS resumed from a token ($(elapsed))"
check "every transfer was interrupted at its cut point" test "$INTERRUPTED" = "$CUTS"
check "the replication log has a line per round: snapshot, seq, base, chunks, bytes, seconds" \
    test "$(grep -cE ' round [0-9]+: snapshot repl-[^ ]+ \(seq [0-9]+\) base [^ ]+ chunks [0-9]+ bytes [0-9]+ seconds [0-9.]+' "$RLOGF")" -ge $((ROUNDS + CUTS + 2))

# ---------------------------------------------------------------------------------------
section "the online delta against a chunk-by-chunk comparison (16 KiB chunks, random workloads)"
DCHB=$((DCH * 512)); DNCH=$((LEN / DCH))
zero_head /dev/mapper/x_c
dd if=/dev/urandom of=/dev/mapper/x_o bs=1M count="$MB" oflag=direct status=none
check "origin dlt ($DNCH chunks of 16 KiB) on the other store's devices, reformatted" "$CTL" origin-create dlt /dev/mapper/x_o /dev/mapper/x_c $DCH
delta_chunks() { # origin from to: every chunk the delta lists (all pages); PAGES
    local start=0 out next
    PAGES=0
    while :; do
        out=$(dmsetup message "$1" 0 delta "$2" "$3" "$start") || return 1
        PAGES=$((PAGES + 1))
        # shellcheck disable=SC2086
        printf '%s\n' $out | awk -F+ '/^[0-9]+\+[0-9]+$/ { for (c = $1; c < $1 + $2; c++) print c }'
        # shellcheck disable=SC2086
        next=$(printf '%s\n' $out | awk 'p { print; exit } $1 == "next" { p = 1 } $1 == "end" { print "end"; exit }')
        [ "$next" = end ] && return 0
        if ! [[ $next =~ ^[0-9]+$ ]] || [ "$next" -le "$start" ]; then echo "delta page from $start: no end nor next: $out" >&2; return 1; fi
        start=$next
    done
}
dlt_id() { local id n; while read -r id n _; do [ "$n" != "$1" ] || { echo "$id"; return 0; }; done < "$SHSNAP_CTL_DIR/dlt.names"; }
# compare A B REWRITTEN_FILE (snapshot names): the delta of A..B against the chunks whose
# content differs; /tmp/d.missed, /tmp/d.fp (lexically sorted, for comm), /tmp/d.same.
compare() {
    local a=$1 b=$2 same=$3
    delta_chunks dlt "$(dlt_id "$a")" "$(dlt_id "$b")" > /tmp/d.raw || return 1
    sort /tmp/d.raw > /tmp/d.listed
    python3 /tmp/chunkdiff.py "/dev/mapper/dlt-$a" "/dev/mapper/dlt-$b" $DCHB > /tmp/d.raw || return 1
    sort /tmp/d.raw > /tmp/d.differ
    comm -13 /tmp/d.listed /tmp/d.differ > /tmp/d.missed
    comm -23 /tmp/d.listed /tmp/d.differ > /tmp/d.fp
    sort -u "$same" > /tmp/d.same
    echo "  delta $a..$b: $(wc -l < /tmp/d.listed) chunks listed in $PAGES pages, $(wc -l < /tmp/d.differ) differ, $(wc -l < /tmp/d.missed) missed, $(wc -l < /tmp/d.fp) false positives ($(comm -12 /tmp/d.fp /tmp/d.same | wc -l) of them written again with the same data)"
    FP_TOTAL=$((FP_TOTAL + $(wc -l < /tmp/d.fp)))
}
FP_TOTAL=0; DSNAP=0; PAGES=0
dsnap() { DSNAP=$((DSNAP + 1)); "$CTL" create dlt "d$DSNAP" > /dev/null && "$CTL" activate dlt "d$DSNAP" > /dev/null; }
dwrites() { # random writes (workload wl 3: also every third chunk), then chunks written again with the same data (listed in $1)
    [ "$wl" != 3 ] || python3 /tmp/rewrite.py /dev/mapper/dlt $DCHB stride 3 || return 1
    timeout 300 fio --ioengine=psync --direct=1 --rw=randwrite --refill_buffers --randseed="$RANDOM" --size="${MB}M" \
        --bsrange=4k-64k --name=origin --filename=/dev/mapper/dlt --io_size=$(( (RANDOM % 4 + 1) * 512 ))k --output=/tmp/fio.out || return 1
    local n=$((RANDOM % 12 + 4)) list=""
    for _ in $(seq 1 $n); do list="$list $((RANDOM % DNCH))"; done
    # shellcheck disable=SC2086
    printf '%s\n' $list | sort -un >> "$1"
    # shellcheck disable=SC2086
    python3 /tmp/rewrite.py /dev/mapper/dlt $DCHB $list
}
for wl in 1 2 3; do
    : > /tmp/d.r1; : > /tmp/d.r2
    A=$((DSNAP + 1)); M=$((DSNAP + 2)); B=$((DSNAP + 3))
    check "workload $wl: snapshot d$A, random writes and rewrites, d$M, more, d$B" \
        eval 'dsnap && dwrites /tmp/d.r1 && dsnap && dwrites /tmp/d.r2 && dsnap'
    mapper_nodes
    sort -u /tmp/d.r1 /tmp/d.r2 > /tmp/d.r12
    for pair in "d$A d$M /tmp/d.r1" "d$M d$B /tmp/d.r2" "d$A d$B /tmp/d.r12"; do
        read -r a b same <<< "$pair"
        compare "$a" "$b" "$same"; crc=$?
        check "workload $wl: delta $a..$b lists every chunk that differs (no false negative)" eval '[ $crc = 0 ] && [ ! -s /tmp/d.missed ]'
        check "workload $wl: delta $a..$b: its false positives are chunks written again with the same data" \
            eval '[ $crc = 0 ] && [ -z "$(comm -23 /tmp/d.fp /tmp/d.same)" ]'
    done
done
check "delta - d$DSNAP (a full send) lists every chunk" eval 'delta_chunks dlt - "$(dlt_id "d$DSNAP")" > /tmp/d.full && [ "$(sort -u /tmp/d.full | wc -l)" = $DNCH ] && [ "$(wc -l < /tmp/d.full)" = $DNCH ]'
echo "  delta - d$DSNAP: $(wc -l < /tmp/d.full) chunks in $PAGES pages"
check_fails "delta of a snapshot against itself is refused (EINVAL)" dmsetup message dlt 0 delta "$(dlt_id d1)" "$(dlt_id d1)" 0
check_fails "delta naming a snapshot that does not exist is refused (ENOENT)" dmsetup message dlt 0 delta "$(dlt_id d1)" 999999 0
echo "  false positives over 9 comparisons: $FP_TOTAL ($(elapsed))"

# ---------------------------------------------------------------------------------------
section "teardown"
reap
for i in $(seq 1 "$DSNAP"); do dmsetup remove "dlt-d$i" > /dev/null 2>&1; done
check "remove the origins and the writable snapshot" sh -c "dmsetup remove pri-work && dmsetup remove pri && dmsetup remove sec && dmsetup remove dlt"
blockdev --flushbufs /dev/mapper/p_c /dev/mapper/s_c 2> /dev/null   # shsnap check reads through the page cache
check "shsnap check: the primary's store is clean" "$REAL_SHSNAP" check /dev/mapper/p_c
check "shsnap check: the secondary's store is clean" "$REAL_SHSNAP" check /dev/mapper/s_c
dmsetup remove p_o p_c s_o s_c x_o x_c
check "unload the module" rmmod dm_shared_snap
echo "  counts: $ROUNDS rounds replicated, $INTERRUPTED interruptions resumed ($RESUMED_TOKENS from a resume token), $REFUSED streams refused, $FP_TOTAL delta false positives; $(elapsed)"
check_dmesg
check_kmemleak
finish
