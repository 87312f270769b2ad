"""Loss curves of --kernels=triton and --kernels=torch over the same data, drawn on one plot.

    python benchmarks/compare_losses.py --data data/fineweb_edu -- --preset gpt2-124m --max_steps 300
    python benchmarks/compare_losses.py --out benchmarks/results/cpu -- --max_steps 300 --n_layer 2 ...

Everything after `--` goes to train.py unchanged (both runs get the same flags, seed and data), so the
two curves differ only by the kernels. Writes <out>/losses_<kernels>/log.jsonl for each run, and
<out>/loss_triton_vs_torch.png and .json with both curves and their largest gap.
"""
import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import train  # noqa: E402
from gpt2.plot import read_log  # noqa: E402


def run(kernels: str, out: pathlib.Path, data: str | None, train_args: list[str]) -> list[float]:
    run_dir = out / f"losses_{kernels}"
    flags = ["--kernels", kernels, "--out_dir", str(run_dir), *(["--data", data] if data else []), *train_args]
    if train.main(flags) != 0:
        raise SystemExit(f"train.py {' '.join(flags)} failed")
    return [r["loss"] for r in read_log(run_dir) if "loss" in r]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="out/compare_losses")
    args = parser.parse_args(ours)
    out = pathlib.Path(args.out)
    curves = {kernels: run(kernels, out, args.data, train_args) for kernels in ("torch", "triton")}
    gap = max(abs(a - b) for a, b in zip(curves["torch"], curves["triton"]))
    (out / "loss_triton_vs_torch.json").write_text(json.dumps(
        {"train_args": train_args, "max_abs_gap": gap, "losses": curves}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for kernels, curve in curves.items():
        top.plot(curve, lw=0.9, label=f"--kernels={kernels}")
    top.set_ylabel("train loss")
    top.legend()
    bottom.plot([a - b for a, b in zip(curves["triton"], curves["torch"])], lw=0.8, color="k")
    bottom.set_ylabel("triton - torch")
    bottom.set_xlabel("step")
    fig.suptitle(" ".join(train_args)[:110], fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_triton_vs_torch.png", dpi=110)
    print(f"largest gap between the curves: {gap:.3g}; plot in {out / 'loss_triton_vs_torch.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
