"""Model FLOPs and throughput: tokens/s, TFLOP/s per device and MFU, as pure functions.

FLOPs per token of one training step (forward + backward = 3 x forward; a multiply-add is
2 FLOPs), counting matrix multiplies only, as Megatron-LM's ``num_floating_point_operations``:

    forward = 2 * L * (h * (n_q + 2 * n_kv) * d      # q, k, v projections
                       + n_q * d * h                # attention output projection
                       + 3 * h * f)                 # gated MLP: gate, up, down
              + 2 * L * 2 * s * n_q * d             # q @ k^T and attn @ v (full s x s)
              + 2 * h * V                           # output layer (logits)
    train   = 3 * forward

with L layers, hidden h, ``n_q``/``n_kv`` query/key-value heads of size d, MLP size f,
sequence length s and vocabulary V. The attention term counts the full square, not the
causal half, like Megatron-LM. MFU = achieved FLOP/s per device / peak FLOP/s per device.
"""

from __future__ import annotations

import msgspec

from mbridge.specs import ModelSpec

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0,
               "L40S": 362.0, "A10": 125.0}


class Throughput(msgspec.Struct, frozen=True, kw_only=True):
    tokens_per_s: float
    tflops_per_device: float
    mfu: float | None  # None when the device's peak is unknown


def train_flops_per_token(spec: ModelSpec, seq_length: int) -> float:
    """FLOPs of forward + backward per token (formula in the module docstring)."""
    h, d, f, L = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size, spec.num_layers
    nq, nkv = spec.num_heads, spec.num_kv_heads
    linear = h * (nq + 2 * nkv) * d + nq * d * h + 3 * h * f
    attention = 2 * seq_length * nq * d
    forward = 2 * L * (linear + attention) + 2 * h * spec.vocab_size
    return 3.0 * forward


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of a device by name (``"NVIDIA H100 80GB HBM3"`` -> 989.0)."""
    if override is not None:
        return override
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None


def throughput(tokens: int, seconds: float, flops_per_token: float, num_devices: int,
               peak: float | None) -> Throughput:
    """Throughput of ``tokens`` processed in ``seconds`` by ``num_devices`` devices."""
    seconds = max(seconds, 1e-9)
    tflops = tokens * flops_per_token / seconds / num_devices / 1e12
    return Throughput(tokens_per_s=tokens / seconds, tflops_per_device=tflops,
                      mfu=tflops / peak if peak else None)
