#!/usr/bin/env bash
# The Docker stage's setup on a Debian bookworm machine with no image registry, as root: the Docker
# daemon (docker.io), compose v2 (from Debian trixie: bookworm has only v1), debootstrap, and the
# local base image. On a normal machine none of this is needed: `docker compose up` just works.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# Only what is missing: a machine with Docker's own packages (docker-ce) keeps them.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  apt-get update -q && apt-get install -y -q "${missing[@]}"
fi
if ! docker compose version >/dev/null 2>&1; then
  echo "deb http://deb.debian.org/debian trixie main" > /etc/apt/sources.list.d/trixie.list
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' > /etc/apt/preferences.d/trixie
  apt-get update -q && apt-get install -y -q --no-install-recommends -t trixie docker-compose
fi
if ! docker info >/dev/null 2>&1; then
  (dockerd > /tmp/opd-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker compose version
bash docker/base-image.sh
