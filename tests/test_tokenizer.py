"""The GPT-2 BPE: known ids, and the offline failure that names TIKTOKEN_CACHE_DIR."""
import pytest

from gpt2 import tokenizer


def test_known_ids_and_round_trip():
    assert tokenizer.encode("Hello world") == [15496, 995]
    text = "ROMEO: <|endoftext|> is plain text here, émigré 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.EOT_TOKEN not in tokenizer.encode(text)


def test_offline_failure_names_the_cache_variable(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
            tokenizer.encode("hi")
    finally:
        tokenizer.get_encoding.cache_clear()
