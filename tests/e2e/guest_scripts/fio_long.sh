# fio_long.sh -- long verified random-write I/O for lifecycle tests (busybox ash).
#
# The host starts this, waits for the "fio.started" result (I/O is flowing), then
# injects a fault (kills a worker, restarts or stops the daemon, powers the VM off)
# and finally judges the results (tests/e2e/guest.py: fio_long_summary).
#
# Workload: rounds of the same fio job until FIO_RUNTIME seconds have passed.  A
# round writes every block of FIO_NUMJOBS disjoint regions (--offset_increment)
# exactly once with random 4k-64k direct writes carrying crc32c verify headers,
# then reads it all back and verifies (--verify_fatal=1).  Before every round the
# region is discarded (or zeroed), so a write lost in this round leaves zeros (bad
# magic) rather than a valid block of the previous round.  Each round gets its own
# --randseed.  After the last round: drop_caches and a verify-only readback pass.
#
# Parameters (env, defaults below):
#   DISK0_LUN                      SCSI LUN of the disk to use
#   FIO_RUNTIME                    seconds of rounds (a round started in time is finished)
#   FIO_SIZE_MB FIO_NUMJOBS FIO_OFFSET_MB FIO_IODEPTH FIO_BSRANGE
#   FIO_START_IOS                  completed writes on the disk before "fio.started"
#   FIO_MAX_ROUNDS                 stop after this many rounds even if time is left
#   MON_INTERVAL                   seconds between "mon" records (0: no monitor)
#
# Results:
#   fio.disk          {value: "sdX sgN H:C:T:L"}
#   fio.wipe          {value: "discard" or "zero rc=N"}: how the region was cleared before round 1
#   fio.started       {value: uptime} -- the marker: fio has completed FIO_START_IOS writes
#   mon               repeated: {"t": uptime, "w": writes done, "r": reads done,
#                     "inflight": requests in flight, "errs": kernel I/O error/abort/reset lines}
#   fio.round.<k>     {rc, t0, t1, out (fio JSON), err (fio stderr)}
#   fio.gap.<k>       {value: "MAX_GAP_MS AT_MS FIRST_MS NSAMPLES"}: longest time in round k during
#                     which no I/O of any job completed, when it began (ms after the round's
#                     start), the time to the round's first completion, and the samples
#   fio.rounds        {value: number of rounds run}
#   fio.drop_caches fio.verify   the final verify-only pass (rc, out = fio JSON)
#   guest.dmesg       kernel messages about SCSI/block/errors
#   fio.done          {value: 0 if every round and the final verify passed, else 1}

: "${DISK0_LUN:=0}" "${FIO_RUNTIME:=20}" "${FIO_SIZE_MB:=8}" "${FIO_NUMJOBS:=4}" "${FIO_OFFSET_MB:=1}"
: "${FIO_IODEPTH:=8}" "${FIO_BSRANGE:=4k-64k}" "${FIO_START_IOS:=64}" "${FIO_MAX_ROUNDS:=1000}"
: "${MON_INTERVAL:=1}"

# The monitor below writes result lines concurrently with this script, and a long line
# (a round's fio JSON) reaches the serial port in several write()s: serialize whole
# lines with a lock (mkdir is atomic), or they interleave and become unparsable.
t_emit() {
    while ! mkdir /tmp/.emit.lock 2>/dev/null; do usleep 2000; done
    { printf '%s\n' "$*" >&3; } 2>/dev/null || printf '%s\n' "$*"
    rmdir /tmp/.emit.lock
}

up_ms() {
    local up rest
    read -r up rest < /proc/uptime
    echo "$up" | awk '{printf "%d", $1 * 1000}'
}

SD="" SG="" ADDR=""
for d in /sys/block/sd*; do
    [ -e "$d/device" ] || continue
    a=$(basename "$(readlink "$d/device")")
    if [ "${a##*:}" = "$DISK0_LUN" ]; then
        SD=${d##*/}
        SG=$(ls "$d/device/scsi_generic" 2>/dev/null | head -n 1)
        ADDR=$a
        break
    fi
done
if [ -z "$SD" ]; then
    result fio.disk ""
    result_num fio.done 1
    exit 1
fi
result fio.disk "$SD $SG $ADDR"

# /sys/block/<dev>/stat: reads completed ($1), writes completed ($5), in flight ($9).
disk_stat() { cat "/sys/block/$SD/stat" 2>/dev/null; }
writes_done() { disk_stat | awk '{print $5 + 0}'; }

kernel_errs() {
    dmesg 2>/dev/null | grep -ciE 'i/o error|critical (medium|target)|abort|reset|timing out|rejecting i/o|offline'
}

monitor() {
    while [ ! -e /tmp/mon.stop ]; do
        set -- $(disk_stat)
        t_emit "@@R mon {\"t\":$(_t_uptime),\"r\":${1:-0},\"w\":${5:-0},\"inflight\":${9:-0},\"errs\":$(kernel_errs)}"
        sleep "$MON_INTERVAL"
    done
}
if [ "$MON_INTERVAL" != 0 ]; then
    monitor &
    MON_PID=$!
fi

region_off=$((FIO_OFFSET_MB * 1048576))
region_len=$((FIO_SIZE_MB * FIO_NUMJOBS * 1048576))
fio_common="--filename=/dev/$SD --direct=1 --ioengine=libaio --iodepth=$FIO_IODEPTH \
    --rw=randwrite --bsrange=$FIO_BSRANGE --numjobs=$FIO_NUMJOBS --offset=${FIO_OFFSET_MB}M \
    --size=${FIO_SIZE_MB}M --offset_increment=${FIO_SIZE_MB}M --verify=crc32c --verify_fatal=1 \
    --group_reporting --output-format=json"

WIPE=""
wipe_region() {
    # Discard (vscsid punches holes, which read back as zeros); zero it if discard fails.
    if blkdiscard -o "$region_off" -l "$region_len" "/dev/$SD" 2>/dev/null; then
        WIPE=discard
    else
        dd if=/dev/zero of="/dev/$SD" bs=1M seek="$FIO_OFFSET_MB" count=$((FIO_SIZE_MB * FIO_NUMJOBS)) \
            oflag=direct conv=notrunc 2>/dev/null
        WIPE="zero rc=$?"
    fi
}

# Longest interval without any completion: merge the per-job completion logs of a round.
# fio's lat logs: "time_ms, latency, ddir, bs, offset[, prio]", time since the job's start.
round_gap() {
    cat "$1"_clat.*.log 2>/dev/null | cut -d, -f1 | sort -n | awk '
        NR == 1 { first = $1; prev = $1; max = $1; at = 0; n = 1; next }
        { g = $1 - prev; if (g > max) { max = g; at = prev }; prev = $1; n++ }
        END { if (n == 0) print "-1 -1 -1 0"; else printf "%d %d %d %d", max, at, first, n }'
}

end_ms=$(($(up_ms) + FIO_RUNTIME * 1000))
all_ok=0
k=0
while :; do
    k=$((k + 1))
    wipe_region
    [ "$k" = 1 ] && result fio.wipe "$WIPE"
    rm -f /tmp/lat_r"$k"_*
    t0=$(_t_uptime)
    base_w=$(writes_done)
    fio --name=long $fio_common --randseed=$((1000 + k)) \
        --write_lat_log=/tmp/lat_r"$k" --log_avg_msec=0 --disable_slat=1 \
        --output=/tmp/fio_r"$k".json > /dev/null 2> /tmp/fio_r"$k".err < /dev/null 3>&- &
    fio_pid=$!
    if [ "$k" = 1 ]; then
        # The marker: this round's writes are completing on the disk.
        while kill -0 "$fio_pid" 2>/dev/null && [ $(($(writes_done) - base_w)) -lt "$FIO_START_IOS" ]; do
            usleep 20000
        done
        result fio.started "$(_t_uptime)"
    fi
    wait "$fio_pid"
    rc=$?
    t1=$(_t_uptime)
    t_emit "@@R fio.round.$k {\"rc\":$rc,\"t0\":$t0,\"t1\":$t1,\"out_b64\":\"$(_t_b64 /tmp/fio_r$k.json 2>/dev/null)\",\"err_b64\":\"$(_t_b64 /tmp/fio_r$k.err 2>/dev/null)\"}"
    say "fio round $k rc=$rc ($t0 .. $t1)"
    result "fio.gap.$k" "$(round_gap /tmp/lat_r$k)"
    rm -f /tmp/lat_r"$k"_*
    if [ "$rc" != 0 ]; then
        all_ok=1
        break
    fi
    [ "$(up_ms)" -ge "$end_ms" ] && break
    [ "$k" -ge "$FIO_MAX_ROUNDS" ] && break
done
result_num fio.rounds "$k"

# Readback of the last round's data after dropping the page cache.
check_sh fio.drop_caches "sync; echo 3 > /proc/sys/vm/drop_caches"
check fio.verify fio --name=long $fio_common --randseed=$((1000 + k)) --verify_only --output=/tmp/fio_verify.json
vrc=$?
result_file fio.verify_json /tmp/fio_verify.json
[ "$vrc" = 0 ] || all_ok=1

touch /tmp/mon.stop
[ -n "$MON_PID" ] && wait "$MON_PID" 2>/dev/null
result guest.dmesg "$(dmesg | grep -iE 'scsi|sd[a-z]|sg|virtio|blk|i/o|error|fail|warn|abort|reset|call trace|bug' | tail -n 200)"
result_num fio.done "$all_ok"
exit 0
