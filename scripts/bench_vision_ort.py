#!/usr/bin/env python3
"""onnxruntime as the peer of `posegpt-edge bench-vision`: one vision encoder ONNX file, fixed
threads, random pixels; prints one JSON line with the load time, per-run times (ms) and their
median, the peak RSS, the RSS before loading, and the model's weight bytes.

    python scripts/bench_vision_ort.py MODEL.onnx --threads 2 --iterations 5

Requirements: scripts/requirements-bench.txt.
"""
import argparse
import json
import resource
import statistics
import time


def rss_now_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=5)
    args = ap.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort

    base = rss_now_bytes()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t = time.perf_counter()
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    inp = sess.get_inputs()[0]
    size = inp.shape[-1]
    pixels = np.random.default_rng(1).standard_normal((1, 3, size, size), dtype=np.float32)
    runs = []
    for i in range(args.iterations + 1):
        t = time.perf_counter()
        sess.run(None, {inp.name: pixels})
        if i > 0:  # the first run is a warm-up
            runs.append((time.perf_counter() - t) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del sess
    # Counted after the peak was read: loading the protobuf here holds inline weights in memory.
    sizes = {1: 4, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2}
    weights = sum(int(np.prod(t.dims, dtype=np.int64)) * sizes.get(t.data_type, 1) for t in
                  onnx.load(args.model, load_external_data=False).graph.initializer)
    print(json.dumps({
        "runner": f"onnxruntime {ort.__version__}",
        "model": args.model,
        "threads": args.threads,
        "load_s": load_s,
        "runs_ms": runs,
        "median_ms": statistics.median(runs),
        "weight_bytes": int(weights),
        "rss_before_load_bytes": base,
        "peak_rss_bytes": peak,
    }))


if __name__ == "__main__":
    main()
