"""Text from a model: used by sample.py and by the trainer's periodic samples."""
import math
import sys

import torch

from gpt2.runtime import autocast
from gpt2.tokenizer import decode, encode

SEPARATOR = "-" * 40


def sample_text(model, prompt: str, num_samples: int = 4, max_new_tokens: int = 32, top_k: int | None = 50,
                temperature: float = 1.0, seed: int = 42, device=None, dtype: str = "float32") -> list[str]:
    """num_samples continuations of prompt, the same for a seed on a given device.

    top_k: sample among the k likeliest tokens; 0 or None: among all. A prompt longer than the model's
    block_size is cropped to its last block_size tokens (all the model can see), with a one-line
    warning on stderr; each sample is the whole prompt and its continuation. An empty prompt starts
    from <|endoftext|>, as a new document, which the samples do not show.
    The model's own RNG stream is untouched (a private torch.Generator), so sampling during training
    does not change the run.
    """
    check_sampling_args(num_samples, max_new_tokens, top_k, temperature, seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokens = encode(prompt) or [model.config.real_vocab_size - 1]
    block_size = model.config.block_size
    if len(tokens) > block_size:
        print(f"warning: the prompt has {len(tokens)} tokens, more than the model's block_size: the model sees "
              f"only its last {block_size}", file=sys.stderr)
        tokens = tokens[-block_size:]
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with autocast(device, dtype):
        out = model.generate(idx, max_new_tokens, top_k=top_k, temperature=temperature,
                             generator=generator)
    model.train(was_training)
    return [prompt + decode(row[idx.shape[1]:]) for row in out.tolist()]


def check_sampling_args(num_samples: int, max_new_tokens: int, top_k: int | None, temperature: float,
                        seed: int = 0) -> None:
    """ValueError, naming the flag, for what no sampling can do."""
    if num_samples < 1:
        raise ValueError(f"--num_samples must be positive, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be positive, got {max_new_tokens}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top_k must be 0 (no top-k: sample from every token) or more, got {top_k}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"--seed must lie in [-2**63, 2**64), got {seed}")


def format_samples(texts: list[str]) -> str:
    """The samples as plain text, a line of dashes between them."""
    return f"\n{SEPARATOR}\n".join(texts)
