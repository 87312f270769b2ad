"""End-to-end: the real training step of GPT-2 124M on one GPU, for every kernel set.

    python benchmarks/run.py --only train

One step = forward and backward of one micro-batch under bf16 autocast, global grad-norm clipping at
1.0 and the optimizer step (gpt2/trainer.py's own accumulate_gradients and clip_and_step), on random
tokens. Providers:

    torch, torch+compile      PyTorch's ops: SDPA (its best backend), F.layer_norm, F.gelu, fused AdamW;
                              torch+compile is the baseline every speedup is against
    triton, triton+compile    every op on our kernels
    <op>+compile              one kernel on Triton, the rest on PyTorch, compiled: what each kernel buys
    triton+compile+atomic     triton+compile with --no-deterministic: attention's backward adds dq up with
                              atomics (5 matmuls per block pair instead of 7)

Work is the training FLOPs, (6N + 6·L·C·T) per token, so TFLOP/s over the measured bf16 matmul ceiling
and over the datasheet peak is the MFU; tokens/s and peak memory come with it. Each provider is
stepped three times before timing (compilation, autotuning, optimizer state), then timed for about
five seconds (median of the steps).
"""
import torch

from gpt2.model import GPT, GPTConfig
from gpt2.ops import OP_NAMES, resolve
from gpt2.trainer import accumulate_gradients, clip_and_step
from harness import StepBench

MODELS = {
    "124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "tiny": dict(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=512, real_vocab_size=512),
}


def train_step(kernels: str, compile_model: bool, deterministic: bool = True):
    def factory(config, device, dtype):
        # Dynamo's caches hold every model compiled before (its parameters too) and count each provider and
        # batch size towards one recompile limit: each provider starts from none. dynamic=False: the second
        # batch size in a process would otherwise be compiled with a symbolic batch, unlike a training run's.
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(GPTConfig(**MODELS[config["model"]]), resolve(kernels, device, deterministic)).to(device)
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
        runnable = torch.compile(model, dynamic=False) if compile_model else model
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        amp = "bfloat16" if device.type == "cuda" else "float32"
        tokens = torch.randint(0, model.config.real_vocab_size, (config["B"], config["T"] + 1),
                               generator=torch.Generator().manual_seed(0)).to(device)
        batches = [(tokens[:, :-1], tokens[:, 1:])]

        def step():
            loss = accumulate_gradients(runnable, batches, device, amp, scaler)
            clip_and_step(optimizer, model, 1.0, scaler)
            return loss, model.transformer.h[0].attn.c_attn.weight

        if device.type == "cuda":
            for _ in range(3):
                step()
        return step

    return factory


def flops_per_step(config) -> float:
    model_config = GPTConfig(**MODELS[config["model"]])
    with torch.device("meta"):
        model = GPT(model_config)
    return model.flops_per_token(config["T"]) * config["B"] * config["T"]


PROVIDERS = {
    "torch": train_step("torch", False),
    "torch+compile": train_step("torch", True),
    "triton": train_step("triton", False),
    "triton+compile": train_step("triton", True),
    "triton+compile+atomic": train_step("triton", True, deterministic=False),
    **{f"{op}+compile": train_step(op, True) for op in OP_NAMES},
}

BENCHMARKS = [
    StepBench(
        name="train",
        unit="TFLOP/s",
        providers=PROVIDERS,
        work=flops_per_step,
        tokens=lambda config: config["B"] * config["T"],
        configs=[{"model": "124M", "B": b, "T": 1024} for b in (64, 32, 16)],
        smoke_configs=[{"model": "tiny", "B": 2, "T": 32}],
        baseline="torch+compile",
        smoke_baseline="torch",
        dtype=torch.bfloat16,
        warmup_ms=1000,
        rep_ms=5000,
        smoke_tol=1e-4,
    ),
]
