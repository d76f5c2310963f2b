"""Structured inputs (issue 14, items 1-3): the input distribution, the order-parameter
ODE per input eigenspace, and the simulation with correlated inputs.

References: an exact map (covariance ``c I`` is the isotropic problem in rescaled weights
at rate ``c eta``), an exact invariance (splitting an eigenspace changes nothing), a
second engine (the quadrature's rates against the closed form's), one-step finite-N SGD
increments by Monte Carlo with an explicit hand-written gradient, and the finite-N
simulation against the ODE.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

import framework as f
from framework import Experiment, InputDistribution, SpecificationError, TeacherStudent, theory
from framework.manager import get_normalization

TWO = {"eigenvalues": [0.4, 2.5], "fractions": [2 / 3, 1 / 3]}


def _state(K: int, M: int, seed: int, L: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A generic state per eigenspace: overlaps of random weights in L blocks."""
    rng = np.random.default_rng(seed)
    Qs, Rs = [], []
    for _ in range(L):
        X = rng.standard_normal((K + M, K + M + 3)) / np.sqrt(K + M + 3)
        S = X @ X.T
        Qs.append(S[:K, :K])
        Rs.append(S[:K, K:])
    return np.array(Qs), np.array(Rs)


# -- item 1: the input distribution ----------------------------------------------------
class TestInputDistribution:
    def test_default_is_isotropic_and_changes_nothing(self):
        assert InputDistribution().isotropic
        plain = TeacherStudent(2, 2)
        explicit = TeacherStudent(2, 2, inputs=InputDistribution())
        assert plain == explicit and plain.to_dict() == explicit.to_dict()
        assert "inputs" not in plain.to_dict()  # spec hashes of stored results unchanged
        eng = theory.select_engine(plain, get_normalization("plain"))
        assert not isinstance(eng, theory.SpectralEngine)

    def test_pickle_and_copy(self):
        import copy
        import pickle

        m = TeacherStudent(2, 3, inputs=TWO)
        assert pickle.loads(pickle.dumps(m)) == m
        d = InputDistribution(**TWO)
        assert copy.deepcopy(d) == d and hash(copy.copy(d)) == hash(d)
        with pytest.raises(AttributeError, match="immutable"):
            d.eigenvalues = np.ones(2)  # type: ignore[misc]

    def test_round_trip(self):
        m = TeacherStudent(2, 3, inputs=TWO)
        assert m.to_dict()["inputs"] == {"eigenvalues": [0.4, 2.5],
                                         "fractions": [2 / 3, 1 / 3]}
        assert TeacherStudent.from_dict(m.to_dict()) == m
        ex = Experiment(model=m, analyzers=["dynamics"])
        assert Experiment.from_dict(ex.to_dict()).model == m

    @pytest.mark.parametrize("bad, err, words", [
        ({"eigenvalues": [1.0, "2"]}, TypeError, "'eigenvalues' must hold real numbers"),
        ({"eigenvalues": [True]}, TypeError, "'eigenvalues' must hold real numbers"),
        ({"eigenvalues": "1.0"}, TypeError, "'eigenvalues' must be a sequence"),
        ({"eigenvalues": [1.0, -0.5]}, SpecificationError, "'eigenvalues' must be > 0"),
        ({"eigenvalues": [1.0, np.inf]}, SpecificationError, "finite"),
        ({"eigenvalues": [1.0, 2.0], "fractions": [0.5, 0.6]}, SpecificationError,
         "'fractions' must sum to 1"),
        ({"eigenvalues": [1.0, 2.0], "fractions": [1.0]}, SpecificationError,
         "one entry per eigenvalue"),
        ({"eigenvalues": [1.0, 2.0], "fractions": [1.5, -0.5]}, SpecificationError,
         "'fractions' must be > 0"),
        ({"eigenvalue": [1.0]}, SpecificationError, "unknown field(s) 'eigenvalue'"),
        ("isotropic", TypeError, "'inputs' must be an InputDistribution or a mapping"),
    ])
    def test_bad_input_refused(self, bad, err, words):
        with pytest.raises(err) as info:
            TeacherStudent(2, 2, inputs=bad)
        assert words in str(info.value)

    def test_helpers(self):
        p = InputDistribution.power_law(5, 1.5, mean=2.0)
        assert p.L == 5 and p.mean_eigenvalue == pytest.approx(2.0, rel=1e-14)
        assert np.allclose(p.eigenvalues[0] / p.eigenvalues, np.arange(1, 6) ** 1.5)
        t = InputDistribution.two_level(100.0, fraction=0.25)
        assert t.eigenvalues[1] / t.eigenvalues[0] == pytest.approx(100.0, rel=1e-14)
        assert t.mean_eigenvalue == pytest.approx(1.0, rel=1e-14)
        with pytest.raises(SpecificationError, match="'ratio' must be >= 1"):
            InputDistribution.two_level(0.5)
        with pytest.raises(TypeError, match="'exponent' must be a real number"):
            InputDistribution.power_law(3, "1")

    def test_block_sizes(self):
        d = InputDistribution([1.0, 2.0, 3.0], [0.5, 0.3, 0.2])
        sizes = d.block_sizes(7)
        assert sizes.sum() == 7 and np.all(sizes >= 1)
        assert d.block_sizes(10).tolist() == [5, 3, 2]
        with pytest.raises(SpecificationError, match="at least one direction"):
            InputDistribution([1.0, 2.0], [0.99, 0.01]).block_sizes(20)

    def test_structured_inputs_refused_where_not_implemented(self):
        m = TeacherStudent(2, 2, inputs=TWO)
        with pytest.raises(SpecificationError, match=r"'fisher'.*isotropic inputs"):
            Experiment(model=m, analyzers=["dynamics", "fixedpoint", "escape", "fisher"])
        with pytest.raises(SpecificationError, match="plain gradient step with structured"):
            Experiment(model=m, learning_rule="natural_gradient", analyzers=["dynamics"])


# -- item 2: the ODE per eigenspace ------------------------------------------------------
@pytest.mark.parametrize("norm, act", [("plain", "erf"), ("batchnorm", "erf"),
                                       ("batchnorm_stopgrad", "erf"), ("plain", "tanh"),
                                       ("batchnorm", "tanh")])
@pytest.mark.parametrize("second_order", [True, False])
def test_covariance_c_identity_is_the_rescaled_isotropic_problem(norm, act, second_order):
    """xi ~ N(0, c I): x = J xi / sqrt(N) = (sqrt(c) J) xi' / sqrt(N) with xi' isotropic,
    and the SGD step on J is sqrt(c) times the isotropic step on sqrt(c) J, i.e. the
    weights J' = sqrt(c) J, B' = sqrt(c) B follow isotropic SGD at rate c eta: Q' = c Q,
    R' = c R, T' = c T, eta' = c eta, dQ'/dalpha = c dQ/dalpha (exactly; without
    trainable parameters, whose step is not rescaled)."""
    c, eta = 1.7, 0.3
    Q, R = _state(3, 2, seed=4)
    n = get_normalization(norm)
    st = theory.select_engine(
        TeacherStudent(3, 2, activation=act, inputs={"eigenvalues": [c]}), n)
    iso = theory.select_engine(TeacherStudent(3, 2, activation=act, T=c * np.eye(2)), n)
    assert isinstance(st, theory.SpectralEngine) and not st.trainable
    assert st.name == ("closed_form" if act == "erf" else "generic")
    r = st.rates(Q, R, eta=eta, second_order=second_order)
    ri = iso.rates(c * Q[0], c * R[0], eta=c * eta, second_order=second_order)
    np.testing.assert_allclose(c * r.dQ[0], ri.dQ, rtol=0, atol=2e-15)
    np.testing.assert_allclose(c * r.dR[0], ri.dR, rtol=0, atol=2e-15)
    assert r.eps_g == pytest.approx(ri.eps_g, rel=1e-15)


def test_covariance_c_identity_trajectory_map():
    c, eta = 0.6, 0.8
    alpha = np.linspace(0.0, 60.0, 31)
    st = theory.select_engine(TeacherStudent(2, 2, inputs={"eigenvalues": [c]}),
                              get_normalization("batchnorm"))
    iso = theory.select_engine(TeacherStudent(2, 2, T=c * np.eye(2)),
                               get_normalization("batchnorm"))
    Q0 = np.array([[0.2, 0.01], [0.01, 0.15]])
    R0 = np.array([[0.02, -0.01], [0.0, 0.03]])
    a = st.integrate(Q0, R0, eta=eta, alpha=alpha, rtol=1e-11, atol=1e-13)
    b = iso.integrate(c * Q0, c * R0, eta=c * eta, alpha=alpha, rtol=1e-11, atol=1e-13)
    assert not a.diverged and not b.diverged
    assert a.spaces["Q"].shape == (31, 1, 2, 2)
    np.testing.assert_allclose(a.Q, b.Q, rtol=0, atol=1e-8)
    np.testing.assert_allclose(a.R, b.R, rtol=0, atol=1e-8)
    np.testing.assert_allclose(a.eps_g, b.eps_g, rtol=0, atol=1e-9)
    assert b.eps_g[-1] < 0.5 * b.eps_g[0]  # the map is tested on a run that learns


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_splitting_an_eigenspace_changes_nothing(norm):
    """Two eigenspaces with the same eigenvalue are one: the rates of the blocks sum to
    the rate of the merged block (an exact invariance of the multi-block assembly)."""
    c, eta = 1.3, 0.4
    n = get_normalization(norm)
    one = theory.select_engine(TeacherStudent(2, 2, inputs={"eigenvalues": [c]}), n)
    two = theory.select_engine(
        TeacherStudent(2, 2, inputs={"eigenvalues": [c, c], "fractions": [0.3, 0.7]}), n)
    Q, R = _state(2, 2, seed=8, L=2)
    r2 = two.rates(Q, R, eta=eta)
    r1 = one.rates(Q.sum(0, keepdims=True), R.sum(0, keepdims=True), eta=eta)
    np.testing.assert_allclose(r2.dQ.sum(0), r1.dQ[0], rtol=0, atol=5e-15)
    np.testing.assert_allclose(r2.dR.sum(0), r1.dR[0], rtol=0, atol=5e-15)


def test_quadrature_engine_agrees_with_the_closed_form():
    """The generic engine's drift (quasi-Monte Carlo over the pre-activations, batch
    norm's statistics path through its VJP) against the closed forms, per eigenspace."""
    m = TeacherStudent(2, 2, inputs=TWO)
    n = get_normalization("batchnorm")
    exact = theory.select_engine(m, n)
    generic = theory.select_engine(m, n, engine="generic",
                                   quadrature={"samples": 16384, "replicates": 16})
    assert isinstance(generic, theory.SpectralEngine) and generic.name == "generic"
    Q, R = _state(2, 2, seed=3, L=2)
    a, b = exact.rates(Q, R, eta=0.5), generic.rates(Q, R, eta=0.5)
    assert np.all(b.dQ_error > 0)
    assert np.all(np.abs(a.dQ - b.dQ) < 5 * b.dQ_error + 1e-12)
    assert np.all(np.abs(a.dR - b.dR) < 5 * b.dR_error + 1e-12)
    assert np.max(b.dQ_error) < 1e-3


def _g(u: np.ndarray) -> np.ndarray:
    return erf(u / np.sqrt(2.0))


def _gp(u: np.ndarray) -> np.ndarray:
    return np.sqrt(2.0 / np.pi) * np.exp(-0.5 * u * u)


@pytest.mark.parametrize("norm", ["plain", "batchnorm", "weightnorm"])
def test_one_step_increments_against_monte_carlo(norm):
    """Finite-N SGD with correlated inputs, one step from fixed weights, averaged over
    inputs: N E[Delta Q_l] and N E[Delta R_l] of the first-order (eta-linear) part
    against the ODE without its eta^2 term. The gradient is written out by hand
    (batch norm's population statistics s_i = (J_i Sigma J_i / N)^(-1/2) included; weight
    norm's statistic is of the weights, s_i = (J_i J_i / N)^(-1/2) at gain 1), and
    the first-order mean is exact at any N (Gaussian conditioning), so the comparison
    is to the Monte Carlo error alone."""
    rng = np.random.default_rng(11)
    K = M = 2
    N, S = 240, 120_000
    inputs = InputDistribution(TWO["eigenvalues"], TWO["fractions"])
    lam_c = inputs.coordinate_eigenvalues(N)
    J = 0.7 * rng.standard_normal((K, N)) + 0.3 * rng.standard_normal((1, N))
    B = rng.standard_normal((M, N))
    Ql = inputs.space_overlaps(J, J)
    Rl = inputs.space_overlaps(J, B)
    Tl = inputs.space_overlaps(B, B)
    T = B @ B.T / N
    model = TeacherStudent(K, M, T=0.5 * (T + T.T), inputs=inputs)
    eng = theory.select_engine(model, get_normalization(norm))
    # the realized teacher's per-space overlaps (T_l = f_l T holds only as N -> infinity)
    eng.T_l = Tl
    eng.base.T = inputs.total(Tl)
    r = eng.rates(Ql, Rl, eta=1.0, second_order=False)
    Qt = inputs.total(Ql)
    edges = np.cumsum(inputs.block_sizes(N))[:-1]
    sums = np.zeros((2, 2, K, K + M))  # (moment, space, K, K+M): E[dQ | dR], E[(..)^2]
    for _ in range(6):
        xi = rng.standard_normal((S // 6, N)) * np.sqrt(lam_c)
        x, y = xi @ J.T / np.sqrt(N), xi @ B.T / np.sqrt(N)
        s = {"plain": np.ones(K), "batchnorm": 1.0 / np.sqrt(np.diag(Qt)),
             "weightnorm": 1.0 / np.sqrt(np.diag(Ql.sum(0)))}[norm]
        xt = s * x
        e = _g(y).sum(1) - _g(xt).sum(1)
        go = -e[:, None] * _gp(xt)  # d loss / d x~
        # -d loss / d J_i / sqrt(N)-scaled: the step with eta = 1
        step = -np.einsum("si,sn->sin", go * s, xi) / np.sqrt(N)
        if norm == "batchnorm":  # d x~_i / d J_i through s_i: -x_i s_i^3 Sigma J_i / N
            step -= np.einsum("si,in->sin", go * x * (-s**3), J * lam_c / N)
        if norm == "weightnorm":  # through |J_i|: -x_i s_i^3 J_i / N (not Sigma J_i)
            step -= np.einsum("si,in->sin", go * x * (-s**3), J / N)
        for ell, (Jb, Bb, stb) in enumerate(zip(np.split(J, edges, axis=1),
                                                 np.split(B, edges, axis=1),
                                                 np.split(step, edges, axis=2), strict=True)):
            lin = np.concatenate([
                np.einsum("sin,kn->sik", stb, Jb) + np.einsum("in,skn->sik", Jb, stb),
                np.einsum("sin,mn->sim", stb, Bb)], axis=-1)  # N * first-order / N
            sums[0, ell] += lin.sum(0)
            sums[1, ell] += (lin**2).sum(0)
    mean = sums[0] / S
    se = np.sqrt(sums[1] / S - mean**2) / np.sqrt(S)
    theory_ = np.concatenate([r.dQ, r.dR], axis=-1)
    z = np.abs(mean - theory_) / se
    assert np.max(z) < 4.5, (z, mean, theory_)
    assert np.max(np.abs(theory_)) > 10 * np.max(se)  # the test resolves the rates


# -- item 3: the simulation ---------------------------------------------------------------
@pytest.fixture(scope="module")
def runs():
    grid = list(np.linspace(0.0, 16.0, 9))
    out = {}
    for norm in ("plain", "batchnorm"):
        for backend in ("numpy", "numba"):
            ex = Experiment(
                model=TeacherStudent(2, 2, inputs=TWO), normalization=norm, eta=0.5,
                init_scale=0.3, seed=1,
                analyzers=[{"name": "dynamics", "alpha": grid},
                           {"name": "simulation", "N": 600, "alpha": grid, "replicas": 12,
                            "backend": backend}])
            out[norm, backend] = ex.run()
    return out


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_simulation_backends_agree(runs, norm):
    a, b = runs[norm, "numpy"]["simulation"], runs[norm, "numba"]["simulation"]
    assert a.attrs["backend"] == "numpy" and b.attrs["backend"] == "numba"
    np.testing.assert_allclose(a.Q.values, b.Q.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.Q_space.values, b.Q_space.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_simulation_against_the_ode(runs, norm):
    res = runs[norm, "numba"]
    ode, sim = res["dynamics"], res["simulation"]
    # the start is realized exactly per eigenspace (N_l / N = f_l here)
    np.testing.assert_allclose(sim.Q_space.values[:, 0], np.broadcast_to(
        ode.Q_space.values[0], sim.Q_space.values[:, 0].shape), rtol=0, atol=1e-12)
    eps_ode = ode.eps_g.values
    eps_sim, sem = sim.eps_g_mean.values, sim.eps_g_sem.values
    assert eps_ode[-1] < 0.2 * eps_ode[0]  # the comparison covers learning
    z = np.abs(eps_sim[1:] - eps_ode[1:]) / sem[1:]
    assert np.max(z) < 4.0, z
    for name in ("Q_space", "R_space"):
        m = sim[name].values.mean(0)
        se = sim[name].values.std(0, ddof=1) / np.sqrt(sim.sizes["replica"])
        zz = np.abs(m[1:] - ode[name].values[1:]) / (se[1:] + 1e-12)
        assert np.quantile(zz, 0.95) < 3.5 and np.max(zz) < 5.0, (name, zz.max())


def test_datasets_are_labelled_and_survive_netcdf(runs, tmp_path):
    res = runs["batchnorm", "numba"]
    for ds in (res["dynamics"], res["simulation"]):
        assert ds.Q_space.dims[-3:] == ("eigenspace", "student", "student_")
        assert ds.input_eigenvalue.values.tolist() == [0.4, 2.5]
        assert "pre-activation covariance" in ds.Q.attrs["long_name"]
        assert "Sigma" in ds.attrs["convention_inputs"]
        np.testing.assert_allclose(
            ds.Q.values, np.einsum("l,...lab->...ab", ds.input_eigenvalue.values,
                                   ds.Q_space.values), rtol=1e-12, atol=1e-14)
    assert res["simulation"].attrs["input_block_sizes"] == "400, 200"
    path = tmp_path / "structured.nc"
    f.save(res["dynamics"], path)
    back = f.load(path)
    np.testing.assert_array_equal(back.Q_space.values, res["dynamics"].Q_space.values)


def test_weight_norm_simulation_against_the_ode():
    """Weight normalization under a spread spectrum: its statistic |J_i|^2 / N = sum_l
    Q_l,ii is of the weights (the simulation's numpy path, in whitened coordinates J' = J
    Sigma^(1/2), takes J' Sigma^-1 J'^T / N), against the ODE (the quadrature engine at
    the weights' Gram matrix; the statistics' step along J, not Sigma J), gain included."""
    grid = list(np.linspace(0.0, 16.0, 9))
    res = Experiment(
        model=TeacherStudent(2, 2, inputs=TWO), normalization="weightnorm", eta=0.5,
        init_scale=0.3, seed=1,
        analyzers=[{"name": "dynamics", "alpha": grid},
                   {"name": "simulation", "N": 600, "alpha": grid, "replicas": 12}]).run()
    ode, sim = res["dynamics"], res["simulation"]
    assert sim.attrs["backend"] == "numpy" and ode.attrs["engine"] == "generic"
    eps_ode = ode.eps_g.values
    assert eps_ode[-1] < 0.2 * eps_ode[0]  # the comparison covers learning
    z = np.abs(sim.eps_g_mean.values[1:] - eps_ode[1:]) / np.hypot(
        sim.eps_g_sem.values[1:], ode.eps_g_error.values[1:])
    assert np.max(z) < 4.0, z
    for name in ("Q_space", "R_space", "param_g"):
        m = sim[name].values.mean(0)
        se = sim[name].values.std(0, ddof=1) / np.sqrt(sim.sizes["replica"])
        zz = np.abs(m[1:] - ode[name].values[1:]) / (se[1:] + 1e-12)
        assert np.quantile(zz, 0.95) < 3.5 and np.max(zz) < 5.0, (name, zz.max())
