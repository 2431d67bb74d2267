"""``vscsid-ctl``: the administration client (reserved; the control socket it talks to
is not part of this release)."""
import sys


def main(argv=None) -> int:
    sys.stderr.write("vscsid-ctl: no administration socket exists yet in this release; "
                     "use the daemon's logs (--log-format json)\n")
    return 2
