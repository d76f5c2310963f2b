"""Benchmark: a 32-point `dynamics` sweep on 1 vs 2 local Dask worker processes.

Prints the wall times (best of ``--repeat``) and the speed-up (target >= 1.8x on a
machine with >= 2 free cores), with the CPU time the workers used: "cores busy" below
the number of workers means other processes were competing for the cores. Each
cluster is started and warmed up (imports, JIT compilation) before the timed sweep,
so the ratio measures the sweep's execution, not process start-up; the end-to-end
time with a cold embedded cluster is printed too. If the `dynamics` analyzer is not
installed, a CPU-bound stand-in analyzer is used and the output says so.

    python bench/sweep.py [--alpha-max 1e4] [--K 6] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import ClassVar

# Benchmark the source tree this file is in (not whatever copy is installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attrs
import numpy as np
import xarray as xr

import framework
from framework import Analyzer, Experiment, TeacherStudent, hookimpl


@attrs.frozen
class Burn(Analyzer):
    """Stand-in: CPU-bound numpy work of a fixed amount per point."""

    name: ClassVar[str] = "burn"
    description: ClassVar[str] = "CPU-bound stand-in for dynamics (benchmark only)"
    steps: int = 400

    def run(self, experiment: Experiment) -> xr.Dataset:
        rng = experiment.rng(7)
        a = rng.standard_normal((150, 150))
        trace = []
        for _ in range(self.steps):
            a = np.tanh(a @ a.T / 150.0)
            trace.append(float(np.trace(a)))
        alpha = np.arange(self.steps, dtype=float)
        return xr.Dataset({"eps_g": ("alpha", np.asarray(trace),
                                     {"long_name": "stand-in", "units": "1"})},
                          coords={"alpha": alpha})


class BurnPlugin:
    @staticmethod
    @hookimpl
    def symphase_register_analyzers(registry):  # type: ignore[no-untyped-def]
        registry.add_analyzer(Burn)


def _cpu() -> float:
    return time.process_time()


def _warm(spec_json: str) -> int:
    """Run one small point on a worker: imports and JIT compilation happen here."""
    Experiment.from_json(spec_json).run()
    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha-max", type=float, default=1e4,
                        help="dynamics alpha_max (work per point)")
    parser.add_argument("--K", type=int, default=6, help="K = M of the model")
    parser.add_argument("--repeat", type=int, default=2,
                        help="timed sweeps per cluster; the best is kept")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    if "dynamics" in framework.list_analyzers():
        analyzer = {"name": "dynamics", "alpha_max": args.alpha_max}
        what = f"dynamics (K = M = {args.K}, alpha_max = {args.alpha_max:g})"
        warm = {"name": "dynamics", "alpha_max": 1.0, "n_points": 3}
    else:
        framework.register_plugin(BurnPlugin)
        analyzer = {"name": "burn"}
        what = "STAND-IN: 'dynamics' is not registered; a CPU-bound numpy analyzer"
        warm = {"name": "burn", "steps": 1}
    exp = Experiment(TeacherStudent(args.K, args.K), analyzers=[analyzer])
    grid = {"eta": [0.1 * (i + 1) for i in range(8)], "seed": [0, 1, 2, 3]}
    n = 8 * 4
    warm_json = Experiment(TeacherStudent(args.K, args.K), analyzers=[warm]).to_json()
    print(f"sweep of {n} points: {what}; cores: {os.cpu_count()}; "
          f"load average before: {os.getloadavg()[0]:.2f}")

    times = {}
    results = {}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            client.run(_warm, warm_json)
            if "burn" in analyzer["name"]:
                client.submit(_warm, warm_json, pure=False).result()
            best = (float("inf"), 0.0)
            for _ in range(args.repeat):
                cpu0 = client.run(_cpu)
                t = time.perf_counter()
                results[workers] = exp.sweep(grid, scheduler=client, progress=False)
                wall = time.perf_counter() - t
                cpu = sum(client.run(_cpu).values()) - sum(cpu0.values())
                best = min(best, (wall, cpu))
            times[workers], cpu = best
        print(f"  {workers} worker process(es): {times[workers]:7.2f} s "
              f"({times[workers] / n * 1e3:.0f} ms per point); worker CPU {cpu:.1f} s, "
              f"i.e. {cpu / times[workers]:.2f} cores busy")
    name = analyzer["name"]
    same = bool(results[1][name].identical(results[2][name]))
    speedup = times[1] / times[2]
    print(f"speed-up 1 -> 2 workers: {speedup:.2f}x (target >= 1.8x); "
          f"results identical: {same}; load average after: {os.getloadavg()[0]:.2f} "
          "(other processes competing for the cores lower the ratio)")

    t = time.perf_counter()
    exp.sweep(grid, workers=2, progress=False)
    print(f"end to end with a cold embedded 2-process cluster: "
          f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
