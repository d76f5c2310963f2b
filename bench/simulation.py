"""Benchmark of the ``simulation`` analyzer: microseconds per SGD step per replica.

Run:  python bench/simulation.py [--quick]

For N in {1000, 10000}, K = M in {2, 4}, 1 and 32 replicas, and both backends
(compiled kernel and generic numpy path), the cost of a step is measured as the
difference of two runs of different lengths (so set-up, realisation of the initial
weights and eps_g are excluded; the short run lasts >= 0.25 s), each best of 3. The
reference is the flop bound of a step, about 6 K N flops (x = J xi, y = B xi,
J += ...), timed in this process as a
numpy matmul of the same size: X (8 x N) @ W (N x 3K) costs 8 * 6KN flops, so its
time per row is the time numpy's BLAS needs for one step's flops. ``ratio`` = step
time / that. A last line compares, in the same process, ``batchnorm_affine`` (gain and
shift trained) on the compiled kernel (through its ``scale_kernels()``) with the numpy
path, and a last one a two-layer network (trained readout, weight decay on both
layers, 'mean' output scale) on the compiled kernel with the committee machine. For
scale: the fastest public peer (C++) needs ~44 us a step at
N = 1000, K = M = 2; the target here is <= 5 us per step per replica.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout

import numpy as np

from framework import Experiment, TeacherStudent, get_analyzer
from plugins.simulation import HAVE_NUMBA


def flop_bound_us(N: int, K: int, repeats: int = 5) -> float:
    """Time (us) of 6 K N flops as a numpy matmul of the same size, per row."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, N))
    W = rng.standard_normal((N, 3 * K))
    best = np.inf
    for _ in range(repeats):
        n = 200
        t = time.perf_counter()
        for _ in range(n):
            X @ W
        best = min(best, (time.perf_counter() - t) / n / 8)
    return best * 1e6


def step_us(N: int, K: int, replicas: int, backend: str, steps: int,
            normalization: str = "plain", model: TeacherStudent | None = None) -> float:
    """us per step per replica of the analyzer (difference of two run lengths)."""
    model = TeacherStudent(K, K) if model is None else model
    ex = Experiment(model, normalization=normalization, eta=0.5, seed=0)

    def run(n: int) -> float:
        sim = get_analyzer("simulation", N=N, alpha=[0.0, n / N], replicas=replicas,
                           backend=backend, progress=False)
        t = time.perf_counter()
        sim.run(ex)
        return time.perf_counter() - t

    run(10)  # compile / warm up
    n = steps
    while run(n) < 0.25:  # long enough that timer and scheduler noise do not matter
        n *= 2
    short = min(run(n) for _ in range(3))
    long = min(run(3 * n) for _ in range(3))
    return (long - short) / (2 * n) / replicas * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    backends = ["numba", "numpy"] if HAVE_NUMBA else ["numpy"]
    print(f"{'backend':>7} {'N':>6} {'K=M':>4} {'replicas':>8} {'us/step/replica':>16} "
          f"{'flop-bound us':>14} {'ratio':>7}")
    for N in (1000, 10000):
        for K in (2, 4):
            bound = flop_bound_us(N, K)
            for backend in backends:
                for replicas in (1, 32):
                    work = 4e6 if backend == "numba" else 4e5
                    if backend == "numpy" and replicas == 1:
                        work /= 8
                    steps = max(20, int(scale * work / (N * K) * (1 if replicas == 1 else 0.25)))
                    us = step_us(N, K, replicas, backend, steps)
                    print(f"{backend:>7} {N:>6} {K:>4} {replicas:>8} {us:>16.2f} "
                          f"{bound:>14.3f} {us / bound:>7.1f}", flush=True)
    print("reference: fastest public peer (C++) ~44 us/step at N=1000, K=M=2; "
          "target <= 5 us/step/replica")
    if HAVE_NUMBA:  # a normalization with trained scale and shift, through scale_kernels()
        N, K = 1000, 2
        for replicas in (1, 32):
            work = 4e6 if replicas == 1 else 1e6
            fast = step_us(N, K, replicas, "numba", max(20, int(scale * work / (N * K))),
                           "batchnorm_affine")
            slow = step_us(N, K, replicas, "numpy", max(20, int(scale * work / (8 * N * K))),
                           "batchnorm_affine")
            print(f"batchnorm_affine (gamma, beta trained) N={N} K=M={K} replicas={replicas}: "
                  f"numba {fast:.2f} us/step/replica, numpy {slow:.2f}, "
                  f"numpy/numba {slow / fast:.1f}x", flush=True)
        two = TeacherStudent(K, K, second_layer="trained", eta_v=1.0, output_scale="mean",
                             weight_decay=0.01, weight_decay_v=0.01)
        for replicas in (1, 32):
            steps = max(20, int(scale * (4e6 if replicas == 1 else 1e6) / (N * K)))
            t2 = step_us(N, K, replicas, "numba", steps, model=two)
            t1 = step_us(N, K, replicas, "numba", steps)
            print(f"two-layer (trained readout, weight decay) N={N} K=M={K} "
                  f"replicas={replicas}: numba {t2:.2f} us/step/replica, committee "
                  f"machine {t1:.2f}, ratio {t2 / t1:.2f}", flush=True)


if __name__ == "__main__":
    main()
