#!/bin/bash
# Snapshots of a mounted file system (ext4 and xfs): the origin stays mounted and written
# while snapshots are taken (after fsfreeze, and without it), activated and mounted beside
# it (read-only, and writable with the journal replayed), and every file system is clean
# by fsck afterwards.  The snapshot tables name the origin device, as dm-snapshot's do.
# Runs inside scripts/vm-run --disks 2 (1 GiB each: xfs wants 300 MiB).
. "$(dirname "$0")/lib.sh"
setup_guest
SZ=$(blockdev --getsz /dev/vda)
M=/tmp/mnt
mkdir -p $M/o $M/s1 $M/s2

files() { # dir prefix count: files of random data, 256 KiB each
    local i
    for i in $(seq 1 "$3"); do
        head -c 262144 /dev/urandom > "$1/$2$i" || return 1
    done
}
manifest() { (cd "$1" && find . -type f -name "$2*" | sort | xargs -r sha256sum); }
fsck_clean() { # fs dev
    case $1 in
        ext4) e2fsck -fn "$2" ;;
        xfs) xfs_repair -n "$2" ;;
    esac
}
mkfs_() { # fs dev
    case $1 in
        ext4) mkfs.ext4 -q -F "$2" ;;
        xfs) mkfs.xfs -q -f "$2" ;;
    esac
}
# xfs refuses a second mount of the same file system UUID unless told.
mopts() { [ "$1" = xfs ] && echo "nouuid,$2" || echo "$2"; }
snap_up() { dmsetup create "$1" --table "0 $SZ shared-snapshot $(odev fo) $2" && mapper_nodes; }
writer() { # keeps writing and syncing files on the origin until /tmp/stop exists
    local i=0
    while [ ! -e /tmp/stop ]; do
        i=$((i + 1))
        head -c 65536 /dev/urandom > $M/o/w$((i % 50)) 2>/dev/null
        [ $((i % 10)) = 0 ] && sync -f $M/o
    done
}

for fs in ext4 xfs; do
    section "$fs on the origin, mounted and written while snapshots are taken"
    dd if=/dev/zero of=/dev/vdb bs=1M count=4 oflag=direct status=none
    check "$fs: create origin" dmsetup create fo --table "0 $SZ shared-origin /dev/vda /dev/vdb 128"
    mapper_nodes
    check "$fs: mkfs on the origin" mkfs_ $fs /dev/mapper/fo
    check "$fs: mount the origin" mount /dev/mapper/fo $M/o
    check "$fs: files before snapshot 1" files $M/o a 40
    manifest $M/o a > /tmp/a.sum
    rm -f /tmp/stop; writer & wpid=$!
    sleep 2
    check "$fs: fsfreeze, create 1, thaw" sh -c "fsfreeze -f $M/o && dmsetup message fo 0 create 1; r=\$?; fsfreeze -u $M/o; exit \$r"
    check "$fs: more files after snapshot 1" files $M/o b 20
    sync -f $M/o
    manifest $M/o b > /tmp/b.sum
    check "$fs: create 2 while the origin is being written (no freeze)" dmsetup message fo 0 create 2
    check "$fs: activate snapshot 1 while the origin is mounted" snap_up fs1 1
    check "$fs: activate snapshot 2 while the origin is mounted" snap_up fs2 2
    touch /tmp/stop; wait $wpid
    check "$fs: the snapshot table names the origin device" sh -c "dmsetup table fs1 | grep -q \"shared-snapshot $(odev fo) 1\""

    section "$fs: snapshots mounted beside the origin"
    if [ $fs = ext4 ]; then
        check "$fs: snapshot 1 (frozen) is clean by fsck" fsck_clean $fs /dev/mapper/fs1
        ro=ro
    else
        # A frozen xfs still has a log to replay (xfs_repair -n refuses it): read it as it
        # is, without recovery, which would write.
        ro=ro,norecovery
    fi
    check "$fs: mount snapshot 1 read-only beside the origin" mount -o "$(mopts $fs $ro)" /dev/mapper/fs1 $M/s1
    check "$fs: snapshot 1 holds the files of its time" sh -c "cd $M/s1 && find . -type f -name 'a*' | sort | xargs -r sha256sum | cmp - /tmp/a.sum"
    check "$fs: snapshot 1 has none of the later files" sh -c "! ls $M/s1 | grep -q '^b'"
    check "$fs: mount snapshot 2 writable (journal replayed)" mount -o "$(mopts $fs rw)" /dev/mapper/fs2 $M/s2
    check "$fs: snapshot 2 holds every file synced before it" sh -c "cd $M/s2 && find . -type f -name 'b*' | sort | xargs -r sha256sum | cmp - /tmp/b.sum"
    check "$fs: write files on snapshot 2" files $M/s2 c 10
    check "$fs: origin still written beside its snapshots" files $M/o d 10
    check "$fs: unmount snapshot 2" umount $M/s2
    check "$fs: snapshot 2 is clean by fsck after its own writes" fsck_clean $fs /dev/mapper/fs2
    check "$fs: unmount snapshot 1" umount $M/s1
    if [ $fs = xfs ]; then
        check "$fs: snapshot 1 mounted writable (log replayed) and unmounted" sh -c "mount -o nouuid /dev/mapper/fs1 $M/s1 && umount $M/s1"
        check "$fs: snapshot 1 is clean by fsck" fsck_clean $fs /dev/mapper/fs1
    fi

    section "$fs: the origin can be mounted while snapshots are active"
    check "$fs: unmount the origin" umount $M/o
    check "$fs: mount the origin again, snapshots active" mount /dev/mapper/fo $M/o
    check "$fs: origin files intact" sh -c "cd $M/o && find . -type f -name 'a*' | sort | xargs -r sha256sum | cmp - /tmp/a.sum"
    check "$fs: unmount the origin" umount $M/o
    check "$fs: origin is clean by fsck" fsck_clean $fs /dev/mapper/fo
    check "$fs: snapshot 1 is still clean" fsck_clean $fs /dev/mapper/fs1
    dmsetup status fo; dmsetup status fs1; dmsetup status fs2
    check "$fs: no snapshot invalidated" sh -c "dmsetup status fo | grep -q ' ok -'"
    check "$fs: remove the devices" sh -c "dmsetup remove fs1 && dmsetup remove fs2 && dmsetup remove fo"
done

check "rmmod" rmmod dm_shared_snap
check_dmesg
check_kmemleak
finish
