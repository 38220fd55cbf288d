#!/usr/bin/env bash
# Debian packages the project needs: libjpeg-turbo headers for the crop-aware decoder, and
# the image libraries pillow-simd is built against (it is compiled from source), and iproute2
# (ip, tc) for the tests that join two network namespaces by a shaped link.
set -euo pipefail
need=()
for pkg in libjpeg62-turbo-dev zlib1g-dev libpng-dev libwebp-dev libtiff-dev iproute2; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
