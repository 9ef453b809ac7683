#!/usr/bin/env bash
# Every GPU measurement of the trainer in one device call. Carry data/dev_run, built on
# any machine by `python bench/train_dev_run.py --workdir data/dev_run --prepare-only`.
#   bash bench/gpu_session.sh [attention] [parts] [throughput] [plainloss] [dev]
# (default: parts throughput dev, which fit one 10-minute call; plainloss is the A/B of the loss)
# Logs and JSON results go to $OUT (or bench/out). Each part has its own time limit, so
# a failure in one still leaves the others' results.
set -u
OUT=${OUT:-bench/out}
PARTS=${*:-parts throughput dev}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
has() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
has attention && timeout 80 python3 bench/attention_kernels.py 2>&1 | grep -v Warning | tee "$OUT/attention.log"
has parts && timeout 120 python3 bench/step_parts.py 2>&1 | tee "$OUT/step_parts.log"
has throughput && timeout 200 python3 bench/train_throughput.py --profile profiles/record_8xh100.yaml \
    --trace "$OUT/trace.txt" 2>&1 | tee "$OUT/throughput.log"
has plainloss && timeout 200 python3 bench/train_throughput.py --profile profiles/record_8xh100.yaml \
    --loss plain 2>&1 | tee "$OUT/throughput_plain_loss.log"
has dev && timeout 260 python3 bench/train_dev_run.py --profile profiles/record_8xh100.yaml --workdir data/dev_run \
    --batch-tokens 131072 --steps 75 2>&1 | tr '\r' '\n' | grep -v "^train\|^score" | tee "$OUT/dev_run.log"
cp bench/results/*.json "$OUT/" 2>/dev/null
ls -la "$OUT"
