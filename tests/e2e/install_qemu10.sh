#!/bin/sh
# install_qemu10.sh -- a private QEMU >= 8.2 (Debian bookworm-backports' QEMU 10) for the
# vhost-user reconnect e2e tests, next to the system QEMU 7.2 that the other e2e tests use.
#
#   tests/e2e/install_qemu10.sh [PREFIX]        # as root; PREFIX default /opt/vscsid-qemu10
#   tests/e2e/install_qemu10.sh --print-backports-source   # the apt source it would add
#
# Nothing is installed system-wide except, if missing, the bookworm-backports apt
# source and the ordinary bookworm shared libraries QEMU links against (on a machine
# with qemu-system-x86 7.2 installed they are all present already).  The apt source
# is derived from the machine's own bookworm entries (found by apt itself, one-line
# or deb822 format): the same URIs and signing key (and options), the suite
# bookworm-backports and the component main, written next to them as
# vscsid-bookworm-backports.list / .sources.  No package server is named here.  The .debs
# qemu-system-x86, qemu-system-common, qemu-system-data and seabios are fetched with
# `apt-get download` from bookworm-backports and unpacked with `dpkg -x` under
# PREFIX/root; PREFIX/bin/qemu-system-x86_64 is a wrapper that runs that binary with
#   -L PREFIX/root/usr/share/qemu -L PREFIX/root/usr/share/seabios  (its own option ROMs
#       and firmware first; QEMU 10's linuxboot/pvh ROMs must match the binary)
#   QEMU_MODULE_DIR=PREFIX/root/usr/lib/x86_64-linux-gnu/qemu (never load 7.2's modules)
# The e2e harness finds it through $VSCSID_QEMU10 or that default path
# (vscsid/guestkit.py: find_qemu(min_version=(8, 2))).
#
# Idempotent: exits at once when PREFIX already holds a working QEMU >= 8.2 (set
# VSCSID_QEMU10_FORCE=1 to reinstall).  Versions: the bookworm-backports candidates;
# VSCSID_QEMU10_VERSION / VSCSID_SEABIOS_VERSION pin exact ones (e.g.
# 1:10.0.2+ds-2+deb13u1~bpo12+1 and 1.16.3-2~bpo12+1).
set -eu

PREFIX=${1:-${VSCSID_QEMU10_PREFIX:-/opt/vscsid-qemu10}}
SUITE=bookworm-backports
WRAPPER="$PREFIX/bin/qemu-system-x86_64"

log() { printf 'install_qemu10: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# "FILE:N" of each configured deb entry for suite $1, as apt itself parsed the sources
# (N: the line of a one-line .list file, the paragraph of a deb822 .sources file).
apt_entries() {
    apt-get indextargets --no-release-info --format '$(SOURCESENTRY)' "Release: $1" 'Target-Of: deb' \
        2>/dev/null | sort -u
}

# The bookworm-backports counterpart of entry N of FILE: the same entry with the suite
# replaced (and the component main), in the file's own format.
backports_of() {  # FILE N
    case "$1" in
    *.sources)
        awk -v n="$2" -v suite="$SUITE" '
            /^#/ { next }
            /^[ \t]*$/ { if (open) { open = 0 }; next }
            !open { open = 1; para++ }
            para != n { next }
            /^[ \t]/ { if (keep) print; next }
            {
                key = tolower(substr($0, 1, index($0, ":") - 1)); keep = 0
                if (key == "types") print "Types: deb"
                else if (key == "suites") print "Suites: " suite
                else if (key == "components") print "Components: main"
                else { keep = 1; print }
            }' "$1"
        ;;
    *)
        awk -v n="$2" -v suite="$SUITE" '
            NR != n { next }
            {
                sub(/#.*/, "")
                out = $1; i = 2
                if ($2 ~ /^\[/) {                 # [ options ], possibly with spaces
                    while (i <= NF && $i !~ /\]$/) { out = out " " $i; i++ }
                    out = out " " $i; i++
                }
                print out " " $i " " suite " main"     # URI suite component
            }' "$1"
        ;;
    esac
}

backports_source() {  # prints the entries: "# FILE" headers, then the .list/.sources text
    entries=$(apt_entries bookworm)
    [ -n "$entries" ] || die "no bookworm apt source on this machine to derive $SUITE from"
    for e in $entries; do
        printf '# %s\n' "${e%:*}"
        backports_of "${e%:*}" "${e##*:}"
        echo
    done
}

add_backports_source() {
    eval "$(apt-config shell parts Dir::Etc::sourceparts/d)"
    entries=$(apt_entries bookworm)
    [ -n "$entries" ] || die "no bookworm apt source on this machine to derive $SUITE from"
    list="" sources=""
    for e in $entries; do
        text=$(backports_of "${e%:*}" "${e##*:}")
        case "${e%:*}" in
        *.sources) sources="$sources$text

" ;;
        *) list="$list$text
" ;;
        esac
    done
    if [ -n "$list" ]; then
        log "adding the $SUITE apt source ${parts}vscsid-bookworm-backports.list"
        printf '%s' "$list" > "${parts}vscsid-bookworm-backports.list"
    fi
    if [ -n "$sources" ]; then
        log "adding the $SUITE apt source ${parts}vscsid-bookworm-backports.sources"
        printf '%s' "$sources" > "${parts}vscsid-bookworm-backports.sources"
    fi
}

if [ "${1:-}" = "--print-backports-source" ]; then
    backports_source
    exit 0
fi

# "QEMU emulator version 10.0.2 (...)" -> 10.0.2
qemu_version() { "$1" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n 1; }

version_ok() {  # >= 8.2
    v=$(qemu_version "$1") || return 1
    [ -n "$v" ] || return 1
    major=${v%%.*}
    rest=${v#*.}
    minor=${rest%%.*}
    [ "$major" -gt 8 ] || { [ "$major" -eq 8 ] && [ "$minor" -ge 2 ]; }
}

if [ "${VSCSID_QEMU10_FORCE:-0}" != 1 ] && [ -x "$WRAPPER" ] && version_ok "$WRAPPER"; then
    log "$WRAPPER is QEMU $(qemu_version "$WRAPPER"): nothing to do"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root (apt-get, and writing $PREFIX)"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian 12)"
export DEBIAN_FRONTEND=noninteractive

have_backports() { apt-cache madison qemu-system-x86 2>/dev/null | grep -q "$SUITE"; }

if ! have_backports; then
    if [ -z "$(apt_entries "$SUITE")" ]; then
        add_backports_source
    fi
    apt-get update -q
    have_backports || die "qemu-system-x86 is not available from $SUITE"
fi

if [ -n "${VSCSID_QEMU10_VERSION:-}" ]; then
    qsel="=$VSCSID_QEMU10_VERSION"
else
    qsel="/$SUITE"
fi
if [ -n "${VSCSID_SEABIOS_VERSION:-}" ]; then
    ssel="=$VSCSID_SEABIOS_VERSION"
elif apt-cache madison seabios 2>/dev/null | grep -q "$SUITE"; then
    ssel="/$SUITE"
else
    ssel=""          # the bookworm one
fi

work=$(mktemp -d /tmp/vscsid-qemu10.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
mkdir "$work/debs"
# _apt cannot write into a root-only directory: let it (avoids apt's "unsandboxed" warning).
chown _apt "$work/debs" 2>/dev/null || true
(cd "$work/debs" && apt-get download -q \
    "qemu-system-x86$qsel" "qemu-system-common$qsel" "qemu-system-data$qsel" "seabios$ssel") \
    || die "apt-get download failed"

stage="$PREFIX.new"
rm -rf "$stage"
mkdir -p "$stage/root" "$stage/bin"
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$stage/root"
    dpkg-deb -f "$deb" Package Version | tr '\n' ' ' >> "$stage/PACKAGES"
    echo >> "$stage/PACKAGES"
done

# Shared libraries: QEMU 10 from backports links against ordinary bookworm libraries.
# Install the lib* packages its Depends name that are missing (none on a machine with
# the system QEMU 7.2), then check with ldd that nothing is unresolved.
missing=""
for deb in "$work"/debs/qemu-system-x86_*.deb "$work"/debs/qemu-system-common_*.deb; do
    for pkg in $(dpkg-deb -f "$deb" Depends | tr ',|' '\n\n' | sed 's/(.*//; s/ //g' | grep '^lib' || true); do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed' \
            || missing="$missing $pkg"
    done
done
if [ -n "$missing" ]; then
    log "installing shared libraries:$missing"
    apt-get install -y -q --no-install-recommends $missing
fi
bin="$stage/root/usr/bin/qemu-system-x86_64"
[ -x "$bin" ] || die "$bin missing after unpacking"
if ldd "$bin" | grep -q 'not found'; then
    ldd "$bin" | grep 'not found' >&2
    die "unresolved shared libraries"
fi

cat > "$stage/bin/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# Private QEMU (from install_qemu10.sh): its own firmware/option ROMs and modules first.
root=$(dirname "$(dirname "$(readlink -f "$0")")")/root
export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"
exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
EOF
chmod 0755 "$stage/bin/qemu-system-x86_64"

# Smoke test: version, and a machine that starts (q35, TCG, the firmware found).
version_ok "$stage/bin/qemu-system-x86_64" || die "unpacked QEMU is not >= 8.2: $(qemu_version "$bin")"
"$stage/bin/qemu-system-x86_64" -L help | grep -q "$stage/root/usr/share/seabios" || die "-L not honoured"
timeout 60 "$stage/bin/qemu-system-x86_64" -machine q35 -accel tcg -cpu max -m 64M -nodefaults \
    -display none -monitor none -serial none -no-reboot -S -daemonize -pidfile "$work/pid" \
    >"$work/smoke.log" 2>&1 || { cat "$work/smoke.log" >&2; die "QEMU does not start"; }
kill "$(cat "$work/pid")" 2>/dev/null || true

# Swap into place (the old copy, if any, is removed).
if [ -e "$PREFIX" ]; then
    rm -rf "$PREFIX.old"
    mv "$PREFIX" "$PREFIX.old"
fi
mv "$stage" "$PREFIX"
rm -rf "$PREFIX.old"
log "installed QEMU $(qemu_version "$WRAPPER") in $PREFIX ($WRAPPER)"
