"""Benchmark of the ``simulation`` analyzer: the Gaussian stream and us per SGD step.

Run:  python bench/simulation.py [--quick] [--rounds R] [--skip-table]

Everything is measured in this process and reported as the median over ``rounds``
interleaved rounds (every configuration once per round), because the machine may be
shared: a slow spell then hits all configurations of a round alike.

1. The Gaussian stream, ns per normal, 2^20 normals of one key: the input stream of
   the simulation (``fill_nb``: SplitMix64 words through numpy's 256-layer ziggurat, a
   branch-free SIMD pass for the fast path and a second pass for the 1.5 % it
   rejects), the same numbers one at a time (a compiled loop over ``normal_nb``, the
   kernel's previous way), numpy's ``Generator.standard_normal`` (PCG64 and SFC64,
   numpy's scalar ziggurat) and ``normals_numpy`` (the stream's numpy-vectorized
   ziggurat, the generic path without numba).
2. us per step at N = 1000, K = M = 2, one replica, compiled kernel, against the bound
   of a step including its draws: N normals at the measured stream cost plus 6 K N
   flops (x = J xi, y = B xi, J += ...) timed as a numpy matmul of the same size
   (X (8 x N) @ W (N x 3K) costs 8 * 6KN flops; its time per row).
3. us per replica-step at N = 10000, K = M = 8: 1 and 32 replicas, 1 and 2 threads
   (the ``threads`` option; the default is ``default_threads()``, the usable CPUs),
   timing the kernel's stepper alone (see ``kernel_step_us``).
4. Unless ``--skip-table``: the table of N in {1000, 10000}, K = M in {2, 4}, 1 and 32
   replicas and both backends, with the same bound; then ``batchnorm_affine`` (gain and
   shift trained) on the compiled kernel against the numpy path, and a two-layer
   network (trained readout, weight decay on both layers, 'mean' output scale) against
   the committee machine, both on the compiled kernel.

A step's cost is the difference of two runs of different lengths (so set-up, the
realisation of the initial weights and eps_g are excluded; the steps of the short run
last >= 0.25 s and >= the set-up), each the median of 3. For scale: the fastest public
peer (C++) needs ~44 us a step at N = 1000, K = M = 2; the target here is <= 5 us per
step per replica.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout

import numpy as np

from framework import Experiment, TeacherStudent, get_analyzer
from plugins import simulation as simmod
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


def stream_ns(rounds: int, count: int = 1 << 20) -> dict[str, float]:
    """Median ns per normal of each generator over interleaved rounds."""
    key = np.uint64(12345)
    out = np.empty(count)
    pcg = np.random.Generator(np.random.PCG64(0))
    sfc = np.random.Generator(np.random.SFC64(0))
    gens: dict[str, Callable[[], object]] = {}
    if HAVE_NUMBA:
        scalar = simmod.fill_one_at_a_time_nb
        gens["stream (fill_nb, SIMD ziggurat)"] = lambda: simmod.fill_nb(key, np.uint64(0), out)
        gens["same numbers one at a time"] = lambda: scalar(key, np.uint64(0), out)
    gens["numpy standard_normal PCG64"] = lambda: pcg.standard_normal(out=out)
    gens["numpy standard_normal SFC64"] = lambda: sfc.standard_normal(out=out)
    small = count // 16  # the numpy twin is slow; fewer numbers
    gens["normals_numpy (numpy-vectorized)"] = lambda: simmod.normals_numpy(
        np.array([key]), 0, small)
    sizes = {name: (small if name.startswith("normals_numpy") else count) for name in gens}
    for fn in gens.values():
        fn()  # compile / warm up
    times: dict[str, list[float]] = {name: [] for name in gens}
    for _ in range(rounds):
        for name, fn in gens.items():
            reps = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                reps.append(time.perf_counter() - t)
            times[name].append(min(reps) / sizes[name] * 1e9)
    return {name: float(np.median(v)) for name, v in times.items()}


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
    setup = run(1)  # set-up (realisation of the weights, eps_g): ~2 s at 32 x N = 10000
    n = steps
    # the steps of the short run last >= 0.25 s and >= the set-up, so that timer,
    # scheduler and set-up noise do not swamp the difference
    while run(n) - setup < max(0.25, setup):
        n *= 2
    short = float(np.median([run(n) for _ in range(3)]))
    long = float(np.median([run(3 * n) for _ in range(3)]))
    return (long - short) / (2 * n) / replicas * 1e6


def kernel_step_us(N: int, K: int, replicas: int, threads: int, steps: int) -> float:
    """us per replica-step of the compiled kernel's stepper alone, as ``run`` drives it
    (``chunk`` steps per call, all replicas per call). The analyzer's set-up (the
    realisation of the initial weights: a QR per replica, ~2 s for 32 replicas at
    N = 10000 on a loaded machine) is too noisy at many replicas for the difference of
    two runs; a step's cost does not depend on the weights' values."""
    ex = Experiment(TeacherStudent(K, K), normalization="plain", eta=0.5, seed=0)
    sim = simmod.Simulation(N=N, replicas=replicas, backend="numba", progress=False,
                            threads=threads)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((replicas, 2 * K, N))
    keys = rng.integers(0, 2**63, size=(replicas, 2)).astype(np.uint64)
    stepper = simmod._KernelStepper(sim, ex, W, keys, {}, np.ones((replicas, K)))
    try:
        stepper.advance(0, 1)  # compile / warm up
        step = 1
        t = time.perf_counter()
        while step <= steps:
            n = min(stepper.chunk, steps + 1 - step)
            stepper.advance(step, n)
            step += n
        return (time.perf_counter() - t) / steps / replicas * 1e6
    finally:
        stepper.close()


def interleaved(configs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each configuration over ``rounds`` rounds, each running all once."""
    vals: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            vals[name].append(fn())
    return {name: float(np.median(v)) for name, v in vals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--skip-table", action="store_true",
                        help="only the stream, the K = 2 step and the replica/thread lines")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    rounds = max(1, args.rounds)

    print(f"1. Gaussian stream, ns per normal (median of {rounds} interleaved rounds)")
    ns = stream_ns(rounds)
    for name, value in ns.items():
        print(f"   {name:36s} {value:7.2f} ns", flush=True)
    ns_normal = ns.get("stream (fill_nb, SIMD ziggurat)",
                       ns["normals_numpy (numpy-vectorized)"])

    def bound_us(N: int, K: int) -> tuple[float, float]:
        """(flops-only bound, bound including N draws) of one step, us."""
        flops = flop_bound_us(N, K)
        return flops, flops + N * ns_normal * 1e-3

    if not HAVE_NUMBA:
        print("numba is not installed: the compiled kernel is not measured")
        return
    N, K = 1000, 2
    flops, bound = bound_us(N, K)
    steps = max(20, int(scale * 4e6 / (N * K)))
    res = interleaved({"k2": functools.partial(step_us, N, K, 1, "numba", steps)}, rounds)
    print(f"2. N={N} K=M={K}, 1 replica, compiled kernel: {res['k2']:.2f} us/step; bound "
          f"{bound:.2f} us = draws {N} x {ns_normal:.2f} ns + flops {flops:.3f} us "
          f"(ratio {res['k2'] / bound:.2f}; flops-only ratio {res['k2'] / flops:.1f})",
          flush=True)

    N, K = 10000, 8
    flops, bound = bound_us(N, K)
    configs: dict[str, Callable[[], float]] = {}
    for replicas in (1, 32):
        for threads in (1, 2):
            if replicas == 1 and threads == 2:
                continue  # one replica runs on one thread
            steps = max(20, int(scale * 6e7 / (replicas * N * K)))  # ~0.5 s a replica-step
            configs[f"{replicas}/{threads}"] = functools.partial(
                kernel_step_us, N, K, replicas, threads, steps)
    res = interleaved(configs, rounds)
    print(f"3. N={N} K=M={K}, compiled kernel, us per replica-step (bound per replica-step "
          f"on one thread {bound:.1f} us incl. draws, flops {flops:.2f} us; default "
          f"threads here {simmod.default_threads()})")
    for name, us in res.items():
        n_rep, n_thr = name.split("/")
        print(f"   replicas={n_rep:>2} threads={n_thr}: {us:8.1f} us/replica-step "
              f"(x{us / res['1/1']:.2f} of one replica on one thread)", flush=True)
    if args.skip_table:
        return

    print(f"4. {'backend':>7} {'N':>6} {'K=M':>4} {'replicas':>8} {'us/step/replica':>16} "
          f"{'bound us':>9} {'ratio':>6} {'flops us':>9} {'ratio':>7}")
    for N in (1000, 10000):
        for K in (2, 4):
            flops, bound = bound_us(N, K)
            for backend in ("numba", "numpy"):
                for replicas in (1, 32):
                    work = 4e6 if backend == "numba" else 4e5
                    if backend == "numpy" and replicas == 1:
                        work /= 8
                    steps = max(20, int(scale * work / (N * K) * (1 if replicas == 1 else 0.25)))
                    us = step_us(N, K, replicas, backend, steps)
                    print(f"   {backend:>7} {N:>6} {K:>4} {replicas:>8} {us:>16.2f} "
                          f"{bound:>9.2f} {us / bound:>6.2f} {flops:>9.3f} {us / flops:>7.1f}",
                          flush=True)
    print("   reference: fastest public peer (C++) ~44 us/step at N=1000, K=M=2; "
          "target <= 5 us/step/replica")
    N, K = 1000, 2
    for replicas in (1, 32):
        work = 4e6 if replicas == 1 else 1e6
        fast = step_us(N, K, replicas, "numba", max(20, int(scale * work / (N * K))),
                       "batchnorm_affine")
        slow = step_us(N, K, replicas, "numpy", max(20, int(scale * work / (8 * N * K))),
                       "batchnorm_affine")
        print(f"   batchnorm_affine (gamma, beta trained) N={N} K=M={K} replicas={replicas}: "
              f"numba {fast:.2f} us/step/replica, numpy {slow:.2f}, "
              f"numpy/numba {slow / fast:.1f}x", flush=True)
    two = TeacherStudent(K, K, second_layer="trained", eta_v=1.0, output_scale="mean",
                         weight_decay=0.01, weight_decay_v=0.01)
    for replicas in (1, 32):
        steps = max(20, int(scale * (4e6 if replicas == 1 else 1e6) / (N * K)))
        t2 = step_us(N, K, replicas, "numba", steps, model=two)
        t1 = step_us(N, K, replicas, "numba", steps)
        print(f"   two-layer (trained readout, weight decay) N={N} K=M={K} "
              f"replicas={replicas}: numba {t2:.2f} us/step/replica, committee "
              f"machine {t1:.2f}, ratio {t2 / t1:.2f}", flush=True)


if __name__ == "__main__":
    main()
