#!/usr/bin/env bash
# A real single-node Ceph cluster (Debian 12's ceph 16.2 "pacific") for tests
# and CI: one monitor, one manager and one bluestore OSD on a sparse file, all
# in one directory on 127.0.0.1, with its own ceph.conf and keyrings.
#
#   ceph_cluster.sh start  DIR   create (first time) or restart the daemons, wait
#                                until RBD I/O works, print DIR/ceph.conf
#   ceph_cluster.sh stop   DIR   stop the daemons (the data stays)
#   ceph_cluster.sh status DIR   daemon states and `ceph health`; exit 0 if all run
#
# start and stop are idempotent. docs/network-storage.md explains each step.
# Tunables (environment): CEPH_OSD_SIZE_GB (sparse OSD file, default 4),
# CEPH_POOL (RBD pool, default rbd), CEPH_START_TIMEOUT (seconds, default 180).
set -euo pipefail

PROG=$(basename "$0")
die() {
    echo "$PROG: error: $*" >&2
    if [ -n "${DIR:-}" ] && [ -d "$DIR/log" ]; then
        for f in "$DIR"/log/*.log; do
            [ -s "$f" ] || continue
            echo "----- last lines of $f -----" >&2
            tail -n 40 "$f" >&2
        done
    fi
    # A start that failed leaves no daemon behind.
    if [ "${CMD:-}" = start ] && [ -f "${CONF:-/nonexistent}" ]; then
        CMD=stopping cmd_stop >&2 || true
    fi
    exit 1
}
usage() { echo "usage: $PROG start|stop|status DIR" >&2; exit 2; }

[ $# -eq 2 ] || usage
CMD=$1
mkdir -p "$2" 2>/dev/null || true
DIR=$(cd "$2" 2>/dev/null && pwd) || die "cannot use directory $2"
CONF=$DIR/ceph.conf
POOL=${CEPH_POOL:-rbd}
OSD_SIZE_GB=${CEPH_OSD_SIZE_GB:-4}
TIMEOUT=${CEPH_START_TIMEOUT:-180}
DAEMONS=(mon.a mgr.x osd.0)        # start order; stop is the reverse

need() {
    local missing=()
    for b in "$@"; do command -v "$b" >/dev/null || missing+=("$b"); done
    [ ${#missing[@]} -eq 0 ] || die "not installed: ${missing[*]} (Debian: apt-get install ceph ceph-mon ceph-mgr ceph-osd)"
}

# Every client command goes to this cluster only, and gives up instead of
# hanging when the monitor is not there.
ceph_() { timeout 60 ceph -c "$CONF" --connect-timeout 15 "$@"; }
rbd_() { timeout 120 rbd -c "$CONF" "$@"; }

pidfile() { echo "$DIR/run/ceph-$1.pid"; }
running() {
    local pf pid
    pf=$(pidfile "$1")
    [ -f "$pf" ] || return 1
    pid=$(cat "$pf" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && \
        tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$CONF"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local fsid=$1 port=$2
    cat > "$CONF" <<EOF
# Single-node test cluster made by tests/support/ceph_cluster.sh
# (docs/network-storage.md explains every setting).
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$port
public_addr = 127.0.0.1
ms_bind_msgr1 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $DIR/\$cluster.\$name.keyring
run_dir = $DIR/run
pid_file = $DIR/run/\$cluster-\$name.pid
admin_socket = $DIR/run/\$cluster-\$name.asok
log_file = $DIR/log/\$cluster-\$name.log
crash_dir = $DIR/crash
mon_cluster_log_file = $DIR/log/\$cluster.log
# One OSD: every pool has one replica, and saying so is not a warning.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_warn_on_insecure_global_id_reclaim_allowed = false
# The test host's disk is shared: warn/stop only when it is really full.
mon_data_avail_warn = 2
mon_data_avail_crit = 1

[mon]
mon_data = $DIR/mon/\$cluster-\$id
# Must stay above rocksdb_cache_size (512 MiB), which it divides among the caches.
mon_memory_target = 1073741824
# Only the modules the manager cannot run without.
mgr_initial_modules = iostat

[mgr]
mgr_data = $DIR/mgr/\$cluster-\$id

[osd]
osd_data = $DIR/osd/\$cluster-\$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = $((OSD_SIZE_GB << 30))
# Two cores and a few GiB of memory.
osd_memory_target = 1073741824
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
osd_max_backfills = 1

[client]
# Many short-lived clients (tests, rbd, qemu): no admin socket each, one log.
admin_socket =
log_file = $DIR/log/\$cluster-client.log
EOF
}

init_cluster() {
    need ceph ceph-mon ceph-mgr ceph-osd ceph-authtool monmaptool rbd python3
    # A directory without the marker holds at most a half-made cluster of
    # ours: remove only what this script creates, then start over.
    local d
    for d in "${DAEMONS[@]}"; do running "$d" && stop_daemon "$d"; done
    rm -rf "$DIR"/mon "$DIR"/mgr "$DIR"/osd "$DIR"/run "$DIR"/log "$DIR"/crash \
        "$DIR"/monmap "$DIR"/ceph.conf "$DIR"/*.keyring
    mkdir -p "$DIR"/mon/ceph-a "$DIR"/mgr/ceph-x "$DIR"/osd/ceph-0 "$DIR"/run "$DIR"/log "$DIR"/crash

    local fsid port
    fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    port=$(free_port)
    write_conf "$fsid" "$port"

    # Keys: the monitors' shared key, and the admin key seeded into the
    # monitor's auth database at mkfs time.
    ceph-authtool --create-keyring "$DIR/ceph.mon.a.keyring" --gen-key -n mon. \
        --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/ceph.client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$DIR/ceph.mon.a.keyring" --import-keyring "$DIR/ceph.client.admin.keyring" >/dev/null

    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/ceph.mon.a.keyring" \
        >>"$DIR/log/setup.log" 2>&1 || die "ceph-mon --mkfs failed"
    start_daemon mon.a
    wait_for "monitor quorum" 60 ceph_ mon stat

    ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
        -o "$DIR/ceph.mgr.x.keyring" >/dev/null || die "cannot create the manager's key"
    start_daemon mgr.x

    # The OSD: registered with the monitor (id 0, its own cephx key), then a
    # bluestore made on a sparse file DIR/osd/ceph-0/block.
    local uuid key id
    uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    key=$(ceph-authtool --gen-print-key)
    id=$(printf '{"cephx_secret": "%s"}' "$key" | ceph_ osd new "$uuid" -i -) \
        || die "ceph osd new failed"
    [ "$id" = 0 ] || die "expected OSD id 0, the monitor gave $id"
    ceph-authtool --create-keyring "$DIR/ceph.osd.0.keyring" --name osd.0 --add-key "$key" >/dev/null
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >>"$DIR/log/setup.log" 2>&1 \
        || die "ceph-osd --mkfs failed"
    start_daemon osd.0
    wait_for "the OSD to be up and in" 90 osd_up

    # The RBD pool (size 1 from the defaults above) and a client that can use
    # only RBD in that pool (the least a vscsid LUN needs).
    ceph_ osd pool create "$POOL" 8 8 replicated >>"$DIR/log/setup.log" 2>&1 \
        || die "cannot create pool $POOL"
    rbd_ pool init "$POOL" || die "rbd pool init $POOL failed"
    ceph_ auth get-or-create client.vscsid mon 'profile rbd' osd "profile rbd pool=$POOL" \
        mgr "profile rbd pool=$POOL" -o "$DIR/ceph.client.vscsid.keyring" >/dev/null \
        || die "cannot create client.vscsid"
    touch "$DIR/.initialized"
}

start_daemon() {
    local name=$1 type=${1%%.*} id=${1#*.}
    running "$name" && return 0
    # The daemons fork into the background once they are up; their logs are
    # in DIR/log, their pid files and admin sockets in DIR/run.
    "ceph-$type" -c "$CONF" -i "$id" >>"$DIR/log/setup.log" 2>&1 || die "ceph-$type -i $id failed to start"
}

stop_daemon() {
    local name=$1 pf pid i
    pf=$(pidfile "$name")
    running "$name" || { rm -f "$pf"; return 0; }
    pid=$(cat "$pf")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$PROG: $name (pid $pid) ignored SIGTERM for 10 s; SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pf"
}

osd_up() {
    local out
    out=$(ceph_ osd stat -f json) || return 1
    python3 -c 'import json, sys; s = json.loads(sys.argv[1]); sys.exit(0 if s["num_up_osds"] == 1 and s["num_in_osds"] == 1 else 1)' "$out"
}

mgr_available() {
    local out
    out=$(ceph_ mgr stat -f json) || return 1
    python3 -c 'import json, sys; sys.exit(0 if json.loads(sys.argv[1])["available"] else 1)' "$out"
}

wait_for() {
    local what=$1 secs=$2 t0
    shift 2
    t0=$SECONDS
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - t0)) -lt "$secs" ] || die "timed out after ${secs}s waiting for $what"
        sleep 0.5
    done
}

# I/O works when an image can be created, written and read back.
rbd_probe() {
    local img=vscsid-probe-$$ ok=1
    head -c 65536 /dev/urandom > "$DIR/run/probe.in"
    rbd_ rm --no-progress "$POOL/$img" >/dev/null 2>&1 || true
    if rbd_ import --no-progress "$DIR/run/probe.in" "$POOL/$img" \
        && rbd_ export --no-progress "$POOL/$img" "$DIR/run/probe.out" \
        && cmp -s "$DIR/run/probe.in" "$DIR/run/probe.out"; then
        ok=0
    fi
    rbd_ rm --no-progress "$POOL/$img" >/dev/null 2>&1 || true
    rm -f "$DIR/run/probe.in" "$DIR/run/probe.out"
    return $ok
}

cmd_start() {
    local t0=$SECONDS d
    if [ ! -f "$DIR/.initialized" ]; then
        init_cluster
    else
        need ceph ceph-mon ceph-mgr ceph-osd rbd python3
        for d in "${DAEMONS[@]}"; do start_daemon "$d"; done
        wait_for "monitor quorum" 60 ceph_ mon stat
        wait_for "the OSD to be up and in" 90 osd_up
    fi
    wait_for "an active manager" 60 mgr_available
    local health
    health=$(ceph_ health 2>&1) || die "ceph health failed: $health"
    case $health in
        HEALTH_ERR*) die "cluster unhealthy: $(ceph_ health detail 2>&1)";;
    esac
    local left=$((TIMEOUT - (SECONDS - t0)))
    [ "$left" -gt 10 ] || left=10
    wait_for "an RBD image to be created and written in pool $POOL" "$left" rbd_probe
    health=$(ceph_ health detail 2>&1)
    case $health in
        HEALTH_OK*) ;;
        *) echo "$PROG: note: $health" >&2;;
    esac
    echo "$PROG: cluster in $DIR ready in $((SECONDS - t0)) s" >&2
    echo "$CONF"
}

cmd_stop() {
    local i
    [ -f "$CONF" ] || { echo "$PROG: no cluster in $DIR" >&2; return 0; }
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[$i]}"; done
}

cmd_status() {
    local d rc=0
    [ -f "$CONF" ] || { echo "no cluster in $DIR"; return 1; }
    echo "conf: $CONF"
    for d in "${DAEMONS[@]}"; do
        if running "$d"; then echo "$d: running (pid $(cat "$(pidfile "$d")"))"
        else echo "$d: stopped"; rc=1; fi
    done
    if running mon.a; then
        echo "health: $(timeout 20 ceph -c "$CONF" --connect-timeout 10 health 2>&1)"
    fi
    return $rc
}

case $CMD in
    start) cmd_start;;
    stop) cmd_stop;;
    status) cmd_status;;
    *) usage;;
esac
