"""Causal flash attention vs every PyTorch SDPA backend and compiled math attention, at GPT-2 124M shapes.

    python benchmarks/run.py --only attention

B x H = 64 x 12 (the GPT-2 124M micro-batch), D = 64, T = 512 ... 4096, causal, bf16. q, k, v are
laid out in memory as (B, T, H, D) and viewed as (B, H, T, D), as the model holds them after
splitting heads. Unit TFLOP/s, from the matmul FLOPs of one call: the forward does Q K^T and P V,
2 * 2*B*H*T*T*D, halved by the causal mask; the backward is counted as 2.5x the forward (five
matmuls instead of two), full = 3.5x.

Providers:
    triton               kernels.attention.flash_attention
    triton-atomic        the same with deterministic=False: the backward adds dq up with fp32 atomics
    torch                F.scaled_dot_product_attention, backend left to PyTorch (what --kernels=torch runs)
    torch-flash          SDPA forced to one backend with torch.nn.attention.sdpa_kernel; a backend the
    torch-cudnn          machine lacks raises, and the harness records n/a
    torch-efficient
    torch.compile(math)  explicit softmax(Q K^T + mask) V under torch.compile (built by the harness)
The harness's own torch.compile of the "torch" provider is off: compiling a single SDPA call adds nothing.

Baseline: the fastest SDPA provider of each config and mode, whichever it is on this machine (cuDNN's
Hopper kernels or FlashAttention-2's, PyTorch's own choice among them); a backend that fails here only
drops out of the comparison. Every speedup names the provider it is against.

The smoke pass (CPU, interpreter) runs the math provider eagerly (compiling on the CPU would only
check Inductor) and lists the forced SDPA backends as n/a: they are CUDA-only.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness import OpBench
from kernels.attention import attention_ref, flash_attention

DTYPE = torch.bfloat16
PASSES = {"forward": 1.0, "backward": 2.5, "full": 3.5}


def make_inputs(config, device, dtype):
    B, H, T, D = config["B"], config["H"], config["T"], config["D"]
    return tuple(torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
                 for _ in range(3))                                              # (B, H, T, D) views


def flops(config, mode):
    B, H, T, D = config["B"], config["H"], config["T"], config["D"]
    return PASSES[mode] * 4 * B * H * T * T * D / 2                             # causal: half the blocks


def triton_attention(q, k, v):
    return flash_attention(q, k, v, causal=True)


def triton_attention_atomic(q, k, v):
    return flash_attention(q, k, v, causal=True, deterministic=False)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_forced(backend):
    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attention


def math_attention(q, k, v):
    """Returns its output in (B, T, H, D) memory like the other providers, as the model consumes it
    (its y.transpose(1, 2).contiguous() then costs nothing); the smoke pass needs equal layouts too,
    since it draws dO with randn_like, whose values follow the memory order."""
    y = attention_ref(q, k, v, causal=True, upcast=False)                        # (B, H, T, D)
    return y.transpose(1, 2).contiguous().transpose(1, 2)


SDPA = ("torch", "torch-flash", "torch-cudnn", "torch-efficient")

BENCHMARKS = [
    OpBench(
        name="attention",
        unit="TFLOP/s",
        dtype=DTYPE,
        make_inputs=make_inputs,
        providers={
            "triton": triton_attention,
            "triton-atomic": triton_attention_atomic,
            "torch": sdpa,
            "torch-flash": sdpa_forced(SDPBackend.FLASH_ATTENTION),
            "torch-cudnn": sdpa_forced(SDPBackend.CUDNN_ATTENTION),
            "torch-efficient": sdpa_forced(SDPBackend.EFFICIENT_ATTENTION),
        },
        compiled={"torch.compile(math)": math_attention},
        work=flops,
        configs=[{"B": 64, "H": 12, "T": T, "D": 64} for T in (1024, 4096, 512, 2048)],  # the targets first
        smoke_configs=[{"B": 1, "H": 2, "T": 17, "D": 32}, {"B": 3, "H": 1, "T": 70, "D": 64}],
        baseline=SDPA,
        compile_baseline=False,
        cuda_only=SDPA[1:],
    ),
]
