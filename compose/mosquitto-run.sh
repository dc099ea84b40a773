#!/bin/sh
# The broker container's entry point: Mosquitto on the users and ACL that `outpost up` generates
# (OUTPOST_BROKER__FILES, the volume mounted here at /mosquitto/auth), never on files made by hand.
# It waits for outpost's passwd and acl, copies them where Mosquitto (dropped to its user mosquitto)
# reads them, starts it, and when outpost rewrites them (a device enrolled) copies them again and
# sends Mosquitto SIGHUP, which rereads them: a signal from the Outpost container could not reach it.
# outpost renames each file into place, so a copy is never of half a file. POSIX sh: Debian's dash
# and the BusyBox of Eclipse's image.
# TLS for devices: when the folder mounted at /mosquitto/tls (compose's BROKER_TLS_DIR) holds
# broker.pem and broker.key, the config it runs gets a second listener, TLS on 8883, with the same
# users and ACL; with devices-ca.pem there too, a client must also show a certificate signed by it.
# (The paths can be moved for tests/integration/test_security.py, which runs it without a container.)
set -eu
src=${MOSQUITTO_AUTH:-/mosquitto/auth}
run=${MOSQUITTO_RUN:-/mosquitto/run}
conf=${MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}
tls=${MOSQUITTO_TLS:-/mosquitto/tls}
stamp() { cat "$src/passwd" "$src/acl" 2>/dev/null | cksum; }
install_files() {
    for f in passwd acl; do
        cp "$src/$f" "$run/.$f.new"
        chown mosquitto:mosquitto "$run/.$f.new"
        chmod 600 "$run/.$f.new"
        mv "$run/.$f.new" "$run/$f"
    done
}
# the config Mosquitto runs: the shipped one, and the TLS listener when its files are there (copied
# beside the users' files, the key readable by the user mosquitto alone)
make_conf() {
    cp "$conf" "$run/mosquitto.conf"
    [ -s "$tls/broker.pem" ] && [ -s "$tls/broker.key" ] || return 0
    for f in broker.pem broker.key devices-ca.pem; do
        [ -s "$tls/$f" ] || continue
        cp "$tls/$f" "$run/.$f.new"
        chown mosquitto:mosquitto "$run/.$f.new"
        chmod 600 "$run/.$f.new"
        mv "$run/.$f.new" "$run/$f"
    done
    printf '%s\n' "" "# TLS for devices (from $tls)" "listener 8883 0.0.0.0" \
        "certfile $run/broker.pem" "keyfile $run/broker.key" "tls_version tlsv1.2" >>"$run/mosquitto.conf"
    if [ -s "$tls/devices-ca.pem" ]; then
        printf '%s\n' "cafile $run/devices-ca.pem" "require_certificate true" >>"$run/mosquitto.conf"
        echo "TLS listener on 8883: $tls/broker.pem; clients need a certificate signed by devices-ca.pem"
    else
        echo "TLS listener on 8883: $tls/broker.pem"
    fi
}
mkdir -p "$run"
chown mosquitto:mosquitto "$run"
if ! [ -s "$src/passwd" ] || ! [ -s "$src/acl" ]; then
    echo "waiting for outpost up to write $src/passwd and $src/acl (OUTPOST_BROKER__FILES)"
    until [ -s "$src/passwd" ] && [ -s "$src/acl" ]; do sleep 0.2; done
fi
last=$(stamp)
install_files
make_conf
mosquitto -c "$run/mosquitto.conf" &
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
