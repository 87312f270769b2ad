"""HellaSwag accuracy of Hugging Face GPT-2 weights or of a train.py checkpoint (see gpt2/hellaswag.py).

    python eval_hellaswag.py --model gpt2                        # acc 0.2859, acc_norm 0.2955
    python eval_hellaswag.py --model gpt2 --style harness        # acc 0.2892, acc_norm 0.3114
    python eval_hellaswag.py --model ./my_hf_dir --data hellaswag_val.jsonl --limit 500 --device cpu
    torchrun --standalone --nproc_per_node=8 eval_hellaswag.py --checkpoint out --out hs.json

Prints {"acc", "acc_norm", "n", "cropped", "style", "model", "kernels", "dtype"} and writes it to --out.
cropped counts the examples with an ending longer than the model's block_size, scored on its first block_size
tokens only (0 for GPT-2; a line on stderr says so when it is not). Ctrl-C (or SIGTERM) stops with a line that
says how far the scoring got and its acc_norm so far, exit code 130 (SIGTERM: 143); --out is then not written.
"""
import argparse
import dataclasses
import sys

from gpt2.hellaswag import STYLES, EvalConfig, Interrupted, run
from gpt2.ops import KernelsError
from gpt2.runtime import DTYPES


def parse_args(argv=None) -> EvalConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a save_pretrained directory")
    source.add_argument("--checkpoint", help="a checkpoint written by train.py, or a run's folder: its newest "
                                              "readable one")
    parser.add_argument("--data", help="local hellaswag_val.jsonl (default: download once into a cache)")
    parser.add_argument("--style", default="completion", choices=STYLES)
    parser.add_argument("--limit", type=int, help="score the first N examples only")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (4 rows each)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu, mps (torchrun: cuda:<local_rank>)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="autocast dtype of the forward")
    parser.add_argument("--kernels", default="torch",
                        help="torch, triton, auto (triton on CUDA), or a comma list of ops (gpt2/ops.py)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (static padded shapes)")
    parser.add_argument("--out", help="write the result as JSON to this file (checked before the evaluation)")
    args = parser.parse_args(argv)
    try:
        return EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    except ValueError as err:  # a flag out of range: argparse's usage line and message, exit 2
        parser.error(str(err))


def main(argv=None) -> dict:
    """The summary dict (for tests and notebooks); the command line goes through cli()."""
    return run(parse_args(argv))


def cli(argv=None) -> int:
    config = parse_args(argv)
    try:
        run(config)
    except Interrupted as stop:  # Ctrl-C or SIGTERM: how far it got, in one line from rank 0, not a traceback
        if stop.rank == 0:
            print(f"{stop}{' (--out not written)' if config.out else ''}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # before run() took the signals over
        print(f"interrupted before the scoring began{' (--out not written)' if config.out else ''}", file=sys.stderr)
        return 130
    except (KernelsError, ValueError, FileNotFoundError, RuntimeError) as err:  # bad input: a message, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
