"""The two-layer theory (issue 13, item 2): readouts, output scales, a trained readout and
weight decay in the order-parameter ODE, checked against an independent finite-N SGD
step (Monte Carlo over inputs), between the exact and the quadrature engines, and by
exact invariances (unit readouts are today's model; "mean" equals "sum" with v = 1/K;
the symmetric subspace stays invariant)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from framework import SpecificationError, TeacherStudent
from framework.manager import get_normalization
from framework.theory import select_engine


def _state(K: int, M: int, D: int, seed: int):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((K, D)) * 0.8
    B = rng.standard_normal((M, D))
    return J, B


_ACTIVATIONS = {  # written here, independently of plugins/activations.py
    "erf": (lambda u: special.erf(u / math.sqrt(2.0)),
            lambda u: math.sqrt(2.0 / math.pi) * np.exp(-0.5 * u * u)),
    "tanh": (np.tanh, lambda u: 1.0 / np.cosh(u) ** 2),
}


def _one_step_increment(model: TeacherStudent, norm_name: str, J, B, v, eta, n_samples, seed):
    """Monte Carlo estimate of ``N E[Delta]`` of one online SGD step at ``N -> inf``,
    written from the update rule alone (no engine code): ``J_i <- J_i - eta dl/dJ_i -
    (lambda / N) J_i``, ``v <- v - (eta_v / N) dl/dv - (lambda_v / N) v``, with the
    per-sample loss ``l = (zeta - sigma)^2 / 2``. The weights are ``J = sqrt(N) W`` with
    ``W`` in ``D`` dimensions; the inputs are ``D``-dimensional (the complement of the
    span contributes ``|xi_perp|^2 / N -> 1`` to the ``eta^2`` term, added exactly).
    Returns per-sample contributions to ``(dQ, dR, dv)`` (mean = estimate)."""
    lay = model.layers()
    K = model.K
    _g, _gp = _ACTIVATIONS[model.activation]
    rng = np.random.default_rng(seed)
    xi = rng.standard_normal((n_samples, J.shape[1]))
    nu = rng.standard_normal(n_samples) * math.sqrt(model.noise)
    x, y = xi @ J.T, xi @ B.T  # pre-activations (W = J / sqrt N, xi of O(1) components)
    Q = J @ J.T
    a, b = lay.student_weights(v), lay.teacher_weights()
    if norm_name == "plain":
        xt = x
        dxt_dx = np.ones(K)
    else:  # population batch norm, gamma = 1: x~_i = x_i / sqrt(Q_ii)
        xt = x / np.sqrt(np.diag(Q))
        dxt_dx = 1.0 / np.sqrt(np.diag(Q))
    zeta = _g(y) @ b + nu
    err = zeta - _g(xt) @ a
    # d l / d x~_i = -err a_i g'(x~_i); d l / d W_i (W = J / sqrt N) through x and Q_ii
    dl_dxt = -err[:, None] * a * _gp(xt)
    # grad wrt W_i: dl/dxt_i * d xt_i / dW_i ; xt_i = x_i / sqrt(Q_ii), x_i = W_i . xi,
    # Q_ii = |W_i|^2 -> d xt_i / dW_i = xi / sqrt(Q_ii) - x_i W_i / Q_ii^(3/2)
    if norm_name == "plain":
        gW = dl_dxt[:, :, None] * xi[:, None, :]
    else:
        q = np.diag(Q)
        gW = dl_dxt[:, :, None] * (xi[:, None, :] * dxt_dx[None, :, None]
                                   - (x / q**1.5)[:, :, None] * J[None, :, :])
    # per-sample step in W: Delta W = -(eta / N) gW - (lambda / N) W (one N factor: alpha)
    step = -eta * gW - lay.weight_decay * J[None]
    # N Delta Q = W step^T + step W^T + (1/N) step step^T * N ... the eta^2 term:
    # (eta^2 / N) gW gW^T summed over the N dimensions -> eta^2 (dl/dx)(dl/dx)^T |xi|^2 / N
    # with |xi|^2 / N -> 1 (the complement); for batch norm the gradient's span part is
    # O(1/sqrt N) of it, so the limit is eta^2 (dl/dx_i dxt_i/dx)(...) per sample.
    lin_Q = np.einsum("kd,sid->sik", J, step)
    lin_Q = lin_Q + np.swapaxes(lin_Q, 1, 2)
    dl_dx = dl_dxt * dxt_dx
    quad_Q = eta**2 * dl_dx[:, :, None] * dl_dx[:, None, :]
    dQ = lin_Q + quad_Q
    dR = np.einsum("sid,nd->sin", step, B)
    dv = -lay.eta_v * (-err[:, None] * lay.c_student * _g(xt)) - lay.weight_decay_v * v
    return dQ, dR, dv


def _compare(model, norm_name, seed, n_samples=400_000, engine="closed_form"):
    K, M = model.K, model.M
    J, B = _state(K, M, K + M, seed)
    T = B @ B.T
    model = TeacherStudent(**{**model.to_dict(), "T": T})
    v = np.linspace(0.6, 1.3, K) if model.second_layer == "trained" else None
    eta = 0.4
    dQs, dRs, dvs = _one_step_increment(model, norm_name, J, B,
                                        model.student_readout if v is None else v, eta,
                                        n_samples, seed + 1)
    norm = get_normalization(norm_name)
    eng = select_engine(model, norm, engine=engine)
    p = {"v": v} if v is not None else {}
    r = eng.rates(J @ J.T, J @ B.T, p, eta=eta)
    # the engine's own estimate error (quadrature) adds to the Monte Carlo one
    errors = {"dQ": r.dQ_error, "dR": r.dR_error, "dv": r.dparams_error.get("v", 0.0)}
    for name, samples, value in (("dQ", dQs, r.dQ), ("dR", dRs, r.dR)) + (
            (("dv", dvs, r.dparams["v"]),) if v is not None else ()):
        mean = samples.mean(axis=0)
        se = np.hypot(samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0]),
                      errors[name])
        z = np.abs(mean - value) / (se + 1e-12)
        assert np.all(z < 5.0), (name, mean, value, se)
        assert np.max(se) < 0.02 * max(1.0, float(np.max(np.abs(value))))  # a sharp test


@pytest.mark.parametrize("norm_name", ["plain", "batchnorm"])
def test_one_step_increment_both_layers_noise_decay(norm_name):
    model = TeacherStudent(3, 2, second_layer="trained", eta_v=0.7,
                           student_readout=[0.6, 0.95, 1.3], teacher_readout=[1.0, 0.7],
                           output_scale="sqrt", noise=0.05, weight_decay=0.03,
                           weight_decay_v=0.02)
    _compare(model, norm_name, seed=3)


@pytest.mark.parametrize("norm_name", ["plain", "batchnorm"])
def test_one_step_increment_fixed_readout_other_widths(norm_name):
    # K < M, a fixed non-unit readout, "mean" scale, first-layer decay only
    model = TeacherStudent(2, 4, student_readout=[0.5, -1.5],
                           teacher_readout=[1.0, 2.0, 0.5, 1.0], output_scale="mean",
                           noise=0.1, weight_decay=0.05)
    _compare(model, norm_name, seed=7)


@pytest.mark.parametrize("norm_name", ["plain", "batchnorm"])
def test_one_step_increment_quadrature_engine_tanh(norm_name):
    # the generic engine (any activation): tanh, both layers, noise and decay
    model = TeacherStudent(2, 3, activation="tanh", second_layer="trained", eta_v=0.5,
                           student_readout=[0.7, 1.2], output_scale="mean", noise=0.05,
                           weight_decay=0.02, weight_decay_v=0.01)
    _compare(model, norm_name, seed=13, engine="generic")


@pytest.mark.parametrize("norm_name", ["plain", "batchnorm"])
def test_unit_readout_is_todays_model_exactly(norm_name):
    J, B = _state(3, 3, 6, 11)
    Q, R = J @ J.T, J @ B.T
    norm = get_normalization(norm_name)
    base = TeacherStudent(3, 3, T=B @ B.T, noise=0.01)
    same = TeacherStudent(3, 3, T=B @ B.T, noise=0.01, student_readout=[1.0, 1.0, 1.0],
                          teacher_readout=[1.0, 1.0, 1.0], output_scale="sum",
                          weight_decay=0.0)
    assert same.to_dict() == base.to_dict()  # unchanged specification (and hashes)
    for engine in ("closed_form", "generic"):
        a = select_engine(base, norm, engine=engine).rates(Q, R, eta=0.5, check=False)
        b = select_engine(same, norm, engine=engine).rates(Q, R, eta=0.5, check=False)
        assert np.array_equal(a.dQ, b.dQ) and np.array_equal(a.dR, b.dR)
        assert a.eps_g == b.eps_g


def test_trained_readout_at_ones_moves_q_and_r_like_the_fixed_model():
    J, B = _state(2, 2, 4, 5)
    Q, R = J @ J.T, J @ B.T
    norm = get_normalization("plain")
    fixed = select_engine(TeacherStudent(2, 2, T=B @ B.T), norm)
    trained = select_engine(TeacherStudent(2, 2, T=B @ B.T, second_layer="trained",
                                           eta_v=0.3), norm)
    a = fixed.rates(Q, R, eta=0.5)
    b = trained.rates(Q, R, {"v": np.ones(2)}, eta=0.5)
    np.testing.assert_allclose(b.dQ, a.dQ, rtol=0, atol=1e-15)
    np.testing.assert_allclose(b.dR, a.dR, rtol=0, atol=1e-15)
    assert a.eps_g == pytest.approx(b.eps_g, abs=1e-15)
    assert set(b.dparams) == {"v"} and trained.trainable == ("v",)


def test_mean_scale_equals_sum_with_scaled_readouts():
    K, M = 4, 2
    J, B = _state(K, M, K + M, 9)
    Q, R, T = J @ J.T, J @ B.T, B @ B.T
    norm = get_normalization("batchnorm")
    mean = select_engine(TeacherStudent(K, M, T=T, output_scale="mean"), norm)
    summed = select_engine(TeacherStudent(K, M, T=T, student_readout=np.full(K, 1 / K),
                                          teacher_readout=np.full(M, 1 / M)), norm)
    a, b = mean.rates(Q, R, eta=0.7), summed.rates(Q, R, eta=0.7)
    np.testing.assert_allclose(a.dQ, b.dQ, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(a.dR, b.dR, rtol=1e-13, atol=1e-15)
    assert a.eps_g == pytest.approx(b.eps_g, rel=1e-13)


@pytest.mark.parametrize("norm_name", ["plain", "batchnorm"])
def test_closed_form_and_quadrature_agree_with_readouts(norm_name):
    K, M = 3, 2
    J, B = _state(K, M, K + M, 21)
    Q, R, T = J @ J.T, J @ B.T, B @ B.T
    model = TeacherStudent(K, M, T=T, second_layer="trained", eta_v=0.7,
                           student_readout=[0.5, 1.2, -0.3], teacher_readout=[1.0, 0.8],
                           output_scale="sqrt", noise=0.01, weight_decay=0.05,
                           weight_decay_v=0.02)
    norm = get_normalization(norm_name)
    ex = select_engine(model, norm, engine="closed_form")
    ge = select_engine(model, norm, engine="generic", quadrature={"samples": 1 << 14})
    p = {"v": np.array([0.5, 1.1, -0.2])}
    a, b = ex.rates(Q, R, p, eta=0.3), ge.rates(Q, R, p, eta=0.3)
    for x, y, e in ((a.dQ, b.dQ, b.dQ_error), (a.dR, b.dR, b.dR_error),
                    (a.dparams["v"], b.dparams["v"], b.dparams_error["v"])):
        assert np.all(np.abs(x - y) < 6 * e + 1e-9)
    assert abs(a.eps_g - b.eps_g) < 6 * b.eps_g_error + 1e-9
    # eps_g's gradient in (W, v) of the two engines (the Hessian's input)
    X = np.linalg.cholesky(np.block([[Q, R], [R.T, T]]))[:, :]
    Xs, Bt = X[:K], X[K:]
    _, gx, gt = ex.weight_moments(Xs, Bt, p)
    _, gx2, gt2 = ge.weight_moments(Xs, Bt, p)
    for exact, est in ((gx[0], gx2), (gt["v"][0], gt2["v"])):
        err = est.std(axis=0, ddof=1) / math.sqrt(est.shape[0])
        assert np.all(np.abs(exact - est.mean(axis=0)) < 6 * err + 1e-9)


def test_readout_gradient_is_the_derivative_of_eps_g():
    K, M = 3, 3
    J, B = _state(K, M, K + M, 2)
    Q, R, T = J @ J.T, J @ B.T, B @ B.T
    model = TeacherStudent(K, M, T=T, second_layer="trained", eta_v=1.0, noise=0.02)
    eng = select_engine(model, get_normalization("batchnorm"))
    v = np.array([0.7, 1.1, 0.9])
    r = eng.rates(Q, R, {"v": v}, eta=0.1)
    h = 1e-6
    num = np.array([(eng.generalization_error(Q, R, {"v": v + h * e})[0]
                     - eng.generalization_error(Q, R, {"v": v - h * e})[0]) / (2 * h)
                    for e in np.eye(K)])
    np.testing.assert_allclose(r.dparams["v"], -1.0 * num, rtol=1e-7, atol=1e-10)


def test_symmetric_subspace_stays_invariant_with_a_trained_readout():
    K = 3
    Q = 0.3 + 0.5 * np.eye(K)
    R = 0.2 + 0.4 * np.eye(K)
    model = TeacherStudent(K, K, second_layer="trained", eta_v=0.5, output_scale="mean",
                           noise=0.01)
    for name in ("plain", "batchnorm"):
        r = select_engine(model, get_normalization(name)).rates(
            Q, R, {"v": np.full(K, 0.8)}, eta=0.6)
        off = ~np.eye(K, dtype=bool)
        assert np.ptp(np.diag(r.dQ)) < 1e-14 and np.ptp(r.dQ[off]) < 1e-14
        assert np.ptp(np.diag(r.dR)) < 1e-14 and np.ptp(r.dR[off]) < 1e-14
        assert np.ptp(r.dparams["v"]) < 1e-14


def test_integration_with_trained_readout_keeps_v_in_the_trajectory():
    model = TeacherStudent(2, 2, second_layer="trained", eta_v=0.5)
    eng = select_engine(model, get_normalization("plain"))
    Q0 = np.array([[0.2, 0.0], [0.0, 0.3]])
    R0 = np.array([[0.05, 0.0], [0.0, 0.02]])
    traj = eng.integrate(Q0, R0, eta=0.5, alpha=np.linspace(0, 2000, 21),
                         params={"v": [0.3, 0.5]})
    assert not traj.diverged and traj.params["v"].shape == (21, 2)
    assert traj.eps_g[-1] < 1e-3 * traj.eps_g[0]  # both layers learn the teacher
    np.testing.assert_allclose(traj.params["v"][-1], 1.0, atol=1e-2)


def test_bad_layer_options_are_refused_with_the_field_named():
    with pytest.raises(SpecificationError, match="'eta_v' must be a positive number"):
        TeacherStudent(2, 2, second_layer="trained")
    with pytest.raises(SpecificationError, match="'eta_v' must be >= 0"):
        TeacherStudent(2, 2, second_layer="trained", eta_v=-0.1)
    with pytest.raises(SpecificationError, match="'teacher_readout' must have shape"):
        TeacherStudent(2, 3, teacher_readout=[1.0, 1.0])
    with pytest.raises(SpecificationError, match="'output_scale' must be one of"):
        TeacherStudent(2, 2, output_scale="average")
    with pytest.raises(SpecificationError, match="'weight_decay' must be >= 0"):
        TeacherStudent(2, 2, weight_decay=-1.0)
    with pytest.raises(TypeError, match="'eta_v' must be a real number"):
        TeacherStudent(2, 2, second_layer="trained", eta_v="fast")
    with pytest.raises(SpecificationError, match="'weight_decay_v' applies only"):
        TeacherStudent(2, 2, weight_decay_v=0.1)
