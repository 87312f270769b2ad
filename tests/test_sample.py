"""sample.py end to end on a local Hugging Face directory."""
import sample
from gpt2 import GPT, GPTConfig
from gpt2.sampling import SEPARATOR


def test_sample_prints_continuations_of_the_prompt(tmp_path, capsys):
    GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).save_pretrained(str(tmp_path))
    args = ["--init_from", str(tmp_path), "--prompt", "Hello, I'm a language model,", "--num_samples", "3",
            "--max_new_tokens", "8", "--device", "cpu", "--seed", "42"]
    assert sample.main(args) == 0
    first = capsys.readouterr().out
    samples = first.rstrip("\n").split("\n" + SEPARATOR + "\n")  # plain text, a line of dashes between
    assert len(samples) == 3 and all(text.startswith("Hello, I'm a language model,") for text in samples)
    assert sample.main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_sample_reports_bad_input_without_traceback(tmp_path, capsys):
    assert sample.main(["--init_from", "gpt-9", "--device", "cpu"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert sample.main(["--init_from", str(tmp_path), "--kernels", "fastest", "--device", "cpu"]) == 2
