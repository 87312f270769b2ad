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

from gpt2.config import add_flags
from gpt2.ops import KernelsError
from gpt2.runtime import init_distributed, shutdown_distributed
from gpt2.trainer import Interrupted, TrainConfig, TrainError, make_config, train


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)  # one flag per TrainConfig field, its help from the field
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
    except Interrupted as stop:  # Ctrl-C: a checkpoint was saved at the end of the step
        if str(stop):
            print(stop, file=sys.stderr)
        return stop.exit_code
    except (TrainError, KernelsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted: resume from the last checkpoint with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
