"""Text from a model: used by sample.py and by the trainer's periodic samples."""
import torch

from gpt2.runtime import autocast
from gpt2.tokenizer import decode, encode


def sample_text(model, prompt: str, num_samples: int = 4, max_new_tokens: int = 32, top_k: int = 50,
                temperature: float = 1.0, seed: int = 42, device=None, dtype: str = "float32") -> list[str]:
    """num_samples continuations of prompt, the same for a seed on a given device.

    The model's own RNG stream is untouched (a private torch.Generator), so sampling during training
    does not change the run.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokens = encode(prompt) or [model.config.real_vocab_size - 1]
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with autocast(device, dtype):
        out = model.generate(idx, max_new_tokens, top_k=top_k, temperature=temperature, generator=generator)
    model.train(was_training)
    return [decode(row) for row in out.tolist()]
