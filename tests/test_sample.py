"""sample.py end to end on a local Hugging Face directory."""
import os
import subprocess
import sys

import torch

import sample
from gpt2 import GPT, GPTConfig
from gpt2.sampling import SEPARATOR

from conftest import REPO


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
    err = capsys.readouterr().err
    assert "fastest" in err and "Traceback" not in err, err


def test_top_k_0_samples_from_every_token_and_long_prompts_are_cropped(tmp_path, capsys):
    GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).save_pretrained(str(tmp_path))
    base = ["--init_from", str(tmp_path), "--num_samples", "2", "--max_new_tokens", "4", "--device", "cpu"]
    assert sample.main([*base, "--top_k", "0", "--prompt", "Hello"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    prompt = " ".join(["word"] * 40)   # 40 tokens for a block_size of 16
    assert sample.main([*base, "--prompt", prompt]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the prompt has 40 tokens, more than the model's block_size: the model sees "
                        "only its last 16"]
    assert all(text.startswith(prompt) for text in captured.out.rstrip("\n").split("\n" + SEPARATOR + "\n"))


def test_an_empty_prompt_starts_a_document_that_the_samples_do_not_show(tmp_path, capsys, monkeypatch):
    GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).save_pretrained(str(tmp_path))
    first_inputs, forward = [], GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **k: (first_inputs.append(idx.tolist()),
                                                                     forward(self, idx, *a, **k))[1])
    assert sample.main(["--init_from", str(tmp_path), "--num_samples", "2", "--max_new_tokens", "4",
                        "--device", "cpu", "--prompt", ""]) == 0
    assert first_inputs[0] == [[50256], [50256]]  # <|endoftext|>: the start of a document
    out = capsys.readouterr().out
    assert "<|endoftext|>" not in out.split("\n")[0] and len(out.split("\n" + SEPARATOR + "\n")) == 2


def test_bad_sampling_flags_are_errors(tmp_path, capsys):
    for flags, message in [(["--max_new_tokens", "-1"], "--max_new_tokens must be positive"),
                           (["--top_k", "-2"], "--top_k must be 0"), (["--num_samples", "0"], "--num_samples"),
                           (["--temperature", "nan"], "--temperature must be"),
                           (["--temperature", "inf"], "--temperature must be"),
                           (["--seed", str(2**64)], "--seed must lie in")]:
        assert sample.main(["--init_from", str(tmp_path), "--device", "cpu", *flags]) == 2
        assert message in capsys.readouterr().err


def test_triton_kernels_without_a_gpu_run_in_the_interpreter(tmp_path):
    """A fresh process, as a user starts it: the interpreter must be on before transformers imports triton."""
    GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).save_pretrained(str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "sample.py", "--init_from", str(tmp_path), "--device", "cpu", "--kernels", "triton",
           "--prompt", "Hello", "--num_samples", "1", "--max_new_tokens", "2"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("Hello")
    assert "note: kernels=triton (in the Triton interpreter: slow, for checking)" in result.stderr


def test_padded_hf_vocabulary_is_never_sampled(tmp_path, capsys):
    """A directory saved with vocab_size 50304 whose padding ids are the likeliest of all."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with torch.no_grad():  # every final state is ln_f's bias b, and each padding row (tied lm_head) is 100 b
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.normal_()
        hf.transformer.wte.weight[50257:] = 100 * hf.transformer.ln_f.bias
    hf.save_pretrained(tmp_path)
    flags = ["--init_from", str(tmp_path), "--device", "cpu", "--num_samples", "2", "--max_new_tokens", "4"]
    assert sample.main([*flags, "--top_k", "0", "--prompt", "Hello"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_a_model_with_fewer_ids_than_the_bpe_is_refused(tmp_path, capsys):
    GPT(GPTConfig(block_size=16, vocab_size=1000, n_layer=1, n_head=2, n_embd=32)).save_pretrained(str(tmp_path))
    assert sample.main(["--init_from", str(tmp_path), "--device", "cpu"]) == 2
    assert "has 1000 token ids, fewer than the 50257 of the GPT-2 BPE" in capsys.readouterr().err


def save_run(folder, steps=(1,), **config):
    """A run folder with a checkpoint of a small random model at each step."""
    from gpt2.checkpoint import save_checkpoint

    model = GPT(GPTConfig(**{"block_size": 16, "vocab_size": 50304, "n_layer": 1, "n_head": 2, "n_embd": 32,
                             **config}))
    for step in steps:
        save_checkpoint(folder / f"ckpt_{step:06d}.pt", model=model, optimizer=torch.optim.AdamW(model.parameters()),
                        step=step, loader_states=[], train_config={})


def test_a_run_folder_as_checkpoint_takes_its_newest(tmp_path, capsys):
    save_run(tmp_path, steps=(1, 2))
    flags = ["--device", "cpu", "--num_samples", "1", "--max_new_tokens", "3", "--prompt", "Hi"]
    assert sample.main(["--checkpoint", str(tmp_path), *flags]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hi") and "ckpt_000002.pt: the newest readable checkpoint" in captured.err
    assert sample.main(["--checkpoint", str(tmp_path / "empty_run"), *flags]) == 2
    (tmp_path / "empty_run").mkdir()
    assert sample.main(["--checkpoint", str(tmp_path / "empty_run"), *flags]) == 2
    assert "no checkpoint (ckpt_*.pt) in the folder" in capsys.readouterr().err


def test_ctrl_c_while_sampling_is_one_line(tmp_path):
    import signal
    import time

    save_run(tmp_path, block_size=64, n_layer=2, n_embd=64)
    cmd = [sys.executable, "sample.py", "--checkpoint", str(tmp_path), "--device", "cpu", "--num_samples", "1",
           "--max_new_tokens", "100000", "--prompt", "Hi"]
    # the default SIGINT handling even where this test runs as a background job (which ignores SIGINT)
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = process.stderr.readline()  # said while loading: the imports are done, main() handles the signal
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "newest readable checkpoint" in first, first + err
    assert process.returncode == 130 and err.strip() == "interrupted: no samples", err[-2000:]


def test_generate_samples_from_the_tempered_distribution():
    """4000 rows, one new token each, from a model of 6 token ids: the frequencies follow softmax(logits / T),
    each row drawn on its own (rows that shared a draw, or a temperature ignored, would fail)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=6, real_vocab_size=6, n_layer=1, n_head=2, n_embd=16))
    model.transformer.wte.weight.data *= 3  # logits a unit or two apart: T = 0.5 and 2 move every frequency
    idx = torch.zeros(4000, 1, dtype=torch.long)
    with torch.no_grad():
        logits = model(idx[:1])[0][0, -1].double()
    for temperature in (0.5, 2.0):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            drawn = model.generate(idx, 1, top_k=None, temperature=temperature, generator=generator)[:, -1]
        frequencies = torch.bincount(drawn, minlength=6).double() / len(drawn)
        expected = torch.softmax(logits / temperature, dim=-1)
        assert (frequencies - expected).abs().max() < 0.03, (temperature, frequencies, expected)


def test_a_long_prompt_leaves_its_last_block_size_tokens_to_the_model(tmp_path, monkeypatch):
    from gpt2.sampling import sample_text
    from gpt2.tokenizer import encode

    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    seen = []
    monkeypatch.setattr(model, "generate", lambda idx, *args, **kwargs: seen.append(idx) or idx)
    prompt = " ".join(f"word{i}" for i in range(30))
    sample_text(model, prompt, num_samples=1, max_new_tokens=1)
    assert seen[0][0].tolist() == encode(prompt)[-16:]
