"""Fixed points and ODE Jacobians on the PSD cone's boundary (identical students) with an
engine of estimates: the quadrature engine's boundary scheme (Engine.boundary_estimates,
equilibrium._boundary_jacobian) against the exact closed form, and weight normalization's
plateau under structured inputs (the identical students' search), checked against the
exact isotropic plateau and finite-N SGD."""

from __future__ import annotations

import numpy as np
import pytest

from framework import Experiment, OrderParameters, TeacherStudent
from framework.manager import get_normalization
from framework.theory import equilibrium as eq


def test_boundary_jacobian_against_the_closed_form():
    """Weight norm's plateau (K = M = 2, eta = 0.5) has identical students: the generic
    engine's Jacobian there (central differences along the boundary, forward ones inward,
    sign-symmetrized roots) equals the exact engine's within the quadrature's error."""
    model, wn = TeacherStudent(2, 2), get_normalization("weightnorm")
    fp = eq.find_fixed_points(model, wn, eta=0.5)[0]
    assert np.allclose(fp.Q, 1.0)  # on the boundary: Q_12 = Q_11
    exact = eq.ode_jacobian(model, wn, fp.Q, fp.R, fp.params, eta=0.5)
    est = eq.ode_jacobian(model, wn, fp.Q, fp.R, fp.params, eta=0.5, engine="generic")
    assert np.all(np.isfinite(est))
    # the quadrature's error (4096 Sobol' points x 16 replicates) and the forward
    # differences inward (O(h^3)); measured 2.1e-4 of 0.32 (6.6e-4 relative)
    assert np.max(np.abs(est - exact)) < 2e-3 * np.max(np.abs(exact))
    lam_e = np.sort(np.linalg.eigvals(exact).real)
    lam_g = np.sort(np.linalg.eigvals(est).real)
    assert np.sum(lam_g > 1e-9) == np.sum(lam_e > 1e-9) == 1
    assert abs(lam_g[-1] - lam_e[-1]) < 0.01 * lam_e[-1]  # 0.020916 vs 0.020974


TWO = {"eigenvalues": [0.4, 2.5], "fractions": [2 / 3, 1 / 3]}


@pytest.fixture(scope="module")
def structured_plateau():
    """Weight norm's plateau under a two-level spectrum (K = M = 2, eta = 0.5), searched
    once for the tests below (about 24 s)."""
    model = TeacherStudent(2, 2, inputs=TWO)
    wn = get_normalization("weightnorm")
    return model, wn, eq.find_fixed_points(model, wn, eta=0.5)


def test_weight_norm_plateau_with_structured_inputs(structured_plateau):
    """Weight norm under a two-level spectrum: the plateau lies on the boundary; the
    identical students' search finds it and its Jacobian has one unstable direction."""
    model, wn, fps = structured_plateau
    assert fps and fps[0].start.startswith("identical students")
    fp = fps[0]
    assert abs(eq.psd_margin(fp.Q, fp.R, eq.teacher_overlaps(model))) < 1e-9
    np.testing.assert_allclose(fp.Q.sum(axis=0).diagonal(), 1.0, rtol=1e-12)
    jac = eq.ode_jacobian(model, wn, fp.Q, fp.R, fp.params, eta=0.5)
    lam = np.linalg.eigvals(jac).real
    assert np.all(np.isfinite(lam)) and np.sum(lam > 1e-9) == 1


def test_structured_plateau_is_stationary_for_finite_n_sgd(structured_plateau):
    """Finite-N SGD (N = 1000, 8 replicas, the numpy path) started on the structured
    plateau, identical students, g at its fixed value: the students stay identical and the
    scale-free state (Q_l / |J|^2, R_l / |J|, g; |J|^2 = sum_l Q_l,ii grows by the eta^2
    term, 1 -> 1.04 by alpha 40) and eps_g stay at the fixed point. The same run from R
    3% smaller ends eps_g 7 standard errors away (10% smaller: normalized Q_l 5 SE)."""
    model, _, fps = structured_plateau
    fp = fps[0]
    grid = list(np.linspace(0.0, 40.0, 11))
    sim = Experiment(
        model=model, normalization={"name": "weightnorm", "g": float(fp.params["g"][0])},
        init=OrderParameters(fp.Q, fp.R, model.inputs.lift(model.T)), eta=0.5, seed=5,
        analyzers=[{"name": "simulation", "N": 1000, "alpha": grid, "replicas": 8}],
    ).run()["simulation"]
    Qs, Rs = sim.Q_space.values[:, -1], sim.R_space.values[:, -1]  # replica, space, ...
    assert np.max(np.abs(Qs[:, :, 0, :] - Qs[:, :, 1, :])) < 1e-12  # measured 7e-16
    q = Qs.sum(axis=1)[:, 0, 0]

    def z(samples, exact):
        se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
        return np.abs(samples.mean(0) - exact) / se

    # measured: at most 1.1 standard errors
    assert np.max(z(Qs[:, :, 0, 0] / q[:, None], fp.Q[:, 0, 0])) < 4.0
    assert np.max(z(Rs[:, :, 0, :] / np.sqrt(q)[:, None, None], fp.R[:, 0])) < 4.0
    assert z(sim.param_g.values[:, -1, 0], fp.params["g"][0]) < 4.0
    # eps_g averaged over alpha 20-40: measured 1.7e-5 from 0.014563 (R 3% smaller: 1.8e-4)
    late = sim.eps_g_mean.values[5:]
    assert abs(late.mean() - fp.eps_g) < 4 * sim.eps_g_sem.values[5:].mean() + fp.eps_g_error


def test_split_isotropic_spectrum_equals_the_exact_plateau():
    """An independent reference for the structured search: the spectrum [1, 1] with
    fractions [1/2, 1/2] is the isotropic problem written in two eigenspaces, so the
    quadrature engine's identical-students root must be the exact engine's plateau, its
    Q_l and R_l the exact Q and R split by the fractions; its Jacobian keeps the isotropic
    eigenvalues (the unstable one among them) and its weight-space Hessian the isotropic
    spectrum."""
    wn = get_normalization("weightnorm")
    iso = TeacherStudent(2, 2)
    fi = eq.find_fixed_points(iso, wn, eta=0.5)[0]
    split = TeacherStudent(2, 2, inputs={"eigenvalues": [1.0, 1.0], "fractions": [0.5, 0.5]})
    fps = eq.find_fixed_points(split, wn, eta=0.5)
    assert fps and fps[0].start.startswith("identical students")
    fs = fps[0]
    # measured: eps_g 0.012409 +- 2.6e-5 against 0.012433 (0.9 standard errors)
    assert abs(fs.eps_g - fi.eps_g) < 4 * fs.eps_g_error
    np.testing.assert_allclose(fs.Q.sum(axis=0), fi.Q, rtol=1e-10)
    np.testing.assert_allclose(fs.R.sum(axis=0), fi.R, atol=1e-4)  # measured 1.2e-6
    np.testing.assert_allclose(fs.Q[0], fs.Q[1], atol=1e-4)  # equal fractions, equal halves
    np.testing.assert_allclose(fs.R[0], fs.R[1], atol=1e-4)
    for k in fi.params:
        np.testing.assert_allclose(fs.params[k], fi.params[k], atol=1e-4)  # g: 2.1e-5
    lam_i = np.sort(np.linalg.eigvals(
        eq.ode_jacobian(iso, wn, fi.Q, fi.R, fi.params, eta=0.5)).real)
    lam_s = np.sort(np.linalg.eigvals(
        eq.ode_jacobian(split, wn, fs.Q, fs.R, fs.params, eta=0.5)).real)
    assert np.sum(lam_s > 1e-9) == np.sum(lam_i > 1e-9) == 1
    assert abs(lam_s[-1] - lam_i[-1]) < 0.01 * lam_i[-1]  # 0.020904 vs 0.020974
    hi = eq.weight_space_hessian(iso, wn, fi.Q, fi.R, fi.params)
    hs = eq.weight_space_hessian(split, wn, 0.5 * np.stack([fi.Q, fi.Q]),
                                 0.5 * np.stack([fi.R, fi.R]), fi.params)
    # measured: lambda_min -0.028122 +- 2.8e-4 against -0.028117; lambda_max 2.3e-4 rel
    assert abs(hs.lambda_min - hi.lambda_min) < 4 * hs.lambda_min_error
    assert abs(hs.lambda_max - hi.lambda_max) < 1e-3 * abs(hi.lambda_max)
