"""HellaSwag: the validation set, two ways of rendering it, and batched scoring with a model.

The data is the original validation file of rowanz/hellaswag (10,042 examples: a context and 4
endings, one of them right). With no local file it is downloaded once from

    https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl

into $HELLASWAG_CACHE (default ~/.cache/gpt2-triton/hellaswag/). Offline, pass the file itself:
`eval_hellaswag.py --data FILE`.

    python eval_hellaswag.py --model gpt2                      # completion style, the default
    python eval_hellaswag.py --model gpt2 --style harness
    torchrun --standalone --nproc_per_node=8 eval_hellaswag.py --checkpoint log/model_19072.pt

Both styles score every ending by the summed log-likelihood of its tokens given the context; they
differ in the text and in what acc_norm divides by:

  completion  build-nanogpt's: tokens of `ctx` and of `" " + ending`, tokenized apart and
              concatenated. acc picks the lowest summed loss, acc_norm the lowest mean loss per
              ending token. GPT-2 124M: acc 0.2859, acc_norm 0.2955.
  harness     lm-evaluation-harness's: the query `activity_label + ": " + ctx_a + " " +
              ctx_b.capitalize()` and the endings cleaned by `harness_preprocess`; the ending's
              tokens are those of query + " " + ending past the query's own tokens. acc picks the
              highest summed log-likelihood, acc_norm that divided by the ending's length in
              characters. GPT-2 124M: acc 0.2892, acc_norm 0.3114.

Ties go to the lower ending index, as torch.argmax and numpy.argmax do.

A model with a short context scores what fits, as lm-evaluation-harness does: a row loses its oldest
context tokens, and an ending longer than block_size is scored on its first block_size tokens, after
the last context token (see crop_endings). The result counts those examples in "cropped": with
block_size 64, 350 of the 10,042 (148 in harness style); with GPT-2's 1024, none.

train.py calls `evaluate` on every rank (it all-reduces the counts); eval_hellaswag.py calls `run`.
"""
import contextlib
import json
import os
import pathlib
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import torch

from gpt2.runtime import DUPLICATE_SIGNAL_S, all_reduce_sum, autocast, init_distributed, shutdown_distributed
from gpt2.tokenizer import check_vocab, encode, get_encoding

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
STYLE_KEYS = {  # what each style reads of an example
    "completion": ("ctx", "endings", "label"),
    "harness": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
}
STYLES = tuple(STYLE_KEYS)
PAD_MULTIPLE = 64  # sequence lengths are padded up to this, so torch.compile sees a few shapes only


# -------------------------------------------------------------------------------------------------
# data

def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "gpt2-triton" / "hellaswag"
    return pathlib.Path(os.environ.get("HELLASWAG_CACHE", default))


def download(url: str = URL, directory: pathlib.Path | None = None, local_flag: str = "--data") -> pathlib.Path:
    """The file at url, fetched once into directory; offline, the message names the caller's flag for a
    local copy (eval_hellaswag.py's --data, train.py's --hellaswag_data)."""
    directory = pathlib.Path(directory or cache_dir())
    path = directory / url.rsplit("/", 1)[-1]
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as err:
        raise RuntimeError(f"could not download HellaSwag from {url} ({err}). Offline, pass a local "
                           f"copy of hellaswag_val.jsonl with {local_flag} FILE") from None
    # write then rename: several torchrun ranks may download at once, none may read a partial file
    with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
    return path


def load_examples(path: str | None = None, limit: int | None = None, local_flag: str = "--data",
                  style: str = "completion") -> list[dict]:
    """The validation examples as dicts (ctx, ctx_a, ctx_b, activity_label, endings, label), in file order;
    downloaded when path is None (local_flag: see download). Each is checked for what `style` reads."""
    check_style(style)
    path = pathlib.Path(path) if path else download(local_flag=local_flag)
    if path.is_dir():
        raise FileNotFoundError(f"HellaSwag file {path} is a folder; give the hellaswag_val.jsonl file itself")
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file {path} does not exist")
    examples = []
    with open(path, "rb") as f:  # bytes, decoded line by line, so that a bad byte is named by its line
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            where = f"{path}:{lineno}"
            line = decode_line(raw, where)
            if line.strip():
                examples.append(parse_example(line, where, style))
    if not examples:  # else an empty file would score 0.0 on n=0 and look like a result
        raise ValueError(f"{path} holds no HellaSwag examples; expected hellaswag_val.jsonl, one JSON object a line")
    return examples


def decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                         "expected a line of HellaSwag's hellaswag_val.jsonl") from None


def parse_example(line: str, where: str, style: str = "completion") -> dict:
    """One line of hellaswag_val.jsonl, with the keys `style` reads, 4 endings and a label of 0..3; `where`
    (file:line) names it in the error, so that a bad line fails here and not as a shape error when scored."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON object ({err.msg}, column {err.colno}); "
                         "expected a line of HellaSwag's hellaswag_val.jsonl") from None
    keys = STYLE_KEYS[style]
    missing = [key for key in keys if not isinstance(example, dict) or key not in example]
    if missing:
        raise ValueError(f"{where}: a HellaSwag example needs {', '.join(keys)} (--style {style}); "
                         f"this line lacks {', '.join(missing)}")
    not_text = [key for key in keys if key not in ("endings", "label") and not isinstance(example[key], str)]
    if not_text:
        raise ValueError(f"{where}: {not_text[0]} must be a string, got {example[not_text[0]]!r:.80}")
    if style == "completion" and not example["ctx"]:  # no token to predict an ending's first one from
        raise ValueError(f"{where}: ctx is empty; a completion is scored given a context (--style harness "
                         "builds one from activity_label, ctx_a and ctx_b)")
    endings = example["endings"]
    if not isinstance(endings, list) or not all(isinstance(ending, str) for ending in endings):
        raise ValueError(f"{where}: endings must be a list of strings, got {endings!r:.80}")
    if len(endings) != 4:
        raise ValueError(f"{where}: a HellaSwag example has 4 endings; this line has {len(endings)}")
    label = example["label"]
    if str(label) not in ("0", "1", "2", "3"):  # an int, or the string that Hugging Face's copy stores
        raise ValueError(f"{where}: label must be 0, 1, 2 or 3 (the index of the right ending), got {label!r}")
    return example


def check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown HellaSwag style {style!r}: choose from {', '.join(STYLES)}")


# -------------------------------------------------------------------------------------------------
# rendering: an example -> context tokens, 4 ending token lists, and what acc_norm divides by

@dataclass
class Rendered:
    context: list[int]
    endings: list[list[int]]   # 4 of them; each row scored is context + ending
    norms: list[float]         # acc_norm divides each ending's log-likelihood by this
    label: int


def render_completion(example: dict) -> Rendered:
    context = encode(example["ctx"])
    endings = [encode(" " + ending) for ending in example["endings"]]
    return Rendered(context, endings, [float(len(e)) for e in endings], int(example["label"]))


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's clean-up of HellaSwag text (the brackets are WikiHow artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def render_harness(example: dict) -> Rendered:
    query = harness_preprocess(example["activity_label"] + ": " + example["ctx_a"] + " "
                               + example["ctx_b"].capitalize())
    choices = [harness_preprocess(ending) for ending in example["endings"]]
    # the harness moves the query's trailing whitespace into the continuation, then takes the
    # continuation's tokens as those of the whole string past the query's own tokens
    context = encode(query.rstrip())
    endings = [encode(query + " " + choice)[len(context):] for choice in choices]
    return Rendered(context, endings, [float(len(c)) for c in choices], int(example["label"]))


def crop_endings(r: Rendered, block_size: int) -> Rendered:
    """r with every ending cut to its first block_size tokens, so that a row still holds the last context
    token to predict the first of them; r itself when all fit. The first tokens are kept, not the last:
    they are the ones the context bears on. acc_norm's divisor shrinks to the share of tokens kept (exactly
    the tokens kept for completion, the characters in proportion for harness), else a cut ending would
    look likelier per token or character than it is."""
    if all(len(e) <= block_size for e in r.endings):
        return r
    kept = [e[:block_size] for e in r.endings]
    norms = [norm * len(k) / len(e) for norm, k, e in zip(r.norms, kept, r.endings)]
    return Rendered(r.context, kept, norms, r.label)


def render(example: dict, style: str = "completion") -> Rendered:
    if style == "completion":
        return render_completion(example)
    if style == "harness":
        return render_harness(example)
    raise ValueError(f"unknown HellaSwag style {style!r}: choose from {', '.join(STYLES)}")


# -------------------------------------------------------------------------------------------------
# scoring

def collate(rendered: list[Rendered], block_size: int, rows: int | None = None):
    """Rows of (context + ending) as next-token inputs and targets, right-padded.

    Returns idx (R, T) and targets (R, T): the next token where it is an ending token, -1 elsewhere
    (context and padding are not scored). Rows longer than block_size + 1 lose their oldest context
    tokens, as the harness truncates; an ending longer than block_size is refused (crop_endings cuts it
    first). T is the longest row, and R is 4 per example, unless `rows` is given: then R = rows (at
    least 4 per example) and T is rounded up to PAD_MULTIPLE (at most block_size), so that a compiled
    model meets a few shapes only. A causal model's outputs at real positions do not depend on the padding.
    """
    token_rows, ending_lens = [], []
    for r in rendered:
        for ending in r.endings:
            if not 0 < len(ending) <= block_size:
                raise ValueError(f"an ending of {len(ending)} tokens cannot be scored with block_size={block_size}"
                                 " (crop_endings cuts it first)")
            token_rows.append((r.context + ending)[-(block_size + 1):])
            ending_lens.append(len(ending))
    T = max(len(t) - 1 for t in token_rows)
    if rows is not None:
        T = min(block_size, -(-T // PAD_MULTIPLE) * PAD_MULTIPLE)
    idx = torch.zeros((rows or len(token_rows), T), dtype=torch.long)
    targets = torch.full(idx.shape, -1, dtype=torch.long)
    for i, (tokens, n_end) in enumerate(zip(token_rows, ending_lens)):
        row = torch.tensor(tokens)
        n = len(tokens) - 1
        idx[i, :n] = row[:-1]
        targets[i, n - n_end:n] = row[n + 1 - n_end:]
    return idx, targets


@torch.no_grad()
def loglikelihoods(model, rendered: list[Rendered], device, autocast_dtype: str = "float32",
                   rows: int | None = None) -> torch.Tensor:
    """(len(rendered), 4) float64 on the CPU: each ending's summed log-probability given its context.
    rows: pad the batch to this many rows (see collate), for a compiled model."""
    device = torch.device(device)
    idx, targets = collate(rendered, _unwrap(model).config.block_size, rows)
    with autocast(device, autocast_dtype):
        _, token_losses = model(idx.to(device), targets.to(device), reduction="none")  # (R, T) fp32, 0 off endings
    ll = -token_losses.double().sum(dim=1)                                              # (R,)
    return ll[: 4 * len(rendered)].view(len(rendered), 4).cpu()


def evaluate(model, examples: list[dict], device, style: str = "completion", batch_size: int = 16,
             rank: int = 0, world_size: int = 1, autocast_dtype: str = "float32", progress=False,
             pad: bool | None = None) -> dict:
    """HellaSwag accuracy of model on examples, rank taking examples[rank::world_size].

    Every rank must call it: the counts are summed over the process group when one is initialized.
    Each forward scores batch_size examples (4 rows each), and only their ending tokens go through the
    lm_head and the loss (GPT.forward with reduction="none"). pad (default: whether the model is
    torch.compile'd) pads every batch to 4 * batch_size rows and the sequences as `collate` does, so that
    a compiled model meets at most block_size / PAD_MULTIPLE shapes (3 for HellaSwag, whose rows have at
    most 166 tokens). Pass the raw or torch.compile'd model, not the DDP wrapper. The model's train/eval
    mode is left as it is (GPT has no dropout, and a switch would make torch.compile recompile the
    training graph).

    progress: True for a progress bar, or a function called with the examples done on this rank after each
    batch. Returns {"acc", "acc_norm", "n", "correct", "correct_norm", "cropped"} over all ranks; cropped counts
    the examples with an ending longer than block_size, scored on its first block_size tokens only. Ctrl-C
    (KeyboardInterrupt) raises Interrupted, which holds this rank's counts so far.
    """
    check_style(style)
    shard = examples[rank::world_size]
    rows = 4 * batch_size if (pad if pad is not None else hasattr(model, "_orig_mod")) else None
    block_size = _unwrap(model).config.block_size
    counts = torch.zeros(4, dtype=torch.long)  # n, correct, correct_norm, cropped on this rank
    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=len(shard), desc=f"hellaswag ({style})", unit="ex", dynamic_ncols=True)
    try:
        for start in range(0, len(shard), batch_size):
            rendered = [render(example, style) for example in shard[start:start + batch_size]]
            cropped = sum(any(len(e) > block_size for e in r.endings) for r in rendered)
            rendered = [crop_endings(r, block_size) for r in rendered]
            ll = loglikelihoods(model, rendered, device, autocast_dtype, rows)                # (b, 4)
            labels = torch.tensor([r.label for r in rendered])
            norms = torch.tensor([r.norms for r in rendered], dtype=torch.float64)        # (b, 4)
            right, right_norm = (ll.argmax(dim=1) == labels).sum(), ((ll / norms).argmax(dim=1) == labels).sum()
            # one add: a signal lands before or after it, so that the counts stay a whole number of batches
            counts += torch.stack([torch.tensor(len(rendered)), right, right_norm, torch.tensor(cropped)])
            if bar is not None:
                bar.update(len(rendered))
                bar.set_postfix(acc_norm=f"{counts[2].item() / counts[0].item():.4f}")
            elif callable(progress):
                progress(int(counts[0]))
    except KeyboardInterrupt as err:  # this rank's counts so far become the message
        raise Interrupted(getattr(err, "signum", signal.SIGINT), rank, world_size, int(counts[0]), len(shard),
                          int(counts[2])) from None
    finally:
        if bar is not None:
            bar.close()  # its last line stays on screen, and the next message starts on a line of its own
    n, correct, correct_norm, cropped = all_reduce_sum(counts.to(device)).tolist()
    if n == 0:  # 0 / 0: no accuracy to report
        raise ValueError("no HellaSwag examples to score")
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n,
            "correct": correct, "correct_norm": correct_norm, "cropped": cropped}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), or SIGTERM inside `signals_interrupt`, stopped a HellaSwag evaluation. done of total:
    the examples scored on this rank (done None: stopped before the scoring began), correct_norm of them right
    by acc_norm. exit_code is 128 + the signal's number, as a shell reports a process that a signal ended."""

    def __init__(self, signum: int, rank: int = 0, world_size: int = 1, done: int | None = None,
                 total: int | None = None, correct_norm: int = 0):
        self.signum, self.rank, self.world_size = signum, rank, world_size
        self.done, self.total, self.correct_norm = done, total, correct_norm
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        name = "interrupted" if self.signum == signal.SIGINT else f"stopped by {signal.Signals(self.signum).name}"
        if self.done is None:
            return f"{name} before the scoring began"
        share = f"rank {self.rank}'s " if self.world_size > 1 else ""  # the other ranks' counts are out of reach
        so_far = f": acc_norm {self.correct_norm / self.done:.4f} so far" if self.done else ""
        return f"{name} after {self.done} of {share}{self.total} examples{so_far}"


@contextlib.contextmanager
def signals_interrupt(rank: int = 0):
    """SIGINT and SIGTERM raise Interrupted inside the block (SIGTERM would end the process without a word,
    and Ctrl-C with a traceback). A second signal within DUPLICATE_SIGNAL_S of the first is the same stop
    (torchrun's copy of the terminal's Ctrl-C: it would replace Interrupted, and its summary, while that
    unwinds); a later one acts as it did before the block, at once. Outside the main thread, where
    signal.signal cannot be called, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first = []  # when the first signal came

    def handle(signum, frame):
        if not first:
            first.append(time.monotonic())
            raise Interrupted(signum, rank)
        if time.monotonic() - first[0] < DUPLICATE_SIGNAL_S:
            return
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.raise_signal(signum)

    # a signal ignored at the start (a background job's SIGINT) stays ignored
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) not in (signal.SIG_IGN, None)}  # None: set outside Python
    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _unwrap(model):
    """The GPT inside torch.compile's and DDP's wrappers, for its config."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# -------------------------------------------------------------------------------------------------
# the command line (eval_hellaswag.py parses its flags into this)

@dataclass
class EvalConfig:
    model: str | None = None          # "gpt2", ..., or a local save_pretrained directory
    checkpoint: str | None = None     # a checkpoint written by train.py
    data: str | None = None           # local hellaswag_val.jsonl; downloaded when None
    style: str = "completion"
    limit: int | None = None          # the first N examples only
    batch_size: int = 16              # examples per forward (4 rows each)
    device: str = "auto"
    dtype: str = "float32"            # autocast dtype of the forward pass
    kernels: str = "torch"
    compile: bool = False
    out: str | None = None            # JSON file for run's summary

    def __post_init__(self):
        for flag in ("limit", "batch_size"):  # limit None: every example
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be positive, got {value}")


def load_model(config: EvalConfig, device):
    """The model to score: HF GPT-2 weights (--model) or one of train.py's checkpoints (--checkpoint)."""
    if (config.model is None) == (config.checkpoint is None):
        raise ValueError("give exactly one of --model and --checkpoint")
    if config.checkpoint is not None:
        from gpt2.checkpoint import load_model as load_checkpoint  # lazy: only this branch needs it

        model = load_checkpoint(config.checkpoint, device, config.kernels)
    else:
        from gpt2.model import GPT
        from gpt2.ops import resolve

        model = GPT.from_pretrained(config.model, kernels=resolve(config.kernels, device)).to(device)
    check_vocab(model.config.vocab_size, config.model or config.checkpoint)
    return model


def check_out(out: str, data: str | None = None) -> None:
    """Refuse an --out that could not be written, or that is the HellaSwag file `data` (None: the downloaded
    copy), before the evaluation rather than after it. Its folder is created here when missing, as the write
    used to do."""
    path = pathlib.Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name for the JSON result")
    data_path = pathlib.Path(data) if data else cache_dir() / URL.rsplit("/", 1)[-1]
    if path.exists() and data_path.exists() and os.path.samefile(path, data_path):
        raise ValueError(f"--out {out} is the HellaSwag file {data_path} that is scored; the result would "
                         "overwrite it: give another file name")
    not_a_folder = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if not_a_folder is not None:
        raise ValueError(f"--out {out}: {not_a_folder} is a file, not a folder; give a path in a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create its folder {path.parent} ({err.strerror})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {out} is not writable")


def run(config: EvalConfig) -> dict:
    """Score a model on HellaSwag, sharded over torchrun's ranks; rank 0 prints and writes the summary.
    Ctrl-C or SIGTERM: Interrupted, and --out is not written."""
    if config.out:
        check_out(config.out, config.data)  # on every rank, before any collective, so that all of them stop alike
    ddp, device = init_distributed(config.device)
    with signals_interrupt(ddp.rank):  # around the shutdown too: a signal's copy may come while it runs
        try:
            return score(config, ddp, device)
        finally:
            shutdown_distributed()


def score(config: EvalConfig, ddp, device) -> dict:
    """run's work inside its process group and signal handlers."""
    # a bad file or a missing BPE fails before the model loads
    examples = load_examples(config.data, config.limit, style=config.style)
    get_encoding()
    model = load_model(config, device)
    ops = model.ops
    if ops.interpreted and ddp.is_main:  # the trainer's first line says the same
        print(f"note: {ops.describe()}; --kernels torch is much faster", file=sys.stderr)
    if config.compile:
        # static shapes: evaluate pads every batch of a compiled model to one of a few (rows, T) shapes
        model = torch.compile(model, dynamic=False)
    result = evaluate(model, examples, device, config.style, config.batch_size, ddp.rank,
                      ddp.world_size, config.dtype, progress=ddp.is_main)
    summary = {"acc": result["acc"], "acc_norm": result["acc_norm"], "n": result["n"],
               "cropped": result["cropped"], "style": config.style, "model": config.model or config.checkpoint,
               "kernels": ops.spec, "dtype": config.dtype}
    if ddp.is_main:
        print(json.dumps(summary))
        if result["cropped"]:
            block_size = _unwrap(model).config.block_size
            print(f"note: {result['cropped']} of {result['n']} examples have an ending longer than the model's "
                  f"block_size={block_size}; it was scored on its first {block_size} tokens", file=sys.stderr)
        if config.out:
            pathlib.Path(config.out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
