#!/bin/sh
# Build deploy/Dockerfile (what `make image` runs), from the repository root.
#
#   IMAGE=batchserve:latest   the tag to build
#   TORCH_VARIANT=cpu|cuda    cpu (default): the CPU build of torch; cuda: PyPI's CUDA build
#                             (`make image-cuda`, the gpu overlay's worker image)
#   BASE_IMAGE=...            the base; default python:3.11-slim, and when that cannot be
#                             pulled, a local Debian bookworm base (deploy/base-image.sh)
#   ENGINE=docker|buildah     default: docker when a daemon answers, else buildah
#   PIP_SOURCES=host|none     host (default): pass the host's pip sources (pip config list:
#                             indexes, find-links, CA bundle) into the build, mounting the local
#                             paths they name (buildah; docker gets only URL sources)
#   TORCH_INDEX_URL=...       the CPU build's: default PyTorch's CPU index when it answers, else
#                             empty (torch==2.13.0+cpu from the pip sources); unused with cuda
#   WARM_CACHES=1|0           1 (the Dockerfile's default): fill the app's caches at build time
set -eu
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-batchserve:latest}
DEFAULT_BASE=python:3.11-slim
LOCAL_BASE=localhost/batchserve-base:bookworm
PIP_SOURCES=${PIP_SOURCES:-host}
PYTORCH_CPU=https://download.pytorch.org/whl/cpu
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
case "$TORCH_VARIANT" in
    cpu|cuda) ;;
    *) echo "TORCH_VARIANT=$TORCH_VARIANT: cpu or cuda" >&2; exit 2 ;;
esac

if [ -z "${ENGINE:-}" ]; then
    if command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then
        ENGINE=docker
    else
        ENGINE=buildah
    fi
fi
if [ "$ENGINE" = buildah ] && ! command -v buildah >/dev/null; then
    echo "no docker daemon answers and buildah is missing: installing buildah, podman, runc"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        buildah podman runc uidmap fuse-overlayfs >/dev/null
fi
echo "engine: $ENGINE"

# ---- the base image
if [ "$ENGINE" = docker ]; then
    have_image() { docker image inspect "$1" >/dev/null 2>&1; }
    pull() { timeout 300 docker pull "$1"; }
else
    have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }
    pull() { timeout 300 buildah pull "$1"; }
fi
if [ -n "${BASE_IMAGE:-}" ]; then
    have_image "$BASE_IMAGE" || pull "$BASE_IMAGE"
elif have_image "$DEFAULT_BASE" || pull "$DEFAULT_BASE"; then
    BASE_IMAGE=$DEFAULT_BASE
else
    echo "cannot pull $DEFAULT_BASE: using a local Debian bookworm base, $LOCAL_BASE"
    deploy/base-image.sh "$([ "$ENGINE" = docker ] && echo docker || echo podman)" "$LOCAL_BASE"
    BASE_IMAGE=$LOCAL_BASE
fi
echo "base image: $BASE_IMAGE"

# ---- where pip gets packages inside the build
pip_options=""
mounts=""
if [ "$PIP_SOURCES" = host ]; then
    sources=$(python3 deploy/pip_sources.py)
    pip_options=$(printf '%s\n' "$sources" | sed -n 's/^option //p' | tr '\n' ' ')
    mounts=$(printf '%s\n' "$sources" | sed -n 's/^mount //p')
    if [ "$ENGINE" = docker ] && [ -n "$mounts" ]; then
        echo "docker builds cannot mount the host's local pip sources: passing only URL sources"
        pip_options=$(printf '%s\n' "$sources" | sed -n 's/^option //p' \
            | grep -v -E -e '--(find-links|cert|client-cert) /' -e 'file:' | tr '\n' ' ' || true)
        mounts=""
    fi
fi
if [ "$TORCH_VARIANT" = cuda ]; then
    TORCH_INDEX_URL=""  # the Dockerfile's framework-cuda stage: torch===2.13.0 from PyPI
elif [ -z "${TORCH_INDEX_URL+set}" ]; then
    if python3 -c "import urllib.request; urllib.request.urlopen('$PYTORCH_CPU/torch/', timeout=10)" 2>/dev/null; then
        TORCH_INDEX_URL=$PYTORCH_CPU
    else
        echo "$PYTORCH_CPU does not answer: torch==2.13.0+cpu comes from the pip sources"
        TORCH_INDEX_URL=""
    fi
fi
echo "pip options: ${pip_options:-(none)}"
if [ "$TORCH_VARIANT" = cuda ]; then
    echo "torch: 2.13.0, the CUDA build, from PyPI (with the pip sources)"
else
    echo "torch index: ${TORCH_INDEX_URL:-(the pip sources)}"
fi

# ---- build
set -- --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "PIP_OPTIONS=$pip_options" \
    --build-arg "TORCH_VARIANT=$TORCH_VARIANT" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    -f deploy/Dockerfile -t "$IMAGE"
if [ -n "${WARM_CACHES:-}" ]; then
    set -- "$@" --build-arg "WARM_CACHES=$WARM_CACHES"
fi
started=$(date +%s)
if [ "$ENGINE" = docker ]; then
    DOCKER_BUILDKIT=1 docker build "$@" .
else
    for path in $mounts; do
        set -- "$@" --volume "$path:$path:ro"
    done
    # chroot isolation: no container runtime needed; docker format keeps the HEALTHCHECK
    buildah bud --isolation chroot --layers --format docker \
        --ignorefile deploy/Dockerfile.dockerignore "$@" .
fi
echo "built $IMAGE ($TORCH_VARIANT torch) in $(( $(date +%s) - started )) s"
