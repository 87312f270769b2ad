"""The GPT-2 BPE through tiktoken.

tiktoken downloads the BPE files on first use and caches them. Offline, point TIKTOKEN_CACHE_DIR at a
folder that holds the cached files (copied from a machine that downloaded them). Training
needs no BPE (it reads token shards, and the default data ships tokenized); preparing other text,
sampling and HellaSwag do. The files are not shipped: only the default run's text is.
"""
import functools
import os

ENCODING_NAME = "gpt2"  # tiktoken's name for it, recorded in every data folder's meta.json
EOT_TOKEN = 50256       # <|endoftext|>, which also separates documents in the token shards
VOCAB_SIZE = 50257      # real GPT-2 vocabulary; the model pads its embedding to 50304 for speed


@functools.lru_cache(maxsize=None)
def get_encoding():
    """The tiktoken "gpt2" encoding, with a clear message when it cannot be downloaded."""
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as err:  # tiktoken raises requests/urllib errors of several kinds when offline
        first = (str(err).splitlines() or [""])[0]  # a ConnectionError's text runs to 300 characters
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        raise RuntimeError(
            f"could not load the GPT-2 BPE ({type(err).__name__}: {first[:60]}{'...' if len(first) > 60 else ''}): "
            f"set TIKTOKEN_CACHE_DIR{f' (now {cache})' if cache else ''} to a folder holding tiktoken's cached "
            "GPT-2 files, or run once with network"
        ) from None


def available() -> bool:
    """Whether the BPE loads (from tiktoken's cache, or downloaded once). Training needs none."""
    try:
        get_encoding()
    except RuntimeError:
        return False
    return True


def check_vocab(vocab_size: int, model: str) -> None:
    """ValueError unless a model with vocab_size token ids can read every GPT-2 BPE token (sample.py and
    eval_hellaswag.py feed it text through this BPE; a smaller embedding fails on the first large id)."""
    if vocab_size < VOCAB_SIZE:
        raise ValueError(f"{model} has {vocab_size} token ids, fewer than the {VOCAB_SIZE} of the GPT-2 BPE "
                         f"that this script feeds it: use a model with vocab_size >= {VOCAB_SIZE}")


def encode(text: str) -> list[int]:
    """Tokens of plain text; special-token strings in it are encoded as ordinary text."""
    return get_encoding().encode_ordinary(text)


def decode(tokens) -> str:
    return get_encoding().decode([int(t) for t in tokens])
