"""The fused lm_head + cross-entropy vs F.cross_entropy(h @ W.T), eager and compiled, at GPT-2 training shapes.

    python benchmarks/run.py --only cross_entropy

N = B*T rows (16K and 64K: B = 16 and 64 sequences of 1024), V = 50304, C = 768 (124M) and 1600 (1.5B),
h and W in bf16, mean over all rows. Unit TFLOP/s, from the matmuls alone (the softmax's exp and
reductions are not counted): forward the logits, 2NVC; backward dh and dW, 4NVC; full 6NVC.
The fused op computes its gradients in the forward when its inputs require grad (the backward only
scales them by the loss's gradient), so only the `full` rows compare like with like; the `forward` and
`backward` rows show where each provider spends its time. (Without gradients, as for a validation loss,
the fused forward is the logits' matmul and one pass of the kernel.) The peak memory column is the
point of the op: PyTorch peaks at the bf16 logits, their fp32 copy and the fp32 log-softmax, 10*N*V
bytes (8.2 GB at N = 16K); the fused op holds one chunk of logits (at most 256 MiB) and the fp32 dW.
"""
import torch

from gpt2.ops import torch_cross_entropy
from harness import OpBench
from kernels.cross_entropy import linear_cross_entropy

DTYPE = torch.bfloat16
CONFIGS = [{"rows": n * 1024, "V": 50304, "C": c} for n in (16, 64) for c in (768, 1600)]
SMOKE_CONFIGS = [{"rows": 37, "V": 500, "C": 32}, {"rows": 5, "V": 4097, "C": 16}]


def make_inputs(config, device, dtype):
    rows, V, C = config["rows"], config["V"], config["C"]
    h = torch.randn(rows, C, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, C, device=device) * 2 / C**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (rows,), device=device)
    return h, weight, targets


def one_matmul(config) -> float:
    """FLOPs of one (N, C) x (C, V) product."""
    return 2 * config["rows"] * config["V"] * config["C"]


MATMULS = {"forward": 1, "backward": 2, "full": 3}  # the logits; dh and dW

BENCHMARKS = [
    OpBench(
        name="cross_entropy",
        unit="TFLOP/s",
        dtype=DTYPE,
        make_inputs=make_inputs,
        providers={"triton": linear_cross_entropy, "torch": torch_cross_entropy},
        work=lambda config, mode: MATMULS[mode] * one_matmul(config),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
    ),
]
