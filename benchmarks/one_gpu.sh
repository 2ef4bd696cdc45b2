#!/usr/bin/env bash
# Every one-GPU measurement in one call (device time is scarce), each step under its own time
# limit so one that hangs cannot take the rest; results go to $OUT (default ./out/one_gpu):
#   bash benchmarks/one_gpu.sh
# Needs CUDA torch, transformers and megatron-core (on the lent GPU machine: the wheels of
# ../shared/gpu/wheels.sh on PYTHONPATH).
set -uo pipefail
out=${OUT:-out/one_gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
$py -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'megatron-core', m.__version__)" | tee -a "$out/gpu.txt"
step() {  # step NAME SECONDS CMD...: run, log to $out/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | grep -v -E 'Warning: |warnings\.warn\(' | tee "$out/$name.log"
}
tp=benchmarks/train_throughput.py
step train_eager "${T_EAGER:-200}" $py $tp --variants mbridge_ce,hf_eager \
  --micro-batches 1,2,4,8,16 --steps 6 --warmup 2 --json "$out/train_eager.json"
step convert_gpu "${T_CONVERT:-90}" $py benchmarks/convert.py --size 1b --workdir /tmp/bench \
  --gpu --json "$out/convert_gpu.json"
step train_compile "${T_COMPILE:-150}" $py $tp --variants mbridge_compile_ce,hf_compile \
  --micro-batches 4,8 --steps 6 --warmup 3 --json "$out/train_compile.json"
step profile "${T_PROFILE:-60}" $py $tp --variants mbridge --micro-batches 4 --steps 3 \
  --warmup 2 --profile mbridge_ce:4
step sft_packed "${T_SFT:-300}" $py benchmarks/sft_throughput.py --json "$out/sft_packed.json"
