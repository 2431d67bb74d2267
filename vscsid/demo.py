"""``vscsid demo``: see a guest use vscsid, in one command.

Starts a daemon on a sparse default image in a temporary directory, boots a
small Linux guest attached to it under QEMU (the host's own kernel and a busybox
initramfs built on the fly by :mod:`vscsid.guestkit`), runs lsblk, sg_inq and a
short fio in the guest, prints what they printed, and shuts everything down.

Exit codes: 0 when every command in the guest succeeded, 1 when one failed or
the guest did not finish, 2 when a prerequisite is missing (the message names
the Debian packages to install).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import guestkit

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: What the guest runs (busybox sh, with /lib/t.sh's `check`): each command's
#: exit status and output travel back on the result channel.
GUEST_SCRIPT = r"""
SD=""
for d in /sys/block/sd*; do [ -e "$d/device" ] && { SD=${d##*/}; break; }; done
result demo.disk "$SD"
check demo.lsblk lsblk -o NAME,SIZE,TYPE,RO,ROTA,VENDOR,MODEL "/dev/$SD"
check demo.sg_inq sg_inq "/dev/$SD"
check demo.fio fio --name=demo --filename="/dev/$SD" --direct=1 --ioengine=libaio \
    --rw=randrw --rwmixread=70 --bs=4k --iodepth=16 --size=256M --offset=0 \
    --runtime="$DEMO_FIO_SECONDS" --time_based --group_reporting
"""

#: (result name, the command as the guest ran it) in the order they are shown.
SHOWN = (
    ("demo.lsblk", "lsblk -o NAME,SIZE,TYPE,RO,ROTA,VENDOR,MODEL /dev/{disk}"),
    ("demo.sg_inq", "sg_inq /dev/{disk}"),
    ("demo.fio", "fio --name=demo --filename=/dev/{disk} --direct=1 --ioengine=libaio "
                 "--rw=randrw --rwmixread=70 --bs=4k --iodepth=16 --runtime={secs} --time_based"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vscsid demo",
        description="Start vscsid on a temporary default image, boot a small Linux guest on it "
                    "under QEMU (TCG), run lsblk, sg_inq and a short fio in the guest, show "
                    "their output and shut everything down.")
    p.add_argument("--num-queues", type=int, default=1, metavar="N",
                   help="request queues (daemon workers and guest blk-mq queues; default 1)")
    p.add_argument("--fio-seconds", type=int, default=5, metavar="S",
                   help="how long fio runs in the guest (default 5)")
    p.add_argument("--timeout", type=float, default=180.0, metavar="S",
                   help="give up when the guest has not finished after S seconds (default 180)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (daemon log, guest console, image) "
                        "even when everything succeeded (it is kept when something failed)")
    return p


def _say(text: str) -> None:
    print(f"vscsid demo: {text}", flush=True)


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "ready":
                return rec
        time.sleep(0.05)
    return None


def _stop_daemon(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.num_queues <= 16 or not 1 <= args.fio_seconds <= 600:
        sys.stderr.write("vscsid: error: demo: --num-queues must be 1..16, --fio-seconds 1..600\n")
        return EXIT_USAGE
    missing = guestkit.missing_prerequisites()
    if missing:
        what = ", ".join(f"{w} (Debian package {p})" for w, p in missing)
        pkgs = " ".join(dict.fromkeys(p for _w, p in missing))
        sys.stderr.write(f"vscsid: error: demo needs {what}: apt-get install {pkgs}\n")
        return EXIT_USAGE

    tmp = Path(tempfile.mkdtemp(prefix="vscsid-demo-"))
    sock, image, log = tmp / "vscsid.sock", tmp / "default.img", tmp / "vscsid.log"
    daemon = None
    ok = False
    try:
        t0 = time.monotonic()
        cache = guestkit.default_cache_dir()
        _say(f"building the guest's initramfs in {cache} (busybox, sg3_utils, fio, lsblk, "
             "the kernel's SCSI modules; cached after the first run)")
        initramfs = guestkit.build_initramfs(cache)
        kernel = guestkit.find_kernel()
        t_build = time.monotonic() - t0

        with open(log, "wb") as logf:
            daemon = subprocess.Popen(
                [sys.executable, "-P", "-m", "vscsid.cli", "--socket-path", str(sock),
                 "--default-image", str(image), "--num-queues", str(args.num_queues),
                 "--log-format", "json", "--quiet"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        ready = _wait_ready(daemon, log)
        if ready is None:
            sys.stderr.write(f"vscsid: error: demo: the daemon did not start:\n"
                             f"{log.read_text(errors='replace')[-2000:]}\n")
            return EXIT_FAILED
        _say(f"daemon pid {daemon.pid} serves {sock}: LUN 0 is a sparse 1 GiB image {image}, "
             f"{args.num_queues} worker(s) {ready.get('workers')}")

        guest = guestkit.Guest(
            initramfs=initramfs, script=GUEST_SCRIPT, env={"DEMO_FIO_SECONDS": args.fio_seconds},
            vhost_user_sockets=[sock], queues=args.num_queues, smp=1, ndisks=1,
            workdir=tmp / "guest", name="vscsid-demo")
        qemu_ver = ".".join(map(str, guest.qemu_version() or ("?",)))
        _say(f"booting Linux {kernel.version} under QEMU {qemu_ver} (TCG) with:")
        print("  " + shlex.join(guest.qemu_command()), flush=True)
        t1 = time.monotonic()
        with guest:
            res = guest.wait(args.timeout)
        t_guest = time.monotonic() - t1

        disk = res.value("demo.disk") or "?"
        ok = res.done is not None and res.done.get("rc") == 0
        for name, cmd in SHOWN:
            r = res.get(name)
            print(f"\n[guest]# {cmd.format(disk=disk, secs=args.fio_seconds)}", flush=True)
            if r is None:
                print("  (did not run)")
                ok = False
                continue
            sys.stdout.write(r.get("out", "") + r.get("err", ""))
            if r.get("rc") != 0:
                print(f"  (exit status {r.get('rc')})")
                ok = False
        print(flush=True)
        boot = f", booted in {res.boot_seconds:.1f} s" if res.boot_seconds else ""
        _say(f"guest ran {t_guest:.1f} s{boot}; initramfs {t_build:.1f} s")
    except (guestkit.GuestError, RuntimeError, OSError) as exc:
        sys.stderr.write(f"vscsid: error: demo: {exc}\n")
        ok = False
    except KeyboardInterrupt:
        sys.stderr.write("vscsid demo: interrupted\n")
        ok = False
    finally:
        if daemon is not None:
            code = _stop_daemon(daemon)
            _say(f"daemon stopped (exit status {code})")
            if code != 0:
                ok = False
        if args.keep:
            _say(f"kept {tmp}")
        elif not ok:
            _say(f"kept {tmp} for a look (the daemon's log vscsid.log, the guest's console "
                 "guest/console.log); remove it when done")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
