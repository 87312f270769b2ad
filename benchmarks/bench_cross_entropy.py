"""The fused lm_head + cross-entropy vs F.cross_entropy(h @ W.T), eager and compiled, at GPT-2 training shapes.

    python benchmarks/run.py --only cross_entropy,cross_entropy_eval

N = B*T rows (16K and 64K: B = 16 and 64 sequences of 1024), V = 50304, C = 768 (124M) and 1600 (1.5B),
h and W in bf16, mean over all rows. Unit TFLOP/s, from the matmuls alone (the softmax's exp and
reductions are not counted):
    cross_entropy       forward + backward, inputs require grad: logits 2NVC, dh 2NVC, dW 2NVC = 6NVC
    cross_entropy_eval  forward, no input requires grad (validation loss): logits 2NVC
The fused op computes its gradients in the forward when its inputs require grad (the backward only
scales them by the loss's gradient), so in `cross_entropy` only the `full` rows compare like with like;
the `forward` and `backward` rows show where each provider spends its time. The peak memory column is
the point of the op: PyTorch holds the bf16 logits, their fp32 copy and the fp32 softmax gradient,
10*N*V bytes (8.2 GB at N = 16K); the fused op one chunk of logits (at most 256 MiB) and the fp32 dW.
"""
import torch

from gpt2.ops import torch_cross_entropy
from harness import OpBench
from kernels.cross_entropy import linear_cross_entropy

DTYPE = torch.bfloat16
CONFIGS = [{"rows": n * 1024, "V": 50304, "C": c} for n in (16, 64) for c in (768, 1600)]
SMOKE_CONFIGS = [{"rows": 37, "V": 500, "C": 32}, {"rows": 5, "V": 4097, "C": 16}]


def make_inputs(requires_grad):
    def make(config, device, dtype):
        rows, V, C = config["rows"], config["V"], config["C"]
        h = torch.randn(rows, C, device=device).to(dtype).requires_grad_(requires_grad)
        weight = (torch.randn(V, C, device=device) * 2 / C**0.5).to(dtype).requires_grad_(requires_grad)
        targets = torch.randint(0, V, (rows,), device=device)
        return h, weight, targets
    return make


def one_matmul(config) -> float:
    """FLOPs of one (N, C) x (C, V) product."""
    return 2 * config["rows"] * config["V"] * config["C"]


MATMULS = {"forward": 1, "backward": 2, "full": 3}  # the logits; dh and dW
PROVIDERS = {"triton": linear_cross_entropy, "torch": torch_cross_entropy}

BENCHMARKS = [
    OpBench(
        name="cross_entropy",
        unit="TFLOP/s",
        dtype=DTYPE,
        make_inputs=make_inputs(True),
        providers=PROVIDERS,
        work=lambda config, mode: MATMULS[mode] * one_matmul(config),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
    ),
    OpBench(
        name="cross_entropy_eval",
        unit="TFLOP/s",
        dtype=DTYPE,
        make_inputs=make_inputs(False),
        providers=PROVIDERS,
        work=lambda config, mode: one_matmul(config),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
        modes=("forward",),
    ),
]
