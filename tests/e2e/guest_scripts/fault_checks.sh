# fault_checks.sh -- the guest meets faults injected on its disk (busybox ash).
#
# The host serves LUN $DISK0_LUN with inject=medium@read:BAD_LBA-(BAD_LBA+7)+hang@read:HANG_LBA*1
# (4 KiB of unreadable blocks, and one read that never completes) and judges the results.
#
# Parameters (env): DISK0_LUN BAD_LBA (a multiple of 8) HANG_LBA HANG_WAIT (seconds the hung
# read is left alone before the reset)
#
# Linux's virtio-scsi driver never aborts a command on a timeout (virtscsi_eh_timed_out
# resets the timer: the host is trusted to answer), so the error handler is asked
# for a device reset with sg_reset -d, the way a user or a cluster manager does: it
# sends LOGICAL UNIT RESET on the control queue.
#
# Results:
#   fault.disk                {value: "sdX sgN H:C:T:L"}
#   fault.bad_read            dd of the 4 KiB at BAD_LBA (expected to fail: EIO)
#   fault.before fault.after  md5 of the 4 KiB just before / after the bad blocks (they read fine)
#   fault.straddle            sg_raw -v READ(10) of LBAs BAD_LBA-4 .. BAD_LBA+3 (sense, INFORMATION)
#   fault.hang_stuck          {value: "stuck N" (N requests in flight) or "done"} after HANG_WAIT s
#   fault.reset               sg_reset -d (LOGICAL UNIT RESET through the control queue)
#   fault.hang_rc fault.hang_s  the hung dd's exit status once reset and retried, and its duration
#   fault.write fault.readback  a write and its readback after all that
#   guest.dmesg               kernel messages (the sense, the abort)

: "${DISK0_LUN:=0}" "${BAD_LBA:=2048}" "${HANG_LBA:=8192}" "${HANG_WAIT:=3}"

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
result fault.disk "$SD $SG $ADDR"
[ -n "$SD" ] || exit 1

page=$((BAD_LBA / 8))
check fault.bad_read dd if="/dev/$SD" of=/dev/null bs=4096 skip="$page" count=1 iflag=direct
check_sh fault.before "dd if=/dev/$SD bs=4096 skip=$((page - 1)) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"
check_sh fault.after "dd if=/dev/$SD bs=4096 skip=$((page + 1)) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"
lba=$((BAD_LBA - 4))
check fault.straddle sg_raw -v -r 4096 -o /tmp/straddle.bin "/dev/$SG" 28 00 \
    $(printf '%08x' "$lba" | sed 's/../& /g') 00 00 08 00

t0=$(_t_uptime)
( dd if="/dev/$SD" of=/dev/null bs=512 skip="$HANG_LBA" count=1 iflag=direct 2> /tmp/hang.err
  echo $? > /tmp/hang.rc ) &
hang_pid=$!
sleep "$HANG_WAIT"
if [ -e /tmp/hang.rc ]; then
    result fault.hang_stuck "done"
else
    result fault.hang_stuck "stuck $(cat "/sys/block/$SD/inflight" | awk '{print $1 + $2}')"
fi
check fault.reset sg_reset -d "/dev/$SG"
wait "$hang_pid"
t1=$(_t_uptime)
result_num fault.hang_rc "$(cat /tmp/hang.rc)"
result fault.hang_s "$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')"

check_sh fault.write "dd if=/data/pattern.bin of=/dev/$SD bs=4096 seek=$((page + 16)) count=1 oflag=direct conv=fsync,notrunc"
check_sh fault.readback "dd if=/dev/$SD bs=4096 skip=$((page + 16)) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"
check_sh fault.pattern "head -c 4096 /data/pattern.bin | md5sum | cut -d' ' -f1"

result guest.dmesg "$(dmesg | grep -iE 'scsi|sd[a-z]|medium|sense|error|abort|reset|timing out|i/o' | tail -n 100)"
exit 0
