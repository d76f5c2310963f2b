"""The ``run``, ``show`` and ``plot`` subcommands of the ``symphase`` CLI.

``symphase run EXPERIMENT.toml [--out DIR] [--scheduler ADDR] [--workers N]``
    Run the experiment (and its ``[sweep]``) described by a TOML file (docs/toml.md);
    results go to DIR: the tasks' records in batch files ``points/*.points``
    (:mod:`framework.sweep.storage`; re-running resumes) and ``<analyzer>.nc`` combined.
    Exit status 1 if a point failed.
``symphase show FILE.nc``
    A readable summary: analyzer, specification, sweep, dimensions, variables with
    long_name/units, key scalars.
``symphase plot FILE.nc [-o FILE.png]``
    Figures chosen by the plugins (``symphase_plot`` hook), else by content
    (:mod:`framework.plotting`).

Bad input exits with status 2 and one line naming the field and the problem.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_commands", "out_file", "out_folder"]


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def out_folder(value: str | os.PathLike[str], arg: str, UsageError: type[Exception]) -> Path:
    """The output folder given as ``arg``, created; a one-line error if it cannot be.

    Refused: an existing file, a path under a file, a folder that cannot be created or
    written (the message names the argument, the path and the reason).
    """
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"'{arg}' {str(path)!r}: is a file, not a folder")
    _writable_folder(path, path, arg, UsageError)
    return path


def _writable_folder(folder: Path, path: Path, arg: str, UsageError: type[Exception]) -> None:
    """Create ``folder`` (for the argument ``arg`` naming ``path``) and check that it is
    writable; a one-line :class:`UsageError` naming the argument and the reason if not."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise UsageError(f"'{arg}' {str(path)!r}: {str(base)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = "" if folder == path else f" {str(folder)!r}"
        raise UsageError(f"'{arg}' {str(path)!r}: cannot create the folder{where} "
                         f"({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"'{arg}' {str(path)!r}: the folder is not writable")


def out_file(value: str | os.PathLike[str], arg: str, UsageError: type[Exception]) -> Path:
    """The output file given as ``arg``, its folder created; a one-line error if unusable."""
    path = Path(value)
    if path.is_dir():
        raise UsageError(f"'{arg}' {str(path)!r}: is a folder; give a file name")
    _writable_folder(path.parent, path, arg, UsageError)
    if path.exists() and not path.is_file():
        raise UsageError(f"'{arg}' {str(path)!r}: is not a regular file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"'{arg}' {str(path)!r}: the file is not writable")
    return path


def add_commands(sub: Any, UsageError: type[Exception]) -> None:
    """Attach ``run``, ``show`` and ``plot`` to the ``symphase`` parser."""

    def run(args: argparse.Namespace) -> int:
        return _cmd_run(args, UsageError)

    def show(args: argparse.Namespace) -> int:
        return _cmd_show(args, UsageError)

    def plot(args: argparse.Namespace) -> int:
        return _cmd_plot(args, UsageError)

    p = sub.add_parser("run", help="run an experiment or sweep described by a TOML file")
    p.add_argument("experiment", metavar="EXPERIMENT.toml", help="see docs/toml.md")
    p.add_argument("--out", default=None,
                   help="results folder (default: [run] out, else results/<file stem>)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="address of a dask.distributed scheduler, or processes, threads, "
                        "synchronous (default: [run] scheduler, else a local cluster)")
    p.add_argument("--workers", type=int, default=None,
                   help="workers of the local cluster (default: one per CPU)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--retry-failed", action="store_true",
                   help="recompute points stored as failed")
    p.set_defaults(func=run)

    p = sub.add_parser("show", help="summarize a stored result (.nc)")
    p.add_argument("file", metavar="FILE.nc")
    p.set_defaults(func=show)

    p = sub.add_parser("plot", help="plot a stored result (.nc)")
    p.add_argument("file", metavar="FILE.nc")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png",
                   help="image file (default: FILE.png next to the input)")
    p.set_defaults(func=plot)


# -- run ------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace, UsageError: type[Exception]) -> int:
    from framework._toml import read_toml

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"'--workers' must be >= 1, got {args.workers}")
    sweep, options = read_toml(args.experiment)
    if args.out:
        out = out_folder(args.out, "--out", UsageError)
    elif options.get("out") is not None:
        out = out_folder(options["out"], "[run] out", UsageError)
    else:
        out = out_folder(Path("results") / Path(args.experiment).stem, "--out", UsageError)
    scheduler = args.scheduler or options.get("scheduler")
    progress = args.progress if args.progress is not None else options.get("progress")
    results = sweep.run(
        results_dir=out, scheduler=scheduler,
        workers=args.workers if args.workers is not None else options.get("workers"),
        progress=progress, retry_failed=args.retry_failed or options.get("retry_failed", False),
    )
    status = 0
    for name, ds in results.items():
        failed = int(ds["sweep_failed"].sum())
        line = f"{name}: {sweep.size} point(s)"
        if failed:
            line += f", {failed} failed (see sweep_error)"
            status = 1
        print(f"{line} -> {Path(out) / f'{name}.nc'}")
    return status


# -- show -----------------------------------------------------------------------------
def _open(path: str, UsageError: type[Exception]) -> Any:
    from framework.io import load

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{path}: is a folder, not a netCDF file")
    if p.exists() and not p.is_file():
        raise UsageError(f"{path}: is not a regular file")
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return load(p)
    except Exception as exc:
        raise UsageError(f"{path}: not a readable netCDF file ({type(exc).__name__})") from None


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    return str(value)


def _spec_lines(spec: dict[str, Any]) -> list[str]:
    model = spec.get("model", {})
    lines = []
    T = model.get("T")
    if isinstance(T, list) and len(T) <= 1000 and T == np.eye(len(T)).tolist():
        t_text = "identity"
    else:
        t_text = json.dumps(T)
        t_text = t_text if len(t_text) <= 200 else t_text[:200] + "..."
    lines.append(
        f"model: K={model.get('K')} M={model.get('M')} activation={model.get('activation')} "
        f"noise={_fmt(model.get('noise'))} T={t_text} second_layer={model.get('second_layer')}"
        + "".join(f" {k}={json.dumps(model[k])}" for k in (
            "output_scale", "eta_v", "weight_decay", "weight_decay_v", "student_readout",
            "teacher_readout") if k in model)
    )
    norm = dict(spec.get("normalization", {}))
    name = norm.pop("name", "?")
    params = " ".join(f"{k}={v}" for k, v in sorted(norm.items()))
    lines.append(f"normalization: {name}{' ' + params if params else ''}")
    for a in spec.get("analyzers", []):
        a = dict(a)
        opts = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(a.items()) if k != "name")
        lines.append(f"analyzer: {a.get('name')} {opts}".rstrip())
    init = spec.get("init")
    init_text = init if isinstance(init, str) else "order parameters"
    lines.append(
        " ".join(f"{k}={_fmt(spec[k])}" for k in ("eta", "batch_size", "seed", "init_scale",
                                                    "init_N") if k in spec)
        + f" init={init_text}"
    )
    return lines


def _cmd_show(args: argparse.Namespace, UsageError: type[Exception]) -> int:
    print(summary(_open(args.file, UsageError), args.file))
    return 0


def summary(ds: Any, path: str = "") -> str:
    """A readable multi-line summary of a stored result."""
    from framework.plotting import sweep_dims

    out = []
    analyzer = ds.attrs.get("symphase_analyzer")
    head = f"{path}: " if path else ""
    version = ds.attrs.get("symphase_version")
    out.append(f"{head}analyzer {analyzer or '(unknown)'}"
               + (f", symphase {version}" if version else ""))
    text = ds.attrs.get("symphase_spec_json")
    if isinstance(text, str):
        label = "base specification" if sweep_dims(ds) else "specification"
        try:
            spec = json.loads(text)
            lines = _spec_lines(spec) if isinstance(spec, dict) else None
        except RecursionError:
            lines = ["(not shown: the stored JSON is nested too deeply)"]
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            lines = [f"(not shown: the stored JSON is not a specification: "
                     f"{type(exc).__name__})"]
        if lines is None:
            lines = ["(not shown: the stored JSON is not a mapping)"]
        out.append(f"{label}:")
        out += [f"  {line}" for line in lines]
    sweeps = sweep_dims(ds)
    if sweeps:
        out.append("sweep:")
        for d in sweeps:
            values = ", ".join(_fmt(v) for v in ds[d].values.tolist())
            out.append(f"  {d} ({ds.sizes[d]}): {values}")
        if "sweep_failed" in ds:
            failed = int(ds["sweep_failed"].sum())
            out.append(f"  points: {int(np.prod([ds.sizes[d] for d in sweeps]))}, "
                       f"failed: {failed}")
    dims = ", ".join(f"{d}={n}" for d, n in ds.sizes.items())
    out.append(f"dimensions: {dims or '(none)'}")
    coords = [c for c in ds.coords if c not in ds.dims]
    if coords:
        out.append("coordinates: " + ", ".join(
            f"{c}{'(' + ', '.join(map(str, ds[c].dims)) + ')' if ds[c].dims else ''}"
            for c in coords))
    out.append("variables:")
    width = max((len(str(n)) for n in ds.data_vars), default=0)
    for name, var in ds.data_vars.items():
        dims_text = f"({', '.join(map(str, var.dims))})" if var.dims else "()"
        long_name = var.attrs.get("long_name", "")
        units = var.attrs.get("units", "")
        unit_text = f" [{units}]" if units else ""
        out.append(f"  {name!s:<{width}}  {dims_text}  {long_name}{unit_text}  {var.dtype}")
    scalars = _key_scalars(ds)
    if scalars:
        out.append("key scalars:")
        out += [f"  {line}" for line in scalars]
    return "\n".join(out)


def _key_scalars(ds: Any) -> list[str]:
    lines = []
    for name, var in ds.data_vars.items():
        if var.dtype.kind not in "biuf":
            continue
        if var.ndim == 0:
            lines.append(f"{name} = {_fmt(var.item())}")
        elif var.dtype == bool and var.size:
            lines.append(f"{name}: {int(var.sum())} of {var.size} true")
        elif "alpha" in var.dims and var.dims == ("alpha",):
            finite = var.values[np.isfinite(var.values)]
            if finite.size:
                lines.append(f"{name}: first {_fmt(finite[0])}, last {_fmt(finite[-1])}, "
                             f"min {_fmt(finite.min())}")
    plain = [k for k, v in ds.attrs.items()
             if not k.startswith(("symphase_", "spec.", "sweep.", "convention"))
             and isinstance(v, int | float | np.integer | np.floating)]
    lines += [f"{k} = {_fmt(ds.attrs[k])} (attr)" for k in plain[:12]]
    return lines


# -- plot -----------------------------------------------------------------------------
def _cmd_plot(args: argparse.Namespace, UsageError: type[Exception]) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is in the 'plot' extra
        raise UsageError("'plot' needs matplotlib (pip install 'symphase[plot]')") from None
    from framework.manager import plugin_manager
    from framework.plotting import plot_dataset

    ds = _open(args.file, UsageError)
    output = out_file(args.output if args.output else Path(args.file).with_suffix(".png"),
                      "-o" if args.output else "FILE.png next to the input", UsageError)
    figure = Figure()
    drawn = plugin_manager().hook.symphase_plot(dataset=ds, figure=figure)
    if not drawn and not plot_dataset(ds, figure):
        raise UsageError(
            f"{args.file}: nothing to plot (no variable over 'alpha', no 'eigenvalue', no "
            "variable over a numeric sweep dimension)"
        )
    try:
        figure.savefig(output, dpi=120)
    except ValueError as exc:  # e.g. an unknown image format
        raise UsageError(f"'-o' {str(output)!r}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"'-o' {str(output)!r}: cannot write ({exc.strerror or exc})") from None
    print(output)
    return 0
