"""Inputs with a mean (issue 14, items 1-3): ``xi ~ N(m u, Sigma)``, the student's overlap
``r = J u / sqrt(N)`` as state, batch norm's centring, and the simulation.

References: one-step finite-N SGD increments by Monte Carlo with the gradient written out
by hand (the population statistics' dependence on the mean included), an exact
structural identity (a centring normalization cancels the mean's drift, ``E[a] + b = 0``),
exact realizations, the two simulation backends against each other, and the finite-N
simulation against the ODE.
"""

from __future__ import annotations

import pickle
from typing import ClassVar

import numpy as np
import pytest
from scipy.special import erf

from framework import Experiment, InputDistribution, SpecificationError, TeacherStudent, theory
from framework.manager import get_normalization

TWO = {"eigenvalues": [0.4, 2.5], "fractions": [2 / 3, 1 / 3]}
MEAN = {"eigenvalues": [1.0], "mean": 2.0, "direction": 0.5}


def _g(u: np.ndarray) -> np.ndarray:
    return erf(u / np.sqrt(2.0))


def _gp(u: np.ndarray) -> np.ndarray:
    return np.sqrt(2.0 / np.pi) * np.exp(-0.5 * u * u)


# -- item 1: the specification -----------------------------------------------------------
class TestSpecification:
    def test_centred_default_unchanged(self):
        d = InputDistribution(**TWO)
        assert d.centred and "mean" not in d.to_dict()
        assert InputDistribution().isotropic
        assert not InputDistribution(mean=1.0).isotropic  # Sigma = I with a mean

    def test_round_trip_pickle_hash(self):
        m = TeacherStudent(2, 2, inputs={**TWO, "mean": 1.5, "direction": [0.3, 0.2],
                                         "mean_space": 1})
        d = m.to_dict()["inputs"]
        assert d["mean"] == 1.5 and d["direction"] == [0.3, 0.2] and d["mean_space"] == 1
        assert TeacherStudent.from_dict(m.to_dict()) == m
        assert pickle.loads(pickle.dumps(m)) == m
        other = TeacherStudent(2, 2, inputs={**TWO, "mean": 1.5, "direction": [0.3, 0.2]})
        assert other != m and hash(other.inputs) != hash(m.inputs)
        ex = Experiment(model=m, analyzers=["dynamics"])
        assert Experiment.from_dict(ex.to_dict()).model == m
        assert "mean of size 1.5" in m.inputs.describe()

    @pytest.mark.parametrize("bad, err, words", [
        ({"eigenvalues": [1.0], "mean": [0.1]}, TypeError, "'mean' must be a real number"),
        ({"eigenvalues": [1.0], "mean": "1"}, TypeError, "'mean' must be a real number"),
        ({"eigenvalues": [1.0], "mean": -1.0}, SpecificationError, "'mean' must be >= 0"),
        ({"eigenvalues": [1.0], "direction": 0.5}, SpecificationError,
         "applies only with 'mean' > 0"),
        ({"eigenvalues": [1.0], "mean": 1.0, "direction": "0.5"}, TypeError,
         "'direction' must be a sequence"),
        ({"eigenvalues": [1.0], "mean": 1.0, "direction": [0.1, 0.2, 0.3]},
         SpecificationError, "one value or one per teacher unit (M = 2)"),
        ({"eigenvalues": [1.0], "mean": 1.0, "direction": 0.9}, SpecificationError,
         "too long for the teacher"),
        ({**TWO, "mean": 1.0, "mean_space": 2}, SpecificationError,
         "0 <= mean_space < L = 2, got 2"),
        ({**TWO, "mean": 1.0, "mean_space": 0.5}, TypeError, "'mean_space' must be an integer"),
        ({"eigenvalues": [1.0], "means": 1.0}, SpecificationError, "unknown field(s) 'means'"),
    ])
    def test_bad_input_refused(self, bad, err, words):
        with pytest.raises(err) as info:
            TeacherStudent(2, 2, inputs=bad)
        assert words in str(info.value)

    def test_engines_and_normalizations_that_cannot(self):
        m = TeacherStudent(2, 2, inputs=MEAN)
        eng = theory.select_engine(m, get_normalization("plain"))
        assert isinstance(eng, theory.SpectralEngine) and eng.name == "generic"
        with pytest.raises(theory.ClosedFormUnavailable, match="centred pre-activations only"):
            theory.select_engine(m, get_normalization("plain"), engine="closed_form")
        # weight norm's statistic is of the weights, blind to the mean: the quadrature
        # engine takes the weights' Gram, with a mean and with a spread spectrum
        for inputs in (MEAN, TWO):
            eng = theory.select_engine(TeacherStudent(2, 2, inputs=inputs),
                                       get_normalization("weightnorm"))
            assert eng.name == "generic" and eng.weight_stats
        with pytest.raises(theory.ClosedFormUnavailable, match="pre-activation covariance"):
            theory.select_engine(TeacherStudent(2, 2, inputs=MEAN),
                                 get_normalization("weightnorm"), engine="closed_form")
        with pytest.raises(theory.ClosedFormUnavailable, match="pre-activation covariance"):
            theory.select_engine(TeacherStudent(2, 2, inputs=TWO),
                                 get_normalization("weightnorm"), engine="closed_form")

    def test_analyzers_without_the_mean_are_refused(self):
        import attrs

        from framework.analyzer import Analyzer

        @attrs.frozen
        class Covariance(Analyzer):  # structured inputs, but not a mean
            name: ClassVar[str] = "covariance_only"
            supports_structured_inputs: ClassVar[bool] = True

        m = TeacherStudent(2, 2, inputs=MEAN)
        with pytest.raises(SpecificationError, match=r"'covariance_only' compute with "
                                                    r"centred inputs only"):
            Experiment(model=m, analyzers=["dynamics", Covariance()])
        with pytest.raises(SpecificationError, match=r"'fisher' compute with isotropic"):
            Experiment(model=m, analyzers=["dynamics", "fisher"])
        Experiment(model=m, analyzers=["dynamics", "simulation", "fixedpoint", "hessian",
                                       "escape"])  # these do

    def test_realization_is_exact(self):
        inputs = InputDistribution(**TWO, mean=1.5, direction=[0.3, -0.2], mean_space=1)
        model = TeacherStudent(2, 2, inputs=inputs)
        op = Experiment(model=model, analyzers=["dynamics"]).initial_order_parameters()
        N = 60
        r = np.array([0.25, -0.1])
        J, B = inputs.realize(model, op, N, np.random.default_rng(3), r=r)
        c = inputs.mean_coordinate(N)
        assert c == inputs.block_sizes(N)[0]
        np.testing.assert_allclose(J[:, c] / np.sqrt(N), r, atol=1e-14)
        np.testing.assert_allclose(B[:, c] / np.sqrt(N), [0.3, -0.2], atol=1e-14)
        frac = inputs.block_sizes(N)[:, None, None] / N
        np.testing.assert_allclose(inputs.space_overlaps(J, J), frac * op.Q, atol=1e-13)
        np.testing.assert_allclose(inputs.space_overlaps(B, B), frac * op.T, atol=1e-13)


# -- item 2: the ODE ------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["plain", "batchnorm", "meanonly", "weightnorm"])
def test_one_step_increments_against_monte_carlo(norm):
    """Finite-N SGD with correlated, non-centred inputs, one step from fixed weights that
    have macroscopic overlaps with the mean direction, averaged over inputs: N E[Delta Q_l],
    N E[Delta R_l] and N E[Delta r] of the eta-linear part against the ODE without its
    eta^2 term. The gradient is written out by hand: batch norm's population statistics
    mean_i = m J_i u / sqrt(N), var_i = J_i Sigma J_i / N, both differentiated; weight
    norm's statistic |J_i|^2 / N (of the weights: blind to the mean and to Sigma), also
    differentiated, and its gain's rate. The first-order mean is exact at any N, so the
    comparison is to the Monte Carlo error."""
    rng = np.random.default_rng(5)
    K = M = 2
    N, S, m = 240, 120_000, 1.5
    base = InputDistribution(TWO["eigenvalues"], TWO["fractions"])
    lam_c = base.coordinate_eigenvalues(N)
    c = int(base.block_sizes(N)[0])  # the mean direction: first coordinate of space 1
    J = 0.6 * rng.standard_normal((K, N)) + 0.3 * rng.standard_normal((1, N))
    B = rng.standard_normal((M, N))
    J[:, c] = np.sqrt(N) * np.array([0.3, -0.2])
    B[:, c] = np.sqrt(N) * np.array([0.35, 0.25])
    r, s = J[:, c] / np.sqrt(N), B[:, c] / np.sqrt(N)
    Ql, Rl, Tl = (base.space_overlaps(J, J), base.space_overlaps(J, B),
                  base.space_overlaps(B, B))
    T = B @ B.T / N
    inputs = InputDistribution(TWO["eigenvalues"], TWO["fractions"], mean=m,
                               direction=s, mean_space=1)
    model = TeacherStudent(K, M, T=0.5 * (T + T.T), inputs=inputs)
    eng = theory.select_engine(model, get_normalization(norm),
                               quadrature={"samples": 1 << 14})
    eng.T_l = Tl  # the realized teacher's per-space overlaps
    eng.base.T = base.total(Tl)
    rt = eng.rates(Ql, Rl, {theory.MEAN_OVERLAP: r}, eta=1.0, second_order=False)
    Qt = base.total(Ql)
    mu = m * r
    sc = {"batchnorm": 1.0 / np.sqrt(np.diag(Qt)),  # g = 1: x~ = x / sqrt(|J|^2 / N)
          "weightnorm": 1.0 / np.sqrt(np.diag(J @ J.T) / N)}.get(norm, np.ones(K))
    edges = np.cumsum(base.block_sizes(N))[:-1]
    sums = np.zeros((2, 2, K, K + M))
    rs = np.zeros((2, K))
    gs = np.zeros((2, K))  # weight norm's gain: d g / d alpha = -E[d loss / d g]
    for _ in range(6):
        xi = rng.standard_normal((S // 6, N)) * np.sqrt(lam_c)
        xi[:, c] += m
        x, y = xi @ J.T / np.sqrt(N), xi @ B.T / np.sqrt(N)
        centred = norm in ("batchnorm", "meanonly")
        xc = x - mu if centred else x
        xt = sc * xc
        e = _g(y).sum(1) - _g(xt).sum(1)
        go = -e[:, None] * _gp(xt)  # d loss / d x~
        dxi = xi.copy()
        if centred:  # d (x_i - mean_i) / d J_i = (xi - m u) / sqrt(N)
            dxi[:, c] -= m
        step = -np.einsum("si,sn->sin", go * sc, dxi) / np.sqrt(N)
        if norm == "batchnorm":  # through var_i: -(x_i - mean_i) s_i^3 Sigma J_i / N
            step -= np.einsum("si,in->sin", go * xc * (-sc**3), J * lam_c / N)
        if norm == "weightnorm":  # through |J_i|^2 / N: along J_i, not Sigma J_i
            step -= np.einsum("si,in->sin", go * x * (-sc**3), J / N)
            dg = -go * x * sc
            gs[0] += dg.sum(0)
            gs[1] += (dg**2).sum(0)
        for ell, (Jb, Bb, stb) in enumerate(zip(np.split(J, edges, axis=1),
                                                 np.split(B, edges, axis=1),
                                                 np.split(step, edges, axis=2), strict=True)):
            lin = np.concatenate([
                np.einsum("sin,kn->sik", stb, Jb) + np.einsum("in,skn->sik", Jb, stb),
                np.einsum("sin,mn->sim", stb, Bb)], axis=-1)
            sums[0, ell] += lin.sum(0)
            sums[1, ell] += (lin**2).sum(0)
        dr = np.sqrt(N) * step[:, :, c]  # N Delta r
        rs[0] += dr.sum(0)
        rs[1] += (dr**2).sum(0)
    mean = sums[0] / S
    se = np.sqrt(sums[1] / S - mean**2) / np.sqrt(S)
    th = np.concatenate([rt.dQ, rt.dR], axis=-1)
    z = np.abs(mean - th) / np.sqrt(se**2 + np.concatenate([rt.dQ_error, rt.dR_error],
                                                          axis=-1) ** 2)
    assert np.max(z) < 4.5, (z, mean, th)
    assert np.max(np.abs(th)) > 10 * np.max(se)  # the test resolves the rates
    rmean = rs[0] / S
    rse = np.sqrt(rs[1] / S - rmean**2) / np.sqrt(S)
    dr_th = rt.dparams[theory.MEAN_OVERLAP]
    zr = np.abs(rmean - dr_th) / np.sqrt(rse**2 + rt.dparams_error[theory.MEAN_OVERLAP] ** 2)
    assert np.max(zr) < 4.5, (zr, rmean, dr_th)
    assert np.max(np.abs(dr_th)) > 10 * np.max(rse)
    if norm == "weightnorm":
        gmean = gs[0] / S
        gse = np.sqrt(gs[1] / S - gmean**2) / np.sqrt(S)
        zg = np.abs(gmean - rt.dparams["g"]) / np.hypot(gse, rt.dparams_error["g"])
        assert np.max(zg) < 4.5, (zg, gmean, rt.dparams["g"])
        assert np.max(np.abs(gmean)) > 10 * np.max(gse)


@pytest.mark.parametrize("norm, centres", [("plain", False), ("batchnorm", True),
                                           ("meanonly", True), ("batchnorm_affine", True)])
def test_a_centring_normalization_cancels_the_mean_drift(norm, centres):
    """Through its statistics a centring normalization pulls J back along u by exactly the
    mean's push: b = -E[a] replicate by replicate (to rounding); plain has b = 0."""
    model = TeacherStudent(2, 2, inputs=MEAN)
    eng = theory.select_engine(model, get_normalization(norm))
    Q = np.array([[0.5, 0.1], [0.1, 0.4]])
    R = np.array([[0.2, 0.05], [0.0, 0.1]])
    d = eng.drift(Q, R, {theory.MEAN_OVERLAP: [0.3, 0.1]}, eta=0.5)
    assert d.Ea is not None and d.b is not None
    assert np.max(np.abs(d.Ea)) > 1e-2  # the mean pushes
    if centres:
        np.testing.assert_allclose(d.b, -d.Ea, rtol=0, atol=1e-14)
    else:
        assert np.all(d.b == 0.0)


def test_a_mean_orthogonal_to_the_teacher_changes_nothing():
    """With s = 0 and r = 0 every pre-activation is centred: the rates are those of the
    centred problem and r stays 0 (an odd activation)."""
    model = TeacherStudent(2, 2, inputs={**TWO, "mean": 3.0, "direction": 0.0})
    centred = TeacherStudent(2, 2, inputs=TWO)
    for norm in ("plain", "batchnorm"):
        n = get_normalization(norm)
        a = theory.select_engine(model, n).rates(np.eye(2) * 0.3, np.eye(2) * 0.1, eta=0.5)
        b = theory.select_engine(centred, n, engine="generic").rates(
            np.eye(2) * 0.3, np.eye(2) * 0.1, eta=0.5)
        np.testing.assert_allclose(a.dQ, b.dQ, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(a.dR, b.dR, rtol=1e-12, atol=1e-14)
        assert np.max(np.abs(a.dparams[theory.MEAN_OVERLAP])) < 1e-3  # QMC zero of odd g


# -- item 3: the simulation -------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs():
    grid = list(np.linspace(0.0, 8.0, 5))
    out = {}
    for norm, backends in (("plain", ("numpy", "numba")), ("batchnorm", ("numpy",)),
                           ("weightnorm", ("numpy",))):
        for backend in backends:
            ex = Experiment(
                model=TeacherStudent(2, 2, inputs={**TWO, "mean": 1.5, "direction": 0.35,
                                                   "mean_space": 1}),
                normalization=norm, eta=0.5, init_scale=0.3, seed=2,
                analyzers=[{"name": "dynamics", "alpha": grid},
                           {"name": "simulation", "N": 600, "alpha": grid, "replicas": 10,
                            "backend": backend}])
            out[norm, backend] = ex.run()
    return out


def test_simulation_backends_agree(runs):
    a, b = runs["plain", "numpy"]["simulation"], runs["plain", "numba"]["simulation"]
    assert a.attrs["backend"] == "numpy" and b.attrs["backend"] == "numba"
    np.testing.assert_allclose(a.Q_space.values, b.Q_space.values, rtol=0, atol=1e-11)
    np.testing.assert_allclose(a.mean_overlap.values, b.mean_overlap.values, rtol=0,
                               atol=1e-11)


@pytest.mark.parametrize("norm", ["plain", "batchnorm", "weightnorm"])
def test_simulation_against_the_ode(runs, norm):
    res = runs[norm, "numpy"]
    ode, sim = res["dynamics"], res["simulation"]
    assert sim.mean_overlap.values[:, 0].max() == 0.0  # r = 0 realized exactly
    eps_ode = ode.eps_g.values
    eps_sim, sem = sim.eps_g_mean.values, sim.eps_g_sem.values
    assert eps_ode[-1] < 0.7 * eps_ode[0]  # the comparison covers learning
    z = np.abs(eps_sim[1:] - eps_ode[1:]) / np.hypot(sem[1:], ode.eps_g_error.values[1:])
    assert np.max(z) < 4.0, z
    r_sim = sim.mean_overlap.values
    m, se = r_sim.mean(0), r_sim.std(0, ddof=1) / np.sqrt(r_sim.shape[0])
    assert np.max(np.abs(ode.mean_overlap.values[-1])) > 0.05  # r moves
    zr = np.abs(m[1:] - ode.mean_overlap.values[1:]) / se[1:]
    assert np.max(zr) < 4.5, zr
    for name in ("Q_space", "R_space"):
        mm = sim[name].values.mean(0)
        ss = sim[name].values.std(0, ddof=1) / np.sqrt(sim.sizes["replica"])
        zz = np.abs(mm[1:] - ode[name].values[1:]) / (ss[1:] + 1e-12)
        assert np.quantile(zz, 0.95) < 3.5 and np.max(zz) < 5.0, (name, zz.max())
    if norm == "weightnorm":  # the trained gain
        g_sim = sim.param_g.values  # (replica, alpha, student)
        gm, gse = g_sim.mean(0), g_sim.std(0, ddof=1) / np.sqrt(g_sim.shape[0])
        assert np.max(np.abs(ode.param_g.values[-1] - 1.0)) > 20 * np.max(gse[-1])  # g moves
        zg = np.abs(gm[1:] - ode.param_g.values[1:]) / (gse[1:] + 1e-12)
        assert np.max(zg) < 4.5, zg


def test_datasets_record_the_mean(runs):
    ds = runs["batchnorm", "numpy"]["dynamics"]
    assert ds.mean_overlap.dims == ("alpha", "student")
    assert ds.teacher_mean_overlap.values.tolist() == [0.35, 0.35]
    assert ds.attrs["input_mean"] == 1.5 and ds.attrs["input_mean_space"] == 1
    assert ds.attrs["convention_inputs"].startswith("xi ~ N(m u, Sigma)")


def test_weight_moments_with_a_mean():
    """In weight space (the Hessian's realization, the mean direction its coordinate
    ``mean_column``): eps_g equals the engine's at the realized state, and dF/dX equals
    central differences of eps_g (the mean's path through the statistics included)."""
    inputs = {**TWO, "mean": 1.5, "direction": [0.3, 0.2], "mean_space": 1}
    model = TeacherStudent(2, 2, inputs=inputs)
    for norm in ("plain", "batchnorm"):
        eng = theory.select_engine(model, get_normalization(norm))
        rng = np.random.default_rng(4)
        w = 6  # two blocks of 6 coordinates, the first of block 1 the mean direction
        X = 0.5 * rng.standard_normal((2, 2 * w))
        Bt = 0.5 * rng.standard_normal((2, 2 * w))
        c = eng.mean_column(2 * w)
        Bt[:, c] = [0.3, 0.2]
        r = X[:, c]
        Q = np.stack([X[:, :w] @ X[:, :w].T, X[:, w:] @ X[:, w:].T])
        R = np.stack([X[:, :w] @ Bt[:, :w].T, X[:, w:] @ Bt[:, w:].T])
        T = np.stack([Bt[:, :w] @ Bt[:, :w].T, Bt[:, w:] @ Bt[:, w:].T])
        eng.T_l = T
        eng.base.T = InputDistribution(**TWO).total(T)
        eps, g, _ = eng.weight_moments(X, Bt)
        ref, ref_err = eng.generalization_error(Q, R, {theory.MEAN_OVERLAP: r})
        se = np.hypot(ref_err, eps.std(ddof=1) / np.sqrt(eps.size))
        assert abs(eps.mean() - ref) < 5 * se
        h = 1e-5
        fd = np.zeros_like(X)
        for i in range(2):
            for d in range(2 * w):
                E = np.zeros_like(X)
                E[i, d] = h
                fd[i, d] = (eng.weight_moments(X + E, Bt)[0].mean()
                            - eng.weight_moments(X - E, Bt)[0].mean()) / (2 * h)
        np.testing.assert_allclose(g.mean(0), fd, rtol=1e-5, atol=1e-8)
        assert abs(fd[0, c]) > 1e-2  # the mean column matters
