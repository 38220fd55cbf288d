#!/usr/bin/env bash
# One prepared GPU check (about 6 minutes on one NVIDIA GPU with 16 CPU cores), writing one JSON:
#   1. `datasvc bench` of the custom, dali_cpu and dali_gpu loaders on a sample pack;
#   2. 100 training steps of ResNet-50 at 224 px, channels_last, in fp16 and in bf16, fed by the
#      custom loader and by dali_gpu: images/s and data-wait fraction of each;
#   3. the remote loader's decode="dali_gpu" path: `datasvc serve` sends encoded samples and crop
#      parameters, the trainer's GPU decodes them (100 steps, bf16).
# Without a CUDA GPU it runs what a CPU can (the custom and dali_cpu bench, one tiny CPU training
# run) and says on one line per part what it skipped; the JSON lists the skipped parts.
#
#   scripts/gpu-check.sh [OUT_DIR]          (default: gpu-check/; the JSON is OUT_DIR/gpu-check.json)
#   GPU_CHECK_SMALL=1 scripts/gpu-check.sh  (a tiny pack and run: what the tests use)
#   PYTHON=/path/to/python                  (default: python; its datasvc and trainer are used)
set -euo pipefail

OUT=${1:-gpu-check}
PY=${PYTHON:-python}
SMALL=${GPU_CHECK_SMALL:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

say() { echo "gpu-check: $*"; }
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
HAS_DALI=$("$PY" -c "import importlib.util as u; print(int(u.find_spec('nvidia.dali') is not None))")
SKIPPED=()

if [ "$SMALL" = 1 ]; then
    CLASSES=4 PER_CLASS=8 VAL_PER_CLASS=2 STEPS=3 BATCH=4 SIZE=64 REPEATS=1
else
    CLASSES=20 PER_CLASS=100 VAL_PER_CLASS=10 STEPS=100 BATCH=128 SIZE=224 REPEATS=2
fi

# --- data: the built-in ImageNet-like sample, as an LMDB pack ------------------------------------
if [ ! -e "$OUT/pack/.complete" ]; then
    rm -rf "$OUT/tree" "$OUT/pack"
    "$PY" -m datasvc.cli sample -q "$OUT/tree" --classes "$CLASSES" --per-class "$PER_CLASS" \
        --val-per-class "$VAL_PER_CLASS"
    "$PY" -m datasvc.cli convert -q "$OUT/tree" "$OUT/pack"
    touch "$OUT/pack/.complete"
fi

# --- 1. loader benchmark ----------------------------------------------------------------------------
BACKENDS=custom
if [ "$HAS_DALI" = 1 ]; then BACKENDS="$BACKENDS,dali_cpu"; else
    say "DALI is not installed: skipping the dali_cpu and dali_gpu benchmarks"
    SKIPPED+=("bench dali_cpu (no DALI)")
fi
if [ "$HAS_GPU" = 1 ] && [ "$HAS_DALI" = 1 ]; then BACKENDS="$BACKENDS,dali_gpu"; else
    [ "$HAS_GPU" = 1 ] || say "no CUDA GPU: skipping the dali_gpu benchmark"
    SKIPPED+=("bench dali_gpu")
fi
say "bench: $BACKENDS"
timeout 240 "$PY" -m datasvc.cli bench -q "$OUT/pack" --backends "$BACKENDS" \
    --batch-size "$BATCH" --image-size "$SIZE" --repeats "$REPEATS" --json "$OUT/bench.json"

# --- 2. and 3. training steps -----------------------------------------------------------------------
train() {  # NAME EXTRA-OVERRIDES...: STEPS steps of ResNet-50; the run's summary.json is kept
    local name=$1
    shift
    say "train: $name"
    timeout 300 "$PY" -m trainer train --fresh --config trainer/configs/seed003_resnet50.yaml \
        data.source="$OUT/pack" data.batch_size="$BATCH" data.image_size="$SIZE" \
        data.num_workers="$(($(nproc) > 2 ? $(nproc) - 2 : 1))" \
        train.max_steps="$STEPS" train.epochs=1000 train.eval_interval=1000 \
        train.log_interval=10 train.plot=false train.tensorboard=false \
        train.channels_last=true train.out_dir="$OUT/runs/$name" "$@" >"$OUT/$name.log" 2>&1 ||
        { say "train $name failed; the end of $OUT/$name.log:"; tail -20 "$OUT/$name.log"; exit 1; }
}

if [ "$HAS_GPU" = 1 ]; then
    train custom_fp16 data.backend=custom train.amp=fp16
    train custom_bf16 data.backend=custom train.amp=bf16
    train dali_gpu_fp16 data.backend=dali_gpu train.amp=fp16
    train dali_gpu_bf16 data.backend=dali_gpu train.amp=bf16
    PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    "$PY" -m datasvc.cli serve -q "sample=$OUT/pack" --bind "tcp://127.0.0.1:$PORT" \
        >"$OUT/serve.log" 2>&1 &
    SERVER=$!
    trap 'kill $SERVER 2>/dev/null || true' EXIT
    sleep 5
    train remote_dali_gpu_bf16 data.backend=remote data.source="tcp://127.0.0.1:$PORT" \
        data.options.pack=sample data.options.decode=dali_gpu train.amp=bf16
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    trap - EXIT
else
    say "no CUDA GPU: skipping the fp16/bf16 ResNet-50 runs on custom and dali_gpu, and the remote decode=dali_gpu run; one CPU run (custom, fp32) stands in"
    SKIPPED+=("train custom fp16/bf16" "train dali_gpu fp16/bf16" "remote decode=dali_gpu")
    train cpu_custom_fp32 data.backend=custom train.amp=none train.device=cpu
fi

# --- the JSON -----------------------------------------------------------------------------------------
"$PY" - "$OUT" "${SKIPPED[@]+"${SKIPPED[@]}"}" <<'EOF'
import json, sys
from pathlib import Path

import torch

out, skipped = Path(sys.argv[1]), sys.argv[2:]
runs = {}
for summary in sorted(out.glob("runs/*/summary.json")):
    s = json.loads(summary.read_text())
    runs[summary.parent.name] = {
        k: s.get(k) for k in ("steps", "images_per_s", "data_wait_frac", "gpu_mem_gib", "wall_s")
    }
result = {
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__,
    "bench": json.loads((out / "bench.json").read_text()),
    "train": runs,
    "skipped": skipped,
}
(out / "gpu-check.json").write_text(json.dumps(result, indent=1) + "\n")
for name, r in runs.items():
    print(
        f"gpu-check: {name}: {r['images_per_s']:.1f} img/s, "
        f"data wait {100 * r['data_wait_frac']:.1f}%, {r['steps']} steps"
    )
print(f"gpu-check: wrote {out / 'gpu-check.json'}")
EOF
