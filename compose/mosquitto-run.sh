#!/bin/sh
# The broker container's entry point: Mosquitto on the users and ACL that `outpost up` generates
# (OUTPOST_BROKER__FILES, the volume mounted here at /mosquitto/auth), never on files made by hand.
# It waits for outpost's passwd and acl, copies them where Mosquitto (dropped to its user mosquitto)
# reads them, starts it, and when outpost rewrites them (a device enrolled) copies them again and
# sends Mosquitto SIGHUP, which rereads them: a signal from the Outpost container could not reach it.
# outpost renames each file into place, so a copy is never of half a file. POSIX sh: Debian's dash
# and the BusyBox of Eclipse's image.
# (The paths can be moved for tests/integration/test_security.py, which runs it without a container.)
set -eu
src=${MOSQUITTO_AUTH:-/mosquitto/auth}
run=${MOSQUITTO_RUN:-/mosquitto/run}
conf=${MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}
stamp() { cat "$src/passwd" "$src/acl" 2>/dev/null | cksum; }
install_files() {
    for f in passwd acl; do
        cp "$src/$f" "$run/.$f.new"
        chown mosquitto:mosquitto "$run/.$f.new"
        chmod 600 "$run/.$f.new"
        mv "$run/.$f.new" "$run/$f"
    done
}
mkdir -p "$run"
chown mosquitto:mosquitto "$run"
if ! [ -s "$src/passwd" ] || ! [ -s "$src/acl" ]; then
    echo "waiting for outpost up to write $src/passwd and $src/acl (OUTPOST_BROKER__FILES)"
    until [ -s "$src/passwd" ] && [ -s "$src/acl" ]; do sleep 0.2; done
fi
last=$(stamp)
install_files
mosquitto -c "$conf" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    now=$(stamp)
    if [ "$now" != "$last" ] && [ -s "$src/passwd" ] && [ -s "$src/acl" ]; then
        install_files
        last=$now
        kill -HUP "$pid" 2>/dev/null || true
        echo "outpost's users and ACL changed: Mosquitto rereads them"
    fi
done
status=0
wait "$pid" || status=$?
exit "$status"
