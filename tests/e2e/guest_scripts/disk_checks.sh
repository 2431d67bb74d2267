# disk_checks.sh -- SCSI and block-layer checks of every expected disk (busybox ash).
#
# Parameters (exported by the generated header; defaults below):
#   E2E_NDISKS                number of disks
#   DISK<i>_LUN / _TARGET     SCSI address of disk i (TARGET empty: any target)
#   DISK<i>_RO                1: read-only disk (write checks expect failure)
#   RUN_FIO FIO_SIZE_MB FIO_NUMJOBS FIO_OFFSET_MB FIO_IODEPTH FIO_BSRANGE FIO_RUNTIME
#   FIO_NEGATIVE              1: afterwards corrupt the fio region and expect a verify failure
#   PATTERN_FILE PATTERN_OFFSET_MB   1 MiB file written at that offset, read back
#   UNMAP_OFFSET_MB UNMAP_MB         region for sg_unmap (first MiB) and blkdiscard (second)
#
# Results (d<i> = disk i, in the order of the DISK<i> variables):
#   guest.uname guest.nproc guest.lsscsi guest.dmesg
#   d<i>.dev d<i>.sg d<i>.addr d<i>.sysfs d<i>.mq          values
#   d<i>.turs d<i>.inq d<i>.inq_raw d<i>.vpd.<pg> d<i>.vpd_raw.<pg> (pg 00 80 83 b0 b1 b2)
#   d<i>.readcap d<i>.readcap_raw d<i>.mode.<pg> d<i>.mode_raw.<pg> (pg 01 08 0a) d<i>.mode_all
#   d<i>.luns d<i>.opcodes d<i>.md5_head d<i>.last_read10 d<i>.oor_read10 d<i>.oor_read16
#   read-write: d<i>.fio_write(_json) d<i>.drop_caches d<i>.fio_verify(_json) [d<i>.fio_negative] d<i>.pattern_write
#               d<i>.pattern_md5 d<i>.unmap_fill d<i>.unmap d<i>.get_lba_status d<i>.unmap_nonzero
#               d<i>.blkdiscard d<i>.blkdiscard_nonzero d<i>.sync
#   read-only:  d<i>.ro_write10 d<i>.ro_dd d<i>.sync
#   (*_raw: binary command output; the host decodes it from out_bytes.)

: "${E2E_NDISKS:=1}" "${RUN_FIO:=1}" "${FIO_SIZE_MB:=8}" "${FIO_NUMJOBS:=4}" "${FIO_OFFSET_MB:=1}"
: "${FIO_IODEPTH:=8}" "${FIO_BSRANGE:=4k-64k}" "${FIO_RUNTIME:=240}"
: "${PATTERN_FILE:=/data/pattern.bin}" "${PATTERN_OFFSET_MB:=33}" "${UNMAP_OFFSET_MB:=34}" "${UNMAP_MB:=2}"

# find_disk: find disk $WANT_LUN (on target $WANT_TARGET, empty: any); set SD (sdX), SG (sgN), ADDR (H:C:T:L); fail if not found.
find_disk() {
    local d a oldifs
    for d in /sys/block/sd*; do
        [ -e "$d/device" ] || continue
        a=$(basename "$(readlink "$d/device")")
        oldifs=$IFS
        IFS=:
        set -- $a
        IFS=$oldifs
        if [ "$4" = "$WANT_LUN" ] && { [ -z "$WANT_TARGET" ] || [ "$3" = "$WANT_TARGET" ]; }; then
            SD=${d##*/}
            SG=$(ls "$d/device/scsi_generic" 2>/dev/null | head -n 1)
            ADDR=$a
            return 0
        fi
    done
    return 1
}

# Hex bytes of N as a COUNT-byte big-endian number, space separated.
hexbytes() {
    printf "%0$(($2 * 2))x" "$1" | sed 's/../& /g'
}

sysfs_dump() {
    local b=/sys/block/$1 f
    for f in size ro removable queue/logical_block_size queue/physical_block_size queue/minimum_io_size \
        queue/optimal_io_size queue/discard_granularity queue/discard_max_bytes queue/discard_max_hw_bytes \
        queue/write_same_max_bytes queue/write_zeroes_max_bytes queue/rotational queue/write_cache queue/fua \
        queue/max_sectors_kb queue/max_hw_sectors_kb queue/max_segments queue/nr_requests queue/scheduler \
        device/vendor device/model device/rev device/queue_depth device/scsi_level device/type device/state; do
        [ -r "$b/$f" ] && printf '%s=%s\n' "$f" "$(cat "$b/$f" 2>/dev/null)"
    done
    for f in "$b"/device/scsi_disk/*/*; do
        case "${f##*/}" in
            provisioning_mode | thin_provisioning | protection_type | cache_type | FUA | zeroing_mode | max_write_same_blocks | manage_start_stop)
                printf 'scsi_disk/%s=%s\n' "${f##*/}" "$(cat "$f" 2>/dev/null)" ;;
        esac
    done
}

# Count non-zero bytes in MB MiB of /dev/$SD starting at OFFSET_MB.
nonzero() {
    dd if="/dev/$SD" bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | tr -d '\000' | wc -c
}

common_checks() {
    local p=$1 pg lbs nblocks
    result "$p.dev" "$SD"
    result "$p.sg" "$SG"
    result "$p.addr" "$ADDR"
    result "$p.sysfs" "$(sysfs_dump "$SD")"
    result_num "$p.mq" "$(ls "/sys/block/$SD/mq" 2>/dev/null | wc -l)"
    check "$p.turs" sg_turs "/dev/$SG"
    check "$p.inq" sg_inq "/dev/$SG"
    check "$p.inq_raw" sg_inq -r "/dev/$SG"
    for pg in 00 80 83 b0 b1 b2; do
        check "$p.vpd.$pg" sg_vpd -p "0x$pg" "/dev/$SG"
        check "$p.vpd_raw.$pg" sg_vpd -p "0x$pg" -r "/dev/$SG"
    done
    check "$p.readcap" sg_readcap -l "/dev/$SG"
    check "$p.readcap_raw" sg_readcap -l -r "/dev/$SG"
    for pg in 01 08 0a; do
        check "$p.mode.$pg" sg_modes -p "0x$pg" "/dev/$SG"
        check "$p.mode_raw.$pg" sg_modes -p "0x$pg" -r "/dev/$SG"
    done
    check "$p.mode_all" sg_modes -a "/dev/$SG"
    check "$p.luns" sg_luns "/dev/$SG"
    check "$p.opcodes" sg_opcodes "/dev/$SG"
    check_sh "$p.md5_head" "dd if=/dev/$SD bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"
    result "$p.md5_head" "$(cat "$T_TMP.out")"

    # Boundary reads: the last block must read, the one after it must fail with
    # ILLEGAL REQUEST / LBA OUT OF RANGE (05/21/00).  -v makes sg_raw print the raw sense.
    lbs=$(cat "/sys/block/$SD/queue/logical_block_size")
    nblocks=$(($(cat "/sys/block/$SD/size") * 512 / lbs))
    if [ "$nblocks" -le 4294967295 ]; then
        check "$p.last_read10" sg_raw -v -r "$lbs" -o /dev/null "/dev/$SG" 28 00 $(hexbytes $((nblocks - 1)) 4) 00 00 01 00
        check "$p.oor_read10" sg_raw -v -r "$lbs" -o /dev/null "/dev/$SG" 28 00 $(hexbytes "$nblocks" 4) 00 00 01 00
    fi
    check "$p.oor_read16" sg_raw -v -r "$lbs" -o /dev/null "/dev/$SG" 88 00 $(hexbytes "$nblocks" 8) 00 00 00 01 00 00
}

rw_checks() {
    local p=$1 lbs ulba unum fio_common
    lbs=$(cat "/sys/block/$SD/queue/logical_block_size")
    if [ "$RUN_FIO" = 1 ]; then
        # Random writes, 4 jobs on disjoint regions, crc32c verify, then (after dropping
        # caches) a verify-only pass that replays the same pattern and reads it back.
        fio_common="--filename=/dev/$SD --direct=1 --ioengine=libaio --iodepth=$FIO_IODEPTH \
            --rw=randwrite --bsrange=$FIO_BSRANGE --numjobs=$FIO_NUMJOBS --offset=${FIO_OFFSET_MB}M \
            --size=${FIO_SIZE_MB}M --offset_increment=${FIO_SIZE_MB}M --verify=crc32c --verify_fatal=1 \
            --randrepeat=1 --group_reporting --output-format=json --runtime=$FIO_RUNTIME"
        check "$p.fio_write" fio --name=e2e $fio_common --output=/tmp/fio_write.json
        result_file "$p.fio_write_json" /tmp/fio_write.json
        check_sh "$p.drop_caches" "sync; echo 3 > /proc/sys/vm/drop_caches"
        check "$p.fio_verify" fio --name=e2e $fio_common --verify_only --output=/tmp/fio_verify.json
        result_file "$p.fio_verify_json" /tmp/fio_verify.json
        if [ "${FIO_NEGATIVE:-0}" = 1 ]; then
            # Harness self-check: zero 64 KiB inside the verified region; verifying again must fail.
            dd if=/dev/zero of="/dev/$SD" bs=64k seek=$((FIO_OFFSET_MB * 16 + 1)) count=1 \
                oflag=direct conv=fsync,notrunc 2>/dev/null
            check "$p.fio_negative" fio --name=e2e $fio_common --verify_only --output=/tmp/fio_negative.json
        fi
    fi

    check "$p.pattern_write" dd if="$PATTERN_FILE" of="/dev/$SD" bs=1M seek="$PATTERN_OFFSET_MB" count=1 \
        oflag=direct conv=fsync,notrunc
    check_sh "$p.pattern_md5" "dd if=/dev/$SD bs=1M skip=$PATTERN_OFFSET_MB count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"
    result "$p.pattern_md5" "$(cat "$T_TMP.out")"

    # UNMAP: fill the region with data first so a zero read-back means something.
    check_sh "$p.unmap_fill" "for i in \$(seq 1 $UNMAP_MB); do cat $PATTERN_FILE; done | \
        dd of=/dev/$SD bs=1M seek=$UNMAP_OFFSET_MB count=$UNMAP_MB iflag=fullblock oflag=direct conv=fsync,notrunc"
    ulba=$((UNMAP_OFFSET_MB * 1048576 / lbs))
    unum=$((1048576 / lbs))
    check "$p.unmap" sg_unmap --force --lba="$ulba" --num="$unum" "/dev/$SG"
    check "$p.get_lba_status" sg_get_lba_status --lba="$ulba" "/dev/$SG"
    result_num "$p.unmap_nonzero" "$(nonzero "$UNMAP_OFFSET_MB" 1)"
    # The kernel's discard path (UNMAP or WRITE SAME, per provisioning_mode).
    check "$p.blkdiscard" blkdiscard -o $(((UNMAP_OFFSET_MB + 1) * 1048576)) -l 1048576 "/dev/$SD"
    result_num "$p.blkdiscard_nonzero" "$(nonzero $((UNMAP_OFFSET_MB + 1)) 1)"
    check "$p.sync" sg_sync "/dev/$SG"
}

ro_checks() {
    local p=$1 lbs
    lbs=$(cat "/sys/block/$SD/queue/logical_block_size")
    dd if=/dev/zero of=/tmp/zero.blk bs="$lbs" count=1 2>/dev/null
    # WRITE(10) of one block at LBA 0 must fail with DATA PROTECT (sense key 7).
    check "$p.ro_write10" sg_raw -v -s "$lbs" -i /tmp/zero.blk "/dev/$SG" 2a 00 00 00 00 00 00 00 01 00
    check "$p.ro_dd" dd if=/dev/zero of="/dev/$SD" bs=4096 count=1 oflag=direct conv=fsync,notrunc
    check "$p.sync" sg_sync "/dev/$SG"
}

result guest.uname "$(uname -a)"
result_num guest.nproc "$(nproc)"
result guest.lsscsi "$(lsscsi 2>&1)"

i=0
while [ "$i" -lt "$E2E_NDISKS" ]; do
    eval "WANT_LUN=\${DISK${i}_LUN:-$i} WANT_TARGET=\${DISK${i}_TARGET:-} ro=\${DISK${i}_RO:-0}"
    if ! find_disk; then
        result "d$i.missing" "lun $WANT_LUN target ${WANT_TARGET:-any} not found"
        i=$((i + 1))
        continue
    fi
    say "disk d$i: $SD ($ADDR, $SG) ro=$ro"
    common_checks "d$i"
    if [ "$ro" = 1 ]; then
        ro_checks "d$i"
    else
        rw_checks "d$i"
    fi
    i=$((i + 1))
done

result guest.dmesg "$(dmesg | grep -iE 'scsi|sd[a-z]|sg|virtio|blk|i/o|error|fail|warn|call trace|bug' | tail -n 300)"
exit 0
