r"""Text from GPT-2 weights (Hugging Face hub or a local save_pretrained directory) or a checkpoint.

    python sample.py --init_from gpt2 --prompt "Hello, I'm a language model," --num_samples 5 \
        --max_new_tokens 30 --top_k 50 --seed 42
    python sample.py --checkpoint out/ckpt_000500.pt --prompt "ROMEO:"
    python sample.py --init_from path/to/hf_dir --device cpu

With GPT-2 124M and --seed 42 expect five different, fluent continuations; a model trained for a few
minutes on tinyshakespeare gives Shakespeare-shaped gibberish. The samples print as plain text, a line
of dashes between them. --top_k 0 samples from every token (no top-k); a prompt longer than the model's
block_size is cropped to its last block_size tokens (the sample shows all of it), with a warning.
"""
import argparse
import sys

from gpt2 import GPT
from gpt2.ops import KernelsError, resolve
from gpt2.runtime import pick_device
from gpt2.sampling import check_sampling_args, format_samples, sample_text
from gpt2.tokenizer import check_vocab


def load(args, device) -> GPT:
    if args.checkpoint:
        from gpt2.checkpoint import load_model

        model = load_model(args.checkpoint, device, kernels=args.kernels)
    else:
        model = GPT.from_pretrained(args.init_from, kernels=resolve(args.kernels, device)).to(device)
    check_vocab(model.config.vocab_size, args.checkpoint or args.init_from)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--init_from", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF dir")
    source.add_argument("--checkpoint", default=None,
                        help="a checkpoint written by train.py, or a run's folder: its newest readable one")
    parser.add_argument("--prompt", default="Hello, I'm a language model,")
    parser.add_argument("--num_samples", type=int, default=5)
    parser.add_argument("--max_new_tokens", type=int, default=30, help="tokens to add to the prompt (at least 1)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens; 0: among all")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: always the likeliest token")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--kernels", default="torch",
                        help="torch | triton | auto (triton on CUDA) | a comma list of ops (see gpt2/ops.py)")
    args = parser.parse_args(argv)
    try:
        check_sampling_args(args.num_samples, args.max_new_tokens, args.top_k, args.temperature,
                            args.seed)  # before loading
        device = pick_device(args.device)
        model = load(args, device)
        if model.ops.interpreted:
            print(f"note: {model.ops.describe()}; --kernels torch is much faster", file=sys.stderr)
        texts = sample_text(model, args.prompt, args.num_samples, args.max_new_tokens, args.top_k,
                            args.temperature, args.seed, device, args.dtype)
    except (KernelsError, ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no samples", file=sys.stderr)
        return 130
    print(format_samples(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
