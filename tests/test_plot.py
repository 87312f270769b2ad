"""gpt2/plot.py: the title names the run, the train curve is smoothed, and GPT-2's reference lines show
only where they apply."""
import matplotlib.pyplot as plt
import pytest

from gpt2 import plot


def log(data: str, hellaswag: bool = False) -> list[dict]:
    records = [{"step": 0, "run": {"preset": "gpt2-124m", "data": data, "kernels": "triton"}}]
    records += [{"step": s, "loss": 11.0 - s / 10 + (s % 2)} for s in range(20)]
    records += [{"step": s, "val_loss": 10.0 - s / 10} for s in (0, 10, 19)]
    if hellaswag:
        records += [{"step": s, "hellaswag_acc_norm": 0.25 + s / 1000} for s in (0, 19)]
    return records


def labels(fig) -> list[str]:
    return [label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]]


@pytest.mark.parametrize("data, hellaswag, references", [
    ("data/shakespeare", False, []),
    ("data/edu_fineweb10B", True, ["GPT-2 124M val loss (FineWeb-Edu)", "GPT-2 124M HellaSwag"]),
    ("data/mine", True, ["GPT-2 124M HellaSwag"]),
])
def test_reference_lines_only_where_they_apply(data, hellaswag, references):
    fig = plot.draw(log(data, hellaswag))
    assert [label for label in labels(fig) if label.startswith("GPT-2")] == references
    assert {"train loss", "train loss, smoothed", "val loss"} <= set(labels(fig))
    assert fig.axes[0].get_title() == f"preset gpt2-124m | data {data.split('/')[-1]} | kernels triton"
    plt.close(fig)


def test_smoothing_follows_the_curve_with_less_noise():
    values = [10.0 + (i % 2) for i in range(200)]
    smoothed = plot.smooth(values)
    assert smoothed[0] == values[0] and abs(smoothed[-1] - 10.5) < 0.1
    assert max(smoothed[100:]) - min(smoothed[100:]) < 0.2


def test_plot_log_writes_the_png(tmp_path):
    import json

    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log("data/shakespeare")))
    assert plot.plot_log(tmp_path).stat().st_size > 1000


def test_the_command_line_says_its_usage(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "gpt2.plot", *args], capture_output=True, text=True, timeout=120)

    helped = run("--help")
    assert helped.returncode == 0 and "usage: python -m gpt2.plot OUT_DIR" in helped.stdout
    assert not (tmp_path / "--help").exists()
    missing = run(str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stderr.startswith("error:") and "Traceback" not in missing.stderr


@pytest.mark.parametrize("content", [b"", b"hello\n[1, 2]\n{\"loss\": 2.0}\n", b"\x85\xff\n", None],
                         ids=["empty", "no-records", "binary", "a-folder"])
def test_a_log_with_nothing_to_draw_is_a_one_line_error(tmp_path, content):
    import subprocess
    import sys

    if content is None:
        (tmp_path / "log.jsonl").mkdir()
    else:
        (tmp_path / "log.jsonl").write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "gpt2.plot", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert "log.jsonl" in result.stderr
    assert not (tmp_path / "loss.png").exists()


def test_lines_that_are_not_records_are_passed_over(tmp_path):
    import json

    lines = [json.dumps(r) for r in log("data/shakespeare")]
    lines[1:1] = ["[1, 2]", '{"loss": 9.0}', '{"step": 3, "lo']  # no object, no step, cut short
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    assert plot.read_log(tmp_path) == log("data/shakespeare")
    assert plot.plot_log(tmp_path).stat().st_size > 1000
