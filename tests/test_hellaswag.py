"""HellaSwag scoring (gpt2/hellaswag.py, eval_hellaswag.py) on tiny models and real validation examples.

The reference renders and scores one example at a time, with the Hugging Face tokenizer and model in
float64, written from the two styles' definitions; our batched, padded, sharded path must agree.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import eval_hellaswag
from gpt2 import hellaswag
from gpt2.model import GPT, GPTConfig

from conftest import REPO

# ActivityNet rows, then WikiHow rows (brackets, "[title]", empty ctx_b) with mixed labels
PICKED = list(range(5)) + list(range(3243, 3248))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=256, vocab_size=50257)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data_file():
    from conftest import SHARED_DATA, need_shared_file

    return need_shared_file(SHARED_DATA / "hellaswag_val.jsonl")


@pytest.fixture(scope="module")
def picked(data_file):
    examples = hellaswag.load_examples(data_file, limit=max(PICKED) + 1)
    return [examples[i] for i in PICKED]


# -------------------------------------------------------------------------------------------------
# the reference: one example at a time, straight from the definitions

def reference_rows(example, style, tok):
    """(context ids, [ending ids] * 4, [acc_norm divisor] * 4) as each evaluation defines them."""
    if style == "completion":   # build-nanogpt
        ctx = tok.encode(example["ctx"])
        ends = [tok.encode(" " + e) for e in example["endings"]]
        return ctx, ends, [len(e) for e in ends]

    def clean(text):             # lm-evaluation-harness
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\[.*?\\]", "", text).replace("  ", " ")

    query = clean(example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize())
    choices = [clean(e) for e in example["endings"]]
    ctx = tok.encode(query)
    ends = [tok.encode(query + " " + c)[len(ctx):] for c in choices]
    return ctx, ends, [len(c) for c in choices]


def reference_scores(hf, tok, examples, style):
    """(n, 4) summed log-likelihoods, and the counts of acc and acc_norm, in float64."""
    lls, correct, correct_norm = [], 0, 0
    for example in examples:
        ctx, ends, norms = reference_rows(example, style, tok)
        ll = []
        for end in ends:
            hidden = hf.transformer(torch.tensor([ctx + end])).last_hidden_state[0]   # (T, C)
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(end) - 1)       # those predicting `end`
            logprobs = torch.log_softmax(hf.lm_head(hidden[positions]), dim=-1)      # (len(end), V)
            ll.append(logprobs[torch.arange(len(end)), torch.tensor(end)].sum().item())
        ll = torch.tensor(ll, dtype=torch.float64)
        correct += int(ll.argmax()) == example["label"]
        correct_norm += int((ll / torch.tensor(norms, dtype=torch.float64)).argmax()) == example["label"]
        lls.append(ll)
    return torch.stack(lls), correct, correct_norm


# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", hellaswag.STYLES)
def test_scores_match_per_example_reference(style, hf_dir, picked, shared_data):
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(shared_data / "gpt2")
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).double().eval()
    with torch.no_grad():
        want, correct, correct_norm = reference_scores(hf, tok, picked, style)

    # acc_norm's divisors, pinned: with a few examples a wrong one seldom changes the count
    assert [hellaswag.render(e, style).norms for e in picked] == [reference_rows(e, style, tok)[2] for e in picked]
    model = GPT.from_pretrained(str(hf_dir), kernels="torch")
    got = torch.cat([hellaswag.loglikelihoods(model, [hellaswag.render(e, style) for e in picked[i:i + 5]], "cpu")
                     for i in range(0, len(picked), 5)])
    err = (got - want).abs().max().item()
    assert err < 2e-3, f"{style}: summed log-likelihoods differ from the reference by up to {err:.2e}"

    # batches of 4 examples: two full ones and a short one padded with empty rows
    result = hellaswag.evaluate(model, picked, torch.device("cpu"), style=style, batch_size=4)
    assert (result["n"], result["correct"], result["correct_norm"]) == (len(picked), correct, correct_norm)
    assert result["acc"] == correct / len(picked) and result["acc_norm"] == correct_norm / len(picked)


# short made-up examples: the forced test trains on them, and every token costs a 50304-way softmax
FORCED = [
    ("Cooking", "A man cuts an onion.", "He", ["puts it in the pan.", "sings a song.", "rides a horse.", "falls asleep."], 0),
    ("Sports", "A girl throws a ball.", "The dog", ["reads a book.", "runs after it.", "paints a wall.", "drives away."], 1),
    ("Music", "Two men play guitars.", "A crowd", ["eats rice.", "swims fast.", "cheers loudly.", "sells cars."], 2),
    ("Home", "A woman opens the door.", "She", ["flies up.", "melts.", "writes code.", "walks inside the house."], 3),
    ("Garden", "A boy waters the plants.", "Then he", ["fixes a car.", "cuts the grass.", "bakes bread.", "swims."], 1),
]


def test_forced_endings_are_answered_right():
    """A tiny GPT that has memorised the right ending of each example (in both renderings) picks it."""
    torch.manual_seed(0)
    examples = [{"activity_label": a, "ctx_a": ca, "ctx_b": cb, "ctx": ca + " " + cb, "endings": ends, "label": label}
                for a, ca, cb, ends, label in FORCED]
    rows = []
    for style in hellaswag.STYLES:
        for e in examples:
            r = hellaswag.render(e, style)
            rows.append(r.context + r.endings[r.label])
    T = max(len(r) for r in rows)
    batch = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = torch.tensor(r)
    inputs, targets = batch[:, :-1].clamp(min=0), batch[:, 1:].contiguous()

    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, kernels="torch"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(25):  # all 5 are right from about step 15 on
        _, loss = model(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for style in hellaswag.STYLES:
        result = hellaswag.evaluate(model, examples, "cpu", style=style, batch_size=len(examples))
        assert result["correct"] == result["correct_norm"] == len(examples), \
            f"{style}: {result} after memorising the right endings (training loss {loss.item():.3f})"


def test_cli_one_rank_and_two_ranks_agree(hf_dir, data_file, tmp_path):
    flags = ["--model", str(hf_dir), "--data", str(data_file), "--limit", "9", "--batch_size", "2",
             "--device", "cpu", "--kernels", "torch", "--style", "harness"]
    one = eval_hellaswag.main(flags + ["--out", str(tmp_path / "one.json")])
    assert json.loads((tmp_path / "one.json").read_text()) == one
    assert set(one) == {"acc", "acc_norm", "n", "cropped", "style", "model", "kernels", "dtype"} and one["n"] == 9
    assert (one["kernels"], one["dtype"]) == ("torch", "float32")
    assert one["cropped"] == 0  # n_positions 256: every ending fits

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "eval_hellaswag.py"), *flags, "--out", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two == one, f"2 ranks {two} vs 1 rank {one}"


def test_harness_preprocess():
    text = " [header] How to x [title] Find  a [step] thing. "
    assert hellaswag.harness_preprocess(text) == " How to x. Find a thing."  # the harness keeps that space
    # the query ends in a space once "[step]" is gone: the harness moves it into the continuation
    example = {"activity_label": "Cooking", "ctx_a": "A man stands.", "ctx_b": "he CUTS onions [step]", "label": 1,
               "endings": ["cries.", " [title] Laughs.", "x", "y"]}
    r = hellaswag.render(example, "harness")
    assert hellaswag.encode("Cooking: A man stands. He cuts onions") == r.context
    assert r.endings[0] == hellaswag.encode("Cooking: A man stands. He cuts onions  cries.")[len(r.context):]
    assert r.norms == [6.0, 8.0, 1.0, 1.0]


def test_download_offline_names_data_flag(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="--data FILE"):
        hellaswag.download("http://127.0.0.1:9/hellaswag_val.jsonl", tmp_path)
    (tmp_path / "hellaswag_val.jsonl").write_text('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n' * 3)
    monkeypatch.setenv("HELLASWAG_CACHE", str(tmp_path))
    assert len(hellaswag.load_examples(limit=2)) == 2   # the cached copy, no network


GOOD = {"activity_label": "Cooking", "ctx_a": "A man cuts an onion.", "ctx_b": "he", "ctx": "A man cuts an onion. He",
        "endings": ["cries.", "sings.", "swims.", "flies."], "label": 0}
DROP = object()


@pytest.mark.parametrize("style, change, message", [
    ("harness", {"ctx_a": DROP}, "needs activity_label, ctx_a, ctx_b, endings, label (--style harness); this line "
                                 "lacks ctx_a"),
    ("harness", {"activity_label": DROP, "ctx_b": DROP}, "lacks activity_label, ctx_b"),
    ("completion", {"ctx": DROP}, "lacks ctx"),
    ("completion", {"endings": ["a", "b", "c"]}, "a HellaSwag example has 4 endings; this line has 3"),
    ("completion", {"endings": "abcd"}, "endings must be a list of strings"),
    ("harness", {"ctx_b": None}, "ctx_b must be a string"),
    ("completion", {"label": 7}, "label must be 0, 1, 2 or 3 (the index of the right ending), got 7"),
    ("completion", {"label": -1}, "got -1"),
    ("completion", {"ctx": ""}, "ctx is empty"),
])
def test_bad_lines_are_errors_that_name_the_line(tmp_path, style, change, message):
    bad = {key: value for key, value in {**GOOD, **change}.items() if value is not DROP}
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        hellaswag.load_examples(path, style=style)


def test_each_style_needs_only_its_own_keys(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({k: GOOD[k] for k in ("ctx", "endings")} | {"label": "3"}) + "\n")
    assert hellaswag.load_examples(path, style="completion")[0]["label"] == "3"  # Hugging Face's copy: a string
    with pytest.raises(ValueError, match="lacks activity_label, ctx_a, ctx_b"):
        hellaswag.load_examples(path, style="harness")


@pytest.mark.parametrize("flag, value", [("--limit", "-1"), ("--limit", "0"), ("--batch_size", "0"),
                                         ("--batch_size", "-1")])
def test_limit_and_batch_size_below_1_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_hellaswag.parse_args(["--model", "gpt2", flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} must be positive, got {value}" in capsys.readouterr().err


def write_forced(path, n=2):
    """The first n FORCED examples as a HellaSwag file."""
    lines = [json.dumps({"activity_label": a, "ctx_a": ca, "ctx_b": cb, "ctx": ca + " " + cb, "endings": ends,
                         "label": label}) for a, ca, cb, ends, label in FORCED[:n]]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_triton_kernels_without_a_gpu_run_in_the_interpreter(tmp_path):
    """A fresh process, as a user starts it: the interpreter must be on before transformers imports triton."""
    model_dir = tmp_path / "model"  # head size 16, the smallest flash_attention takes
    GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)).save_pretrained(str(model_dir))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    data = write_forced(tmp_path / "hs.jsonl")
    cmd = [sys.executable, "eval_hellaswag.py", "--model", str(model_dir), "--data", str(data), "--device", "cpu",
           "--kernels", "triton", "--out", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert (result["n"], result["kernels"], result["dtype"]) == (2, "triton", "float32")
    assert "note: kernels=triton (in the Triton interpreter: slow, for checking" in proc.stderr  # as the trainer says


def test_a_model_with_fewer_ids_than_the_bpe_is_refused(tmp_path):
    model_dir = tmp_path / "small"
    GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=1, n_head=2, n_embd=16)).save_pretrained(str(model_dir))
    flags = ["--model", str(model_dir), "--data", str(write_forced(tmp_path / "hs.jsonl")), "--device", "cpu"]
    with pytest.raises(ValueError, match="has 1000 token ids, fewer than the 50257 of the GPT-2 BPE"):
        eval_hellaswag.main(flags)


def test_unknown_style():
    with pytest.raises(ValueError, match="completion, harness"):
        hellaswag.evaluate(None, [], "cpu", style="nope")


def test_cli_checkpoint_scores_like_the_weights_it_holds(hf_dir, data_file, tmp_path):
    from gpt2.checkpoint import save_checkpoint

    model = GPT.from_pretrained(str(hf_dir), kernels="torch")
    save_checkpoint(tmp_path / "model.pt", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                    step=0, loader_states=[], train_config={})
    flags = ["--data", str(data_file), "--limit", "4", "--device", "cpu", "--kernels", "torch"]
    from_checkpoint = eval_hellaswag.main(flags + ["--checkpoint", str(tmp_path / "model.pt")])
    from_weights = eval_hellaswag.main(flags + ["--model", str(hf_dir)])
    assert from_checkpoint["model"] == str(tmp_path / "model.pt")
    assert {k: from_checkpoint[k] for k in ("acc", "acc_norm", "n")} == {k: from_weights[k] for k in ("acc", "acc_norm", "n")}


@pytest.mark.gpu
def test_compiled_model_scores_like_eager(hf_dir, data_file):
    """Padded shapes: a compiled model compiles once per padded length and scores as eager does."""
    device = torch.device("cuda")
    model = GPT.from_pretrained(str(hf_dir), kernels="torch").to(device)
    compiled = torch.compile(model, dynamic=False)
    examples = hellaswag.load_examples(data_file, limit=48)
    for start in range(0, len(examples), 8):
        rendered = [hellaswag.render(e) for e in examples[start:start + 8]]
        want = hellaswag.loglikelihoods(model, rendered, device, rows=32)
        got = hellaswag.loglikelihoods(compiled, rendered, device, rows=32)
        err = (got - want).abs().max().item()
        assert err < 1e-3, f"compiled vs eager summed log-likelihoods differ by {err:.2e}"
    assert hellaswag.evaluate(compiled, examples, device, batch_size=8) == hellaswag.evaluate(model, examples, device, batch_size=8)


# -------------------------------------------------------------------------------------------------
# a model whose context is shorter than some endings (README's default block_size=64 meets 350 of them)

LONG = "walks inside the big old house, sits down at the kitchen table and reads the morning paper."


def short_context_examples():
    """Three FORCED examples; the second has an ending of about 20 tokens, longer than block_size 8."""
    examples = [{"activity_label": a, "ctx_a": ca, "ctx_b": cb, "ctx": ca + " " + cb, "endings": list(ends),
                 "label": label} for a, ca, cb, ends, label in FORCED[:3]]
    examples[1]["endings"][2] = LONG
    return examples


@pytest.mark.parametrize("style", hellaswag.STYLES)
def test_an_ending_longer_than_block_size_is_scored_on_its_first_tokens(style):
    """Each row is scored from the model's full logits, one at a time: an ending cut to its first block_size
    tokens after the last context token, the others after as much context as fits."""
    torch.manual_seed(0)
    block = 8
    model = GPT(GPTConfig(block_size=block, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    examples = short_context_examples()
    want_ll, want_norms, correct, correct_norm = [], [], 0, 0
    for example in examples:
        r = hellaswag.render(example, style)
        ll, norms = [], []
        for ending, norm in zip(r.endings, r.norms):
            kept = ending[:block]
            row = r.context[-(block + 1 - len(kept)):] + kept   # at least the last context token
            with torch.no_grad():
                logits, _ = model(torch.tensor([row[:-1]]))      # (1, T, V)
            logprobs = torch.log_softmax(logits[0, :, :model.config.real_vocab_size].double(), dim=-1)
            ll.append(logprobs[-len(kept):].gather(1, torch.tensor(kept)[:, None]).sum().item())
            norms.append(norm * len(kept) / len(ending))          # the share of the ending scored
        ll = torch.tensor(ll, dtype=torch.float64)
        correct += int(ll.argmax()) == r.label
        correct_norm += int((ll / torch.tensor(norms, dtype=torch.float64)).argmax()) == r.label
        want_ll.append(ll)
        want_norms.append(norms)
    assert len(hellaswag.render(examples[1], style).endings[2]) > block  # the case under test

    cropped = [hellaswag.crop_endings(hellaswag.render(e, style), block) for e in examples]
    assert [r.norms for r in cropped] == want_norms  # a cut ending's divisor shrinks with it
    got = hellaswag.loglikelihoods(model, cropped, "cpu")
    err = (got - torch.stack(want_ll)).abs().max().item()
    assert err < 1e-4, f"{style}: summed log-likelihoods differ from the per-row reference by up to {err:.2e}"
    result = hellaswag.evaluate(model, examples, "cpu", style=style, batch_size=2)
    assert (result["n"], result["cropped"]) == (3, 1)
    assert (result["correct"], result["correct_norm"]) == (correct, correct_norm)


def test_cli_with_a_short_context_model_reports_the_cropped_examples(tmp_path, capsys):
    model_dir = tmp_path / "model"
    GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)).save_pretrained(str(model_dir))
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in short_context_examples()))
    out = tmp_path / "new_folder" / "hs.json"   # a missing folder is created
    result = eval_hellaswag.main(["--model", str(model_dir), "--data", str(data), "--device", "cpu", "--out", str(out)])
    assert result["n"] == 3 and result["cropped"] == 1
    assert json.loads(out.read_text()) == result
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip()) == result
    assert "1 of 3 examples have an ending longer than the model's block_size=8" in captured.err


@pytest.mark.parametrize("case", ["folder", "parent is a file", "not writable"])
def test_a_bad_out_is_refused_before_the_evaluation(tmp_path, monkeypatch, capsys, case):
    (tmp_path / "file").write_text("")
    out = {"folder": tmp_path, "parent is a file": tmp_path / "file" / "hs.json",
           "not writable": tmp_path / "hs.json"}[case]
    if case == "not writable":  # simulated: root may write into any folder
        monkeypatch.setattr(hellaswag.os, "access", lambda path, mode: False)
    monkeypatch.setattr(hellaswag, "evaluate", never_evaluated)
    monkeypatch.setattr(sys, "argv", ["eval_hellaswag.py", "--model", str(tmp_path / "no_model"), "--device", "cpu",
                                      "--out", str(out)])
    assert eval_hellaswag.cli() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}") and err.count("\n") == 1, err


# -------------------------------------------------------------------------------------------------
# what the command line says when it stops early or is given the wrong thing

def never_evaluated(*args, **kwargs):
    pytest.fail("evaluated although the input was refused")


@pytest.mark.parametrize("signum, copies", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-and-its-copy"])
def test_a_signal_during_the_scoring_says_how_far_it_got(hf_dir, data_file, tmp_path, monkeypatch, capsys, signum,
                                                         copies):
    """A real signal at the third batch of 2: one line with the 4 examples scored and their acc_norm, exit code
    128 + the signal, the old --out kept, and the handlers given back. A copy of the signal a moment later, while
    that unwinds (torchrun's, during the process group's shutdown), changes nothing."""
    flags = ["--model", str(hf_dir), "--data", str(data_file), "--batch_size", "2", "--device", "cpu"]
    want = eval_hellaswag.main(flags + ["--limit", "4"])["acc_norm"]
    out = tmp_path / "hs.json"
    out.write_text("the last result\n")
    real, calls = hellaswag.loglikelihoods, []

    def signalled_at_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(hellaswag, "loglikelihoods", signalled_at_the_third_batch)
    if copies == 2:
        shutdown = hellaswag.shutdown_distributed
        monkeypatch.setattr(hellaswag, "shutdown_distributed",
                            lambda: (os.kill(os.getpid(), signum), shutdown()) if calls else shutdown())
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    capsys.readouterr()
    assert eval_hellaswag.cli(flags + ["--limit", "10", "--out", str(out)]) == 128 + signum
    last = capsys.readouterr().err.strip().splitlines()[-1]
    name = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert last == f"{name} after 4 of 10 examples: acc_norm {want:.4f} so far (--out not written)"
    assert out.read_text() == "the last result\n"
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_a_file_without_examples_is_refused(text, tmp_path, monkeypatch, capsys):
    data = tmp_path / "hs.jsonl"
    data.write_text(text)
    monkeypatch.setattr(hellaswag, "evaluate", never_evaluated)
    out = tmp_path / "hs.json"
    assert eval_hellaswag.cli(["--model", str(tmp_path / "no_model"), "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {data} holds no HellaSwag examples")
    assert not out.exists()


def test_evaluate_refuses_no_examples():
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    with pytest.raises(ValueError, match="no HellaSwag examples to score"):  # not acc 0.0 of n=0
        hellaswag.evaluate(model, [], "cpu")


def test_a_missing_bpe_is_said_before_the_model_loads_in_one_short_line(tmp_path, monkeypatch, capsys):
    import tiktoken

    from gpt2 import tokenizer

    def offline(name):  # what tiktoken raises offline with an empty TIKTOKEN_CACHE_DIR (about 300 characters)
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): Max "
                              "retries exceeded with url: /gpt-2/encodings/main/vocab.bpe " + "(Caused by ...)" * 20)

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hellaswag, "load_model", lambda *args: pytest.fail("the model loaded before the BPE"))
    tokenizer.get_encoding.cache_clear()
    try:
        code = eval_hellaswag.cli(["--model", "gpt2", "--data", str(write_forced(tmp_path / "hs.jsonl"))])
    finally:
        tokenizer.get_encoding.cache_clear()  # the next test loads the real one again
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and len(err) - len(str(tmp_path)) < 250, err
    assert err.startswith("error: could not load the GPT-2 BPE (ConnectionError: HTTPSConnectionPool")
    assert f"set TIKTOKEN_CACHE_DIR (now {tmp_path}) to a folder holding tiktoken's cached GPT-2 files" in err


@pytest.mark.parametrize("spelling", ["same", "another spelling", "a link"])
def test_an_out_that_is_the_data_file_is_refused(tmp_path, monkeypatch, capsys, spelling):
    data = write_forced(tmp_path / "hs.jsonl")
    before = data.read_text()
    out = {"same": data, "another spelling": tmp_path / "." / ".." / tmp_path.name / "hs.jsonl",
           "a link": tmp_path / "link.jsonl"}[spelling]
    if spelling == "a link":
        out.symlink_to(data)
    monkeypatch.setattr(hellaswag, "evaluate", never_evaluated)
    assert eval_hellaswag.cli(["--model", str(tmp_path / "no_model"), "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --out {out} is the HellaSwag file {data} that is scored; the result "
                                       "would overwrite it: give another file name\n")
    assert data.read_text() == before


@pytest.mark.parametrize("case", ["data is a folder", "data is not UTF-8", "out's folder is a file"])
def test_wrong_paths_are_named_for_what_they_are(tmp_path, monkeypatch, capsys, case):
    good = write_forced(tmp_path / "hs.jsonl")
    (tmp_path / "file").write_text("")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(good.read_bytes() + json.dumps(GOOD).replace("man", "m\u00e4n").encode("latin-1") + b"\n")
    data, out, message = {
        "data is a folder": (tmp_path, None, f"HellaSwag file {tmp_path} is a folder; give the hellaswag_val.jsonl "
                                             "file itself"),
        "data is not UTF-8": (latin1, None, f"{latin1}:3: not UTF-8 text (byte 0xe4 at column "),
        "out's folder is a file": (good, tmp_path / "file" / "hs.json",
                                   f"--out {tmp_path / 'file' / 'hs.json'}: {tmp_path / 'file'} is a file, not a "
                                   "folder"),
    }[case]
    monkeypatch.setattr(hellaswag, "evaluate", never_evaluated)
    flags = ["--model", str(tmp_path / "no_model"), "--data", str(data)] + (["--out", str(out)] if out else [])
    assert eval_hellaswag.cli(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
