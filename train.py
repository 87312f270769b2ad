"""Train GPT-2: one device with `python train.py`, or DDP with torchrun.

    python train.py                                  # shakespeare preset: a small GPT, a few minutes on a CPU
    torchrun --standalone --nproc_per_node=8 train.py --preset gpt2-124m --data data/fineweb_edu
    python train.py --preset gpt2-124m --data DIR --resume          # continue from the newest checkpoint
    python train.py --kernels=attention,gelu                         # some ops on Triton, the rest on PyTorch

Every flag overrides its preset's value (gpt2/trainer.py: PRESETS and TrainConfig). Writes
<out_dir>/log.jsonl (a JSON object per step and evaluation), <out_dir>/loss.png and
<out_dir>/ckpt_<step>.pt. With the shakespeare preset (200 steps, about 3 minutes on a 2-core CPU)
expect the validation loss to fall from 10.8 to about 6.2, and samples in Shakespeare's shape
(speaker names, short lines) at the end.
"""
import argparse
import sys

from gpt2.ops import KernelsError
from gpt2.runtime import init_distributed, shutdown_distributed
from gpt2.trainer import PRESETS, TrainConfig, TrainError, make_config, train


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare", choices=list(PRESETS))
    parser.add_argument("--data", help="folder of token shards (default for shakespeare: prepared in data/)")
    parser.add_argument("--out_dir", help="logs, plot and checkpoints (default out)")
    parser.add_argument("--kernels", help="auto (triton on CUDA, torch elsewhere) | torch | triton | op,op,...")
    parser.add_argument("--device", help="auto | cuda | cpu | mps")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="autocast dtype (default bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for CUDA)")
    parser.add_argument("--init_from", help="fine-tune from HF weights: gpt2 | gpt2-medium | ... | a local dir")
    for name, kind in [("n_layer", int), ("n_head", int), ("n_embd", int), ("block_size", int),
                       ("batch_size", int), ("total_batch_size", int), ("max_steps", int),
                       ("warmup_steps", int), ("learning_rate", float), ("min_lr_ratio", float),
                       ("weight_decay", float), ("grad_clip", float), ("seed", int), ("eval_interval", int),
                       ("eval_steps", int), ("hellaswag_interval", int), ("hellaswag_limit", int),
                       ("hellaswag_data", str), ("sample_interval", int), ("checkpoint_interval", int)]:
        parser.add_argument(f"--{name}", type=kind, help=f"default: the preset's {name}; 0 turns an interval off")
    parser.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint")
    parser.add_argument("--delete_consumed_shards", action="store_true", default=None,
                        help="delete each train shard once every rank is done with it (with a streaming prepare_data.py)")
    args = vars(parser.parse_args(argv))
    return make_config(args.pop("preset"), **args)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        ddp, device = init_distributed(cfg.device)
        try:
            train(cfg, ddp, device)
        finally:
            shutdown_distributed()
    except (TrainError, KernelsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
