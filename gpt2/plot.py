"""The loss plot of a run, drawn from its log.jsonl.

    python -m gpt2.plot out/          # writes out/loss.png

Train and validation loss against steps on the left axis, HellaSwag acc_norm on the right, with
OpenAI GPT-2 124M's values as dashed reference lines (validation loss 3.2924 on FineWeb-Edu as
measured by build-nanogpt; acc_norm 0.2955 in the completion style).
"""
import json
import pathlib
import sys

GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955


def read_log(out_dir) -> list[dict]:
    path = pathlib.Path(out_dir) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no log.jsonl in {out_dir}: is it a train.py --out_dir?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
    return records


def plot_log(out_dir) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(out_dir)

    def series(key):
        return [r["step"] for r in records if key in r], [r[key] for r in records if key in r]

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(*series("loss"), lw=0.8, alpha=0.7, label="train loss")
    ax.plot(*series("val_loss"), marker="o", ms=3, label="val loss")
    ax.axhline(GPT2_124M_VAL_LOSS, color="gray", ls="--", lw=0.8, label="GPT-2 124M val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
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
    path = pathlib.Path(out_dir) / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m gpt2.plot OUT_DIR")
    try:
        print(plot_log(sys.argv[1]))
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
