# labkit shell helpers, sourced by every bundle/hosts/<netns>/start.sh (POSIX sh).
# Contract: the caller runs start.sh as root INSIDE the host's netns, with its
# addresses configured.  LAB_STATE (default /run/lab) is writable; each host
# keeps its state, logs and pid files in $LAB_STATE/<netns>.

# lab_prepare NETNS HOSTDIR: copy the host's files to its state dir and fill in @STATE@.
lab_prepare() {
    LAB_HOST=$1
    STATE="${LAB_STATE:-/run/lab}/$1"
    rm -rf "$STATE"
    mkdir -p "$STATE"
    cp -R "$2/." "$STATE/"
    grep -rl '@STATE@' "$STATE" 2>/dev/null | while read -r f; do
        sed -i "s|@STATE@|$STATE|g" "$f"
    done
    export STATE LAB_HOST
}

# lab_fail MESSAGE [LOG]: print MESSAGE and the tail of LOG, exit 1.
lab_fail() {
    echo "start.sh[$LAB_HOST]: $1" >&2
    if [ -n "${2:-}" ] && [ -f "$2" ]; then
        echo "--- last lines of $2 ---" >&2
        tail -n 30 "$2" >&2
    fi
    exit 1
}

# lab_wait SECONDS WHAT LOG CMD...: poll CMD every 0.1 s until it succeeds.
lab_wait() {
    _t=$(($1 * 10)); _what=$2; _log=$3; shift 3
    while ! "$@" >/dev/null 2>&1; do
        _t=$((_t - 1))
        [ "$_t" -gt 0 ] || lab_fail "$_what not ready" "$_log"
        sleep 0.1
    done
}

# lab_spawn NAME CMD...: start CMD detached, log in $STATE/NAME.log, pid in $STATE/NAME.pid.
lab_spawn() {
    _name=$1; shift
    setsid "$@" >"$STATE/$_name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$_name.pid"
}

# lab_http V4 [V6]: serve $STATE/www on V4:80 (and V6:80 if that address exists),
# wait until V4:80 accepts.  Own addresses only, so hosts may share a netns in tests.
lab_http() {
    lab_spawn http python3 -m http.server 80 --bind "$1" --directory "$STATE/www"
    if [ -n "${2:-}" ] && ip -6 addr show 2>/dev/null | grep -q " $2/"; then
        lab_spawn http6 python3 -m http.server 80 --bind "$2" --directory "$STATE/www"
    fi
    lab_wait 15 "http server" "$STATE/http.log" \
        python3 -c "import socket,sys; socket.create_connection((sys.argv[1], 80), 1)" "$1"
}

# lab_afalg_warm: instantiate the kernel's ESP AEAD templates now, so the first
# SA does not pay for it (LAB-NOTES: 2.2 s -> 0.2-0.5 s under TCG).  Best effort.
lab_afalg_warm() {
    python3 - <<'EOF' >/dev/null 2>&1 || true
import socket
for alg in ("seqiv(rfc4106(gcm(aes)))", "rfc4106(gcm(aes))"):
    try:
        s = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
        s.bind(("aead", alg))
        s.close()
    except OSError:
        pass
EOF
}

# lab_pluto_stop: stop the pluto of $STATE (TERM, then KILL after 5 s) and flush the
# netns's SAs and policies, so the next lab_pluto starts from a clean kernel.
lab_pluto_stop() {
    if [ -f "$STATE/pluto.pid" ]; then
        _pid=$(cat "$STATE/pluto.pid")
        kill "$_pid" 2>/dev/null || true
        _i=50
        while kill -0 "$_pid" 2>/dev/null && [ $_i -gt 0 ]; do sleep 0.1; _i=$((_i - 1)); done
        kill -9 "$_pid" 2>/dev/null || true
        rm -f "$STATE/pluto.pid" "$STATE/run/pluto.ctl" "$STATE/run/pluto.pid"
    fi
    ip xfrm state flush
    ip xfrm policy flush
}

# lab_pluto: start libreswan's pluto on $STATE (ipsec.conf, ipsec.d, nss) and wait
# until every OE group with a policy is loaded.  Extra args: groups to wait for.
lab_pluto() {
    mkdir -p "$STATE/nss" "$STATE/run"
    ipsec initnss --nssdir "$STATE/nss" >"$STATE/initnss.log" 2>&1 || [ $? -eq 42 ] ||
        lab_fail "ipsec initnss failed" "$STATE/initnss.log"
    if [ -f "$STATE/hostkey.p12" ]; then
        pk12util -i "$STATE/hostkey.p12" -d "sql:$STATE/nss" -W "$(cat "$STATE/hostkey.p12.pass")" \
            -K "" >"$STATE/pk12util.log" 2>&1 || lab_fail "NSS key import failed" "$STATE/pk12util.log"
    fi
    lab_afalg_warm
    _pluto=$(command -v pluto || echo /usr/libexec/ipsec/pluto)
    lab_spawn pluto "$_pluto" --nofork --config "$STATE/ipsec.conf" --rundir "$STATE/run" \
        --nssdir "$STATE/nss" --ipsecdir "$STATE/ipsec.d" --secretsfile "$STATE/ipsec.secrets" \
        --logfile "$STATE/pluto.log"
    lab_wait 20 "pluto control socket" "$STATE/pluto.log" test -S "$STATE/run/pluto.ctl"
    for _g in "$@"; do
        lab_wait 20 "pluto group $_g" "$STATE/pluto.log" \
            sh -c "ipsec whack --ctlsocket '$STATE/run/pluto.ctl' --status | grep -q '\"$_g#'"
    done
}

# lab_knot_loaded N: true once knotd (config $STATE/knot.conf) has loaded N zones.
lab_knot_loaded() {
    [ "$(knotc -c "$STATE/knot.conf" zone-status 2>/dev/null | grep -c 'serial: [0-9]')" -ge "$1" ]
}

# lab_iked_stop: stop the OpenIKED of $STATE (TERM, then KILL after 5 s) and flush the
# netns's SAs and policies (iked's PF_KEY SAs are XFRM states), so the next start is clean.
lab_iked_stop() {
    if [ -f "$STATE/iked.pid" ]; then
        _pid=$(cat "$STATE/iked.pid")
        kill "$_pid" 2>/dev/null || true
        _i=50
        while kill -0 "$_pid" 2>/dev/null && [ $_i -gt 0 ]; do sleep 0.1; _i=$((_i - 1)); done
        kill -9 "$_pid" 2>/dev/null || true
        rm -f "$STATE/iked.pid" "$STATE/iked.sock"
    fi
    [ -f "$STATE/iked.log" ] && cat "$STATE/iked.log" >>"$STATE/iked-before.log"
    rm -f "$STATE/iked.log"
    ip xfrm state flush
    ip xfrm policy flush
}

# lab_iked [CONF]: start OpenIKED (iked -dvv, log $STATE/iked.log, control socket
# $STATE/iked.sock) with CONF (default $STATE/iked.conf) and wait for its control socket.
# iked reads its keys from the compiled-in /etc/iked only, so it runs in a private mount
# namespace with $STATE/iked bind-mounted there: each host keeps its own keys. Its one
# kernel interface is PF_KEY (af_key, loaded at boot from modules.txt).
lab_iked() {
    _conf=${1:-$STATE/iked.conf}
    [ -e /proc/net/pfkey ] || lab_fail "no PF_KEY in this kernel (af_key not loaded)"
    chmod 600 "$_conf"  # iked refuses a configuration others may read
    mkdir -p "$STATE/iked/ca" "$STATE/iked/certs" "$STATE/iked/crls" "$STATE/iked/private" \
        "$STATE/iked/pubkeys/fqdn" "$STATE/iked/pubkeys/ipv4" "$STATE/iked/pubkeys/ipv6" \
        "$STATE/iked/pubkeys/ufqdn"
    chmod -R go-rwx "$STATE/iked/private"
    rm -f "$STATE/iked.sock"
    lab_afalg_warm
    setsid unshare --mount --propagation private sh -c \
        'mount --bind "$1/iked" /etc/iked && exec iked -dvv -f "$2" -s "$1/iked.sock"' \
        iked "$STATE" "$_conf" >"$STATE/iked.log" 2>&1 </dev/null &
    echo $! >"$STATE/iked.pid"
    lab_wait 20 "iked control socket" "$STATE/iked.log" test -S "$STATE/iked.sock"
    # the socket comes first; IKE messages are dropped until the ikev2 process has its
    # policies and UDP sockets, after which iked -v logs its static settings
    lab_wait 20 "iked policies and sockets" "$STATE/iked.log" \
        grep -q "config_getstatic: nattport" "$STATE/iked.log"
}
