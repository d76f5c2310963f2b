"""Models: the abstract :class:`Model` interface, the built-in teacher-student model and
its order parameters.

Conventions (shared by every module, see the README's convention table):
inputs ``xi ~ N(0, I_N)``; teacher ``y = B xi / sqrt(N)`` (M units), student
``x = J xi / sqrt(N)`` (K units); outputs are plain sums over units with unit
second-layer weights. Order parameters ``Q = J J^T / N``, ``R = J B^T / N``,
``T = B B^T / N``; the pair ``(x, y)`` is Gaussian with covariance
``[[Q, R], [R^T, T]]``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import numpy as np

from framework.inputs import ISOTROPIC, InputDistribution
from framework.validators import (
    SpecificationError,
    check_int,
    check_real_array,
    ge,
    integer,
    one_of,
    optional_real,
    real,
    string,
    to_float,
)

if TYPE_CHECKING:
    from framework.activation import Activation
    from framework.experiment import Experiment

__all__ = [
    "OUTPUT_SCALES",
    "Layers",
    "Model",
    "OrderParameters",
    "TeacherStudent",
    "output_scale_factor",
    "realize_covariance",
]

#: Output-scale conventions of the field: ``sigma = c_K sum_i v_i g(x~_i)`` with
#: ``c_K = 1`` ("sum": Saad & Solla, Goldt et al., symphase's default), ``1 / K``
#: ("mean": Veiga et al., Arnaboldi et al.) or ``1 / sqrt(K)`` ("sqrt":
#: StatPhysMLSimPlayground); the teacher's ``c_M`` likewise with ``M``.
OUTPUT_SCALES = ("sum", "mean", "sqrt")


def output_scale_factor(scale: str, units: int) -> float:
    """``c`` of the output-scale convention ``scale`` for ``units`` hidden units:
    1 (``"sum"``), ``1 / units`` (``"mean"``) or ``1 / sqrt(units)`` (``"sqrt"``)."""
    if scale == "sum":
        return 1.0
    if scale == "mean":
        return 1.0 / units
    if scale == "sqrt":
        return 1.0 / math.sqrt(units)
    raise SpecificationError(
        f"'output_scale' must be one of {', '.join(map(repr, OUTPUT_SCALES))}, got {scale!r}"
    )


def _vector(name: str, value: Any, size: int) -> np.ndarray:
    """A read-only finite float vector of length ``size`` (TypeError for non-numbers)."""
    out = check_real_array(name, value)
    if out.shape != (size,):
        raise SpecificationError(f"{name!r} must have shape ({size},), got {out.shape}")
    if not np.all(np.isfinite(out)):
        raise SpecificationError(f"{name!r} must have finite entries, got {out.tolist()}")
    out.setflags(write=False)
    return out


@attrs.frozen
class Layers:
    """The two layers of a model as the theory and the simulation see them
    (:meth:`Model.layers`).

    Student output ``sigma = c_K sum_i v_i g(x~_i)``, teacher output ``zeta = c_M sum_n
    v*_n g(y_n) + noise``. The engines work with the *effective* output weights ``a =
    c_K v`` (:meth:`student_weights`) and ``b = c_M v*`` (:meth:`teacher_weights`).

    Attributes
    ----------
    readout : ndarray (K,)
        Student readout ``v``: its value when fixed, its initial value when trained.
    teacher_readout : ndarray (M,)
        Teacher readout ``v*``.
    c_student, c_teacher : float
        Output scales ``c_K``, ``c_M`` (:func:`output_scale_factor`).
    readout_trained : bool
        ``v`` is trained: ``v <- v - (eta_v / N) d eps / d v - (weight_decay_v / N) v``
        per step, so ``dv/dalpha = -eta_v d eps_g / d v - weight_decay_v v`` (no
        ``eta_v^2`` term: the readout's noise is ``O(1/N)`` per unit time).
    eta_v : float
        The readout's learning rate (0 when fixed).
    weight_decay : float
        First layer: ``J <- J - (weight_decay / N) J`` per step, i.e. ``-2 weight_decay
        Q`` in ``dQ/dalpha`` and ``-weight_decay R`` in ``dR/dalpha`` (independent of
        ``eta``).
    weight_decay_v : float
        Second layer (trained readout only), as above.
    """

    readout: np.ndarray
    teacher_readout: np.ndarray
    c_student: float = 1.0
    c_teacher: float = 1.0
    readout_trained: bool = False
    eta_v: float = 0.0
    weight_decay: float = 0.0
    weight_decay_v: float = 0.0

    @classmethod
    def committee(cls, K: int, M: int) -> Layers:
        """Unit readouts, fixed, no weight decay: the soft committee machine."""
        return cls(np.ones(K), np.ones(M))

    def student_weights(self, v: Any = None) -> np.ndarray:
        """``a = c_K v`` (``v``: the trained readout's current value; default
        :attr:`readout`)."""
        v = self.readout if v is None else np.asarray(v, dtype=float)
        return self.c_student * v

    def teacher_weights(self) -> np.ndarray:
        """``b = c_M v*``."""
        return self.c_teacher * self.teacher_readout

    def error_weights(self, v: Any = None) -> np.ndarray:
        """``w = (-a, b)``: the noise-free error is ``zeta - sigma = w . g(u)``."""
        return np.concatenate([-self.student_weights(v), self.teacher_weights()])

    @property
    def committee_machine(self) -> bool:
        """Unit effective weights, readout fixed, no weight decay (today's model)."""
        return bool(not self.readout_trained and self.weight_decay == 0.0
                    and np.all(self.student_weights() == 1.0)
                    and np.all(self.teacher_weights() == 1.0))

    def describe(self) -> str:
        """One line for attrs."""
        if self.committee_machine:
            return "soft committee machine (unit second layer, fixed)"
        v = ("trained readout v (eta_v = "
             f"{self.eta_v:g}, weight decay {self.weight_decay_v:g})" if self.readout_trained
             else "fixed readout v")
        return (f"sigma = {self.c_student:.6g} sum_i v_i g(x~_i), {v}; teacher zeta = "
                f"{self.c_teacher:.6g} sum_n v*_n g(y_n); first-layer weight decay "
                f"{self.weight_decay:g}")


#: Relative tolerance for symmetry and positive semi-definiteness checks.
_TOL = 1e-10


def _readonly(array: Any, field: Any = None) -> np.ndarray:
    """A read-only float copy of an array of real numbers (a string, bools or a ragged
    nesting raise :class:`TypeError` naming the field)."""
    out = check_real_array(getattr(field, "name", "array"), array)
    out.setflags(write=False)
    return out


def _array_eq(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.shape(a) == np.shape(b) and np.array_equal(a, b))


def _array_field(**kwargs: Any) -> Any:
    return attrs.field(
        converter=attrs.Converter(_readonly, takes_field=True),
        eq=attrs.cmp_using(eq=_array_eq), hash=False, **kwargs
    )


def _check_square_symmetric(name: str, matrix: np.ndarray, size: int) -> None:
    if matrix.shape != (size, size):
        raise SpecificationError(f"{name!r} must have shape ({size}, {size}), got {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise SpecificationError(f"{name!r} must have finite entries, got {matrix!r}")
    scale = max(1.0, float(np.max(np.abs(matrix))))
    asym = float(np.max(np.abs(matrix - matrix.T))) if size else 0.0
    if asym > _TOL * scale:
        raise SpecificationError(
            f"{name!r} must be symmetric, got max |{name} - {name}^T| = {asym:.3g}"
        )


def _check_psd(name: str, matrix: np.ndarray, hint: str = "") -> None:
    if matrix.size == 0:
        return
    lam = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    scale = max(1.0, float(np.max(np.abs(lam))))
    if lam[0] < -_TOL * scale * matrix.shape[0]:
        raise SpecificationError(
            f"{name} must be positive semi-definite, got smallest eigenvalue {lam[0]:.6g}{hint}"
        )


def realize_covariance(
    covariance: np.ndarray, N: int, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """Rows ``Z`` (P x N) with ``Z Z^T / N == covariance`` exactly (to rounding).

    A factor of the covariance is rotated by a Haar-random orthonormal frame drawn
    from ``rng``; ``N`` must be at least the covariance's rank.
    """
    rng = np.random.default_rng(rng)
    lam, vec = np.linalg.eigh(covariance)
    keep = lam > _TOL * max(1.0, float(lam[-1])) * lam.size
    factor = vec[:, keep] * np.sqrt(lam[keep])  # P x rank
    if N < factor.shape[1]:
        raise SpecificationError(
            f"'N' must be >= {factor.shape[1]} (the rank of the covariance), got {N}"
        )
    frame, r = np.linalg.qr(rng.standard_normal((N, factor.shape[1])))
    frame = frame * np.sign(np.diag(r))  # Haar-distributed orthonormal columns
    return np.sqrt(N) * factor @ frame.T


@attrs.frozen
class Forward:
    """What a model's simulation step computes for one minibatch (:meth:`Model.forward`).

    Attributes
    ----------
    x : ndarray
        Student pre-activations before the normalization, shape ``(..., B, K)``.
    zeta : ndarray
        Teacher outputs, output noise included, shape ``(..., B)``.
    """

    x: np.ndarray
    zeta: np.ndarray


class Model(abc.ABC):
    """The interface every model plugin implements.

    A model says what learns from what: its specification (frozen attrs fields,
    validated on construction), the layout of its order-parameter state and how the
    state is realized in weights, its generalization error and ODE (computed by an
    engine of :mod:`framework.theory`), and the per-sample step a finite-N simulation
    takes. Models are registered through the ``symphase_register_models`` hook
    (``registry.add_model(cls)``) and named in an experiment's dict form
    (``{"model": {"name": "teacher_student", "K": 2, "M": 2}}``).

    What a subclass must implement
    ------------------------------
    ``name`` and ``description`` (class attributes), :meth:`to_dict`,
    :meth:`from_dict`, :meth:`state_layout`, :meth:`random_state`, :meth:`forward`
    and :meth:`readout`.

    What is optional
    ----------------
    :meth:`check` (reject an experiment early; default: :meth:`check_state` on an
    explicit initial state), :meth:`check_state`, :meth:`realize` and
    :meth:`order_parameters` (defaults: :class:`OrderParameters` ``realize`` /
    ``from_weights``), :meth:`generalization_error` and :meth:`rates` (defaults:
    delegate to the engine).

    Attributes the built-in engines and analyzers read
    --------------------------------------------------
    ``K`` (student units), ``M`` (teacher units), ``T`` (teacher overlaps, M x M),
    ``activation`` (a registered activation name) and ``noise`` (output noise
    variance). A model that leaves them out can only run with analyzers that do not
    read them (and :func:`framework.results.convention_attrs` reads ``K``, ``M``,
    ``activation`` and ``noise``).
    """

    __slots__ = ()

    # The attributes the order-parameter theory reads (see above); declared here so
    # that code written against ``Model`` is type-checked against them.
    K: int
    M: int
    T: np.ndarray
    activation: str
    noise: float

    #: Registry name, a Python identifier (``"teacher_student"``).
    name: ClassVar[str] = ""
    #: One-line description shown by ``symphase plugins``.
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "model"
    #: True if :meth:`forward` and :meth:`readout` are the soft committee machine's
    #: (``x = J xi / sqrt(N)``, ``zeta = sum_n g(B_n xi / sqrt(N))`` plus noise,
    #: ``sigma = sum_i g(xt_i)``): the compiled simulation kernel, which hard-codes
    #: them, applies. Other models run the simulation through :meth:`forward` and
    #: :meth:`readout`.
    committee_machine: ClassVar[bool] = False

    def layers(self) -> Layers:
        """The second layers and the weight decay (:class:`Layers`); default: the soft
        committee machine (unit readouts, fixed, no weight decay). The theory engines
        and the simulation read it; a trained readout ``v`` is then state (the
        parameter ``"v"`` beside the normalization's trainable parameters)."""
        return Layers.committee(self.K, self.M)

    def input_distribution(self) -> InputDistribution:
        """The distribution of the inputs (:class:`~framework.InputDistribution`);
        default: isotropic ``N(0, I)``. With a structured covariance the theory follows
        the order parameters per eigenspace (:mod:`framework.inputs`) and the
        simulation draws correlated inputs."""
        return ISOTROPIC

    def activation_function(self) -> Activation:
        """The :class:`~framework.Activation` named by ``activation`` (the registry's
        look-up; an unknown name raises listing the installed ones). The theory engines
        receive this object (:func:`framework.theory.select_engine`)."""
        from framework.manager import get_activation

        return get_activation(self.activation)

    # -- specification ---------------------------------------------------------------
    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The specification as a JSON-compatible dict (without the ``name``).

        :class:`~framework.Experiment` adds ``"name": self.name`` to it in its own
        dict form; :meth:`from_dict` must rebuild an equal model from either.
        """

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Model:
        """Rebuild from :meth:`to_dict` output; a ``name`` entry, if any, must match
        ``cls.name``; unknown keys are an error naming the valid ones."""

    def check(self, experiment: Experiment) -> None:
        """Raise a ``ValueError`` if ``experiment`` cannot run with this model.

        Called once when the :class:`~framework.Experiment` is built, before the
        analyzers' checks. Default: :meth:`check_state` on an explicit initial state.
        """
        if isinstance(experiment.init, OrderParameters):
            self.check_state(experiment.init, "init")

    # -- order-parameter state ---------------------------------------------------------
    @abc.abstractmethod
    def state_layout(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the order parameters that evolve, in state order.

        E.g. ``{"Q": (K, K), "R": (K, M)}`` for the teacher-student model (``T`` is
        fixed by the specification and not part of the evolving state).
        """

    def check_state(self, state: OrderParameters, name: str = "state") -> None:
        """Raise :class:`~framework.SpecificationError` if ``state`` does not fit.

        Default: every array of :meth:`state_layout` has its shape; ``name`` is used
        in the message (``'init.Q' must have shape (2, 2), got (3, 3)``).
        """
        for key, shape in self.state_layout().items():
            got = np.shape(getattr(state, key))
            if got != tuple(shape):
                raise SpecificationError(
                    f"'{name}.{key}' must have shape {tuple(shape)}, got {got}"
                )

    @abc.abstractmethod
    def random_state(self, N: int, scale: float, rng: np.random.Generator) -> OrderParameters:
        """The random initial state of ``init="random"``.

        Parameters
        ----------
        N : int
            Dimension in which the weights are drawn.
        scale : float
            Standard deviation of the student components.
        rng : numpy.random.Generator
            The experiment's ``STREAM_INIT`` stream (see :mod:`framework.streams`).
        """

    def realize(
        self, state: OrderParameters, N: int, rng: np.random.Generator | int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Weights ``(J (K, N), B (M, N))`` in dimension ``N`` with exactly this state.

        Default: :meth:`OrderParameters.realize`.
        """
        return state.realize(N, rng)

    def order_parameters(self, J: Any, B: Any) -> OrderParameters:
        """The state of student weights ``J`` (K x N) and teacher weights ``B`` (M x N).

        Default: :meth:`OrderParameters.from_weights`.
        """
        return OrderParameters.from_weights(J, B)

    # -- theory, through an engine -----------------------------------------------------
    def generalization_error(
        self, engine: Any, Q: Any, R: Any, params: Mapping[str, Any] | None = None
    ) -> tuple[float, float]:
        """``(eps_g, error estimate)`` at ``(Q, R)`` and the normalization parameters.

        Default: ``engine.generalization_error(Q, R, params)`` with ``engine`` from
        :func:`framework.theory.expectation_engine` (error 0 when exact).
        """
        return engine.generalization_error(Q, R, params)

    def rates(
        self,
        engine: Any,
        Q: Any,
        R: Any,
        params: Mapping[str, Any] | None = None,
        *,
        eta: float,
        batch_size: int = 1,
        second_order: bool = True,
    ) -> Any:
        """The right-hand side of the order-parameter ODE at ``(Q, R)``.

        Default: ``engine.rates(Q, R, params, eta=eta, batch_size=batch_size,
        second_order=second_order)``, a :class:`framework.theory.GenericRates`
        (``dQ``, ``dR``, ``dparams``, ``eps_g`` and their error estimates).
        """
        return engine.rates(
            Q, R, params, eta=eta, batch_size=batch_size, second_order=second_order
        )

    # -- the simulation step -------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, W: np.ndarray, xi: np.ndarray, noise: np.ndarray | None = None) -> Forward:
        """Student pre-activations and teacher outputs of a minibatch.

        Parameters
        ----------
        W : ndarray, shape (..., K + M, N)
            Student rows ``J`` then teacher rows ``B`` (as :meth:`realize` returns them,
            stacked); leading axes are replicas.
        xi : ndarray, shape (..., B, N)
            Inputs, one row per sample of the minibatch.
        noise : ndarray, shape (..., B), optional
            Standard normal draws of the output noise (None: no noise drawn).

        Returns
        -------
        Forward
            ``x`` (..., B, K), the pre-activations the normalization receives, and
            ``zeta`` (..., B), the teacher outputs.
        """

    @abc.abstractmethod
    def readout(self, xt: np.ndarray, v: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Student outputs of normalized pre-activations and their gradient.

        Parameters
        ----------
        xt : ndarray, shape (..., B, K)
            Pre-activations after the normalization.
        v : ndarray, shape (..., K), optional
            The current student readout when it is trained (:meth:`layers`; leading
            axes are replicas); None: the model's fixed readout.

        Returns
        -------
        sigma : ndarray, shape (..., B)
            Student outputs.
        dsigma : ndarray, shape (..., B, K)
            ``d sigma / d xt``; the per-sample loss ``(zeta - sigma)^2 / 2`` has gradient
            ``-(zeta - sigma)[..., None] * dsigma`` with respect to ``xt``.
        """


@attrs.frozen
class TeacherStudent(Model):
    """A two-layer soft-committee teacher-student model.

    Parameters
    ----------
    K : int
        Number of student hidden units (>= 1).
    M : int
        Number of teacher hidden units (>= 1).
    activation : str
        Name of a registered activation (default ``"erf"``: ``g(u) = erf(u / sqrt 2)``).
    T : array_like, optional
        Teacher overlap matrix ``B B^T / N`` (M x M, symmetric positive definite).
        Defaults to the identity.
    noise : float
        Variance ``sigma^2`` of Gaussian output noise added to the teacher output (>= 0).
    second_layer : str
        ``"fixed"`` (default): the student readout ``v`` stays at ``readout``;
        ``"trained"``: ``v`` learns with rate ``eta_v`` (:class:`Layers`).
    student_readout : array_like (K,), optional
        The student readout ``v`` (fixed value, or initial value when trained); default
        ones.
    teacher_readout : array_like (M,), optional
        The teacher readout ``v*``; default ones.
    output_scale : str
        ``"sum"`` (default, ``c = 1``), ``"mean"`` (``c_K = 1/K``, ``c_M = 1/M``) or
        ``"sqrt"`` (``1/sqrt(K)``, ``1/sqrt(M)``): ``sigma = c_K sum_i v_i g(x~_i)``,
        ``zeta = c_M sum_n v*_n g(y_n) + noise``.
    eta_v : float, optional
        The readout's learning rate (> 0), required with ``second_layer="trained"`` and
        refused with ``"fixed"``: ``dv/dalpha = -eta_v d eps_g / d v``.
    weight_decay : float
        First-layer weight decay ``lambda >= 0``: ``J <- J - (lambda / N) J`` per step
        (``-2 lambda Q`` in ``dQ/dalpha``, ``-lambda R`` in ``dR/dalpha``).
    weight_decay_v : float
        Second-layer weight decay (trained readout only): ``-weight_decay_v v`` in
        ``dv/dalpha``.
    inputs : InputDistribution or mapping, optional
        The input distribution (default isotropic ``N(0, I)``): a covariance given by its
        spectrum, ``{"eigenvalues": [...], "fractions": [...]}``
        (:class:`~framework.InputDistribution`, :mod:`framework.inputs` for the
        conventions), and a mean ``{"mean": m, "direction": s, "mean_space": l}`` (size,
        the teacher's overlaps with its direction, the eigenspace that holds it). ``T``
        stays ``B B^T / N``; the teacher's pre-activation covariance is then
        ``mean_eigenvalue * T`` and its pre-activation mean ``m s``.

    With the defaults this is the soft committee machine of Saad & Solla, bit for bit.

    Registered as the model ``"teacher_student"`` by the built-in plugin
    ``plugins.models``.
    """

    name: ClassVar[str] = "teacher_student"
    description: ClassVar[str] = (
        "soft committee machine: K student units learn from M teacher units"
    )
    committee_machine: ClassVar[bool] = True

    K: int = attrs.field(validator=integer(minimum=1))
    M: int = attrs.field(validator=integer(minimum=1))
    activation: str = attrs.field(default="erf", validator=string())
    T: np.ndarray = _array_field(default=None)
    noise: float = attrs.field(default=0.0, converter=to_float, validator=ge(0.0))
    second_layer: str = attrs.field(default="fixed", validator=one_of("fixed", "trained"))
    student_readout: np.ndarray = attrs.field(default=None, eq=attrs.cmp_using(eq=_array_eq),
                                              hash=False)
    teacher_readout: np.ndarray = attrs.field(default=None, eq=attrs.cmp_using(eq=_array_eq),
                                              hash=False)
    output_scale: str = attrs.field(default="sum", validator=one_of(*OUTPUT_SCALES))
    eta_v: float | None = attrs.field(default=None, converter=to_float,
                                      validator=optional_real(minimum=0.0))
    weight_decay: float = attrs.field(default=0.0, converter=to_float,
                                      validator=real(minimum=0.0))
    weight_decay_v: float = attrs.field(default=0.0, converter=to_float,
                                        validator=real(minimum=0.0))
    inputs: InputDistribution = attrs.field(default=ISOTROPIC)

    def __attrs_post_init__(self) -> None:
        trained = self.second_layer == "trained"
        if trained and (self.eta_v is None or self.eta_v <= 0.0):
            raise SpecificationError(
                f"'eta_v' must be a positive number with second_layer='trained', got "
                f"{self.eta_v!r}")
        if not trained and self.eta_v is not None:
            raise SpecificationError(
                f"'eta_v' applies only with second_layer='trained' (the readout is fixed), "
                f"got eta_v={self.eta_v!r}")
        if not trained and self.weight_decay_v != 0.0:
            raise SpecificationError(
                f"'weight_decay_v' applies only with second_layer='trained', got "
                f"{self.weight_decay_v!r}")
        if not self.inputs.centred:  # the mean direction: one overlap per teacher unit
            self.inputs.teacher_overlap(self.M)
            self.inputs.check_teacher(self.T)

    @T.validator
    def _check_T(self, attribute: Any, value: np.ndarray) -> None:
        _check_square_symmetric("T", value, self.M)
        lam = np.linalg.eigvalsh(value)
        if lam[0] <= 0:
            raise SpecificationError(
                f"'T' must be positive definite, got smallest eigenvalue {lam[0]:.6g}"
            )

    def __init__(self, K: int, M: int, activation: str = "erf", T: Any = None,
                 noise: float = 0.0, second_layer: str = "fixed", student_readout: Any = None,
                 teacher_readout: Any = None, output_scale: str = "sum",
                 eta_v: float | None = None, weight_decay: float = 0.0,
                 weight_decay_v: float = 0.0, inputs: Any = None) -> None:
        K = check_int("K", K, minimum=1)
        M = check_int("M", M, minimum=1)
        if T is None:
            T = np.eye(M)
        readout = np.ones(K) if student_readout is None else \
            _vector("student_readout", student_readout, K)
        teacher_readout = np.ones(M) if teacher_readout is None else \
            _vector("teacher_readout", teacher_readout, M)
        readout.setflags(write=False)
        teacher_readout.setflags(write=False)
        inputs = ISOTROPIC if inputs is None else InputDistribution.from_dict(inputs)
        self.__attrs_init__(  # type: ignore[attr-defined]
            K, M, activation, T, noise, second_layer, readout, teacher_readout, output_scale,
            eta_v, weight_decay, weight_decay_v, inputs)

    #: Fields of the two-layer options and their defaults (omitted from :meth:`to_dict`
    #: at their defaults, so that the soft committee machine's specification -- and the
    #: hashes of stored results -- are unchanged).
    _LAYER_DEFAULTS: ClassVar[dict[str, Any]] = {
        "output_scale": "sum", "eta_v": None, "weight_decay": 0.0, "weight_decay_v": 0.0,
    }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible description (``T`` as nested lists; the two-layer options
        only where they differ from their defaults)."""
        out: dict[str, Any] = {
            "K": self.K,
            "M": self.M,
            "activation": self.activation,
            "T": self.T.tolist(),
            "noise": self.noise,
            "second_layer": self.second_layer,
        }
        if np.any(self.student_readout != 1.0):
            out["student_readout"] = self.student_readout.tolist()
        if np.any(self.teacher_readout != 1.0):
            out["teacher_readout"] = self.teacher_readout.tolist()
        for key, default in self._LAYER_DEFAULTS.items():
            if getattr(self, key) != default:
                out[key] = getattr(self, key)
        if not self.inputs.isotropic:  # omitted when isotropic: hashes as before
            out["inputs"] = self.inputs.to_dict()
        return out

    def input_distribution(self) -> InputDistribution:
        """The ``inputs`` field."""
        return self.inputs

    def layers(self) -> Layers:
        """:class:`Layers` of this specification."""
        return Layers(
            readout=self.student_readout, teacher_readout=self.teacher_readout,
            c_student=output_scale_factor(self.output_scale, self.K),
            c_teacher=output_scale_factor(self.output_scale, self.M),
            readout_trained=self.second_layer == "trained",
            eta_v=0.0 if self.eta_v is None else float(self.eta_v),
            weight_decay=float(self.weight_decay), weight_decay_v=float(self.weight_decay_v),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeacherStudent:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error.

        A ``name`` entry (the experiment's dict form) must be ``"teacher_student"``.
        """
        data = _without_name(cls, data)
        return cls(**_known_keys(cls.__name__, data, (
            "K", "M", "activation", "T", "noise", "second_layer", "student_readout",
            "teacher_readout", "output_scale", "eta_v", "weight_decay", "weight_decay_v",
            "inputs")))

    # -- the Model interface -----------------------------------------------------------
    def check(self, experiment: Experiment) -> None:
        """The activation is registered, ``init_N >= K + M`` and an explicit ``init``
        has this ``K``, ``M`` and ``T``."""
        self.activation_function()  # unknown activation -> error listing them
        if experiment.init_N < self.K + self.M:
            raise SpecificationError(
                f"'init_N' must be >= K + M = {self.K + self.M}, got {experiment.init_N}"
            )
        if isinstance(experiment.init, OrderParameters):
            self.check_state(experiment.init, "init")

    def state_layout(self) -> dict[str, tuple[int, ...]]:
        """``{"Q": (K, K), "R": (K, M)}``."""
        return {"Q": (self.K, self.K), "R": (self.K, self.M)}

    def check_state(self, state: OrderParameters, name: str = "state") -> None:
        """``state`` has this ``K`` and ``M`` and its ``T`` equals the model's."""
        K, M = self.K, self.M
        if state.K != K or state.M != M:
            raise SpecificationError(
                f"{name!r} must have K={K}, M={M} like the model, got K={state.K}, "
                f"M={state.M}"
            )
        if state.per_eigenspace:  # one block per input eigenspace, T_l = f_l T
            inputs = self.inputs
            if inputs.isotropic or state.Q.shape[0] != inputs.L:
                raise SpecificationError(
                    f"{name!r} per input eigenspace must have one block per eigenspace of "
                    f"the model's inputs ({inputs.L if not inputs.isotropic else 0}), got "
                    f"{state.Q.shape[0]}")
            if not np.allclose(state.T, inputs.lift(self.T), rtol=1e-10, atol=1e-12):
                raise SpecificationError(
                    f"'{name}.T' per eigenspace must equal f_l T (the model's T spread over "
                    f"the eigenspaces)")
            return
        if not np.allclose(state.T, self.T, rtol=1e-10, atol=1e-12):
            raise SpecificationError(f"'{name}.T' must equal the model's T")

    def random_state(self, N: int, scale: float, rng: np.random.Generator) -> OrderParameters:
        """A teacher realizing ``T`` exactly, then K student vectors with iid
        ``N(0, scale^2)`` components, both in dimension ``N`` and drawn from ``rng``."""
        B = realize_covariance(self.T, N, rng)
        J = scale * rng.standard_normal((self.K, N))
        return OrderParameters.from_weights(J, B)

    def forward(self, W: np.ndarray, xi: np.ndarray, noise: np.ndarray | None = None) -> Forward:
        """``x = J xi / sqrt(N)``, ``zeta = c_M sum_n v*_n g(B_n xi / sqrt(N)) +
        sqrt(noise) * noise``."""
        K, N = self.K, W.shape[-1]
        pre = np.matmul(xi, np.swapaxes(W, -1, -2)) * (1.0 / math.sqrt(N))  # (..., B, K + M)
        b = self.layers().teacher_weights()
        zeta = (self.activation_function().g(pre[..., K:]) * b).sum(axis=-1)
        if noise is not None:
            zeta = zeta + math.sqrt(self.noise) * noise
        return Forward(pre[..., :K], zeta)

    def readout(self, xt: np.ndarray, v: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """``sigma = c_K sum_i v_i g(xt_i)`` and ``d sigma / d xt_i = c_K v_i
        g'(xt_i)`` (``v``: the trained readout's current value, default the fixed one;
        ``d sigma / d v_i = c_K g(xt_i)``)."""
        act = self.activation_function()
        a = self.layers().student_weights(None if v is None else np.asarray(v)[..., None, :])
        return (act.g(xt) * a).sum(axis=-1), a * act.gprime(xt)


def _without_name(cls: type[Model], data: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(data)
    name = data.pop("name", cls.name)
    if name != cls.name:
        raise SpecificationError(f"'name' must be {cls.name!r} for {cls.__name__}, got {name!r}")
    return data


def _known_keys(owner: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SpecificationError(
            f"unknown field(s) {', '.join(map(repr, unknown))} for {owner}; "
            f"valid fields: {', '.join(map(repr, allowed))}"
        )
    return dict(data)


@attrs.frozen(init=False)
class OrderParameters:
    """Order parameters ``Q = J J^T/N`` (K x K), ``R = J B^T/N`` (K x M), ``T = B B^T/N``.

    Q and T must be symmetric and the joint covariance ``[[Q, R], [R^T, T]]`` of the
    pre-activations ``(x, y)`` positive semi-definite. Arrays are stored read-only.

    Per input eigenspace (structured inputs, :mod:`framework.inputs`): ``Q (L, K, K)``,
    ``R (L, K, M)`` and ``T (L, M, M)`` (required), the overlaps of the projections on
    each eigenspace, every block's joint covariance positive semi-definite.
    """

    Q: np.ndarray = _array_field()
    R: np.ndarray = _array_field()
    T: np.ndarray = _array_field()

    def __init__(self, Q: Any, R: Any, T: Any = None) -> None:
        if np.ndim(Q) == 3:  # per input eigenspace: every block checked
            Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
            if T is None or np.ndim(T) != 3 or np.ndim(R) != 3 or \
                    not (len(Q) == len(R) == len(T)):
                raise SpecificationError(
                    f"order parameters per input eigenspace need Q (L, K, K), R (L, K, M) "
                    f"and T (L, M, M) with the same L, got shapes {np.shape(Q)}, "
                    f"{np.shape(R)}, {np.shape(T)}")
            T = np.asarray(T, dtype=float)
            for ell in range(len(Q)):
                try:
                    OrderParameters(Q[ell], R[ell], T[ell])
                except SpecificationError as exc:
                    raise SpecificationError(f"eigenspace {ell}: {exc}") from None
            self.__attrs_init__(Q, R, T)
            return
        Q = np.atleast_2d(np.asarray(Q, dtype=float))
        R = np.asarray(R, dtype=float)
        K = Q.shape[0]
        if R.ndim != 2 or R.shape[0] != K:
            raise SpecificationError(f"'R' must have shape ({K}, M), got {R.shape}")
        M = R.shape[1]
        T = np.eye(M) if T is None else np.atleast_2d(np.asarray(T, dtype=float))
        _check_square_symmetric("Q", Q, K)
        _check_square_symmetric("T", T, M)
        if not np.all(np.isfinite(R)):
            raise SpecificationError(f"'R' must have finite entries, got {R!r}")
        joint = np.block([[Q, R], [R.T, T]])
        _check_psd(
            "the joint covariance [[Q, R], [R^T, T]]",
            joint,
            " (|R_in| too large for the norms Q_ii and T_nn?)",
        )
        self.__attrs_init__(Q, R, T)

    @property
    def K(self) -> int:
        return int(self.Q.shape[-1])

    @property
    def M(self) -> int:
        return int(self.T.shape[-1])

    @property
    def per_eigenspace(self) -> bool:
        """The state is per input eigenspace (``Q`` of shape ``(L, K, K)``)."""
        return self.Q.ndim == 3

    @property
    def covariance(self) -> np.ndarray:
        """The joint covariance ``[[Q, R], [R^T, T]]`` of ``(x, y)`` (per eigenspace:
        ``(L, K + M, K + M)``)."""
        if self.per_eigenspace:
            return np.concatenate([np.concatenate([self.Q, self.R], axis=-1),
                                   np.concatenate([np.swapaxes(self.R, -1, -2), self.T],
                                                  axis=-1)], axis=-2)
        return np.block([[self.Q, self.R], [self.R.T, self.T]])

    @classmethod
    def from_weights(cls, J: Any, B: Any) -> OrderParameters:
        """Order parameters of student weights ``J`` (K x N) and teacher ``B`` (M x N)."""
        J = np.atleast_2d(np.asarray(J, dtype=float))
        B = np.atleast_2d(np.asarray(B, dtype=float))
        if J.shape[1] != B.shape[1]:
            raise SpecificationError(
                f"'J' and 'B' must have the same input dimension N, got {J.shape[1]} and "
                f"{B.shape[1]}"
            )
        N = J.shape[1]
        return cls(J @ J.T / N, J @ B.T / N, B @ B.T / N)

    @classmethod
    def symmetric(cls, K: int, Q: float, C: float, R: float, S: float) -> OrderParameters:
        """The symmetric-phase point ``Q_ii=Q, Q_ik=C, R_ii=R, R_in=S`` with ``M=K``, ``T=I``."""
        K = check_int("K", K, minimum=1)
        eye = np.eye(K)
        return cls(C + (Q - C) * eye, S + (R - S) * eye, eye)

    @property
    def rank(self) -> int:
        """Numerical rank of the joint covariance (the dimension of the weights' span)."""
        lam = np.linalg.eigvalsh(self.covariance)
        return int(np.sum(lam > _TOL * max(1.0, float(lam[-1])) * lam.size))

    def realize(
        self, N: int, rng: np.random.Generator | int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Weights ``(J, B)`` in dimension ``N`` with exactly these order parameters.

        The rows of ``[J; B] / sqrt(N)`` are a factor of the joint covariance rotated
        by a uniformly random orthonormal frame (drawn from ``rng``), so
        ``OrderParameters.from_weights(J, B)`` reproduces ``Q, R, T`` to rounding.
        ``N`` must be at least the rank of the joint covariance.
        """
        N = check_int("N", N, minimum=1)
        if self.per_eigenspace:
            raise SpecificationError(
                "order parameters per input eigenspace are realized by "
                "InputDistribution.realize (each eigenspace in its own coordinates)")
        rank = self.rank
        if N < rank:
            raise SpecificationError(
                f"'N' must be >= {rank} (the rank of the joint covariance), got {N}"
            )
        weights = realize_covariance(self.covariance, N, rng)
        return weights[: self.K], weights[self.K :]

    def to_dict(self) -> dict[str, Any]:
        return {"Q": self.Q.tolist(), "R": self.R.tolist(), "T": self.T.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrderParameters:
        return cls(**_known_keys(cls.__name__, data, ("Q", "R", "T")))
