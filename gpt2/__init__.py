"""GPT-2 and everything around it, independent of which kernels run (see gpt2/ops.py).

    from gpt2 import GPT, GPTConfig
"""


def __getattr__(name):
    # lazy, so that `import gpt2.tokenizer` in data workers does not build the model module
    if name in ("GPT", "GPTConfig"):
        from gpt2 import model

        return getattr(model, name)
    raise AttributeError(f"module 'gpt2' has no attribute {name!r}")


__all__ = ["GPT", "GPTConfig"]
