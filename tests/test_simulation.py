"""Tests of the finite-N online SGD ``simulation`` analyzer (plugins/simulation.py).

Statistical checks use standard errors over replicas (or over samples) with a fixed
number of standard errors; every simulation is seeded, so the outcomes are
deterministic.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import numpy as np
import pytest
from scipy import integrate, stats

from framework import (
    Backward,
    Experiment,
    Normalization,
    OrderParameters,
    ScaleKernels,
    SpecificationError,
    TeacherStudent,
    get_activation,
    get_analyzer,
    get_normalization,
    list_analyzers,
    list_normalizations,
    load,
    save,
    theory,
)
from framework.testing import NormalizationContract
from plugins import simulation as simmod

Z = 4.0  # standard errors allowed in statistical comparisons

needs_numba = pytest.mark.skipif(not simmod.HAVE_NUMBA, reason="numba not installed")
njit_or_none = simmod.njit()  # numba.njit, or the identity without numba


def experiment(norm: str | Normalization = "plain", **kw) -> Experiment:  # type: ignore[no-untyped-def]
    model = kw.pop("model", TeacherStudent(2, 2))
    return Experiment(model, normalization=norm, **{"eta": 0.5, "seed": 0, **kw})


def simulate(ex: Experiment, **options):  # type: ignore[no-untyped-def]
    return get_analyzer("simulation", **options).run(ex)


def ode_eps_g(ex: Experiment, grid: list[float]) -> np.ndarray:
    """eps_g of the ODE from the experiment's initial order parameters."""
    if "dynamics" in list_analyzers():
        return get_analyzer("dynamics", alpha=grid).run(ex)["eps_g"].values
    model, norm, K = ex.model, ex.normalization, ex.model.K
    op = ex.initial_order_parameters()

    def rhs(_t: float, y: np.ndarray) -> np.ndarray:
        Q, R = y[: K * K].reshape(K, K), y[K * K :].reshape(K, -1)
        dQ, dR = theory.ode_rhs(model, norm, Q, R, ex.eta, ex.batch_size)
        return np.concatenate([dQ.ravel(), dR.ravel()])

    y0 = np.concatenate([op.Q.ravel(), op.R.ravel()])
    sol = integrate.solve_ivp(rhs, (grid[0], grid[-1]), y0, t_eval=grid, method="DOP853",
                              rtol=1e-10, atol=1e-12)
    Qs = sol.y[: K * K].T.reshape(-1, K, K)
    Rs = sol.y[K * K :].T.reshape(-1, K, model.M)
    return theory.generalization_error_batch(model, norm, Qs, Rs)


# ---------------------------------------------------------------------------------
# the input stream
# ---------------------------------------------------------------------------------
def test_stream_numpy_and_compiled_agree_and_do_not_depend_on_chunking() -> None:
    keys = np.array([1, 2**63 + 5, 123456789], dtype=np.uint64)
    whole = simmod.normals_numpy(keys, 17, 60_000)
    parts = np.concatenate([simmod.normals_numpy(keys, 17, 25_000),
                            simmod.normals_numpy(keys, 17 + 25_000, 35_000)], axis=1)
    np.testing.assert_array_equal(whole, parts)
    # identical but for the rare slow-path values where libm and numpy may differ by an ulp
    np.testing.assert_allclose(simmod.normals(keys, 17, 60_000), whole, rtol=1e-14, atol=0)


def test_stream_is_standard_normal() -> None:
    n = 400_000
    x = simmod.normals_numpy(np.array([7], dtype=np.uint64), 0, n)[0]
    assert abs(x.mean()) < Z / math.sqrt(n)
    assert abs(x.var() - 1.0) < Z * math.sqrt(2.0 / n)
    assert abs(stats.kurtosis(x)) < Z * math.sqrt(24.0 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-4
    # the ziggurat's tail (|x| > r) has the right weight
    p = 2 * stats.norm.sf(simmod.ZIG_R)
    count = np.count_nonzero(np.abs(x) > simmod.ZIG_R)
    assert abs(count - n * p) < Z * math.sqrt(n * p)
    # different keys are uncorrelated
    y = simmod.normals_numpy(np.array([8], dtype=np.uint64), 0, n)[0]
    assert abs(np.mean(x * y)) < Z / math.sqrt(n)


# ---------------------------------------------------------------------------------
# backends, seeds, options
# ---------------------------------------------------------------------------------
@needs_numba
@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_compiled_kernel_agrees_step_for_step_with_generic_path(norm: str,
                                                                batch_size: int) -> None:
    model = TeacherStudent(2, 3, noise=0.05)
    ex = experiment(norm, model=model, batch_size=batch_size, eta=0.8, seed=4)
    opts = dict(N=150, alpha=[0, 0.02, 1.0, 3.0], replicas=3)
    a = simulate(ex, backend="numpy", **opts)
    b = simulate(ex, backend="numba", **opts)
    assert a.attrs["backend"] == "numpy" and b.attrs["backend"] == "numba"
    np.testing.assert_allclose(a["Q"], b["Q"], rtol=0, atol=1e-11)
    np.testing.assert_allclose(a["R"], b["R"], rtol=0, atol=1e-11)
    assert not np.allclose(a["Q"].isel(alpha=-1), a["Q"].isel(alpha=0))  # it did move


class _SameMachineAsAModelPlugin(TeacherStudent):
    """The soft committee machine, declared as any model plugin would be: not a
    committee machine to the simulation, which then steps it through the model's own
    ``forward`` / ``readout`` (numpy)."""

    name: ClassVar[str] = "teacher_student_via_forward"
    committee_machine: ClassVar[bool] = False


@needs_numba
@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_a_model_plugin_is_simulated_through_its_forward_and_readout(norm: str) -> None:
    """Same weights, same stream: the model's simulation step (forward/readout) gives the
    compiled committee-machine kernel's trajectory step for step; the kernel is refused
    for a model that does not declare itself a committee machine."""
    opts = dict(N=120, alpha=[0, 0.5, 2.0], replicas=2)
    plugin = _SameMachineAsAModelPlugin(2, 3, noise=0.05)
    ex = experiment(norm, model=plugin, eta=0.8, seed=5)
    a = simulate(ex, **opts)
    assert a.attrs["backend"] == "numpy"
    with pytest.raises(SpecificationError, match="not a soft committee machine"):
        simulate(ex, backend="numba", **opts)
    b = simulate(experiment(norm, model=TeacherStudent(2, 3, noise=0.05), eta=0.8, seed=5),
                 backend="numba", **opts)
    np.testing.assert_allclose(a["Q"], b["Q"], rtol=0, atol=1e-11)
    np.testing.assert_allclose(a["R"], b["R"], rtol=0, atol=1e-11)
    assert not np.allclose(a["Q"].isel(alpha=-1), a["Q"].isel(alpha=0))


def test_same_seed_reproduces_and_replicas_are_independent_streams() -> None:
    ex = experiment("batchnorm")
    opts = dict(N=100, alpha_max=1.0, records=3)
    a = simulate(ex, replicas=3, **opts)
    b = simulate(ex, replicas=3, **opts)
    np.testing.assert_array_equal(a["Q"], b["Q"])
    # replica r does not depend on how many replicas run with it
    c = simulate(ex, replicas=2, **opts)
    np.testing.assert_array_equal(a["R"].isel(replica=slice(0, 2)), c["R"])
    # different replicas, different seeds: different trajectories
    assert not np.allclose(a["R"].isel(replica=0, alpha=-1), a["R"].isel(replica=1, alpha=-1))
    d = simulate(ex.evolve(seed=1), replicas=3, **opts)
    assert not np.allclose(a["R"].isel(alpha=-1), d["R"].isel(alpha=-1))


def test_start_is_the_experiments_initial_point_exactly() -> None:
    ex = experiment("batchnorm", init_scale=0.7)
    ds = simulate(ex, N=64, alpha=[0.0, 0.5], replicas=2)
    op = ex.initial_order_parameters()
    for r in range(2):
        np.testing.assert_allclose(ds["Q"].isel(replica=r, alpha=0), op.Q, atol=1e-12)
        np.testing.assert_allclose(ds["R"].isel(replica=r, alpha=0), op.R, atol=1e-12)
    expected = theory.generalization_error(ex.model, ex.normalization, op)
    np.testing.assert_allclose(ds["eps_g"].isel(alpha=0), expected, rtol=1e-12)


def test_explicit_initial_order_parameters() -> None:
    op = OrderParameters.symmetric(2, Q=0.5, C=0.1, R=0.3, S=0.2)
    ds = simulate(experiment(), N=50, alpha=[0.0], replicas=1, initial=op)
    np.testing.assert_allclose(ds["Q"].isel(replica=0, alpha=0), op.Q, atol=1e-12)
    spec = get_analyzer("simulation", initial=op).to_dict()
    assert spec["initial"] == op.to_dict()
    assert get_analyzer("simulation", **{k: v for k, v in spec.items() if k != "name"}) == \
        get_analyzer("simulation", initial=op)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(N=3), r"'N' must be >= K \+ M = 4, got 3"),
        (dict(replicas=0), r"'replicas' must be >= 1, got 0"),
        (dict(records=1), r"'records' must be >= 2, got 1"),
        (dict(alpha_max=0), r"'alpha_max' must be > 0"),
        (dict(alpha=[1.0, 0.5]), r"'alpha' must be a non-empty non-decreasing grid"),
        (dict(alpha=[-1.0]), r"'alpha' must be"),
        (dict(statistics="running"), r"'statistics' must be one of 'population', 'batch'"),
        (dict(backend="cuda"), r"'backend' must be one of 'auto', 'numpy', 'numba'"),
        (dict(mc_samples=10), r"'mc_samples' must be >= 1000, got 10"),
        (dict(speed=3), r"unknown option\(s\) 'speed' for analyzer 'simulation'"),
    ],
)
def test_bad_options_name_the_option(options: dict, match: str) -> None:
    with pytest.raises(SpecificationError, match=match):
        Experiment(TeacherStudent(2, 2), analyzers=[{"name": "simulation", **options}])


def test_batch_statistics_need_batch_size_two() -> None:
    with pytest.raises(SpecificationError, match=r"'batch_size' must be >= 2 .*got 1"):
        Experiment(TeacherStudent(2, 2), normalization="batchnorm",
                   analyzers=[{"name": "simulation", "statistics": "batch"}])


@needs_numba
def test_numba_backend_refused_where_the_kernel_does_not_apply() -> None:
    with pytest.raises(SpecificationError, match=r"'backend' must be 'auto' or 'numpy'.*batch"):
        Experiment(TeacherStudent(2, 2), normalization="batchnorm", batch_size=4,
                   analyzers=[{"name": "simulation", "statistics": "batch",
                               "backend": "numba"}])


def test_dataset_layout_and_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ex = experiment("batchnorm", analyzers=[{"name": "simulation", "N": 60, "alpha_max": 0.5,
                                             "records": 3, "replicas": 2}])
    ds = ex.run()["simulation"]
    assert ds["eps_g"].dims == ("replica", "alpha")
    assert ds["Q"].dims == ("replica", "alpha", "student", "student_")
    assert ds["R"].dims == ("replica", "alpha", "student", "teacher")
    for name in ("eps_g", "Q", "R"):
        assert f"{name}_mean" in ds and f"{name}_sem" in ds
    for name, var in ds.variables.items():
        if name not in ds.dims:
            assert "long_name" in var.attrs and "units" in var.attrs, name
    assert ds.attrs["N"] == 60 and ds.attrs["eta"] == 0.5 and ds.attrs["batch_size"] == 1
    assert ds.attrs["statistics"] == "population"
    assert "eta/sqrt(N)" in ds.attrs["learning_rate_scaling"]
    assert ds.attrs["time"].startswith("alpha = steps / N")
    np.testing.assert_allclose(ds["alpha"], [0.0, 0.25, 0.5], atol=1 / 60)
    back = load(save(ds, tmp_path / "sim.nc"))
    np.testing.assert_array_equal(back["Q"], ds["Q"])


def test_single_replica_has_nan_standard_error() -> None:
    ds = simulate(experiment(), N=40, alpha=[0.0, 0.1], replicas=1)
    assert np.all(np.isnan(ds["eps_g_sem"]))


# ---------------------------------------------------------------------------------
# generic normalizations: statistics paths, trainable parameters, Monte Carlo eps_g
# ---------------------------------------------------------------------------------
@attrs.frozen
class Gain(Normalization):
    """Test normalization ``x~ = a x`` with a per-unit gain ``a`` (trainable or not)."""

    name: ClassVar[str] = "test-gain"
    description: ClassVar[str] = "x~ = a x"
    learn: bool = False

    def parameters(self, K: int) -> dict[str, np.ndarray]:
        return {"a": np.ones(K)}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("a",) if self.learn else ()

    def forward(self, x, stats, params):  # type: ignore[no-untyped-def]
        return params["a"] * x

    def backward(self, x, stats, params, grad_out):  # type: ignore[no-untyped-def]
        shape = np.broadcast_shapes(np.shape(x), np.shape(params["a"]))
        return Backward(x=np.broadcast_to(grad_out * params["a"], shape).copy(),
                        params={"a": np.broadcast_to(grad_out * x, shape).copy()})


def test_monte_carlo_eps_g_fallback_matches_closed_form() -> None:
    """The fallback estimator, on the order parameters of a short plain run."""
    plain = experiment("plain", model=TeacherStudent(2, 2, noise=0.1))
    ds = simulate(plain, N=80, alpha=[0.0, 2.0], replicas=2)
    Qs, Rs = ds["Q"].values, ds["R"].values
    samples = 200_000
    mc, mc_err = simmod._eps_g_monte_carlo(plain.model, plain.normalization, Qs, Rs, {},
                                           samples)
    exact = ds["eps_g"].values
    # sd of (zeta - sigma)^2 / 2 is sqrt(2) (eps_g - noise/2) for Gaussian zeta - sigma;
    # allow a factor 2 for non-Gaussianity
    sem = 2 * math.sqrt(2) * (exact - 0.05) / math.sqrt(samples)
    assert np.all(np.abs(mc - exact) < Z * sem), (mc, exact, sem)
    # its own standard error is the Gaussian one within that factor 2
    assert np.all((mc_err > 0.5 * sem / 2) & (mc_err < 2 * sem / 2)), (mc_err, sem)
    assert np.all(np.abs(mc - exact) < Z * mc_err), (mc, exact, mc_err)


@pytest.mark.parametrize("norm", ["plain", "batchnorm", "weightnorm"])
def test_eps_g_has_the_same_fields_whichever_engine(norm: str) -> None:
    """The exact engine's eps_g (also with a trained gain) carries eps_g_error = 0 and
    names its engine, like the quadrature's."""
    ds = simulate(experiment(norm), N=60, alpha=[0.0, 1.0], replicas=2)
    assert ds["eps_g"].attrs["eps_g_engine"] == "closed_form"
    np.testing.assert_array_equal(ds["eps_g_error"].values, 0.0)
    assert ds["eps_g_error"].dims == ds["eps_g"].dims


def test_generic_normalization_without_closed_form() -> None:
    """A normalization the closed form does not cover: the generic numpy path runs and
    eps_g comes from the theory's generic engine or the Monte Carlo fallback."""
    ex = experiment(Gain())
    ds = simulate(ex, N=80, alpha=[0.0, 2.0], replicas=2, mc_samples=200_000)
    assert ds.attrs["backend"] == "numpy"
    method = ds["eps_g"].attrs["method"]
    assert "generic" in method or "Monte Carlo" in method
    assert ds["eps_g"].attrs["eps_g_engine"] in ("generic", "monte_carlo")
    assert np.all(ds["eps_g_error"].values > 0)  # an estimate, with its error
    plain = experiment("plain")
    exact = theory.generalization_error_batch(plain.model, plain.normalization,
                                              ds["Q"].values, ds["R"].values)
    sem = 2 * math.sqrt(2) * exact / math.sqrt(200_000)
    assert np.all(np.abs(ds["eps_g"].values - exact) < Z * sem)
    # Gain (a = 1) is the plain network: same trajectory as plain with the same seed
    ref = simulate(experiment("plain"), N=80, alpha=[0.0, 2.0], replicas=2, backend="numpy")
    np.testing.assert_allclose(ds["Q"], ref["Q"], atol=1e-12)


def test_trainable_parameter_takes_step_eta_over_N() -> None:
    ex = experiment(Gain(learn=True), batch_size=2, eta=0.3)
    N = 50
    ds = simulate(ex, N=N, alpha=[0.0, 1.0 / N], replicas=1, backend="numpy",
                  mc_samples=1000)
    assert "param_a" in ds
    # redo the one step by hand from the same stream
    rng = ex.rng(simmod.STREAM_SIMULATION, 0)
    J, Bt = ex.initial_order_parameters().realize(N, rng)
    key = rng.integers(0, 2**64 - 1, size=2, dtype=np.uint64, endpoint=True)[0]
    xi = simmod.normals_numpy(np.array([key]), 0, 2 * N).reshape(2, N)
    x, y = xi @ J.T / math.sqrt(N), xi @ Bt.T / math.sqrt(N)
    g = get_activation("erf")
    err = g.g(y).sum(-1) - g.g(x).sum(-1)
    grad_a = (-err[:, None] * g.gprime(x) * x).mean(axis=0)
    np.testing.assert_allclose(ds["param_a"].isel(replica=0, alpha=1), 1.0 - 0.3 / N * grad_a,
                               rtol=1e-12)
    grad_J = (-err[:, None] * g.gprime(x)).T @ xi / math.sqrt(N) / 2
    Jn = J - 0.3 * grad_J
    np.testing.assert_allclose(ds["Q"].isel(replica=0, alpha=1), Jn @ Jn.T / N, rtol=1e-12)


def test_batch_statistics_gradient_matches_finite_differences() -> None:
    """One generic step with batch statistics equals SGD on the batch loss (checked
    against central finite differences of that loss)."""
    N, Bsz, eta = 12, 4, 0.2
    ex = experiment("batchnorm", batch_size=Bsz, eta=eta, init_N=N)
    ds = simulate(ex, N=N, alpha=[0.0, 1.0 / N], replicas=1, statistics="batch",
                  backend="numpy")
    rng = ex.rng(simmod.STREAM_SIMULATION, 0)
    J, Bt = ex.initial_order_parameters().realize(N, rng)
    key = rng.integers(0, 2**64 - 1, size=2, dtype=np.uint64, endpoint=True)[0]
    xi = simmod.normals_numpy(np.array([key]), 0, Bsz * N).reshape(Bsz, N)
    erf = get_activation("erf").g

    def loss(Jv: np.ndarray) -> float:
        x = xi @ Jv.reshape(2, N).T / math.sqrt(N)
        xt = (x - x.mean(0)) / x.std(0)
        return float(np.mean(0.5 * (erf(xi @ Bt.T / math.sqrt(N)).sum(-1)
                                     - erf(xt).sum(-1)) ** 2))

    h = 1e-6
    grad = np.array([(loss(J.ravel() + h * e) - loss(J.ravel() - h * e)) / (2 * h)
                     for e in np.eye(J.size)]).reshape(J.shape)
    Jn = J - eta * grad
    np.testing.assert_allclose(ds["Q"].isel(replica=0, alpha=1), Jn @ Jn.T / N, atol=1e-8)
    np.testing.assert_allclose(ds["R"].isel(replica=0, alpha=1), Jn @ Bt.T / N, atol=1e-8)


def test_population_statistics_gradient_matches_finite_differences() -> None:
    """Generic path, population statistics: the step includes the gradient through Q."""
    N, eta = 10, 0.4
    ex = experiment("batchnorm", eta=eta, init_N=N, init_scale=0.8)
    ds = simulate(ex, N=N, alpha=[0.0, 1.0 / N], replicas=1, backend="numpy")
    rng = ex.rng(simmod.STREAM_SIMULATION, 0)
    J, Bt = ex.initial_order_parameters().realize(N, rng)
    key = rng.integers(0, 2**64 - 1, size=2, dtype=np.uint64, endpoint=True)[0]
    xi = simmod.normals_numpy(np.array([key]), 0, N)[0]
    erf = get_activation("erf").g

    def loss(Jv: np.ndarray) -> float:
        Jm = Jv.reshape(2, N)
        xt = (Jm @ xi / math.sqrt(N)) / np.sqrt(np.sum(Jm**2, axis=1) / N)
        return float(0.5 * (erf(Bt @ xi / math.sqrt(N)).sum() - erf(xt).sum()) ** 2)

    h = 1e-6
    grad = np.array([(loss(J.ravel() + h * e) - loss(J.ravel() - h * e)) / (2 * h)
                     for e in np.eye(J.size)]).reshape(J.shape)
    Jn = J - eta * grad
    np.testing.assert_allclose(ds["Q"].isel(replica=0, alpha=1), Jn @ Jn.T / N, atol=1e-8)


# ---------------------------------------------------------------------------------
# agreement with the ODE
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_agrees_with_ode_on_the_plateau(norm: str) -> None:
    """N = 1000, K = M = 2, eta = 0.5: replica means of eps_g within Z standard errors
    of the ODE from the same start, through the approach and along the plateau."""
    ex = experiment(norm)
    grid = [0.0, 5.0, 10.0, 20.0, 30.0, 40.0]
    ode = ode_eps_g(ex, grid)
    ds = simulate(ex, N=1000, alpha=grid, replicas=16)
    mean, sem = ds["eps_g_mean"].values, ds["eps_g_sem"].values
    np.testing.assert_allclose(mean[0], ode[0], rtol=1e-10)  # identical start
    assert np.all(np.abs(mean[1:] - ode[1:]) < Z * sem[1:]), (mean, ode, sem)
    assert np.all(ode[3:] > 0.5 * ode[3])  # still on the plateau (not escaped)


def _batch_vs_population(small: int, large: int, grid: list[float], replicas: int) -> None:
    """Deviation of minibatch-statistics runs from the population-statistics ODE (same
    batch size, so the same eta^2 / B term): at the larger batch it must be smaller by
    at least sqrt(large / small) (convergence at least like 1 / sqrt(B); observed
    closer to 1 / B), up to Z combined standard errors."""
    dev, sem = {}, {}
    for B in (small, large):
        ex = experiment("batchnorm", batch_size=B, eta=0.5)
        ode = ode_eps_g(ex, grid)
        ds = simulate(ex, N=500, alpha=grid, replicas=replicas, statistics="batch")
        dev[B] = np.abs(ds["eps_g_mean"].values - ode)[1:]
        sem[B] = ds["eps_g_sem"].values[1:]
    f = math.sqrt(large / small)
    bound = dev[small] / f + Z * np.hypot(sem[large], sem[small] / f)
    assert np.all(dev[large] < bound), (dev, sem)
    assert dev[small][-1] > Z * sem[small][-1]  # the effect is resolved at the small batch


def test_batch_statistics_approach_population_ode_as_batch_grows() -> None:
    _batch_vs_population(4, 16, [0.0, 2.0, 4.0], replicas=8)


@pytest.mark.slow
def test_batch_statistics_with_large_batch_approach_population_ode() -> None:
    _batch_vs_population(16, 64, [0.0, 1.0, 2.0, 4.0, 8.0], replicas=16)


@pytest.mark.parametrize("name", list_normalizations())
@pytest.mark.parametrize("statistics", ["population", "batch"])
def test_every_registered_normalization_runs(name: str, statistics: str) -> None:
    # K = 3: with K = 2, layer norm's output is +-1 and nothing moves
    ex = experiment(name, model=TeacherStudent(3, 3),
                    batch_size=4 if statistics == "batch" else 1)
    if statistics == "batch" and not ex.normalization.supports_batch_statistics:
        with pytest.raises(NotImplementedError, match="no minibatch statistics"):
            simulate(ex, N=40, alpha=[0.0, 0.5], replicas=2, statistics=statistics,
                     backend="numpy")
        return
    ds = simulate(ex, N=40, alpha=[0.0, 0.5], replicas=2, statistics=statistics,
                  backend="numpy", mc_samples=20_000)
    assert np.all(np.isfinite(ds["Q"])) and np.all(np.isfinite(ds["eps_g"]))
    assert not np.allclose(ds["Q"].isel(alpha=1), ds["Q"].isel(alpha=0))
    for param in ex.normalization.trainable:
        assert f"param_{param}" in ds


# ---------------------------------------------------------------------------------
# the compiled kernel through the normalization's compiled scale functions
# ---------------------------------------------------------------------------------
@njit_or_none
def _rownorm_scale(Q, p):  # s_i = c_i m_i^(-1/4), m_i = sum_j Q_ij^2
    K = Q.shape[0]
    out = np.empty(K)
    for i in range(K):
        m = 0.0
        for j in range(K):
            m += Q[i, j] * Q[i, j]
        out[i] = p[0, i] * m**-0.25
    return out


@njit_or_none
def _rownorm_jacobian(Q, p):  # ds_i/dQ_ik = -c_i m_i^(-5/4) Q_ik / 2 (couples units)
    K = Q.shape[0]
    out = np.zeros((K, K, K))
    for i in range(K):
        m = 0.0
        for j in range(K):
            m += Q[i, j] * Q[i, j]
        for k in range(K):
            out[i, i, k] = -0.5 * p[0, i] * m**-1.25 * Q[i, k]
    return out


@njit_or_none
def _rownorm_parameter_jacobian(Q, p):
    K = Q.shape[0]
    out = np.zeros((2, K, K))
    for i in range(K):
        m = 0.0
        for j in range(K):
            m += Q[i, j] * Q[i, j]
        out[0, i, i] = m**-0.25
    return out


@attrs.frozen
class RowNorm(Normalization):
    """Third-party diagonal scale with a shift, ``x~_i = c_i x_i / m_i^(1/4) + b_i``,
    ``m_i = sum_j Q_ij^2``: ``ds_i/dQ`` couples the units (off-diagonal ``G``), ``c`` is
    a trained scale parameter, ``b`` a trained shift; compiled scale functions."""

    name: ClassVar[str] = "test-rownorm"
    description: ClassVar[str] = "x~_i = c_i x_i / (sum_j Q_ij^2)^(1/4) + b_i"
    statistics_names: ClassVar[tuple[str, ...]] = ("m",)
    supports_diagonal_scale: ClassVar[bool] = True
    supports_batch_statistics: ClassVar[bool] = False
    scale_parameters: ClassVar[tuple[str, ...]] = ("c",)
    shift_parameters: ClassVar[tuple[str, ...]] = ("b",)
    b0: float = 0.0

    def is_diagonal_scale(self) -> bool:
        return self.b0 == 0.0

    def parameters(self, K: int) -> dict[str, np.ndarray]:
        return {"c": np.linspace(0.9, 1.2, K), "b": np.full(K, self.b0)}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("c", "b")

    def population_statistics(self, Q):  # type: ignore[no-untyped-def]
        return {"m": np.sum(np.square(Q), axis=-1)}

    def population_statistics_vjp(self, Q, grad):  # type: ignore[no-untyped-def]
        return 2.0 * grad["m"][..., :, None] * Q

    def batch_statistics(self, x):  # type: ignore[no-untyped-def]
        raise NotImplementedError("test-rownorm has no minibatch statistics")

    def forward(self, x, stats, params):  # type: ignore[no-untyped-def]
        return params["c"] * x * stats["m"] ** -0.25 + params["b"]

    def backward(self, x, stats, params, grad_out):  # type: ignore[no-untyped-def]
        inv = stats["m"] ** -0.25
        shape = np.broadcast_shapes(np.shape(x), np.shape(grad_out), np.shape(inv))

        def full(v):  # type: ignore[no-untyped-def]
            return np.broadcast_to(v, shape).copy()

        return Backward(x=full(grad_out * params["c"] * inv),
                        stats={"m": full(-0.25 * grad_out * params["c"] * x * inv / stats["m"])},
                        params={"c": full(grad_out * x * inv), "b": full(grad_out)})

    def scale(self, Q, params):  # type: ignore[no-untyped-def]
        return params["c"] * np.sum(np.square(Q), axis=-1) ** -0.25

    def scale_jacobian(self, Q, params):  # type: ignore[no-untyped-def]
        m = np.sum(np.square(Q), axis=-1)
        K = np.shape(Q)[-1]
        out = np.zeros((*np.shape(Q)[:-2], K, K, K))
        idx = np.arange(K)
        out[..., idx, idx, :] = -0.5 * (params["c"] * m**-1.25)[..., :, None] * Q
        return out

    def scale_parameter_jacobian(self, Q, params):  # type: ignore[no-untyped-def]
        m = np.sum(np.square(Q), axis=-1)
        return {"c": m[..., :, None] ** -0.25 * np.eye(np.shape(Q)[-1])}

    def scale_kernels(self):  # type: ignore[no-untyped-def]
        return _ROWNORM_KERNELS


_ROWNORM_KERNELS = None if not simmod.HAVE_NUMBA else ScaleKernels(
    names=("c", "b"), scale=_rownorm_scale, jacobian=_rownorm_jacobian,
    parameter_jacobian=_rownorm_parameter_jacobian, shift=("b",))


@needs_numba
def test_third_party_scale_kernels_satisfy_the_contract() -> None:
    norm = RowNorm(b0=0.2)
    NormalizationContract().test_scale_kernels(norm, norm.parameters(3),
                                               np.random.default_rng(7))
    NormalizationContract().test_diagonal_scale(RowNorm(), RowNorm().parameters(3),
                                                np.random.default_rng(8))


@needs_numba
@pytest.mark.parametrize(("norm", "K"), [
    (("batchnorm_affine", {}), 2),
    (("batchnorm_affine", {"gamma": 1.3, "beta": 0.3, "eps": 0.1}), 2),
    (("weightnorm", {"g": 1.2}), 2),
    (("batchnorm_stopgrad", {"gamma": 0.8}), 2),
    (("batchnorm", {"beta": 0.4, "eps": 0.1}), 2),
    (RowNorm(), 3),
    (RowNorm(b0=0.2), 2),
])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_compiled_kernel_agrees_with_generic_path_through_scale_kernels(
        norm: tuple | Normalization, K: int, batch_size: int) -> None:
    """Kernel vs numpy path step for step: statistics gradient from ``ds/dQ`` (diagonal
    and coupling units), trained scale parameters and shifts; both updates of ``Q``
    (closed form for B (B + 1) <= K (K + 1), recomputed otherwise)."""
    if isinstance(norm, tuple):
        norm = get_normalization(norm[0], **norm[1])
    ex = experiment(norm, model=TeacherStudent(K, 3, noise=0.05), batch_size=batch_size,
                    eta=0.8, seed=4)
    opts = dict(N=150, alpha=[0, 0.02, 1.0, 3.0], replicas=3, mc_samples=1000)
    a = simulate(ex, backend="numpy", **opts)
    b = simulate(ex, backend="numba", **opts)
    assert a.attrs["backend"] == "numpy" and b.attrs["backend"] == "numba"
    np.testing.assert_allclose(a["Q"], b["Q"], rtol=0, atol=1e-11)
    np.testing.assert_allclose(a["R"], b["R"], rtol=0, atol=1e-11)
    assert not np.allclose(a["Q"].isel(alpha=-1), a["Q"].isel(alpha=0))  # it did move
    for name in norm.trainable:
        np.testing.assert_allclose(a[f"param_{name}"], b[f"param_{name}"], rtol=0, atol=1e-11)
        assert not np.allclose(a[f"param_{name}"].isel(alpha=-1),
                               a[f"param_{name}"].isel(alpha=0)), name  # trained


@needs_numba
def test_kernel_state_carries_across_chunks_and_q_refreshes() -> None:
    """Results do not depend on chunking; Q stays J J^T / N past a refresh step."""
    ex = experiment("weightnorm", model=TeacherStudent(2, 2), eta=0.8, seed=1)
    opts = dict(N=40, replicas=2, backend="numba")
    one = simulate(ex, alpha=[0.0, 2100 / 40], **opts)
    many = simulate(ex, alpha=list(np.arange(0, 2101, 300) / 40), **opts)
    np.testing.assert_allclose(one["Q"].isel(alpha=-1), many["Q"].isel(alpha=-1), rtol=0,
                               atol=1e-13)
    ref = simulate(ex, alpha=[0.0, 2100 / 40], N=40, replicas=2, backend="numpy")
    np.testing.assert_allclose(one["Q"], ref["Q"], rtol=0, atol=1e-11)
    np.testing.assert_allclose(one["param_g"], ref["param_g"], rtol=0, atol=1e-11)


@needs_numba
def test_numba_backend_refused_without_scale_kernels() -> None:
    with pytest.raises(SpecificationError, match=r"'backend' must be.*scale_kernels\(\) is None"):
        get_analyzer("simulation", backend="numba").check(experiment(Gain()))
