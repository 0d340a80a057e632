#!/usr/bin/env bash
# Temporary host demo (issue 2), until the QEMU lab exists and replaces it:
# starts oe-routerd on this host with the shipped default config
# (files/etc/config/oe), its control socket in a temporary directory, shows
# `oe status`, and stops it with SIGTERM.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=.venv/bin/python
CONFIG=files/etc/config/oe
RUNDIR=$(mktemp -d /tmp/oe-demo.XXXXXX)
SOCK=$RUNDIR/control.sock
LOG=$RUNDIR/oe-routerd.log
PID=

cleanup() {
	if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
		kill -TERM "$PID" 2>/dev/null || true
		wait "$PID" 2>/dev/null || true
	fi
	rm -rf "$RUNDIR"
}
trap cleanup EXIT

echo "== oe config check $CONFIG"
$PY -m oe_router.cli config check "$CONFIG"

echo "== starting oe-routerd --config $CONFIG --socket $SOCK"
$PY -m oe_router --config "$CONFIG" --socket "$SOCK" 2>"$LOG" &
PID=$!
for _ in $(seq 1 100); do
	[ -S "$SOCK" ] && break
	if ! kill -0 "$PID" 2>/dev/null; then
		echo "oe-routerd exited early; its log:" >&2
		cat "$LOG" >&2
		exit 1
	fi
	sleep 0.1
done
[ -S "$SOCK" ] || { echo "oe-routerd did not create $SOCK; its log:" >&2; cat "$LOG" >&2; exit 1; }

echo "== oe status"
$PY -m oe_router.cli --socket "$SOCK" status

echo "== stopping oe-routerd (SIGTERM)"
kill -TERM "$PID"
rc=0
wait "$PID" || rc=$?
PID=
echo "oe-routerd exited with status $rc; its log:"
sed 's/^/  /' "$LOG"
if [ -e "$SOCK" ]; then
	echo "error: the control socket was not removed" >&2
	exit 1
fi

echo
echo "NOTE: this is a host-only demo. The QEMU lab demo (router and world VMs, real"
echo "kernel ESP, libreswan/strongSwan peers, a LAN client) does not exist yet."
exit "$rc"
