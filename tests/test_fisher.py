"""The weight-space Fisher (framework.theory.fisher) and the ``fisher`` analyzer.

References: an explicit numpy network at N = 20-40 with hand-written per-sample
gradients of the output (independent of the normalizations' ``backward``), averaged by
Monte Carlo over the inputs (the statistical error of every entry is measured and the
agreement stated in standard errors); the Gauss-Newton identity F = Hessian at a
realizable zero-error point, against ``weight_space_hessian``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

import framework
from framework import Experiment, SpecificationError, TeacherStudent
from framework.theory import equilibrium as eq
from framework.theory.fisher import weight_space_fisher

SQ2 = np.sqrt(2.0)


def _erf_g(u):
    return special.erf(u / SQ2)


def _erf_gp(u):
    return np.sqrt(2.0 / np.pi) * np.exp(-0.5 * u * u)


def _relu_gp(u):
    return (u > 0).astype(float)


def _relu_g(u):
    return np.maximum(u, 0.0)


def _realize(Q: np.ndarray, N: int, rng: np.random.Generator) -> np.ndarray:
    """W (K, N) with W W^T = Q, in random directions."""
    lam, vec = np.linalg.eigh(Q)
    X = vec * np.sqrt(np.clip(lam, 0.0, None))
    U, _ = np.linalg.qr(rng.standard_normal((N, Q.shape[0])))
    return X @ U.T


def _brute(kind: str, W: np.ndarray, *, n: int, seed: int, v=None, c: float = 1.0,
           gamma=None, trained_v: bool = False, stats_grad: bool = True, act: str = "erf"):
    """Monte Carlo Fisher of an explicit network: ``(F, standard error per entry)``.

    ``kind``: ``"plain"`` (x~ = x), ``"scale"`` (x~_i = gamma_i x_i / |W_i|: batchnorm
    with population statistics, weightnorm; ``stats_grad=False`` drops the dependence of
    |W_i| on W, as a stop-gradient normalization does), ``"weightnorm"`` (the same with
    the gain ``gamma`` a trained parameter). ``trained_v`` appends d sigma / d v."""
    K, N = W.shape
    v = np.ones(K) if v is None else np.asarray(v, dtype=float)
    gp = _erf_gp if act == "erf" else _relu_gp
    gg = _erf_g if act == "erf" else _relu_g
    norms = np.linalg.norm(W, axis=1)
    gamma = np.ones(K) if gamma is None else np.asarray(gamma, dtype=float)
    rng = np.random.default_rng(seed)
    P = K * N + (K if kind == "weightnorm" else 0) + (K if trained_v else 0)
    S1 = np.zeros((P, P))
    S2 = np.zeros((P, P))
    done = 0
    while done < n:
        m = min(1 << 14, n - done)
        xi = rng.standard_normal((m, N))
        x = xi @ W.T
        if kind == "plain":
            xt = x
            gW = (c * v * gp(xt))[:, :, None] * xi[:, None, :]
        else:
            xt = gamma * x / norms
            pre = (c * v * gp(xt) * gamma)[:, :, None]
            gW = pre * xi[:, None, :] / norms[None, :, None]
            if stats_grad:
                gW = gW - pre * (x / norms**3)[:, :, None] * W[None]
        parts = [gW.reshape(m, K * N)]
        if kind == "weightnorm":
            parts.append(c * v * gp(xt) * x / norms)
        if trained_v:
            parts.append(c * gg(xt))
        g = np.concatenate(parts, axis=1)
        S1 += g.T @ g
        S2 += (g * g).T @ (g * g)
        done += m
    F = S1 / n
    se = np.sqrt(np.maximum(S2 / n - F * F, 0.0) / n)
    return F, se


def _agreement(F_theory, F_mc, se):
    """(max |difference| in standard errors, max |difference| / max |F|)."""
    diff = np.abs(F_theory - F_mc)
    z = np.max(diff / np.maximum(se, 1e-300))
    return float(z), float(np.max(diff) / np.max(np.abs(F_theory)))


# ---------------------------------------------------------------------------------------
# brute force at N = 20 - 40
# ---------------------------------------------------------------------------------------

N_MC = 1 << 17

CASES = {
    # name: (model kwargs, normalization, norm kwargs, brute kwargs, Q, N)
    "plain K=M=2": ({"K": 2, "M": 2}, "plain", {}, {"kind": "plain"},
                    [[0.8, 0.3], [0.3, 1.2]], 30),
    "batchnorm K=M=2": ({"K": 2, "M": 2}, "batchnorm", {"gamma": 1.3},
                        {"kind": "scale", "gamma": [1.3, 1.3]}, [[0.7, -0.2], [-0.2, 1.5]], 30),
    "batchnorm K=3, M=2": ({"K": 3, "M": 2}, "batchnorm", {},
                           {"kind": "scale"},
                           [[1.0, 0.4, 0.1], [0.4, 0.6, 0.2], [0.1, 0.2, 1.3]], 24),
    "plain K=3, M=1, trained readout (sqrt scale)": (
        {"K": 3, "M": 1, "second_layer": "trained", "eta_v": 0.5, "output_scale": "sqrt",
         "student_readout": [0.5, -1.0, 1.5]},
        "plain", {}, {"kind": "plain", "v": [0.5, -1.0, 1.5], "c": 1 / np.sqrt(3),
                      "trained_v": True},
        [[1.0, 0.4, 0.1], [0.4, 0.6, 0.2], [0.1, 0.2, 1.3]], 40),
    "weightnorm K=2, M=3 (trained gain)": (
        {"K": 2, "M": 3}, "weightnorm", {"g": 0.8}, {"kind": "weightnorm",
                                                     "gamma": [0.8, 0.8]},
        [[0.5, 0.1], [0.1, 2.0]], 20),
    "batchnorm_stopgrad K=M=2": ({"K": 2, "M": 2}, "batchnorm_stopgrad", {"gamma": 1.1},
                                 {"kind": "scale", "gamma": [1.1, 1.1], "stats_grad": False},
                                 [[0.9, 0.5], [0.5, 1.1]], 24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_monte_carlo_network(case):
    mkw, norm_name, nkw, bkw, Q, N = CASES[case]
    model = TeacherStudent(**mkw)
    norm = framework.get_normalization(norm_name, **nkw)
    Q = np.array(Q)
    spec = weight_space_fisher(model, norm, Q)
    assert spec.engine == "closed_form" and spec.dim_span == model.K
    W = _realize(Q, N, np.random.default_rng(1))
    F_theory = spec.matrix(W)
    F_mc, se = _brute(W=W, n=N_MC, seed=2, **bkw)
    z, rel = _agreement(F_theory, F_mc, se)
    # 131072 samples: relative MC error ~ 3e-3 of the largest entry; the maximum over
    # ~(K N)^2 / 2 entries of |difference| / SE is ~4.5 for a correct theory
    assert z < 6.0, (case, z, rel)
    assert rel < 2e-2, (case, z, rel)
    # the exact engine's rule converges to rounding
    assert float(spec.span_error.max()) < 1e-9


def test_stop_gradient_landscape_option_includes_the_statistics():
    """batchnorm_stopgrad: landscape=True is the Fisher of the output function (= that of
    batchnorm), landscape=False that of the update direction without the statistics."""
    model = TeacherStudent(K=2, M=2)
    Q = np.array([[0.9, 0.5], [0.5, 1.1]])
    stop = framework.get_normalization("batchnorm_stopgrad")
    full = weight_space_fisher(model, stop, Q, landscape=True)
    bn = weight_space_fisher(model, framework.get_normalization("batchnorm"), Q)
    np.testing.assert_allclose(full.span, bn.span, atol=1e-12)
    W = _realize(Q, 20, np.random.default_rng(3))
    F_mc, se = _brute("scale", W, n=N_MC, seed=4, stats_grad=True)
    z, _ = _agreement(full.matrix(W), F_mc, se)
    assert z < 6.0
    assert full.statistics_gradient_included
    assert not weight_space_fisher(model, stop, Q).statistics_gradient_included
    with pytest.raises(TypeError, match=r"'landscape' must be a bool, got 'yes'"):
        weight_space_fisher(model, stop, Q, landscape="yes")


def test_generic_engine_matches_monte_carlo_network_with_errors():
    """relu + batchnorm (no closed form): the engine's QMC replicates, errors quoted."""
    model = TeacherStudent(K=2, M=2, activation="relu")
    norm = framework.get_normalization("batchnorm")
    Q = np.array([[0.8, 0.3], [0.3, 1.2]])
    spec = weight_space_fisher(model, norm, Q, quadrature={"samples": 16384})
    assert spec.engine == "generic" and "Sobol" in spec.method
    assert 0 < float(spec.span_error.max()) < 2e-3
    W = _realize(Q, 20, np.random.default_rng(5))
    F_mc, se = _brute("scale", W, n=N_MC, seed=6, act="relu")
    # the theory's own error is far below the brute force's: compare in the latter's SE
    z, rel = _agreement(spec.matrix(W), F_mc, se)
    assert z < 6.0 and rel < 2e-2, (z, rel)


# ---------------------------------------------------------------------------------------
# the reduction and its multiplicities (deterministic)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_full_spectrum_is_the_reduced_one_with_multiplicities(case):
    mkw, norm_name, nkw, _, Q, N = CASES[case]
    model = TeacherStudent(**mkw)
    norm = framework.get_normalization(norm_name, **nkw)
    spec = weight_space_fisher(model, norm, np.array(Q))
    W = _realize(np.array(Q), N, np.random.default_rng(7))
    dense = np.linalg.eigvalsh(spec.matrix(W))
    n_theta = len(spec.theta_names) * model.K
    _, mult = spec.multiplicities(N)
    assert int(mult.sum()) == model.K * N + n_theta == dense.size
    np.testing.assert_allclose(dense, spec.full(N), atol=1e-12)
    # the Fisher depends on the student only: the same at another realization
    W2 = _realize(np.array(Q), N, np.random.default_rng(8))
    np.testing.assert_allclose(np.linalg.eigvalsh(spec.matrix(W2)), dense, atol=1e-12)


def test_rank_deficient_point_identical_students():
    """The gradient-flow plateau of the plain K = M = 2 network (Q = C = 1/3): dim_span =
    1, and E[b b^T] singular (b_1 = b_2), so lambda_min = 0 with multiplicity N - 1 (+1)."""
    model = TeacherStudent(K=2, M=2)
    Q = np.full((2, 2), 1.0 / 3.0)
    spec = weight_space_fisher(model, framework.get_normalization("plain"), Q)
    assert spec.dim_span == 1
    np.testing.assert_allclose(spec.complement[0], 0.0, atol=1e-14)
    # lambda_max = 2 E[g'(x)^2] at Var x = 1/3: (2/pi) 2 / sqrt(1 + 2/3)
    np.testing.assert_allclose(spec.lambda_max, 4.0 / np.pi / np.sqrt(5.0 / 3.0), rtol=1e-12)
    W = _realize(Q, 20, np.random.default_rng(9))
    np.testing.assert_allclose(np.linalg.eigvalsh(spec.matrix(W)), spec.full(20), atol=1e-12)


PAIRWISE = [
    ({"K": 2, "M": 2}, "plain", {}), ({"K": 2, "M": 2}, "batchnorm", {"gamma": 1.3}),
    ({"K": 3, "M": 2}, "weightnorm", {"g": 0.8}), ({"K": 3, "M": 3}, "batchnorm_affine", {}),
    ({"K": 3, "M": 1, "second_layer": "trained", "eta_v": 0.5, "output_scale": "sqrt",
      "student_readout": [0.5, -1.0, 1.5]}, "batchnorm", {}),
    ({"K": 2, "M": 2}, "batchnorm_stopgrad", {}),
]


@pytest.mark.parametrize("landscape", [False, True])
@pytest.mark.parametrize(("mkw", "norm_name", "nkw"), PAIRWISE)
def test_pairwise_reduction_equals_the_per_sample_gradients(mkw, norm_name, nkw, landscape):
    """The exact engine's two computations: pairs of units (the diagonal-scale structure,
    g' absorbed into the Gaussian) and the normalization's own backward on a tensor
    Gauss-Hermite rule."""
    model = TeacherStudent(**mkw)
    norm = framework.get_normalization(norm_name, **nkw)
    K = model.K
    A = np.random.default_rng(K).standard_normal((K, K))
    Q = A @ A.T / K + 0.5 * np.eye(K)
    a = weight_space_fisher(model, norm, Q, landscape=landscape, method="pairwise")
    b = weight_space_fisher(model, norm, Q, landscape=landscape, method="samples")
    assert "pairwise" in a.method and "Gauss-Hermite rule, 64^" in b.method
    # the product rule is the less accurate one (plain, Q_22 ~ 2.6: ~1e-7); its own
    # error estimate bounds the difference
    tol = 1e-9 + float(b.span_error.max())
    np.testing.assert_allclose(a.span_matrix, b.span_matrix, rtol=0, atol=tol)
    np.testing.assert_allclose(a.complement_matrix, b.complement_matrix, rtol=0, atol=tol)
    assert float(a.span_error.max()) < 1e-10


@pytest.mark.parametrize("norm_name", ["plain", "batchnorm"])
def test_complement_is_the_closed_form_at_large_overlaps(norm_name):
    """E[b_i b_k] = s_i s_k E[g'(x~_i) g'(x~_k)] = s_i s_k (2/pi) / sqrt((1 + S_ii)(1 +
    S_kk) - S_ik^2) with S the covariance of x~ (Saad & Solla's integral), at Q = O(10)
    where the pre-activations are broad and g' narrow."""
    model = TeacherStudent(K=2, M=2)
    norm = framework.get_normalization(norm_name, gamma=2.0) if norm_name == "batchnorm" \
        else framework.get_normalization(norm_name)
    Q = np.array([[9.0, 2.0], [2.0, 16.0]])
    spec = weight_space_fisher(model, norm, Q)
    s = np.ones(2) if norm_name == "plain" else 2.0 / np.sqrt(np.diag(Q))
    S = Q * np.outer(s, s)
    d = np.diag(S)
    ref = np.outer(s, s) * (2.0 / np.pi) / np.sqrt(np.outer(1 + d, 1 + d) - S**2)
    np.testing.assert_allclose(spec.complement_matrix, ref, rtol=1e-13)
    with pytest.raises(SpecificationError, match=r"'method' must be one of 'auto', "):
        weight_space_fisher(model, norm, Q, method="exact")
    relu = TeacherStudent(K=2, M=2, activation="relu")
    with pytest.raises(SpecificationError, match=r"'method' 'pairwise' needs an exact engine"):
        weight_space_fisher(relu, norm, Q, method="pairwise")


def test_matrix_refuses_a_realization_of_another_Q():
    spec = weight_space_fisher(TeacherStudent(K=2, M=2), framework.get_normalization("plain"),
                               np.eye(2))
    with pytest.raises(SpecificationError, match=r"'W' must realize the Fisher's Q"):
        spec.matrix(2.0 * np.eye(2))
    with pytest.raises(SpecificationError, match=r"'W' must have shape \(K=2, D >= "):
        spec.matrix(np.ones((3, 4)))


# ---------------------------------------------------------------------------------------
# Gauss-Newton: F = Hessian at a realizable zero-error point
# ---------------------------------------------------------------------------------------

REALIZABLE = {
    "plain K=M=2": ({"K": 2, "M": 2}, "plain", {}, np.eye(2), np.eye(2), None),
    "plain K=M=2 with output noise": ({"K": 2, "M": 2, "noise": 0.5}, "plain", {}, np.eye(2),
                                      np.eye(2), None),
    "batchnorm K=M=2": ({"K": 2, "M": 2}, "batchnorm", {}, np.eye(2), np.eye(2), None),
    "batchnorm K=M=3": ({"K": 3, "M": 3}, "batchnorm", {}, np.eye(3), np.eye(3), None),
    "weightnorm K=M=2 (gain in theta)": ({"K": 2, "M": 2}, "weightnorm", {}, np.eye(2),
                                         np.eye(2), None),
    "batchnorm_affine K=M=2 (gamma, beta held)": ({"K": 2, "M": 2}, "batchnorm_affine", {},
                                                  np.eye(2), np.eye(2), None),
    # K != M: a third student with readout 0 (orthogonal, any norm) is realizable
    "plain K=3, M=2, trained readout, dead unit": (
        {"K": 3, "M": 2, "second_layer": "trained", "eta_v": 0.5}, "plain", {},
        np.diag([1.0, 1.0, 0.5]), np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
        {"v": [1.0, 1.0, 0.0]}),
}


@pytest.mark.parametrize("case", list(REALIZABLE))
def test_gauss_newton_identity_at_the_realizable_optimum(case):
    mkw, norm_name, nkw, Q, R, params = REALIZABLE[case]
    model = TeacherStudent(**mkw)
    norm = framework.get_normalization(norm_name, **nkw)
    hess = eq.weight_space_hessian(model, norm, Q, R, params)
    fish = weight_space_fisher(model, norm, Q, params)
    assert fish.theta_names == hess.theta_names
    # the Fisher in the Hessian's realization and coordinates
    F = fish.matrix(hess.X[:, :hess.dim_span])
    scale = float(np.max(np.abs(hess.span_matrix)))
    np.testing.assert_allclose(F, hess.span_matrix, atol=1e-9 * scale)
    np.testing.assert_allclose(fish.full(10), hess.full(10), atol=1e-9 * scale)


@pytest.mark.parametrize("norm_name", ["plain", "batchnorm"])
def test_gauss_newton_identity_on_the_generic_engine(norm_name):
    """tanh (no closed form): both by quadrature, independent base points; the
    eigenvalues agree within 4 combined error estimates."""
    model = TeacherStudent(K=2, M=2, activation="tanh")
    norm = framework.get_normalization(norm_name)
    hess = eq.weight_space_hessian(model, norm, np.eye(2), np.eye(2))
    fish = weight_space_fisher(model, norm, np.eye(2))
    assert hess.engine == fish.engine == "generic"
    err = np.concatenate([np.hypot(hess.span_error, fish.span_error),
                          np.hypot(hess.complement_error, fish.complement_error)])
    diff = np.abs(np.concatenate([hess.span - fish.span, hess.complement - fish.complement]))
    assert np.all(diff <= 4.0 * err + 1e-12), (diff, err)
    assert 0 < float(err.max()) < 1e-3


def test_hessian_and_fisher_differ_away_from_the_optimum():
    """At the plain K = M = 2 plateau (eps_g > 0) the residual term is not zero."""
    model = TeacherStudent(K=2, M=2)
    norm = framework.get_normalization("plain")
    fp = next(p for p in eq.find_fixed_points(model, norm, eta=0.1) if p.eps_g > 1e-3)
    hess = eq.weight_space_hessian(model, norm, fp.Q, fp.R)
    fish = weight_space_fisher(model, norm, fp.Q)
    F = fish.matrix(hess.X[:, :hess.dim_span])
    assert float(np.max(np.abs(F - hess.span_matrix))) > 1e-3
    assert hess.lambda_min < 0 <= fish.lambda_min + 1e-12  # F is positive semi-definite


# ---------------------------------------------------------------------------------------
# the analyzer
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_name", ["plain", "batchnorm"])
def test_analyzer_at_fixed_points(norm_name):
    ds = Experiment(TeacherStudent(2, 2), normalization=norm_name, eta=0.1, analyzers=[
        {"name": "fisher", "N": 50}]).run()["fisher"]
    assert ds.attrs["N"] == 50 and "multiplicity_formula" in ds.attrs
    assert "unit variance" in ds.attrs["fisher_definition"]
    K = 2
    np.testing.assert_array_equal(ds.multiplicity.sum("eigen").values, K * 50)
    b = int(ds.attrs["plateau_branch"])
    assert b >= 0 and bool(ds.is_plateau[b])
    values = ds.eigenvalue.values[b]
    assert float(ds.lambda_max[b]) == pytest.approx(np.nanmax(values), abs=0)
    assert float(ds.lambda_min[b]) == pytest.approx(np.nanmin(values), abs=0)
    # the same numbers as the function at the branch's point
    spec = weight_space_fisher(TeacherStudent(2, 2), framework.get_normalization(norm_name),
                               ds.Q.values[b])
    assert float(ds.lambda_max[b]) == pytest.approx(spec.lambda_max, rel=1e-12)
    for v in ds.data_vars.values():
        assert v.attrs.get("long_name"), v.name


def test_analyzer_along_a_trajectory_ends_at_the_hessian():
    """Along the plain K = M = 2 trajectory; converged (zero error, realizable), the
    Fisher spectrum equals the Hessian's (Gauss-Newton)."""
    grid = [0.0, 50.0, 2000.0]
    ds = Experiment(TeacherStudent(2, 2), eta=0.5, init_N=10_000, analyzers=[
        {"name": "fisher", "alpha": grid}]).run()["fisher"]
    np.testing.assert_array_equal(ds.alpha.values, grid)
    assert ds.attrs["trajectory_diverged"] == 0 and float(ds.eps_g[-1]) < 1e-8
    hess = eq.weight_space_hessian(TeacherStudent(2, 2), framework.get_normalization("plain"),
                                   ds.Q.values[-1], ds.R.values[-1])
    assert float(ds.lambda_max[-1]) == pytest.approx(float(hess.full(10)[-1]), rel=1e-4)
    assert float(ds.lambda_min[-1]) == pytest.approx(float(hess.full(10)[0]), rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"landscape": "false"}, TypeError, r"'landscape' must be a bool, got 'false' \(str\)"),
        ({"N": "10"}, TypeError, r"'N' must be an integer, got '10' \(str\)"),
        ({"eta": True}, TypeError, r"'eta' must be a real number, got True \(bool\)"),
        ({"alpha": ["0", "1"]}, TypeError, r"'alpha' must be a sequence of real numbers"),
        ({"rtol": "1e-8"}, TypeError, r"'rtol' must be a real number, got '1e-8' \(str\)"),
        ({"quadrature": {"accuracy": "0.1"}}, TypeError, r"'accuracy' must be a real number"),
        ({"second_order": 1}, TypeError, r"'second_order' must be a bool, got 1"),
        ({"alpha": [0.0, 1.0], "at": {"Q": [[1, 0], [0, 1]], "R": [[1, 0], [0, 1]]}},
         SpecificationError, r"'alpha' \(along the trajectory\) and 'at' \(one point\)"),
        ({"alpha": [0.0, 1.0], "weight_norm": 1.0}, SpecificationError,
         r"'weight_norm' applies to fixed points"),
    ],
)
def test_options_refused_with_the_field_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        framework.get_analyzer("fisher", **kwargs)


def test_weight_norm_refused_for_a_normalization_without_scale_invariance():
    with pytest.raises(SpecificationError, match=r"'weight_norm' applies only"):
        Experiment(TeacherStudent(2, 2), eta=0.1,
                   analyzers=[{"name": "fisher", "weight_norm": 2.0}]).run()


def test_batchnorm_fisher_scales_with_the_weight_norm():
    ds = Experiment(TeacherStudent(2, 2), normalization="batchnorm", eta=0.0, analyzers=[
        {"name": "fisher", "weight_norm": [1.0, 4.0]}]).run()["fisher"]
    lam = ds.lambda_max.values  # (weight_norm, branch)
    np.testing.assert_allclose(lam[1], lam[0] / 4.0, rtol=1e-12)
