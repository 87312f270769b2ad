"""Resident memory and time of HellaSwag scoring on the CPU: our scorer against a one-example-at-a-time one.

    python benchmarks/hellaswag_memory.py                          # 300 examples, a 2-layer 64-wide GPT
    python benchmarks/hellaswag_memory.py --limit 20 --kernels cross_entropy --scorers ours
    python benchmarks/hellaswag_memory.py --out benchmarks/results/cpu/hellaswag_memory.md   # also write it

Each scorer runs in a fresh Python process (so that its peak resident memory is its own), on the same
randomly initialised GPT (seed 0, real vocabulary 50257 of 50304 rows), completion style, fp32:

  one-by-one   written for this comparison after build-nanogpt's scorer: per example, its 4 rows padded to
               the longest, the full (4, T, V) logits, F.cross_entropy over them, the ending tokens' losses
               summed (acc) and averaged (acc_norm); the logits cut to the real vocabulary, as ours are.
  full-logits  the scorer before the per-token op: 16 examples a forward padded to 64 rows and to a
               multiple of 64 positions, the full logits, then the cross-entropy of the ending tokens.
  ours         gpt2.hellaswag.loglikelihoods as evaluate() calls it on an eager model: 16 examples a
               forward, no padding, only the ending tokens through lm_head + the loss op
               (GPT.forward(..., reduction="none")).
  ours-padded  the same with the padding a torch.compile'd model gets (64 rows, multiples of 64).

Columns: the process's resident memory once the model and data are loaded, its peak (max RSS, the
whole process) after scoring, the median peak relative to one-by-one's, the scoring time, and whether
every example's acc and acc_norm pick equals one-by-one's (with the largest difference of a summed
log-likelihood). --repeat runs every scorer that many times, round by round: memory and time are the
median [min - max] of the runs. The peak of a scorer that frees and allocates large tensors of changing
sizes (one-by-one) varies from run to run with the allocator's reuse of freed memory.
"""
import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpt2 import hellaswag  # noqa: E402
from gpt2.model import GPT, GPTConfig  # noqa: E402

SCORERS = ("one-by-one", "full-logits", "ours", "ours-padded")
BATCH = 16  # examples a forward, as evaluate()'s default
SHARED_DATA = REPO.parent / "shared" / "data"   # beside the repository, as the tests expect it
if (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))


# ---------------------------------------------------------------------------------------------
# the scorers: (model, rendered examples) -> (n, 4) summed log-likelihoods, float64


def one_by_one(model, rendered):
    lls = []
    for r in rendered:
        rows = [r.context + ending for ending in r.endings]
        T = max(len(row) for row in rows)
        tokens = torch.zeros((4, T), dtype=torch.long)
        scored = torch.zeros((4, T - 1))                                       # 1 where the target is an ending token
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            scored[i, len(r.context) - 1: len(row) - 1] = 1.0
        logits, _ = model(tokens[:, :-1])                                      # (4, T - 1, V)
        logits = logits[..., : model.config.real_vocab_size]
        losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, T - 1)
        lls.append(-(losses * scored).sum(dim=1).double())
    return torch.stack(lls)


def full_logits(model, rendered):
    lls = []
    for start in range(0, len(rendered), BATCH):
        batch = rendered[start:start + BATCH]
        idx, targets = hellaswag.collate(batch, model.config.block_size, rows=4 * BATCH)
        scored = targets != -1
        logits, _ = model(idx)                                                 # (64, T, V)
        logits = logits[..., : model.config.real_vocab_size]
        token_ll = -F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
        ll = torch.zeros(idx.size(0)).index_add_(0, scored.nonzero()[:, 0], token_ll)
        lls.append(ll[: 4 * len(batch)].view(len(batch), 4).double())
    return torch.cat(lls)


def ours(model, rendered, rows=None):
    return torch.cat([hellaswag.loglikelihoods(model, rendered[start:start + BATCH], "cpu", rows=rows)
                      for start in range(0, len(rendered), BATCH)])


RUN = {"one-by-one": one_by_one, "full-logits": full_logits, "ours": ours,
       "ours-padded": lambda model, rendered: ours(model, rendered, rows=4 * BATCH)}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(scorer: str, data: str, limit: int, kernels: str) -> dict:
    """Score in this process; returns the measurements and the log-likelihoods."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, kernels=kernels)).eval()
    rendered = [hellaswag.render(e) for e in hellaswag.load_examples(data, limit)]
    loaded = current_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        ll = RUN[scorer](model, rendered)
    seconds = time.perf_counter() - start
    norms = torch.tensor([r.norms for r in rendered], dtype=torch.float64)
    return {"scorer": scorer, "loaded_MB": loaded, "max_rss_MB": max_rss_mb(), "seconds": seconds,
            "ll": ll.tolist(), "labels": [r.label for r in rendered], "norms": norms.tolist()}


# ---------------------------------------------------------------------------------------------
# the parent: one process per scorer, then the table


def measure_once(scorer: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", scorer, "--data", str(args.data), "--limit", str(args.limit),
           "--kernels", args.kernels]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{scorer} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def measure(scorers: list[str], args) -> list[dict]:
    """Each scorer's runs merged: median memory and time, their ranges, the first run's log-likelihoods."""
    runs = {scorer: [] for scorer in scorers}
    for _ in range(args.repeat):
        for scorer in scorers:
            runs[scorer].append(measure_once(scorer, args))
    merged = []
    for scorer, results in runs.items():
        row = dict(results[0])
        for key in ("loaded_MB", "max_rss_MB", "seconds"):
            values = sorted(r[key] for r in results)
            row[key], row[key + "_range"] = values[len(values) // 2], (values[0], values[-1])
        merged.append(row)
    return merged


def _median_range(row: dict, key: str, digits: int) -> str:
    low, high = (f"{value:.{digits}f}" for value in row[key + "_range"])
    return f"{row[key]:.{digits}f}" + (f" [{low} - {high}]" if low != high else "")


def picks(result: dict):
    ll = torch.tensor(result["ll"], dtype=torch.float64)
    return ll.argmax(1), (ll / torch.tensor(result["norms"], dtype=torch.float64)).argmax(1)


def table(results: list[dict]) -> str:
    base = results[0]
    base_acc, base_norm = picks(base)
    labels = torch.tensor(base["labels"])
    lines = ["| scorer | RSS loaded (MB) | max RSS (MB) | vs " + base["scorer"] + " | scoring (s) | acc | acc_norm "
             "| same picks as " + base["scorer"] + " | max ll diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc, norm = picks(r)
        same = bool((acc == base_acc).all() and (norm == base_norm).all())
        diff = (torch.tensor(r["ll"]) - torch.tensor(base["ll"])).abs().max().item()
        lines.append(f"| {r['scorer']} | {r['loaded_MB']:.0f} | {_median_range(r, 'max_rss_MB', 0)} | "
                     f"{r['max_rss_MB'] / base['max_rss_MB']:.2f}x | {_median_range(r, 'seconds', 1)} | "
                     f"{(acc == labels).float().mean():.4f} | {(norm == labels).float().mean():.4f} | "
                     f"{'yes' if same else 'NO'} | {diff:.1e} |")
    return "\n".join(lines)


def environment(args) -> str:
    import harness

    env = harness.environment(torch.device("cpu"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    env["device"] = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.system()}"
    env["setup"] = (f"GPT n_layer=2 n_embd=64 (vocab 50304, real 50257), {args.limit} HellaSwag examples, "
                    f"completion style, fp32, --kernels {args.kernels}, {args.repeat} run(s) of every scorer")
    return "\n".join(f"- {k}: {v}" for k, v in env.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA / "hellaswag_val.jsonl"), help="hellaswag_val.jsonl")
    parser.add_argument("--limit", type=int, default=300, help="the first N examples")
    parser.add_argument("--kernels", default="torch", help="the model's op set (gpt2/ops.py)")
    parser.add_argument("--scorers", default=",".join(SCORERS), help=f"comma list of {', '.join(SCORERS)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every scorer (median and range)")
    parser.add_argument("--out", help="markdown file to write the report to")
    parser.add_argument("--worker", choices=SCORERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.limit, args.kernels)))
        return 0
    results = measure(args.scorers.split(","), args)
    report = f"# HellaSwag scoring: resident memory and time\n\n{environment(args)}\n\n{table(results)}\n"
    print(report)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
