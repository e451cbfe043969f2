#!/usr/bin/env python3
"""Measure the converter at the released model's shapes: peak memory of its whole process tree,
time and disk per step, the part of the peak that grows with the LLM and its extrapolation to
the 40-layer 13B release; then check the converted bundle's poses against PyTorch.

For each layer count it writes a random checkpoint at LLaVA-1.5-13B's widths with only the layer
count reduced (scripts/make_tiny_chatpose.py --preset release: fp16 .bin shards, a 32 003-token
vocabulary, a CLIP ViT-L/14-336 tower, and PyTorch's outputs on the sample frames), converts it
while sampling every process of the converter's tree every 50 ms (llama.cpp's converter
included), and runs `posegpt-edge pose` on the bundle in exact and deployment modes against
PyTorch's rotations and P([SEG]). With --baseline-rev, the converter as it was at that git
revision is measured on the same checkpoints in the same run.

    .venv-convert/bin/python scripts/measure_convert.py [--layers 2,4] [--baseline-rev REV] \
        [--work /tmp/measure-convert] [--binary target/release/posegpt-edge]

Not part of the test suite: one layer count takes a few minutes and ~10 GB of disk. Memory is
reported two ways: resident (VmRSS, what `top` shows, including file pages that are mapped and
that the kernel can drop at any time) and anonymous (RssAnon + RssShmem: what cannot be dropped,
which is what runs a machine without swap out of memory). Results: WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE_LAYERS = 40


def tree(root: int) -> list[int]:
    """`root` and its descendants."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM of one process, in bytes."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


class Sampler(threading.Thread):
    """Samples a process tree's memory until stopped; peaks overall and per step."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.step = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.hwm = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            rss = anon = 0
            for pid in tree(self.pid):
                m = memory(pid)
                rss += m.get("VmRSS", 0)
                anon += m.get("RssAnon", 0) + m.get("RssShmem", 0)
                if pid == self.pid:
                    self.hwm = max(self.hwm, m.get("VmHWM", 0))
            for key in ("all", self.step):
                p = self.peaks.setdefault(key, {"rss": 0, "anon": 0})
                p["rss"], p["anon"] = max(p["rss"], rss), max(p["anon"], anon)
            time.sleep(self.interval)


def measure(cmd: list[str], log: Path) -> dict:
    """Runs a converter command, sampling its process tree; returns peaks and step times."""
    started = time.monotonic()
    steps: dict[str, float] = {}
    with open(log, "w") as logf, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                 stderr=logf, text=True) as proc:
        sampler = Sampler(proc.pid)
        sampler.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            logf.flush()
            if line.startswith("[") and "/6]" in line[:6]:
                sampler.step = line[1:2]
                steps[sampler.step] = time.monotonic() - started
                print(f"    {line.rstrip()}", flush=True)
        proc.wait()
        sampler.stopped.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"error: the converter failed ({proc.returncode}); its log: {log}")
    total = time.monotonic() - started
    marks = [("start", 0.0)] + sorted(steps.items()) + [("end", total)]
    durations = {marks[i][0]: marks[i + 1][1] - marks[i][1] for i in range(len(marks) - 1)}
    return {"peaks": sampler.peaks, "main_hwm": sampler.hwm, "seconds": total,
            "step_seconds": durations}


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.suffix in (".bin", ".safetensors"))


def rotation_angle(a: list[float], b: list[float]) -> float:
    """The angle of the rotation between two row-major 3x3 rotation matrices, in radians."""
    trace = sum(a[3 * i + k] * b[3 * i + k] for i in range(3) for k in range(3))
    return math.acos(max(-1.0, min(1.0, (trace - 1) / 2)))


def compare_poses(binary: Path, bundle: Path, expected: Path,
                  modes=(("exact", ["--exact"]), ("deployment", []))) -> dict:
    """`pose` on each sample frame against PyTorch, in each of `modes`: the largest and the
    mean angle between a joint's rotations, and the largest difference in P([SEG])."""
    want = json.loads(expected.read_text())
    result = {}
    for mode, flags in modes:
        angles, means, confidence = [], [], []
        for case in want["cases"]:
            out = subprocess.run([str(binary), "pose", "--bundle", str(bundle), "--image",
                                  str(ROOT / "models/samples" / case["image"]), *flags],
                                 capture_output=True, text=True, check=True)
            got = json.loads(out.stdout)
            rot = [sum(m, []) for m in got["rotmats"]] if isinstance(got["rotmats"][0][0], list) \
                else got["rotmats"]
            joint = [rotation_angle(r, w) for r, w in zip(rot, case["rotmats"])]
            angles.append(max(joint))
            means.append(sum(joint) / len(joint))
            confidence.append(abs(got["confidence"] - case["confidence"]))
        result[mode] = {"max_angle_rad": max(angles), "mean_angle_rad": sum(means) / len(means),
                        "max_confidence_diff": max(confidence)}
        print(f"    pose vs PyTorch, {mode}: rotations within {max(angles):.2e} rad (mean "
              f"{result[mode]['mean_angle_rad']:.2e}), P([SEG]) within {max(confidence):.1e}",
              flush=True)
    # Another frame's pose must differ by far more, or the comparison shows nothing.
    a, b = want["cases"][0]["rotmats"], want["cases"][1]["rotmats"]
    result["between_frames_rad"] = max(rotation_angle(x, y) for x, y in zip(a, b))
    return result


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,4", help="two or more layer counts, comma-separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/measure-convert"))
    ap.add_argument("--baseline-rev", help="also measure the converter at this git revision")
    ap.add_argument("--binary", type=Path, default=ROOT / "target/release/posegpt-edge")
    ap.add_argument("--outtype", choices=["f16", "f32"], default="f16")
    args = ap.parse_args()
    layers = sorted(int(x) for x in args.layers.split(","))
    if len(layers) < 2:
        raise SystemExit("error: --layers needs two layer counts to tell what grows with the LLM")
    if not args.binary.is_file():
        raise SystemExit(f"error: {args.binary} does not exist: cargo build --release first, or "
                         "pass --binary")
    args.work.mkdir(parents=True, exist_ok=True)
    converters = {"new": ROOT / "scripts/convert_chatpose.py"}
    if args.baseline_rev:
        old = args.work / f"baseline-{args.baseline_rev}" / "convert_chatpose.py"
        old.parent.mkdir(exist_ok=True)
        old.write_text(subprocess.run(["git", "show", f"{args.baseline_rev}:scripts/convert_chatpose.py"],
                                      cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        converters["baseline"] = old

    results = {"outtype": args.outtype, "cpus": os.cpu_count(), "runs": []}
    for n in layers:
        src = args.work / f"layers-{n}"
        ckpt = src / f"chatpose-13b-{n}-layers"
        if not (src / "expected" / "expected.json").is_file():
            print(f"== checkpoint with {n} layers at the release's widths -> {src}", flush=True)
            subprocess.run([sys.executable, str(ROOT / "scripts/make_tiny_chatpose.py"),
                            "--preset", "release", "--layers", str(n), "--out", str(src),
                            "--fixtures", str(src / "expected")], check=True)
        ckpt_bytes = weights_bytes(ckpt)
        for name, script in converters.items():
            out = src / f"bundle-{name}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            print(f"== {name} converter, {n} layers ({gb(ckpt_bytes)} checkpoint)", flush=True)
            cmd = [sys.executable, str(script), str(ckpt), "--clip", str(src / "clip"), str(out),
                   "--outtype", args.outtype]
            run = measure(cmd, src / f"convert-{name}.log")
            run.update({"converter": name, "layers": n, "checkpoint_bytes": ckpt_bytes,
                        "bundle_bytes": sum(f.stat().st_size for f in out.iterdir())})
            p = run["peaks"]["all"]
            print(f"    peak {gb(p['rss'])} resident, {gb(p['anon'])} anonymous; "
                  f"{run['seconds']:.0f} s", flush=True)
            if name == "new":
                run["pose"] = compare_poses(args.binary, out, src / "expected" / "expected.json")
            results["runs"].append(run)
            subprocess.run(["rm", "-rf", str(out)], check=True)
        if n == layers[0] and args.outtype == "f16":
            # llama.cpp multiplies f16 weights with activations rounded to f16, which shows in
            # the comparison; with f32 weights exact mode shows what the conversion itself keeps.
            out = src / "bundle-f32"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            print(f"== new converter, {n} layers, --outtype f32 (the same weights, f32 arithmetic)",
                  flush=True)
            subprocess.run([sys.executable, str(converters["new"]), str(ckpt), "--clip",
                            str(src / "clip"), str(out), "--outtype", "f32"], check=True,
                           capture_output=True)
            results["f32_exact_pose"] = compare_poses(
                args.binary, out, src / "expected" / "expected.json", (("exact", ["--exact"]),))
            subprocess.run(["rm", "-rf", str(out)], check=True)

    print("\n== what grows with the LLM (between the smallest and largest layer count)")
    for name in converters:
        runs = sorted((r for r in results["runs"] if r["converter"] == name),
                      key=lambda r: r["layers"])
        lo, hi = runs[0], runs[-1]
        per_layer = (hi["checkpoint_bytes"] - lo["checkpoint_bytes"]) / (hi["layers"] - lo["layers"])
        release = lo["checkpoint_bytes"] + per_layer * (RELEASE_LAYERS - lo["layers"])
        summary = {"release_checkpoint_bytes": release}
        # The whole run's peak, and the peaks of the steps that handle the LLM (the old
        # converter has no per-step split of what it holds: its state lives through every step).
        for scope in ("all", "2", "3"):
            if scope not in lo["peaks"] or scope not in hi["peaks"]:
                continue
            for kind in ("rss", "anon"):
                grow = hi["peaks"][scope][kind] - lo["peaks"][scope][kind]
                slope = grow / (hi["checkpoint_bytes"] - lo["checkpoint_bytes"])
                at_release = lo["peaks"][scope][kind] + slope * (release - lo["checkpoint_bytes"])
                summary[f"{scope}_{kind}"] = {"slope": slope, "release_peak": at_release}
                what = "whole run" if scope == "all" else f"step {scope}"
                print(f"  {name:8} {what:9} {kind:4}: peak {gb(lo['peaks'][scope][kind])} -> "
                      f"{gb(hi['peaks'][scope][kind])}; grows {slope:+.3f} x the checkpoint's "
                      f"bytes; at {RELEASE_LAYERS} layers ({gb(release)}): {gb(at_release)}")
        # Time: the steps that copy and convert the LLM (2, 3) scale with its bytes, from the
        # largest run; the others (imports, checks, tower, head) do not. Two small runs are
        # too close for a slope on this noisy machine.
        scale = release / hi["checkpoint_bytes"]
        seconds = {k: v * (scale if k in ("2", "3") else 1)
                   for k, v in hi["step_seconds"].items()}
        summary["release_step_seconds"] = seconds
        print(f"  {name:8} time at {RELEASE_LAYERS} layers: {sum(seconds.values()):.0f} s ("
              + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
        results[f"summary_{name}"] = summary
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults in {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
