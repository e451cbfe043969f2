#!/usr/bin/env python3
"""Paired timing of the vision encoder: posegpt-edge (tract) against onnxruntime on one ONNX
file, one run of each in turn, so that both runs of a pair see the same state of a noisy shared
machine (its speed changes from minute to minute; separate batches of runs do not share it).

    python scripts/bench_vision_paired.py MODEL.onnx --ours target/release/posegpt-edge \\
        [--ours OTHER_BUILD ...] --threads 2 --pairs 20 [--runs 10]

Each --ours binary is started with `bench-vision --paced` and kept loaded for a run; onnxruntime
runs in this process, a new session per run. A process keeps the speed offset it started with
(memory placement, presumably) for its life, so to compare builds use several runs (--runs):
each starts every runner afresh, and the median of the runs' medians is the figure to quote.
Every round runs each runner once, in an order that rotates from round to round, with a short
pause between runs so that one runtime's idle worker threads have gone to sleep
before the other starts. Prints one JSON line: per runner the median and quartiles of its run
times, and per posegpt-edge binary the median and quartiles of its per-round ratio to
onnxruntime, and with --runs the per-run medians, their median and range.

Requirements: scripts/requirements-bench.txt.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


class Ours:
    def __init__(self, binary, model, threads):
        self.name = binary
        self.proc = subprocess.Popen(
            [binary, "bench-vision", "--onnx", model, "-t", str(threads), "--paced"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            sys.exit(f"{binary} did not load {model} (said {line!r}); see its log above")

    def run_ms(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"{self.name} stopped during the runs; see its log above")
        return float(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


class Ort:
    name = "onnxruntime"

    def __init__(self, model, threads):
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        inp = self.sess.get_inputs()[0]
        size = inp.shape[-1]
        self.feed = {inp.name: np.random.default_rng(1).standard_normal(
            (1, 3, size, size), dtype=np.float32)}
        self.version = ort.__version__
        self.run_ms()  # warm-up

    def run_ms(self):
        t = time.perf_counter()
        self.sess.run(None, self.feed)
        return (time.perf_counter() - t) * 1e3

    def close(self):
        pass


def paired_run(args):
    """One run: every runner started afresh, then `args.pairs` rounds; the run times per runner."""
    runners = [Ours(b, args.model, args.threads) for b in args.ours]
    ort_runner = Ort(args.model, args.threads)
    runners.append(ort_runner)
    times = {r.name: [] for r in runners}
    for i in range(args.pairs):
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            time.sleep(args.pause_ms / 1e3)
            times[r.name].append(r.run_ms())
        if (i + 1) % 10 == 0:
            print(f"round {i + 1}/{args.pairs}", file=sys.stderr)
    for r in runners:
        r.close()
    return times, ort_runner


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ours", action="append", required=True, help="a posegpt-edge binary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=30, help="rounds (one run of each runner)")
    ap.add_argument("--runs", type=int, default=1,
                    help="runs, each with every runner started afresh: a process keeps the speed "
                         "offset it started with, so one run is one sample of it")
    ap.add_argument("--pause-ms", type=float, default=50.0, help="pause between two runs")
    args = ap.parse_args()

    per_run = []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"run {run + 1}/{args.runs}", file=sys.stderr)
        per_run.append(paired_run(args))
    times = {name: [t for ts, _ in per_run for t in ts[name]] for name in per_run[0][0]}
    ort_name = per_run[0][1].name
    # Per binary and run: the median of that run's per-pair ratios.
    run_ratios = {b: [statistics.median([o / r for o, r in zip(ts[b], ts[ort_name])])
                      for ts, _ in per_run] for b in args.ours}
    ort_ms = times[ort_name]
    print(json.dumps({
        "model": args.model,
        "threads": args.threads,
        "pairs": args.pairs,
        "runs": args.runs,
        "onnxruntime": per_run[0][1].version,
        "runs_ms": {name: quartiles(t) for name, t in times.items()},
        "ratio_to_onnxruntime": {
            b: quartiles([o / r for o, r in zip(times[b], ort_ms)]) for b in args.ours},
        "ratio_per_run": {
            b: {"medians": r, "median_of_medians": statistics.median(r),
                "min": min(r), "max": max(r)} for b, r in run_ratios.items()},
    }))


if __name__ == "__main__":
    main()
