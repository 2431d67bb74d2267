#!/bin/sh
# build-deb.sh -- build the vscsid Debian package with Debian's own tooling and check it with lintian.
#
#   packaging/build-deb.sh [--install-build-deps] [OUTDIR]     (default OUTDIR: dist/deb)
#
# The source tree keeps its Debian files in packaging/debian/ (the top level is
# fixed by the design), so this copies the tree -- the files git tracks plus
# untracked ones that are not ignored, i.e. the working tree as committed or
# edited -- to a temporary directory, puts packaging/debian/ there as debian/,
# and runs `dpkg-buildpackage -us -uc -b` in it (dh + pybuild, see debian/rules).
# --install-build-deps first runs `apt-get build-dep` on that tree (as root), so
# the build dependencies come from debian/control alone.
#
# OUTDIR receives the .deb (and its -dbgsym .deb), .buildinfo and .changes, build.log and lintian.txt
# (`lintian --info --display-info` on the .changes). The script prints OUTDIR on
# its last line. Exit status: 0, or 1 when the build fails or lintian reports an
# error (warnings are listed in lintian.txt but do not fail).
set -eu

install_deps=0
if [ "${1:-}" = "--install-build-deps" ]; then
    install_deps=1
    shift
fi
src=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$src/dist/deb}
mkdir -p "$out"
out=$(cd "$out" && pwd)

log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A Debian build uses Debian's interpreter (/usr/bin/python3), never a pyenv,
# virtualenv or PYTHONPATH of the caller's.
sys_env() { env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

command -v git >/dev/null || die "needs git (the file list comes from git ls-files)"
command -v dpkg-buildpackage >/dev/null || die "needs dpkg-dev (apt-get install dpkg-dev)"

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$src/pyproject.toml" | head -n 1)
[ -n "$version" ] || die "no version in pyproject.toml"

work=$(mktemp -d /tmp/vscsid-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
tree="$work/vscsid-$version"
mkdir "$tree"
(cd "$src" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$src" && tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) \
    | tar -xf - -C "$tree"
cp -a "$src/packaging/debian" "$tree/debian"

deb_version=$(cd "$tree" && dpkg-parsechangelog -S Version)
[ "${deb_version%%-*}" = "$version" ] \
    || die "packaging/debian/changelog is at $deb_version but pyproject.toml at $version: add a changelog entry"

if [ "$install_deps" = 1 ]; then
    log "installing the build dependencies from debian/control"
    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -q "$tree" >"$out/build-deps.log" 2>&1 \
        || { tail -n 30 "$out/build-deps.log" >&2; die "apt-get build-dep failed"; }
fi
(cd "$tree" && sys_env dpkg-checkbuilddeps) || die "build dependencies missing (run with --install-build-deps as root)"

rm -f "$out"/vscsid_*.deb "$out"/vscsid-dbgsym_*.deb "$out"/vscsid_*.buildinfo "$out"/vscsid_*.changes
log "dpkg-buildpackage -us -uc -b in $tree (log: $out/build.log)"
if ! (cd "$tree" && sys_env dpkg-buildpackage -us -uc -b) >"$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log" >&2
    die "dpkg-buildpackage failed"
fi
cp "$work"/vscsid_*.deb "$work"/vscsid-dbgsym_*.deb "$work"/vscsid_*.buildinfo "$work"/vscsid_*.changes "$out/"

rc=0
if command -v lintian >/dev/null; then
    # lintian exits non-zero for errors only (its default --fail-on=error).
    sys_env lintian --info --display-info "$out"/vscsid_*.changes >"$out/lintian.txt" 2>&1 || rc=1
    log "lintian: $(grep -c '^E:' "$out/lintian.txt" || true) error(s), $(grep -c '^W:' "$out/lintian.txt" || true) warning(s), $(grep -c '^I:' "$out/lintian.txt" || true) info(s) ($out/lintian.txt)"
    [ "$rc" = 0 ] || { grep '^E:' "$out/lintian.txt" >&2 || true; log "lintian reported errors"; }
else
    log "lintian not installed: not checked"
    rc=1
fi
log "built $(cd "$out" && ls vscsid_*.deb)"
echo "$out"
exit "$rc"
