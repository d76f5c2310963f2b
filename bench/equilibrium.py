"""Benchmark: fixedpoint + hessian for K = M = 2 ... 32 (plain, erf, T = I, eta = 0).

For each K, in a fresh process (so that its peak memory is its own): the wall time of
one ``Experiment.run()`` with the ``fixedpoint`` and ``hessian`` analyzers (warm: after a
first run has compiled the kernels and filled the per-model caches, with the branch
cache emptied), with the branch search shared by the two
analyzers (the default) and, as the baseline in the same process, with the search run
once per analyzer (the cache emptied between them); the ratio baseline / shared; the
peak resident memory of the process; the plateau's lambda_min (the same in both runs).

Targets (issue 16): K = 10 under 1 s, K = 20 under 5 s, memory under 1 GiB.

Run: ``python bench/equilibrium.py [K ...]`` (default 2 4 8 16 32; K = 32 takes about a
minute).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def one(K: int) -> dict[str, float]:
    from framework import Experiment, TeacherStudent
    from plugins import equilibrium as peq

    def experiment(k: int) -> Experiment:
        return Experiment(TeacherStudent(k, k), eta=0.1, seed=0, analyzers=[
            {"name": "fixedpoint", "eta": 0.0}, {"name": "hessian", "eta": 0.0}])

    experiment(K).run()  # warm: kernels compiled or loaded, per-model caches filled
    peq._BRANCH_CACHE.clear()
    t0 = time.perf_counter()
    res = experiment(K).run()
    shared = time.perf_counter() - t0
    fixedpoint_analyzer, hessian_analyzer = experiment(K).analyzers
    peq._BRANCH_CACHE.clear()
    t0 = time.perf_counter()
    fixedpoint_analyzer.run(experiment(K))
    peq._BRANCH_CACHE.clear()  # the baseline: each analyzer searches on its own
    hessian_analyzer.run(experiment(K))
    unshared = time.perf_counter() - t0
    h = res["hessian"]
    b = int(h.attrs["plateau_branch"])
    return {
        "K": K, "shared_s": shared, "unshared_s": unshared,
        "peak_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "lambda_min": float(h.lambda_min[b]) if b >= 0 else float("nan"),
        "branches": int(h.sizes["branch"]),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        print(json.dumps(one(int(argv[1]))))
        return 0
    Ks = [int(k) for k in argv] or [2, 4, 8, 16, 32]
    print(__doc__.split("\n\n")[1] + "\n")
    print(f"{'K':>3} {'branches':>8} {'shared s':>9} {'per-analyzer s':>15} {'ratio':>6} "
          f"{'peak MiB':>9} {'lambda_min':>12}")
    for K in Ks:
        out = subprocess.run([sys.executable, __file__, "--one", str(K)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['K']:>3} {r['branches']:>8} {r['shared_s']:>9.2f} {r['unshared_s']:>15.2f} "
              f"{r['unshared_s'] / r['shared_s']:>6.2f} {r['peak_MiB']:>9.0f} "
              f"{r['lambda_min']:>12.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
