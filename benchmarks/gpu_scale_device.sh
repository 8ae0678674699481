#!/usr/bin/env bash
# The one-GPU measurements of docs/benchmarks.md ("The large-scale configs on one GPU"), as
# one command for a lent GPU machine whose python3 has torch (the package runs from src/,
# nothing installed):
#   OUT=/some/dir FACES=cache/gpu_pool bash benchmarks/gpu_scale_device.sh
# FACES: a folder of aligned 112×112 face JPEGs (a few hundred; reused for the loop's .rec).
set -u
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder for the results}
FACES=${FACES:-cache/gpu_pool}
J="$OUT/gpu_scale.jsonl"
B="python3 benchmarks/gpu_scale.py"
MS=configs/ms1mv2_iresnet50_pfc.toml
GL=configs/glint360k_iresnet100_pfc.toml
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
nproc
$B step --config $MS --classes 85742 --amp bf16 --rate 0.3 1 --cudnn-benchmark 0 1 --out "$J"
$B step --config $MS --classes 85742 --amp fp16 off --out "$J"
$B step --config $MS --classes 85742 --amp bf16 --batch 256 512 --out "$J"
$B step --config $GL --classes 360232 --amp bf16 --rate 0.2 1 --out "$J"
$B loop --config $MS --classes 85742 --faces "$FACES" --work /tmp/gpu_scale --steps 300 --out "$J"
$B loop --config $MS --classes 85742 --faces "$FACES" --work /tmp/gpu_scale --steps 100 \
    --amp fp16 --out "$J"
python3 - "$J" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from gpu_scale import _table
print(_table([json.loads(line) for line in open(sys.argv[1])]))
PY
