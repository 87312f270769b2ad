"""Every kernel against PyTorch (eager and torch.compile), plus end-to-end training throughput.

    python benchmarks/run.py                    # all benchmarks on the GPU
    python benchmarks/run.py --only layernorm   # one (or a comma list); --list shows the names
    python benchmarks/run.py --smoke            # tiny sizes, CPU interpreter: providers agree?

On a GPU it first measures the device's own ceilings (device-to-device copy GB/s, bf16 matmul
TFLOP/s), then prints a markdown table per benchmark and writes JSON, markdown and a PNG plot to
benchmarks/results/<gpu-name>/ with the GPU, versions, date and commit. Without CUDA it says so and
runs the smoke pass, which measures nothing and exits non-zero only if a provider disagrees.

Each benchmark lives in benchmarks/bench_<name>.py as BENCHMARKS = [...] (see harness.py).
"""
import argparse
import importlib
import os
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def discover() -> dict:
    benches = {}
    for path in sorted(HERE.glob("bench_*.py")):
        for bench in importlib.import_module(path.stem).BENCHMARKS:
            benches[bench.name] = bench
    return benches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma list of benchmark names (default all)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, agreement only (default without CUDA)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>)")
    args = parser.parse_args(argv)

    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

    import harness

    benches = discover()
    if args.list:
        print("\n".join(benches))
        return 0
    wanted = list(benches) if args.only is None else [name.strip() for name in args.only.split(",")]
    unknown = [name for name in wanted if name not in benches]  # '' too: `--only ,` names none
    if unknown:
        print(f"error: --only: unknown benchmark {', '.join(map(repr, unknown))}; choose from {', '.join(benches)}",
              file=sys.stderr)
        return 2
    if smoke and not torch.cuda.is_available():
        print("No CUDA device: running the smoke pass (tiny sizes, Triton interpreter on the CPU); nothing is timed.")

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    env = harness.environment(device)
    if smoke:
        failed = []
        for name in wanted:
            bench = benches[name]
            run_smoke = harness.smoke_op if isinstance(bench, harness.OpBench) else harness.smoke_step
            rows = run_smoke(bench, device)
            print(f"\n## {name} (smoke)\n\n{harness.markdown_table(bench, rows)}")
            failed += [f"{name}/{r['provider']}" for r in rows if r.get("ok") is False]  # no "ok": not run here
        if failed:
            print(f"\nDISAGREE with the baseline: {', '.join(failed)}", file=sys.stderr)
            return 1
        print("\nsmoke pass: every provider agrees with its baseline")
        return 0

    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    ceilings = harness.measure_ceilings(device)
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    out_dir = pathlib.Path(args.out) if args.out else harness.results_dir(env["device"])
    for name in wanted:
        bench = benches[name]
        run_timed = harness.time_op if isinstance(bench, harness.OpBench) else harness.time_step
        rows = run_timed(bench, device, ceilings)
        print(f"\n## {name}\n\n{harness.markdown_table(bench, rows)}", flush=True)
        harness.write_results(bench, rows, env, ceilings, out_dir)
    print(f"\nresults written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
