"""The loss plot of a run, drawn from its log.jsonl.

    python -m gpt2.plot out/          # writes out/loss.png

Train loss (raw, and smoothed over it) and validation loss against steps on the left axis, HellaSwag
acc_norm on the right. The title names the run (preset, data, kernels) from the log's first record.
OpenAI GPT-2 124M's values are drawn as dashed reference lines only where they apply: its validation
loss (3.2924 on FineWeb-Edu, as measured by build-nanogpt) on a run whose data is FineWeb, its HellaSwag
acc_norm (0.2955, completion style) where HellaSwag was measured. A Shakespeare run gets neither.
"""
import json
import pathlib
import sys

GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
SMOOTHING = 0.9  # the smoothed train curve: an exponential moving average with this weight on the past


def read_log(out_dir) -> list[dict]:
    """The records of out_dir/log.jsonl: every line that holds an object with a step. Other lines are
    passed over: the last line of a run killed while writing it is cut short."""
    path = pathlib.Path(out_dir) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no log.jsonl in {out_dir}: is it a train.py --out_dir?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a train.py log: it is not text") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def run_info(records: list[dict]) -> dict:
    """The run's description (train.py writes it first), or {} for older logs."""
    return next((r["run"] for r in records if "run" in r), {})


def title(run: dict) -> str:
    if not run:
        return "training run"
    data = pathlib.Path(run["data"]).name if run.get("data") else "?"
    return f"preset {run.get('preset')} | data {data} | kernels {run.get('kernels')}"


def is_fineweb(run: dict) -> bool:
    """Whether GPT-2's FineWeb validation loss is a fair line to draw: the run's data is FineWeb."""
    text = " ".join(str(run.get(key) or "") for key in ("data", "data_name", "data_source")).lower()
    return "fineweb" in text


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def plot_log(out_dir) -> pathlib.Path:
    """Draw out_dir/log.jsonl into out_dir/loss.png."""
    import matplotlib.pyplot as plt

    records = read_log(out_dir)
    if not records:
        raise ValueError(f"{pathlib.Path(out_dir) / 'log.jsonl'} holds no train.py records: nothing to draw")
    fig = draw(records)
    path = pathlib.Path(out_dir) / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(records: list[dict]):
    """The figure of a run's log records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = run_info(records)

    def series(key):
        return [r["step"] for r in records if key in r], [r[key] for r in records if key in r]

    fig, ax = plt.subplots(figsize=(8, 5))
    steps, loss = series("loss")
    ax.plot(steps, loss, lw=0.6, alpha=0.35, color="tab:blue", label="train loss")
    ax.plot(steps, smooth(loss), lw=1.4, color="tab:blue", label="train loss, smoothed")
    ax.plot(*series("val_loss"), marker="o", ms=3, color="tab:orange", label="val loss")
    if is_fineweb(run):
        ax.axhline(GPT2_124M_VAL_LOSS, color="gray", ls="--", lw=0.8, label="GPT-2 124M val loss (FineWeb-Edu)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title(run), fontsize=10)
    handles = ax.get_legend_handles_labels()
    steps, acc = series("hellaswag_acc_norm")
    if acc:
        ax2 = ax.twinx()
        ax2.plot(steps, acc, color="tab:red", marker="s", ms=3, label="HellaSwag acc_norm")
        ax2.axhline(GPT2_124M_HELLASWAG, color="tab:red", ls=":", lw=0.8, label="GPT-2 124M HellaSwag")
        ax2.set_ylabel("acc_norm")
        more = ax2.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax.legend(*handles, fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    usage = "usage: python -m gpt2.plot OUT_DIR  (redraws OUT_DIR/loss.png from OUT_DIR/log.jsonl)"
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(usage)
        sys.exit(0)
    if len(sys.argv) != 2:
        sys.exit(usage)
    try:
        print(plot_log(sys.argv[1]))
    except (OSError, ValueError) as err:  # a missing, unreadable or unwritable file; a log with nothing in it
        sys.exit(f"error: {err}")
