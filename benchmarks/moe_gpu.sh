#!/usr/bin/env bash
# The one-GPU MoE checks and measurements in one call (device time is scarce), each step under
# its own time limit; results go to $OUT (default ./out/moe_gpu):
#   bash benchmarks/moe_gpu.sh [checks] [throughput] [more] [fused]   (default: all four)
# Needs CUDA torch, transformers and megatron-core (on the lent GPU machine: the wheels of
# ../shared/gpu/wheels.sh, plus pytest and its dependencies, on PYTHONPATH).
set -uo pipefail
phases=${*:-checks throughput more fused}
has() { [[ " $phases " == *" $1 "* ]]; }
out=${OUT:-out/moe_gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...: run, log to $out/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | grep -v -E 'Warning: |warnings\.warn\(' | tee "$out/$name.log" | tail -40
}
if has checks; then
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'megatron-core', m.__version__); \
print('torch._grouped_mm', getattr(torch, '_grouped_mm', None)); \
x = torch.randn(96, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True); \
w = torch.randn(3, 32, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True); \
o = torch.tensor([32, 32, 96], device='cuda', dtype=torch.int32); \
y = torch._grouped_mm(x, w.transpose(1, 2), offs=o); y.float().square().sum().backward(); \
ref = torch.cat([x[a:b] @ w[j].t() for j, (a, b) in enumerate([(0, 32), (32, 32), (32, 96)])]); \
print('grouped_mm', tuple(y.shape), 'max diff vs loop', (y - ref).abs().max().item(), \
'grad', w.grad.shape)"; } 2>&1 | tee "$out/gpu.txt"
step tests "${T_TESTS:-150}" $py -m pytest -q -p no:cacheprovider -x tests/gpu \
  tests/moe/test_moe_experts.py tests/test_cpu_shim.py
fi
mt=benchmarks/moe_throughput.py
if has throughput; then
step moe "${T_MOE:-230}" $py $mt --variants mbridge,hf_eager,hf_compile --layers 4
step moe_hf_bf16 "${T_HFBF16:-150}" $py $mt --variants hf_bf16_eager,hf_bf16_compile --layers 4
step moe_more "${T_MORE:-100}" $py $mt --variants mbridge --layers 8 --steps 3 --warmup 2
step moe_fast "${T_FAST:-400}" $py $mt --variants \
  mbridge,mbridge_fast,mbridge_fast_compile,mbridge_stacked,mbridge_stacked_compile --layers 4
step moe_accum "${T_ACCUM:-300}" $py $mt --variants mbridge_stacked_compile,hf_bf16_compile \
  --layers 4 --micro-batches 4 --steps 3 --warmup 2
step moe_deep "${T_DEEP:-400}" $py $mt --variants mbridge_stacked_compile,hf_bf16_compile \
  --layers 8 --micro-batches 4 --steps 4 --warmup 2
step moe_bf16_grads "${T_BF16G:-200}" $py $mt --variants mbridge_stacked_compile \
  --layers 4,8 --micro-batches 4 --steps 4 --warmup 2 --bf16-grads
fi
if has fused; then  # the experts' weight gradients added into DDP's buffer by a Triton kernel
step wgrad_tests "${T_WGRAD:-150}" $py -m pytest -q -p no:cacheprovider tests/gpu/test_wgrad_gpu.py \
  "tests/gpu/test_moe_gpu.py::test_training_loss_falls"
step wgrad_kernel "${T_WGRADK:-90}" $py benchmarks/grouped_wgrad.py
step cross_entropy "${T_CE:-60}" $py benchmarks/cross_entropy.py
step moe_fused "${T_FUSED:-400}" $py $mt --variants \
  hf_bf16_compile,mbridge_stacked_compile,mbridge_stacked_compile_fused,mbridge_stacked_compile_fused_out \
  --layers 4 --micro-batches 4 --steps 4 --warmup 2
step moe_fused_bf16 "${T_FUSEDB:-200}" $py $mt --variants \
  hf_bf16_compile,mbridge_stacked_compile_fused_out --layers 4 --micro-batches 4 --steps 4 \
  --warmup 2 --bf16-grads
fi
if has more; then
step moe_seq "${T_SEQ:-60}" $py $mt --variants mbridge_seq --layers 4 --steps 2 --warmup 1
step profile "${T_PROFILE:-70}" $py $mt --variants '' --layers 4 --profile mbridge:4
step profile_fast "${T_PROFILE:-70}" $py $mt --variants '' --layers 4 --profile mbridge_stacked:4
step convert_gpu "${T_CONVERT:-90}" $py benchmarks/convert.py --size 1b --workdir /tmp/bench \
  --gpu
fi
