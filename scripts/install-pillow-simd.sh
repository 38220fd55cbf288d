#!/usr/bin/env bash
# Replace Pillow with pillow-simd (the same API; SIMD resize and colour conversion) in the
# given Python environment, built from source (~1 min). Falls back to stock Pillow if the
# build fails. The `torch` loader backend reports which one it runs on.
set -euo pipefail
py=${1:?usage: install-pillow-simd.sh PYTHON}
if "$py" -c "import importlib.metadata as m; m.version('pillow-simd')" >/dev/null 2>&1; then
  exit 0
fi
flags=""
grep -qw avx2 /proc/cpuinfo 2>/dev/null && flags="-mavx2"
"$py" -m pip uninstall -q -y pillow
if ! CC="cc $flags" "$py" -m pip install -q --disable-pip-version-check --no-cache-dir \
    --force-reinstall --no-deps pillow-simd; then
  echo "pillow-simd did not build; keeping stock Pillow" >&2
  "$py" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps pillow
fi
