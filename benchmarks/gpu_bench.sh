#!/usr/bin/env bash
# `perfit bench speed` on a lent GPU machine, in one call of the device tool, from the repository root
# there, with `.device-kit` carried (packed here first: `python benchmarks/device_kit.py pack --data
# ../shared/data/databricks-dolly-15k.jsonl`). That machine has torch, transformers and peft but no
# Flower, gguf or network: perfit runs from src/, random weights of the model's architecture are
# written there, and the report and its JSON go to $OUT (the device tool brings them back).
#
#   run(command="bash benchmarks/gpu_bench.sh", carry=[".device-kit"], timeout_s=540)
set -euo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
out="${OUT:-docs}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 benchmarks/device_kit.py weights .device-kit
python3 -m perfit bench speed --device cuda --model .device-kit/model --data .device-kit/data.jsonl --out "$out" "$@" \
  2>&1 | tee "$out/gpu_bench.log"
