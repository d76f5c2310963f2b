"""The interface every analyzer plugin implements.

An analyzer is a computation on an :class:`~framework.Experiment` (model,
normalization, training parameters) that returns a labelled
:class:`xarray.Dataset`. Subclasses are frozen attrs classes whose fields are the
analyzer's own options (``get_analyzer("dynamics", alpha_max=100)``).

What a subclass must implement: ``name``, ``description`` and :meth:`run`.
Optional: ``supports_learning_rules`` (below); ``requires`` (capabilities such as
``"diagonal_scale"``) checked by :meth:`check`, which may be overridden to reject an
experiment early with a clear error; ``size_options``, the options that size the arrays the analyzer
allocates, which the framework reads to refuse a specification beyond the machine's
memory before building it.

Datasets must use the shared dimension names (``alpha``, ``student``,
``student_``, ``teacher``, ``teacher_``, ``eigen``, ``replica``, ``branch``),
give every variable ``long_name`` and ``units`` attrs, and state their
conventions in attrs; the framework adds the experiment's provenance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from framework._named import Named

if TYPE_CHECKING:
    import xarray as xr

    from framework.experiment import Experiment

__all__ = ["Analyzer"]


class Analyzer(Named):
    """Base class of analyzers."""

    #: Registry name, e.g. ``"dynamics"``.
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "analyzer"
    #: One-line description shown by ``symphase plugins``.
    description: ClassVar[str] = ""
    #: Options that size what :meth:`run` allocates, mapped to their kind:
    #: ``"trajectory"`` (stored points of a trajectory, ``K (K + M)`` numbers each),
    #: ``"system"`` (an input dimension or a sample count, ``K + M`` numbers each and
    #: per replica) or ``"replicas"``. Read (from the JSON form, before anything is
    #: built) by the memory check of ``symphase run`` and of stored results; options not
    #: listed are not sizes.
    size_options: ClassVar[dict[str, str]] = {}
    #: True if :meth:`run` computes under the experiment's ``learning_rule`` (e.g. through
    #: the engine :func:`framework.theory.select_engine` returns for it); an experiment
    #: with a rule other than the plain gradient step refuses analyzers that leave it
    #: False (default), since they would silently compute under SGD.
    supports_learning_rules: ClassVar[bool] = False
    #: True if :meth:`run` computes with the model's input distribution when it is not
    #: isotropic (:meth:`framework.Model.input_distribution`; e.g. through the engine
    #: :func:`framework.theory.select_engine` returns, whose state is per input
    #: eigenspace); an experiment with structured inputs refuses analyzers that leave it
    #: False (default), since they would silently compute with isotropic inputs.
    supports_structured_inputs: ClassVar[bool] = False
    #: True if :meth:`run` also computes with inputs that have a mean (the state's
    #: ``mean_overlap``, :mod:`framework.theory.spectral`); an experiment whose inputs have
    #: a mean refuses analyzers that leave it False (default).
    supports_input_mean: ClassVar[bool] = False

    def check(self, experiment: Experiment) -> None:
        """Raise a ``ValueError`` if this analyzer cannot run ``experiment`` (default: accept)."""

    def run(self, experiment: Experiment) -> xr.Dataset:
        """Compute and return a labelled dataset."""
        raise NotImplementedError(f"analyzer {self.name!r} must implement run()")
