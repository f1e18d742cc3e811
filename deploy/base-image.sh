#!/bin/sh
# A Debian bookworm base image with Python, made from Debian's own packages, for machines that
# cannot pull the registry's python:3.11-slim.  Usage: deploy/base-image.sh ENGINE NAME
#   ENGINE: docker or podman (buildah and podman share their image store)
# Reuses NAME when it exists.  Needs mmdebstrap and root (installed with apt-get when missing).
set -eu
engine=${1:?usage: base-image.sh docker|podman NAME}
name=${2:?usage: base-image.sh docker|podman NAME}

if [ "$engine" = docker ]; then
    exists() { docker image inspect "$name" >/dev/null 2>&1; }
    import_tar() { docker import "$1" "$name"; }
else
    exists() { podman image exists "$name"; }
    import_tar() { podman import "$1" "$name"; }
fi

if exists; then
    echo "base image $name exists: reused"
    exit 0
fi
if ! command -v mmdebstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "building base image $name with mmdebstrap (Debian bookworm, python3)"
# passwd: useradd for the image's unprivileged user; curl: for operators' health probes
mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,ca-certificates,curl,passwd \
    bookworm "$scratch/base.tar"
import_tar "$scratch/base.tar"
echo "base image $name imported"
