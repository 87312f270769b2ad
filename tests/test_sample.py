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


def test_top_k_0_samples_from_every_token_and_long_prompts_are_cropped(tmp_path, capsys):
    GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).save_pretrained(str(tmp_path))
    base = ["--init_from", str(tmp_path), "--num_samples", "2", "--max_new_tokens", "4", "--device", "cpu"]
    assert sample.main([*base, "--top_k", "0", "--prompt", "Hello"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    prompt = " ".join(["word"] * 40)   # 40 tokens for a block_size of 16
    assert sample.main([*base, "--prompt", prompt]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the prompt has 40 tokens, more than the model's block_size: it is cropped to "
                        "its last 16"]
    assert captured.out.startswith(" word word") and captured.out.count("word") == 2 * 16


def test_bad_sampling_flags_are_errors(tmp_path, capsys):
    for flags, message in [(["--max_new_tokens", "-1"], "--max_new_tokens must be positive"),
                           (["--top_k", "-2"], "--top_k must be 0"), (["--num_samples", "0"], "--num_samples")]:
        assert sample.main(["--init_from", str(tmp_path), "--device", "cpu", *flags]) == 2
        assert message in capsys.readouterr().err
