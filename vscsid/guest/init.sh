#!/bin/sh
# /init of the vscsid e2e initramfs (busybox ash, PID 1).
#
# Mounts the pseudo file systems, loads the SCSI/virtio modules listed in
# /etc/modules.load, waits for $E2E_NDISKS SCSI disks, runs /test.sh (shipped
# in a second cpio archive appended by the host), reports on the result channel
# and powers off.  Settings come from /etc/e2e.env (also from the appended
# archive).  Protocol lines: "@@BOOT {...}", "@@R name {...}", "@@DONE {...}".

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp /run /root /dev/pts /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
[ -r /etc/e2e-libpath ] && export LD_LIBRARY_PATH="$(cat /etc/e2e-libpath)"

E2E_NDISKS=0
E2E_DISK_WAIT=60
E2E_CHANNEL=/dev/ttyS1
[ -r /etc/e2e.env ] && . /etc/e2e.env

. /lib/t.sh

# The result channel: a second serial port the host captures to its own file,
# so kernel messages on the console can never split a result line.
if [ -c "$E2E_CHANNEL" ] && stty -F "$E2E_CHANNEL" raw -echo 2>/dev/null; then
    exec 3> "$E2E_CHANNEL"
    chan=$E2E_CHANNEL
else
    exec 3> /dev/console
    chan=/dev/console
fi

t_emit "@@BOOT {\"uptime\":$(_t_uptime),\"channel_b64\":\"$(printf '%s' "$chan" | _t_b64)\"}"
say "init: booted at $(_t_uptime)s, kernel $(uname -r), $(nproc) cpus"

: > /tmp/insmod.log
while read -r m; do
    [ -n "$m" ] || continue
    if ! insmod "/lib/modules/$m" >> /tmp/insmod.log 2>&1; then
        say "insmod $m failed: $(tail -n 1 /tmp/insmod.log)"
    fi
done < /etc/modules.load
result guest.modules "$(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"

# Wait for the expected number of sd disks (and their sg nodes).
deadline=$(($(cut -d. -f1 /proc/uptime) + E2E_DISK_WAIT))
while :; do
    n=0
    for d in /sys/block/sd*; do
        [ -e "$d/device/scsi_generic" ] && n=$((n + 1))
    done
    [ "$n" -ge "$E2E_NDISKS" ] && break
    if [ "$(cut -d. -f1 /proc/uptime)" -ge "$deadline" ]; then
        say "init: only $n of $E2E_NDISKS disks after ${E2E_DISK_WAIT}s"
        break
    fi
    sleep 0.1
done
disks=""
for d in /sys/block/sd*; do
    [ -e "$d/device" ] || continue
    sg=$(ls "$d/device/scsi_generic" 2>/dev/null | head -n 1)
    disks="$disks${d##*/} $(basename "$(readlink "$d/device")") $sg
"
done
t_emit "@@R guest.disks {\"count\":$n,\"uptime\":$(_t_uptime),\"value_b64\":\"$(printf '%s' "$disks" | _t_b64)\"}"
say "init: $n disk(s) at $(_t_uptime)s"

rc=0
if [ -r /test.sh ]; then
    say "init: running /test.sh"
    sh /test.sh
    rc=$?
fi

sync
t_emit "@@DONE {\"rc\":$rc,\"uptime\":$(_t_uptime)}"
say "init: done (rc=$rc), powering off"
exec 3>&-
poweroff -f
# Not reached; if poweroff fails, PID 1 exiting panics the kernel and
# panic=-1 plus QEMU's -no-reboot end the VM anyway.
sleep 5
exit 1
