#!/usr/bin/env bash
# Every benchmark at GPU sizes, in one go (about 8 minutes on one H200). Run on a CUDA machine:
#   bash benchmarks/run_gpu.sh [out_dir]
# Writes out_dir/gpu-reference.json: {"recorded": {gpu, torch, date}, "results": {benchmark: its JSON}}
# and the full log beside it. Copy the JSON unchanged into benchmarks/reference/ to publish it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${1:-${OUT:-runs/gpu}}
mkdir -p "$OUT_DIR"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh needs a CUDA GPU')" || exit 1
LOG="$OUT_DIR/gpu-benchmarks.log"
: > "$LOG"
for b in train_throughput sparse_attention checkpointing flash_attention data_parallel; do
  [ -f "benchmarks/$b.py" ] || { echo "skip $b (missing)" | tee -a "$LOG"; continue; }
  echo "== $b" | tee -a "$LOG"
  timeout 150 $PY "benchmarks/$b.py" --gpu 2>&1 | tee -a "$LOG" | tail -1 > "$OUT_DIR/$b.json"
done
$PY - "$OUT_DIR" <<'PY'
import datetime, json, pathlib, sys, torch
out = pathlib.Path(sys.argv[1])
results = {}
for f in sorted(out.glob("*.json")):
    if f.name == "gpu-reference.json":
        continue
    try:
        results[f.stem] = json.loads(f.read_text())
    except json.JSONDecodeError:
        results[f.stem] = {"error": "no JSON line; see gpu-benchmarks.log"}
recorded = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}
(out / "gpu-reference.json").write_text(json.dumps({"recorded": recorded, "results": results}, indent=1))
print(json.dumps(recorded))
PY
