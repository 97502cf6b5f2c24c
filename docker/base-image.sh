#!/usr/bin/env bash
# For machines that cannot pull from an image registry: build the base image the Dockerfiles start
# from (Debian bookworm with python3), with debootstrap, and copy this machine's local CA
# certificates into it so pip works behind a TLS-inspecting proxy. Then copy this machine's torch CPU
# wheel (if it keeps one) where docker/Dockerfile looks for local wheels. As root:
#   bash docker/base-image.sh            # then: OPD_BASE_IMAGE=opd-base:bookworm docker compose up
set -euo pipefail
image=${1:-opd-base:bookworm}
here=$(cd "$(dirname "$0")" && pwd)
cp /opt/wheels/torch-*+cpu-*.whl "$here/wheels/" 2>/dev/null || true
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image already built"; exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,haproxy \
  bookworm "$root" http://deb.debian.org/debian
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
chroot "$root" update-ca-certificates >/dev/null
chroot "$root" apt-get clean
tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$image"
echo "built $image"
