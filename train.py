"""Train GPT-2: one device with `python train.py`, or DDP with torchrun.

    python train.py                                  # shakespeare preset: a small GPT on a CPU, no network needed
    torchrun --standalone --nproc_per_node=8 train.py --preset gpt2-124m --data data/fineweb_edu
    python train.py --out_dir out --resume                           # continue the run in out, with its flags
    python train.py --overwrite                                      # start over in an --out_dir that holds a run
    python train.py --kernels=attention,gelu                         # some ops on Triton, the rest on PyTorch

Every flag is a field of TrainConfig (gpt2/config.py) and overrides its preset's value. Writes
<out_dir>/log.jsonl (the run's description, then a JSON object per step and evaluation), <out_dir>/loss.png,
<out_dir>/ckpt_<step>.pt and, with --tensorboard, <out_dir>/tensorboard/. An --out_dir that holds a run is
refused unless --resume or --overwrite says what to do with it. Ctrl-C saves a checkpoint at the end of the
step and exits with 130 (SIGTERM: 143); --resume continues from it, with the flags stored in the checkpoint
(a flag given with --resume changes that setting from there on, and is said; the model's shape, --preset,
--seed and --sampling cannot change; the weights come from the checkpoint, so --init_from is not needed).

The shakespeare preset trains a 4-layer GPT (7.2M parameters, most of them the embedding) for 200 steps of
512 tokens taken at random positions of the tinyshakespeare shipped with the package, and evaluates the
whole val split (33,803 tokens) every 50 steps. Measured with `python train.py` (torch 2.13 CPU, float32,
a 2-core CPU): val loss 10.83 at step 0, 6.57 at 50, 6.27 at 100, 6.09 at 150 and 5.99 (5.9861) at step
200, then samples in Shakespeare's shape (speaker names, short lines). The run took 18 minutes on that CPU
while other jobs loaded it (load average 4 to 5); an idle one is faster.
"""
import argparse
import sys

from gpt2.config import add_flags
from gpt2.ops import KernelsError
from gpt2.runtime import init_distributed, shutdown_distributed
from gpt2.trainer import Interrupted, TrainConfig, TrainError, make_config, resume_config, train


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)  # one flag per TrainConfig field, its help from the field
    args = vars(parser.parse_args(argv))
    given = {name for name, value in args.items() if value is not None}
    return resume_config(make_config(args.pop("preset"), **args), given)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        ddp, device = init_distributed(cfg.device)
        try:
            train(cfg, ddp, device)
        except Interrupted as stop:  # Ctrl-C: a checkpoint was saved at the end of the step
            if str(stop):  # before the process group goes: under torchrun the other ranks may be exiting
                print(stop, file=sys.stderr, flush=True)
            return stop.exit_code
        finally:
            shutdown_distributed()
    except (TrainError, KernelsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # a second Ctrl-C or SIGTERM (StoppedAtOnce), or one before training started
        print("interrupted: resume from the last checkpoint with --resume", file=sys.stderr)
        return getattr(stop, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
