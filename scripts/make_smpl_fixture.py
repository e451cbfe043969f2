#!/usr/bin/env python3
"""Expected outputs of the `smplx` package on a synthetic SMPL-format model, for the Rust LBS
parity test (tests/smpl.rs).

The synthetic model has every array SMPL's `.npz` layout has, at SMPL's full shapes, filled
with made-up values (no licensed data). Its posedirs alone are 17 MB of random numbers, so the
model is NOT committed: both this script and the Rust test build it from the same counter-based
generator (splitmix64 of `seed`, array number and element index; every value is computed with
exact or identical IEEE operations, so both sides get the same bits). What is committed is
`tests/fixtures/smpl/expected.npz` (seed, poses, betas, translations, and smplx's joints and
vertices) and `tests/fixtures/smpl/meta.json`.

    python -m venv venv && venv/bin/pip install -r scripts/requirements-smpl.txt
    venv/bin/python scripts/make_smpl_fixture.py [--out tests/fixtures/smpl] [--bench]

`--bench` also times smplx's forward pass (float32, batch 1, on the CPU) as the peer figure for
`cargo bench --bench smpl`.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import smplx

SEED = 20261125
NV, NJ, NF, NB, NP = 6890, 24, 13776, 10, 207
PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix(x):
    """splitmix64 of a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def raw(stream, n):
    """n uint64 hashes of (seed, stream, index)."""
    i = np.arange(n, dtype=np.uint64)
    key = np.uint64(SEED) ^ (np.uint64(stream) << np.uint64(48))
    return splitmix(key ^ i)


def uniform(stream, n):
    """n values in [-1, 1), multiples of 2^-23: exact in float32 and float64."""
    top = (raw(stream, n) >> np.uint64(40)).astype(np.float64)  # 24 bits
    return top / float(1 << 23) - 1.0


def synthetic_model():
    v_template = (uniform(1, NV * 3) * 0.5).reshape(NV, 3)
    shapedirs = (uniform(2, NV * 3 * NB) * 0.01).reshape(NV, 3, NB)
    posedirs = (uniform(3, NV * 3 * NP) * 0.005).reshape(NV, 3, NP)
    # Each joint: the mean of 8 hashed vertices (a repeat adds up), rows sum to exactly 1.
    J_regressor = np.zeros((NJ, NV))
    picks = (raw(4, NJ * 8) % np.uint64(NV)).astype(np.int64).reshape(NJ, 8)
    for j in range(NJ):
        for v in picks[j]:
            J_regressor[j, v] += 0.125
    # Each vertex: two hashed joints (maybe the same one), weights w and 1 - w.
    weights = np.zeros((NV, NJ))
    joints = (raw(5, NV * 2) % np.uint64(NJ)).astype(np.int64).reshape(NV, 2)
    w = 0.5 + 0.25 * uniform(6, NV)
    for v in range(NV):
        weights[v, joints[v, 0]] += w[v]
        weights[v, joints[v, 1]] += 1.0 - w[v]
    kintree_table = np.array(
        [[p if p >= 0 else 4294967295 for p in PARENTS], list(range(NJ))], dtype=np.uint32
    )
    f = (raw(7, NF * 3) % np.uint64(NV)).astype(np.uint32).reshape(NF, 3)
    return dict(
        v_template=v_template,
        shapedirs=shapedirs,
        posedirs=posedirs,
        J_regressor=J_regressor,
        weights=weights,
        kintree_table=kintree_table,
        f=f,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/smpl")
    ap.add_argument("--model-out", default="/tmp/synthetic_smpl.npz",
                    help="where the (uncommitted) synthetic model is written for smplx")
    ap.add_argument("--bench", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    model = synthetic_model()
    np.savez(args.model_out, **model)
    # smplx.SMPL reads only pickles from a path; the same arrays go in as its data_struct.
    def load(dtype):
        arrays = dict(np.load(args.model_out))
        return smplx.SMPL(args.model_out, data_struct=smplx.utils.Struct(**arrays), dtype=dtype)

    body = load(torch.float64)

    rng = np.random.default_rng(7)
    cases = 3
    global_orient = rng.uniform(-1.5, 1.5, (cases, 3))
    body_pose = rng.uniform(-0.8, 0.8, (cases, 69))
    body_pose[0] = 0.0  # case 0: only the global orientation
    betas = rng.uniform(-2.0, 2.0, (cases, NB))
    transl = rng.uniform(-1.0, 1.0, (cases, 3))
    # Inputs exact in float32, so the Rust side (float32 in) gets the same numbers.
    f32 = lambda a: a.astype(np.float32).astype(np.float64)
    global_orient, body_pose, betas, transl = map(f32, (global_orient, body_pose, betas, transl))
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    with torch.no_grad():
        out = body(betas=t(betas), body_pose=t(body_pose), global_orient=t(global_orient),
                   transl=t(transl), return_verts=True)
    joints = out.joints[:, :NJ].numpy()
    vertices = out.vertices.numpy()
    # The rest joints of each shape (no pose, no translation): FK starts from these.
    with torch.no_grad():
        rest = body(betas=t(betas), body_pose=t(np.zeros_like(body_pose)),
                    global_orient=t(np.zeros_like(global_orient))).joints[:, :NJ].numpy()

    np.savez_compressed(
        os.path.join(args.out, "expected.npz"),
        global_orient=global_orient.astype(np.float32),
        body_pose=body_pose.astype(np.float32),
        betas=betas.astype(np.float32),
        transl=transl.astype(np.float32),
        joints=joints.astype(np.float32),
        rest_joints=rest.astype(np.float32),
        vertices=vertices.astype(np.float32),
    )
    meta = {
        "seed": SEED,
        "generator": "splitmix64(seed ^ stream << 48 ^ index); uniform = (h >> 40) / 2^23 - 1",
        "smplx": smplx.__version__ if hasattr(smplx, "__version__") else "0.1.28",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cases": cases,
        "note": "poses/betas/transl are float32-exact inputs; smplx ran in float64",
    }
    with open(os.path.join(args.out, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
    print(f"wrote {args.out}/expected.npz ({cases} cases) and meta.json")

    if args.bench:
        b32 = load(torch.float32)
        inputs = dict(betas=torch.tensor(betas[:1], dtype=torch.float32),
                      body_pose=torch.tensor(body_pose[1:2], dtype=torch.float32),
                      global_orient=torch.tensor(global_orient[1:2], dtype=torch.float32))
        times = []
        with torch.no_grad():
            for _ in range(10):
                b32(**inputs)
            for _ in range(200):
                s = time.perf_counter()
                b32(**inputs)
                times.append(time.perf_counter() - s)
        times.sort()
        print(f"smplx SMPL forward (float32, batch 1, {torch.get_num_threads()} threads): "
              f"median {times[len(times) // 2] * 1e6:.0f} us, p90 {times[int(len(times) * 0.9)] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
