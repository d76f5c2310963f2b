"""Benchmark: a 32-point `dynamics` sweep on 1 vs 2 local Dask worker processes.

Prints the wall times (best of ``--repeat``) and the speed-up (target >= 1.8x on a
machine with >= 2 free cores), with the CPU time the workers used: "cores busy" below
the number of workers means other processes were competing for the cores. Each
cluster is started and warmed up (imports, JIT compilation) before the timed sweep,
so the ratio measures the sweep's execution, not process start-up; the end-to-end
time with a cold embedded cluster is printed too. If the `dynamics` analyzer is not
installed, a CPU-bound stand-in analyzer is used and the output says so.

Then the per-point overhead of the sweep machinery on small points (``--points`` of
a cheap analyzer, `dynamics` with ``alpha_max = --small-alpha-max`` or a tiny stand-in):
a plain Python loop ``Experiment.run()`` over the same points in this process is the
baseline; the sweep runs synchronously and on the warmed 2-worker cluster, each with
and without a results directory (a fresh one every time, so every point is computed
and stored in batch files, and the combined file written; the folders are made and
removed outside the timed runs). ``--rounds`` interleaved rounds, each sweep's ratio
to the mean of its round's loops. Printed: median ms per point, the median ratio to the
baseline and its range (target: with a results directory within 2x of the loop), what
storage adds per point, and the median CPU time per point (of this process, and for the
2-worker rows of this process plus the workers). The load average is printed: on a
machine whose cores other processes use, the 2-worker rows measure the competition, not
the sweep.

    python bench/sweep.py [--alpha-max 1e4] [--K 6] [--repeat 2] [--points 64]
    python bench/sweep.py --overhead-only [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
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


@attrs.frozen
class Tiny(Analyzer):
    """Stand-in for a small point: a few scalars and a short trajectory, no work."""

    name: ClassVar[str] = "tiny"
    description: ClassVar[str] = "instant stand-in for a small point (benchmark only)"

    def run(self, experiment: Experiment) -> xr.Dataset:
        alpha = np.linspace(0.0, 1.0, 8)
        return xr.Dataset({"eps_g": ("alpha", np.exp(-experiment.eta * alpha),
                                     {"long_name": "stand-in", "units": "1"})},
                          coords={"alpha": alpha})


class BurnPlugin:
    @staticmethod
    @hookimpl
    def symphase_register_analyzers(registry):  # type: ignore[no-untyped-def]
        registry.add_analyzer(Burn)
        registry.add_analyzer(Tiny)


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
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of the per-point overhead measurement")
    parser.add_argument("--points", type=int, default=64,
                        help="points of the per-point overhead measurement")
    parser.add_argument("--small-alpha-max", type=float, default=1.0,
                        help="dynamics alpha_max of a small point (overhead measurement)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the per-point overhead measurement")
    args = parser.parse_args()
    if not args.overhead_only:
        scaling(args)
    overhead(args)


def scaling(args: argparse.Namespace) -> None:
    """1 vs 2 worker processes on a CPU-bound sweep."""
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


def _timed(fn, cpu):  # type: ignore[no-untyped-def]
    """``(wall seconds, CPU seconds)`` of ``fn()``; ``cpu()`` is read outside the wall time."""
    c = cpu()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    return wall, cpu() - c


def overhead(args: argparse.Namespace) -> None:
    """Per-point cost of a sweep of small points, with and without storage.

    ``--rounds`` interleaved rounds; each round times the plain loop before, between
    and after the sweeps, and each sweep's ratio is to the mean of that round's loops,
    so that a load change between rounds cancels. Printed per configuration: the
    median wall time and ratio over the rounds (and the ratios' range), and the median
    CPU time per point.
    """
    import statistics

    from distributed import Client, LocalCluster

    framework.register_plugin(BurnPlugin)
    if "dynamics" in framework.list_analyzers():
        analyzer = {"name": "dynamics", "alpha_max": args.small_alpha_max, "n_points": 8}
        what = f"dynamics (K = M = 2, alpha_max = {args.small_alpha_max:g}, 8 points)"
    else:
        analyzer = {"name": "tiny"}
        what = "STAND-IN 'tiny' ('dynamics' is not registered)"
    exp = Experiment(TeacherStudent(2, 2), analyzers=[analyzer])
    n_seed = 4
    grid = {"eta": [0.05 * (i + 1) for i in range(max(1, args.points // n_seed))],
            "seed": list(range(n_seed))}
    sweep = framework.Sweep(exp, grid)
    points = [e for _, e in sweep.points()]
    n = len(points)
    load_before = os.getloadavg()[0]
    print(f"\nper-point overhead, {n} small points: {what}; {args.rounds} interleaved "
          f"rounds; load average before: {load_before:.2f}")
    for e in points[:2]:
        e.run()  # warm up this process

    labels = [("sweep synchronous", False), ("sweep synchronous", True),
              ("sweep on 2 warm worker processes", False),
              ("sweep on 2 warm worker processes", True)]
    walls: dict[tuple[str, bool], list[float]] = {k: [] for k in labels}
    ratios: dict[tuple[str, bool], list[float]] = {k: [] for k in labels}
    cpus: dict[tuple[str, bool], list[float]] = {k: [] for k in labels}
    totals: dict[tuple[str, bool], list[float]] = {k: [] for k in labels}
    loops: list[float] = []
    loop_cpus: list[float] = []
    with (LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                       dashboard_address=":0") as cluster, Client(cluster) as client,
          tempfile.TemporaryDirectory() as parent):
        folders = (Path(parent) / str(i) for i in itertools.count())
        sweep.run(scheduler=client, progress=False)  # warm the workers
        sweep.run(scheduler=client, progress=False, results_dir=next(folders))

        def all_cpu() -> float:  # CPU seconds of this process and of the workers
            return time.process_time() + sum(client.run(time.process_time).values())

        def loop() -> None:
            wall, used = _timed(lambda: [e.run() for e in points], time.process_time)
            round_loops.append(wall)
            loop_cpus.append(used)

        for _ in range(args.rounds):
            round_loops: list[float] = []
            timings = {}
            loop()
            for label, store in labels:
                kw = {"scheduler": "synchronous" if "synchronous" in label else client}
                # every run stores into a fresh, empty folder (made and removed untimed)
                folder = next(folders) if store else None
                cpu = time.process_time if "synchronous" in label else all_cpu
                proc0 = time.process_time()
                timings[label, store] = (*_timed(
                    lambda: sweep.run(results_dir=folder, progress=False, **kw),  # noqa: B023
                    cpu), time.process_time() - proc0)
                if store:
                    loop()
            base = statistics.fmean(round_loops)
            loops.extend(round_loops)
            for key, (wall, used, here) in timings.items():
                walls[key].append(wall)
                ratios[key].append(wall / base)
                cpus[key].append(here)
                totals[key].append(used)

    def ms(values: list[float]) -> float:
        return statistics.median(values) / n * 1e3

    loop_ms = ms(loops)
    print(f"  {'':<52} {'wall':>8} {'':<12} {'ratio (range)':>20}   CPU ms per point")
    print(f"  {'plain loop over Experiment.run() (baseline)':<52} {loop_ms:8.2f} ms per "
          f"point  {1.0:6.2f}x the loop {'':>13}   this process {ms(loop_cpus):.2f}")
    for label, store in labels:
        key = (label, store)
        r = ratios[key]
        where = f"this process {ms(cpus[key]):.2f}"
        if "synchronous" not in label:
            where += f", with the workers {ms(totals[key]):.2f}"
        print(f"  {label + (', with' if store else ', no') + ' results_dir':<52} "
              f"{ms(walls[key]):8.2f} ms per point  {statistics.median(r):6.2f}x the loop "
              f"({min(r):.2f}-{max(r):.2f})   {where}")
    for label in ("sweep synchronous", "sweep on 2 warm worker processes"):
        extra = ms(walls[label, True]) - ms(walls[label, False])
        print(f"  storage adds {extra:+.2f} ms per point ({extra / loop_ms:+.2f}x the loop), "
              f"{label}")
    print(f"  (target: with results_dir <= 2x the loop (median ratio); load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} "
          "cores; 2 workers and this process (client and scheduler) share the cores: on 2 "
          "cores the 2-worker wall time is at least their CPU time / 2, and other processes' "
          "load slows the loop and the sweeps unevenly)")


if __name__ == "__main__":
    main()
