"""Optimizer step over the parameter set of GPT-2 124M and 1.5B: FusedAdamW vs torch.optim.AdamW.

Two benchmarks: `adamw` (step only) and `adamw_clip` (clip the global grad norm to 1.0, then step:
torch.nn.utils.clip_grad_norm_ + step for torch, clip_grad_norm_ folded into the step for ours).
Providers: triton (FusedAdamW), torch (fused=True, the baseline), torch-foreach, torch-forloop.

Work: 28 bytes per fp32 parameter, the traffic of one fused update (read p, g, m, v; write p, m, v).
The clip benchmark counts the same 28 bytes, so its GB/s compare directly with the step-only ones;
the norm's extra read of the gradients (4 bytes per parameter, more for torch's clip, which also
rewrites them) shows as a lower rate.

The parameter shapes are built from the config without building the model: wte (vocab x C),
wpe (1024 x C), per layer ln_1, ln_2 (weight, bias: C each), c_attn (3C x C, 3C), attn.c_proj (C x C, C),
c_fc (4C x C, 4C), mlp.c_proj (C x 4C, C); ln_f. The lm_head is tied to wte.
"""
import math

import torch

from harness import StepBench

GPT2_SIZES = {"124M": dict(n_layer=12, n_embd=768), "1.5B": dict(n_layer=48, n_embd=1600)}


def gpt2_shapes(n_layer: int, n_embd: int, vocab_size: int = 50304, block_size: int = 1024) -> list:
    C = n_embd
    layer = [(C,), (C,),                       # ln_1
             (3 * C, C), (3 * C,),             # attn.c_attn
             (C, C), (C,),                     # attn.c_proj
             (C,), (C,),                       # ln_2
             (4 * C, C), (4 * C,),             # mlp.c_fc
             (C, 4 * C), (C,)]                 # mlp.c_proj
    return [(vocab_size, C), (block_size, C), *layer * n_layer, (C,), (C,)]


def shapes(config: dict) -> list:
    if config["model"] == "tiny":  # smoke: odd sizes, one of several blocks
        return [(1,), (37,), (13, 7), (64, 65), (3000, 5)]
    return gpt2_shapes(**GPT2_SIZES[config["model"]])


def n_params(config: dict) -> int:
    return sum(math.prod(s) for s in shapes(config))


def make_params(config, device, dtype) -> list:
    """Parameters with gradients, decayed (matrices) and undecayed groups as GPT.configure_optimizers makes."""
    params = []
    for shape in shapes(config):
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
        p.grad = torch.randn_like(p)
        params.append(p)
    return params


def param_groups(params) -> list:
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)


def provider(make_optimizer, clip: bool):
    """(config, device, dtype) -> step(): one optimizer step (clip first if asked); returns the params."""
    def factory(config, device, dtype):
        params = make_params(config, device, dtype)
        opt = make_optimizer(param_groups(params))

        def step():
            # torch's clip rewrites p.grad, so every timed step after the first clips gradients of
            # norm ~1: the coefficient changes, the work (read, scale, write every grad) does not
            if clip and hasattr(opt, "clip_grad_norm_"):
                opt.clip_grad_norm_(1.0)
            elif clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return params

        return step

    return factory


def _fused_triton(groups):
    from kernels.adamw import FusedAdamW

    return FusedAdamW(groups, **HYPER)


OPTIMIZERS = {
    "triton": _fused_triton,
    "torch": lambda groups: torch.optim.AdamW(groups, **HYPER, fused=True),
    "torch-foreach": lambda groups: torch.optim.AdamW(groups, **HYPER, foreach=True),
    "torch-forloop": lambda groups: torch.optim.AdamW(groups, **HYPER, foreach=False),
}

CONFIGS = [{"model": "124M"}, {"model": "1.5B"}]
SMOKE_CONFIGS = [{"model": "tiny"}]


def bench(name: str, clip: bool) -> StepBench:
    return StepBench(
        name=name,
        unit="GB/s",
        providers={name: provider(make, clip) for name, make in OPTIMIZERS.items()},
        work=lambda config: 28 * n_params(config),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
        dtype=torch.float32,
        smoke_tol=1e-6,
    )


BENCHMARKS = [bench("adamw", clip=False), bench("adamw_clip", clip=True)]
