"""Every kernel of a training step compiles for Hopper (sm_90) and Ampere (sm_80) with the argument types
torch.compile gives it, does no fp64 arithmetic, and spills no registers; nor does any autotuning
candidate; and torch.compile(fullgraph=True) traces the step's forward and backward. No GPU needed:
benchmarks/compiled_kernels.py compiles with the ptxas Triton ships.

What the interpreter cannot show: the project's first GPU run crashed under torch.compile because
inductor typed a float scalar fp64 and tl.dot refused the fp64 accumulator that followed.
"""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_gpus_without_fp64_or_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPT2_AUTOTUNE")}
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "benchmarks/compiled_kernels.py", "--configs", "--check", "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    compiled = {(r["kernel"], r["target"], r["types"]) for r in rows if "error" not in r}
    kernels = {r["kernel"] for r in rows}
    # every op of the registry launches at least one kernel in the step (and attention's atomic backward its cast)
    for expected in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_layer_norm_fwd_kernel",
                     "_layer_norm_bwd_kernel", "_gelu_fwd_kernel", "_gelu_bwd_kernel", "_adamw_kernel",
                     "_cross_entropy_kernel", "_bwd_dq_cast"):
        assert expected in kernels, f"{expected} was not launched by the step"
    for kernel in kernels:
        for target in ("sm_90", "sm_80"):
            assert (kernel, target, "fp64/i64") in compiled, f"{kernel} not compiled for {target} with fp64 scalars"
    candidates = [r for r in rows if r.get("candidate")]
    assert len(candidates) >= 3 and all(r["registers"] for r in candidates)


def test_the_check_finds_fp64_arithmetic():
    """The scan that the test above relies on: an fp64 multiply is found, a conversion is not."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compiled_kernels

    ptx = "\tcvt.rn.f32.f64 %f1, %fd1;\n\tld.param.f64 %fd1, [x];\n\tmul.f64 %fd2, %fd1, %fd1;\n\tfma.rn.f64 %fd3, %fd2, %fd1, %fd1;\n"
    found = compiled_kernels._FP64_MATH.findall(ptx)
    assert [line.strip().split()[0] for line in found] == ["mul.f64", "fma.rn.f64"]


def test_the_check_finds_a_persistent_grid_in_two_waves():
    """The LayerNorm backward's grid check: 4 programs launched on a multiprocessor that holds 3 is found."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compiled_kernels

    assert any("two waves" in p for p in compiled_kernels.problems({"programs_per_sm": 4, "fit_per_sm": 3}))
    assert not compiled_kernels.problems({"programs_per_sm": 4, "fit_per_sm": 4})
