r"""Text -> GPT-2 token shards for train.py (the work is done by gpt2/shards.py).

    # tinyshakespeare, 90 % train / 10 % val, from the copy shipped in gpt2/assets (no network, no BPE):
    python prepare_data.py shakespeare --out data/shakespeare
    # -> shakespeare_val_000000.npy (33,803 tokens) and shakespeare_train_000001.npy (304,223 tokens)
    # ... or any other text, split the same way, from a file or downloaded (these need the GPT-2 BPE):
    python prepare_data.py shakespeare --out data/mine --input my_text.txt
    python prepare_data.py shakespeare --out data/mine --url https://example.com/text.txt

    # FineWeb-Edu sample-10BT streamed from the Hugging Face hub (pip install -e .[data]):
    # about 10B tokens in about 100 shards of 1e8 tokens (200 MB each); the first shard is val
    python prepare_data.py fineweb --out data/fineweb_edu --workers 16
    # ... or local .jsonl/.parquet/.csv/.txt files with a `text` field:
    python prepare_data.py fineweb --out data/mine --input a.jsonl b.parquet --shard_size 1000000

    # a small disk: at most 4 train shards (+ the val shard) on disk; the trainer deletes what it consumed
    # and its newest checkpoint is past (4 shards of 1e8 tokens: a checkpoint every 571 steps of 524,288 or less)
    python prepare_data.py fineweb --out data/fineweb_edu --max_shards_on_disk 4 &
    sleep 10   # the trainer must find the producer's meta.json, its first write
    torchrun --standalone --nproc_per_node=8 train.py --preset gpt2-124m --data data/fineweb_edu \
        --delete_consumed_shards --checkpoint_interval 500

Rerunning over an existing output continues where the last run stopped and writes the same files (a
killed or Ctrl-C'd run leaves only complete shards; Ctrl-C exits with code 130, SIGTERM with 143,
each with one line that says what was written); an output folder holding
shards of another tokenizer, shard size or source (file names, sizes and a fingerprint of their content)
is refused. The folder's files are described in gpt2/shards.py.
"""
import argparse
import os
import signal
import sys

from gpt2.shards import (
    FINEWEB_CONFIG, FINEWEB_DATASET, MIN_SHARD_SIZE, SHAKESPEARE_URL, Interrupted, prepare_fineweb,
    prepare_shakespeare,
)


def shard_size_arg(text: str) -> int:
    """A token count, also written 1e8 or 100_000_000; at least MIN_SHARD_SIZE."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens (e.g. 1e8)") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    if value < MIN_SHARD_SIZE:
        raise argparse.ArgumentTypeError(f"{text} tokens is too small: a shard holds at least {MIN_SHARD_SIZE:,} "
                                         "(smaller ones write a file every few documents)")
    return int(value)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive (use 1 or more)")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)

    shakespeare = sub.add_parser("shakespeare", help="tinyshakespeare (or one other text), 90 %% train / 10 %% val")
    shakespeare.add_argument("--out", required=True, help="output folder")
    text = shakespeare.add_mutually_exclusive_group()
    text.add_argument("--input", default=None, help="a local text file instead of the shipped tinyshakespeare")
    text.add_argument("--url", default=None, help=f"download the text from here instead (the shipped copy is "
                                                  f"{SHAKESPEARE_URL})")

    fineweb = sub.add_parser("fineweb", help="FineWeb-Edu from the hub, or local text files")
    fineweb.add_argument("--out", required=True, help="output folder")
    fineweb.add_argument("--input", nargs="+", default=None,
                         help="local files instead of the hub: .jsonl/.parquet/.csv with a `text` field, "
                              "or .txt (one document each)")
    fineweb.add_argument("--dataset", default=FINEWEB_DATASET, help="Hugging Face dataset to stream")
    fineweb.add_argument("--name", default=FINEWEB_CONFIG, help="its configuration (subset)")
    fineweb.add_argument("--shard_size", type=shard_size_arg, default=100_000_000,
                         help=f"tokens per shard, e.g. 1e8 (at least {MIN_SHARD_SIZE:,})")
    fineweb.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 2) // 2),
                         help="tokenizer processes")
    fineweb.add_argument("--max_shards_on_disk", type=int, default=None,
                         help="wait while this many train shards are on disk "
                              "(run train.py --delete_consumed_shards beside it)")
    fineweb.add_argument("--prefix", default="edufineweb",
                         help="shard file name prefix: letters, digits, '-', '_', '.', without '_train' or '_val'")
    fineweb.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    stopped_by = [signal.SIGINT]

    def terminate(signum, frame):  # SIGTERM (kill, a scheduler) stops as Ctrl-C does, not without a word
        stopped_by[0] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        if args.dataset == "shakespeare":
            done = prepare_shakespeare(args.out, args.input, args.url)
        else:
            done = prepare_fineweb(
                args.out, inputs=args.input, dataset=args.dataset, config=args.name, shard_size=args.shard_size,
                workers=args.workers, max_shards_on_disk=args.max_shards_on_disk, name=args.prefix,
                progress=not args.no_progress,
            )
    except (ValueError, OSError, RuntimeError, ImportError) as err:  # the messages say what to do
        sys.exit(f"prepare_data.py: error: {err}")
    except KeyboardInterrupt as err:  # Ctrl-C: one line, not a traceback; what is on disk is complete
        message = err if isinstance(err, Interrupted) else "interrupted; run the same command again to continue"
        print(f"prepare_data.py: {message}", file=sys.stderr)
        sys.exit(128 + stopped_by[0])  # as a shell reports a process the signal ended: 130, SIGTERM 143
    summary = ", ".join(f"{split}: {len(done['shards'][split])} shards, {done['tokens'][split]:,} tokens"
                        for split in ("train", "val"))
    print(f"{args.out}: {summary}", file=sys.stderr)
    if args.dataset != "shakespeare" and not done["shards"]["train"]:  # the first shard_size tokens are val
        sys.exit(f"prepare_data.py: error: {args.out} holds no train shard: {no_train_shard_fix(done, args)}")


def no_train_shard_fix(done, args) -> str:
    total = done["tokens"]["val"]
    told = f"all {total:,} tokens went to the val shard (--shard_size {args.shard_size:,})"
    if total <= MIN_SHARD_SIZE:
        return f"{told}; a val and a train shard need more than {MIN_SHARD_SIZE:,} tokens: pass more text"
    return (f"{told}; prepare the text again into a new --out with --shard_size "
            f"{max(MIN_SHARD_SIZE, total // 10):,}")


if __name__ == "__main__":
    main()
