#!/usr/bin/env bash
# Installs the optional real data sets that install offline: Fashion-MNIST from Debian's
# package dataset-fashion-mnist (files under /usr/share/datasets/fashion-mnist/).
# Never fails the set-up: without it, the tests that need Fashion-MNIST skip with a message.
set -u
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "Fashion-MNIST: already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST: no apt-get on this machine; its tests and experiments will skip"
  exit 0
fi
sudo=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; else
    echo "Fashion-MNIST: needs root to install dataset-fashion-mnist; its tests will skip"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
   { $sudo apt-get update -q >/dev/null 2>&1 &&
     $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
  echo "Fashion-MNIST: installed (dataset-fashion-mnist)"
else
  echo "Fashion-MNIST: apt-get could not install dataset-fashion-mnist; its tests will skip"
fi
exit 0
