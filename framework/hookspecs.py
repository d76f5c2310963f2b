"""Hook specifications: the one place where symphase's hooks are declared.

Every hook is called with keyword arguments only. A plugin implements any subset
of them with functions marked by :data:`framework.hookimpl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import xarray as xr

    from framework.analyzer import Analyzer
    from framework.experiment import Experiment
    from framework.registry import Registry

hookspec = pluggy.HookspecMarker("symphase")


@hookspec
def symphase_register_models(registry: Registry) -> None:
    """Register model classes.

    Call ``registry.add_model(cls)`` for each :class:`~framework.Model` subclass the
    plugin provides; an experiment then names it as ``{"model": {"name": cls.name,
    ...}}``.

    Parameters
    ----------
    registry : Registry
        The registry being built; it validates each class (a concrete ``Model``
        subclass with a ``name`` and a ``description``) and rejects duplicate names.

    Returns
    -------
    None

    Fires
    -----
    Once per plugin when the registry is built (first look-up, or after
    :func:`framework.refresh_plugins`), before the plugin's other registration hooks;
    built-in plugins first, then entry points, then plugins registered at run time.
    """


@hookspec
def symphase_register_normalizations(registry: Registry) -> None:
    """Register normalization classes.

    Call ``registry.add_normalization(cls)`` for each
    :class:`~framework.Normalization` subclass the plugin provides.

    Parameters
    ----------
    registry : Registry
        The registry being built; it validates each class and rejects duplicate
        names.

    Returns
    -------
    None

    Fires
    -----
    Once per plugin when the registry is built (first look-up, or after
    :func:`framework.refresh_plugins`), built-in plugins first, then entry points,
    then plugins registered at run time.
    """


@hookspec
def symphase_register_analyzers(registry: Registry) -> None:
    """Register analyzer classes.

    Call ``registry.add_analyzer(cls)`` for each :class:`~framework.Analyzer`
    subclass the plugin provides.

    Parameters
    ----------
    registry : Registry
        The registry being built.

    Returns
    -------
    None

    Fires
    -----
    Once per plugin when the registry is built, in the same order as
    :func:`symphase_register_normalizations`.
    """


@hookspec
def symphase_register_activations(registry: Registry) -> None:
    """Register activation functions.

    Call ``registry.add_activation(activation)`` with :class:`~framework.Activation`
    instances.

    Parameters
    ----------
    registry : Registry
        The registry being built.

    Returns
    -------
    None

    Fires
    -----
    Once per plugin when the registry is built.
    """


@hookspec
def symphase_register_learning_rules(registry: Registry) -> None:
    """Register learning-rule classes.

    Call ``registry.add_learning_rule(cls)`` for each :class:`~framework.LearningRule`
    subclass the plugin provides; an experiment then names it as
    ``learning_rule="natural_gradient"`` or ``{"name": ..., **options}``.

    Parameters
    ----------
    registry : Registry
        The registry being built; it validates each class (a subclass of
        ``LearningRule`` implementing ``rates`` and ``direction``, with a ``name`` and a
        ``description``) and rejects duplicate names.

    Returns
    -------
    None

    Fires
    -----
    Once per plugin when the registry is built, in the same order as
    :func:`symphase_register_normalizations`.
    """


@hookspec
def symphase_register_reproductions(registry: Registry) -> None:
    """Register named reproductions runnable as ``symphase reproduce NAME``.

    Call ``registry.add_reproduction(name, function, description)``; ``function``
    takes ``(out: pathlib.Path, quick: bool)`` and returns a process exit code.

    Parameters
    ----------
    registry : Registry
        The registry being built.

    Returns
    -------
    None

    Fires
    -----
    Once per plugin when the registry is built.
    """


@hookspec
def symphase_dataset_created(
    dataset: xr.Dataset, experiment: Experiment, analyzer: Analyzer
) -> None:
    """Inspect or extend a dataset an analyzer just produced.

    Implementations may add attrs (strings and numbers only) or variables in place;
    they must not remove or change existing ones.

    Parameters
    ----------
    dataset : xarray.Dataset
        The analyzer's result, provenance attrs already attached.
    experiment : Experiment
        The experiment that produced it.
    analyzer : Analyzer
        The analyzer that produced it.

    Returns
    -------
    None

    Fires
    -----
    After every ``Analyzer.run`` inside :meth:`Experiment.run` and sweeps, for all
    plugins (last registered first).
    """


@hookspec
def symphase_before_save(dataset: xr.Dataset, path: str) -> None:
    """Inspect or extend a dataset just before :func:`framework.save` writes it.

    Parameters
    ----------
    dataset : xarray.Dataset
        The dataset about to be written (attrs already flattened); may be extended in
        place with attrs or variables.
    path : str
        Destination path.

    Returns
    -------
    None

    Fires
    -----
    Once per :func:`framework.save` call, before the temporary file is written.
    """


@hookspec(firstresult=True)
def symphase_plot(dataset: xr.Dataset, figure: Any) -> bool | None:
    """Draw ``dataset`` on a matplotlib ``figure`` for ``symphase plot``.

    Stops at first non-None result.

    Parameters
    ----------
    dataset : xarray.Dataset
        A stored result.
    figure : matplotlib.figure.Figure
        An empty figure to draw on.

    Returns
    -------
    bool or None
        True if this plugin drew the dataset; None to let the next plugin try.

    Fires
    -----
    Once per ``symphase plot`` invocation, last-registered plugin first.
    """
