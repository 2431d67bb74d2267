# live_ops.sh -- watch the guest's SCSI disks while the host changes the daemon's LUNs
# (busybox ash). The guest never rescans by hand: whatever changes, the kernel did it
# on the daemon's events (virtio-scsi event queue) and unit attentions.
#
# Parameters (env):
#   WATCH_SECONDS   how long to watch (the host usually powers the VM off before)
#   FIO_HCTL        H:C:T:L of a disk to keep fio verify running on (empty: none)
#   FIO_LOOPS       write+verify passes of that fio (4k random writes, crc32c)
#   VERIFY_NEW      1: run a short fio verify on every disk that appears later
#
# Results:
#   disks.N         {value: "sdX H:C:T:L SECTORS" lines}: the disks at start (N=0) and
#                   after every change (a disk came or went, a size changed)
#   verify.sdX      check result of the fio verify on a disk that appeared
#   fio.started     the background fio's writes are completing
#   fio             check-style result of the background fio (rc, out = fio JSON)
#   guest.dmesg     kernel messages about SCSI at the end

: "${WATCH_SECONDS:=120}" "${FIO_HCTL:=}" "${FIO_LOOPS:=3}" "${VERIFY_NEW:=0}"

t_emit() {
    while ! mkdir /tmp/.emit.lock 2>/dev/null; do usleep 2000; done
    { printf '%s\n' "$*" >&3; } 2>/dev/null || printf '%s\n' "$*"
    rmdir /tmp/.emit.lock
}

snapshot() {
    # A disk that is going (or still coming) may lose its sysfs entries between two reads:
    # it is listed only when its address and size were both read.
    for d in /sys/block/sd*; do
        [ -e "$d/device" ] || continue
        hctl=$(basename "$(readlink "$d/device" 2>/dev/null)" 2>/dev/null)
        size=$(cat "$d/size" 2>/dev/null)
        [ -n "$hctl" ] && [ "$hctl" != . ] && [ -n "$size" ] || continue
        echo "${d##*/} $hctl $size"
    done | sort
}

disk_of() {
    for d in /sys/block/sd*; do
        [ -e "$d/device" ] || continue
        [ "$(basename "$(readlink "$d/device")")" = "$1" ] && { echo "${d##*/}"; return; }
    done
}

if [ -n "$FIO_HCTL" ]; then
    FD=$(disk_of "$FIO_HCTL")
    (
        base=$(awk '{print $5}' "/sys/block/$FD/stat")
        fio --name=bg --filename="/dev/$FD" --direct=1 --ioengine=libaio --iodepth=8 \
            --rw=randwrite --bs=4k --size=8M --loops="$FIO_LOOPS" --verify=crc32c \
            --verify_backlog=256 --verify_fatal=1 --randseed=7 --output-format=json \
            --output=/tmp/fio_bg.json > /dev/null 2> /tmp/fio_bg.err < /dev/null 3>&- &
        pid=$!
        while kill -0 "$pid" 2>/dev/null \
                && [ $(($(awk '{print $5}' "/sys/block/$FD/stat") - base)) -lt 64 ]; do
            usleep 20000
        done
        t_emit "@@R fio.started {\"value_b64\":\"$(printf '%s' "$FD" | _t_b64)\"}"
        wait "$pid"
        rc=$?
        t_emit "@@R fio {\"rc\":$rc,\"out_b64\":\"$(_t_b64 /tmp/fio_bg.json)\",\"err_b64\":\"$(_t_b64 /tmp/fio_bg.err)\"}"
    ) &
fi

n=0
prev=$(snapshot)
t_emit "@@R disks.0 {\"value_b64\":\"$(printf '%s' "$prev" | _t_b64)\"}"
end=$(($(cut -d. -f1 /proc/uptime) + WATCH_SECONDS))
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    usleep 100000
    now=$(snapshot)
    [ "$now" = "$prev" ] && continue
    n=$((n + 1))
    t_emit "@@R disks.$n {\"uptime\":$(_t_uptime),\"value_b64\":\"$(printf '%s' "$now" | _t_b64)\"}"
    if [ "$VERIFY_NEW" = 1 ]; then
        for sd in $(printf '%s\n' "$now" | cut -d' ' -f1); do
            printf '%s\n' "$prev" | grep -q "^$sd " && continue
            check "verify.$sd" fio --name=new --filename="/dev/$sd" --direct=1 --ioengine=libaio \
                --iodepth=8 --rw=randwrite --bs=4k --size=4M --verify=crc32c --verify_fatal=1 \
                --randseed=11 --output-format=json
        done
    fi
    prev=$now
done
result guest.dmesg "$(dmesg | grep -iE 'scsi|sd[a-z]|virtio|capacity|attention|error' | tail -n 100)"
