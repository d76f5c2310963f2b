"""Benchmark: start-up costs of symphase, each as a fresh process (issue 16, item 3).

Prints the wall time (median of ``--repeat`` fresh subprocesses) of

* ``python -c pass`` -- the baseline: the interpreter's own start-up;
* ``python -c "import framework"`` (target: under 0.5 s on a warm OS cache);
* a whole ``symphase run`` of a small K = M = 2 ``dynamics`` experiment (TOML written to a
  temporary directory, synchronous scheduler, a fresh results folder every time), after
  one untimed warm-up run so that numba's on-disk kernel cache is filled;

and the ratios of the last two to the baseline. The processes import the source tree this
file is in (``PYTHONPATH``, run from that folder), not whatever copy is installed.

    python bench/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMALL_TOML = """\
eta = 0.5

[model]
K = 2
M = 2

[analyzers.dynamics]
alpha_max = 20.0
n_points = 21

[run]
scheduler = "synchronous"
progress = false
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _time(cmd: list[str], repeat: int, fresh_out: Path | None = None) -> float:
    """Median wall time of ``repeat`` runs of ``cmd`` (each in a new process).

    With ``fresh_out``, ``--out <fresh_out>/<i>`` is appended (a new results folder per
    run, so that no run skips stored points)."""
    times = []
    for i in range(repeat):
        full = cmd if fresh_out is None else [*cmd, "--out", str(fresh_out / f"run{i}")]
        t0 = time.perf_counter()
        subprocess.run(full, check=True, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="symphase-startup-") as tmp:
        tmpdir = Path(tmp)
        toml = tmpdir / "small.toml"
        toml.write_text(SMALL_TOML)
        run = [py, "-c", "import sys; from framework.cli import main; sys.exit(main())",
               "run", str(toml)]
        # warm-up: numba kernels compiled or loaded from the disk cache, OS cache filled
        subprocess.run([*run, "--out", str(tmpdir / "warmup")], check=True, env=_env(),
                       cwd=ROOT, stdout=subprocess.DEVNULL)
        base = _time([py, "-c", "pass"], args.repeat)
        imp = _time([py, "-c", "import framework"], args.repeat)
        whole = _time(run, args.repeat, fresh_out=tmpdir)
    print(f"median of {args.repeat} fresh processes (wall time)")
    print(f"  python -c pass              {base:7.3f} s   (baseline)")
    print(f"  python -c 'import framework' {imp:6.3f} s   {imp / base:6.1f}x baseline"
          f"   (target < 0.5 s)")
    print(f"  symphase run small K=2 TOML {whole:7.3f} s   {whole / base:6.1f}x baseline"
          f"   (warm numba cache)")


if __name__ == "__main__":
    main()
