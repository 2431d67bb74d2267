# /lib/t.sh -- result helpers for vscsid e2e guest scripts (busybox ash).
#
# Results travel to the host as single lines on the result channel (fd 3,
# opened by /init on /dev/ttyS1, or the console as a fallback):
#
#     @@R <name> <json object>
#
# Keys ending in "_b64" carry base64 text (the host decodes them into "<key>"
# as str and "<key>_bytes" as bytes), so arbitrary command output, binary
# included, survives the serial line.  Names: [A-Za-z0-9._:-]+.
#
#   result NAME VALUE...        {"value_b64": ...}           free text
#   result_num NAME NUMBER      {"value": N}                 (falls back to text)
#   result_file NAME FILE       {"value_b64": ...} or {"missing": true}
#   check NAME CMD [ARG...]     run CMD; {"rc", "t0", "t1", "cmd_b64", "out_b64", "err_b64"}
#   check_sh NAME 'SNIPPET'     the same for a shell snippet (pipes, redirections)
#   say TEXT                    human-readable line on the console only
#
# check/check_sh return the command's exit status, so scripts can branch on it.
# Never use "set -e" in guest scripts: a failing check must not stop the run.

if [ -z "$T_SH_LOADED" ]; then
T_SH_LOADED=1
T_TMP=/tmp/t.$$

_t_b64() { base64 -w 0 "$@"; }

_t_uptime() {
    local up rest
    read -r up rest < /proc/uptime
    echo "$up"
}

_t_name_ok() {
    case "$1" in
        "" | *[!A-Za-z0-9._:-]*) say "t.sh: bad result name '$1'"; return 1 ;;
    esac
    return 0
}

t_emit() {
    # 2>/dev/null: fd 3 may be missing when a script is run by hand.
    { printf '%s\n' "$*" >&3; } 2>/dev/null || printf '%s\n' "$*"
}

say() {
    { printf '[guest] %s\n' "$*" > /dev/console; } 2>/dev/null || printf '[guest] %s\n' "$*" >&2
}

result() {
    local name=$1
    shift
    _t_name_ok "$name" || return 1
    t_emit "@@R $name {\"value_b64\":\"$(printf '%s' "$*" | _t_b64)\"}"
    say "$name = $(printf '%s' "$*" | head -n 1 | cut -c1-100)"
}

result_num() {
    local name=$1 v=$2
    _t_name_ok "$name" || return 1
    case "$v" in
        "" | -* | *[!0-9.]* | *.*.* | .*) result "$name" "$v"; return ;;
    esac
    t_emit "@@R $name {\"value\":$v}"
    say "$name = $v"
}

result_file() {
    local name=$1 f=$2
    _t_name_ok "$name" || return 1
    if [ -r "$f" ]; then
        t_emit "@@R $name {\"value_b64\":\"$(_t_b64 "$f")\"}"
        say "$name: $(wc -c < "$f") bytes"
    else
        t_emit "@@R $name {\"missing\":true}"
        say "$name: $f missing"
    fi
}

_t_report() {
    # _t_report NAME RC T0 T1 CMDTEXT  (output in $T_TMP.out / $T_TMP.err)
    t_emit "@@R $1 {\"rc\":$2,\"t0\":$3,\"t1\":$4,\"cmd_b64\":\"$(printf '%s' "$5" | _t_b64)\",\"out_b64\":\"$(_t_b64 "$T_TMP.out")\",\"err_b64\":\"$(_t_b64 "$T_TMP.err")\"}"
    if [ "$2" = 0 ]; then
        say "$1 ok"
    else
        say "$1 rc=$2: $(head -c 300 "$T_TMP.err" | tr '\n' ' ')"
    fi
}

check() {
    local name=$1 t0 t1 rc
    shift
    _t_name_ok "$name" || return 1
    t0=$(_t_uptime)
    "$@" < /dev/null > "$T_TMP.out" 2> "$T_TMP.err" 3>&-
    rc=$?
    t1=$(_t_uptime)
    _t_report "$name" "$rc" "$t0" "$t1" "$*"
    return $rc
}

check_sh() {
    local name=$1 t0 t1 rc
    _t_name_ok "$name" || return 1
    t0=$(_t_uptime)
    sh -c "$2" < /dev/null > "$T_TMP.out" 2> "$T_TMP.err" 3>&-
    rc=$?
    t1=$(_t_uptime)
    _t_report "$name" "$rc" "$t0" "$t1" "$2"
    return $rc
}

fi
