"""Equilibria with structured inputs (issue 14, item 4): fixed points and the ODE Jacobian
per input eigenspace, and the exact weight-space Hessian (one span block over the
eigenspaces, one complement block per eigenspace), for plain and batch-normalized
networks.

References: the exact map of covariance ``c I`` to the isotropic problem (``Q' = c Q``,
``eta' = c eta``; Jacobian per unit ``eta alpha`` divided by ``c``; Hessian in ``W``
multiplied by ``c``), the invariance under splitting an eigenspace in two, and a
brute-force Hessian of ``eps_g`` over explicit weights at ``N = 15`` by second
differences of the function value alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from framework import Experiment, InputDistribution, TeacherStudent, theory
from framework.manager import get_normalization
from framework.theory import equilibrium as eq

C = 1.7
TWO = InputDistribution([0.4, 2.5], [2 / 3, 1 / 3])


def _pair(norm: str, eta: float = 0.1):
    """Fixed points of Sigma = c I and of the isotropic map (T' = c T, eta' = c eta,
    weight norm c q for a scale-invariant normalization)."""
    n = get_normalization(norm)
    st = TeacherStudent(2, 2, inputs={"eigenvalues": [C]})
    iso = TeacherStudent(2, 2, T=C * np.eye(2))
    wn = None if norm == "plain" else C
    return (n, st, iso, eq.find_fixed_points(st, n, eta=eta),
            eq.find_fixed_points(iso, n, eta=C * eta, weight_norm=wn))


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_fixed_points_and_jacobian_map_exactly(norm):
    n, st, iso, a, b = _pair(norm)
    assert len(a) == len(b) >= 3
    for x, y in zip(a, b, strict=True):
        assert x.Q.shape == (1, 2, 2) and x.residual < 1e-10
        assert x.eps_g == pytest.approx(y.eps_g, abs=1e-13)
        np.testing.assert_allclose(C * x.Q[0], y.Q, atol=1e-10)
        np.testing.assert_allclose(C * x.R[0], y.R, atol=1e-10)
    plateau = next(fp for fp in a if 0.001 < fp.eps_g)
    mapped = next(fp for fp in b if abs(fp.eps_g - plateau.eps_g) < 1e-12)
    ja = eq.ode_jacobian(st, n, plateau.Q, plateau.R, eta=0.1)
    jb = eq.ode_jacobian(iso, n, mapped.Q, mapped.R, eta=C * 0.1)
    np.testing.assert_allclose(ja, C * jb, rtol=0, atol=1e-7)
    assert np.max(np.linalg.eigvals(ja).real) > 0.05  # an unstable direction, mapped too


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_hessian_maps_exactly_and_splitting_changes_nothing(norm):
    n, st, iso, a, b = _pair(norm)
    fp = a[0]
    ha = eq.weight_space_hessian(st, n, fp.Q, fp.R)
    hb = eq.weight_space_hessian(iso, n, b[0].Q, b[0].R)
    np.testing.assert_allclose(ha.full(10), C * hb.full(10), rtol=0, atol=1e-11)
    assert ha.lambda_max == pytest.approx(C * hb.lambda_max, rel=1e-12)
    # the same eigenvalue in two eigenspaces (fractions 0.6, 0.4) is one eigenspace
    split = TeacherStudent(2, 2, inputs={"eigenvalues": [C, C], "fractions": [0.6, 0.4]})
    hs = eq.weight_space_hessian(split, n, np.array([0.6 * fp.Q[0], 0.4 * fp.Q[0]]),
                                 np.array([0.6 * fp.R[0], 0.4 * fp.R[0]]))
    assert hs.dim_span == 2 * ha.dim_span  # the span doubles: the extra modes are
    np.testing.assert_allclose(hs.full(10), ha.full(10), rtol=0, atol=1e-11)  # complement


def _brute_force_hessian(model, norm, Q_l, R_l, N, seed=0):
    """Hessian of eps_g over the K N entries of W = J / sqrt(N) by second differences of
    eps_g(W Sigma W^T, W Sigma Bt^T), for explicit weights realizing (Q_l, R_l, T_l)
    exactly in each eigenspace's block of coordinates."""
    rng = np.random.default_rng(seed)
    inputs = model.input_distribution()
    K, M = model.K, model.M
    Tl = eq.teacher_overlaps(model)
    W, Bt = [], []
    for q, r, t, n_l in zip(Q_l, R_l, Tl, inputs.block_sizes(N), strict=True):
        lam, vec = np.linalg.eigh(np.block([[q, r], [r.T, t]]))
        root = vec * np.sqrt(np.clip(lam, 0.0, None))
        basis = np.linalg.qr(rng.standard_normal((n_l, n_l)))[0][:, :K + M]
        rows = root @ basis.T
        W.append(rows[:K])
        Bt.append(rows[K:])
    W, Bt = np.concatenate(W, axis=1), np.concatenate(Bt, axis=1)
    lam_c = inputs.coordinate_eigenvalues(N)
    base = theory.select_engine(TeacherStudent(K, M, T=inputs.teacher_covariance(model.T)),
                                norm)

    def F(x):
        w = x.reshape(K, N)
        return base.generalization_error((w * lam_c) @ w.T, (w * lam_c) @ Bt.T)[0]

    x0, h, n = W.ravel(), 1e-3, W.size
    H = np.zeros((n, n))
    eye = np.eye(n) * h
    for i in range(n):
        for j in range(i, n):
            H[i, j] = H[j, i] = (F(x0 + eye[i] + eye[j]) - F(x0 + eye[i] - eye[j])
                                 - F(x0 - eye[i] + eye[j]) + F(x0 - eye[i] - eye[j])) / (4 * h * h)
    return np.linalg.eigvalsh(H)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_hessian_against_brute_force(norm):
    n = get_normalization(norm)
    model = TeacherStudent(2, 2, inputs=TWO)
    fps = eq.find_fixed_points(model, n, eta=0.1)
    fp = [x for x in fps if x.eps_g > 1e-3][-1]
    spec = eq.weight_space_hessian(model, n, fp.Q, fp.R)
    N = 15  # eigenspaces of 10 and 5 directions
    free = TWO.block_sizes(N) - spec.space_ranks
    assert np.all(free >= 1)  # both complement blocks present
    assert spec.complement_multiplicity(N).tolist() == np.repeat(free, 2).tolist()
    brute = _brute_force_hessian(model, n, fp.Q, fp.R, N)
    scale = max(abs(brute[0]), abs(brute[-1]))
    np.testing.assert_allclose(spec.full(N), brute, rtol=0, atol=3e-5 * scale)
    assert spec.lambda_min < 0 < spec.lambda_max  # a saddle, resolved


def test_analyzers_with_structured_inputs():
    ex = Experiment(model=TeacherStudent(2, 2, inputs=TWO), normalization="batchnorm",
                    eta=0.1, init_N=900, analyzers=["fixedpoint", "hessian"])
    res = ex.run()
    fp, h = res["fixedpoint"], res["hessian"]
    b = int(fp.attrs["plateau_branch"])
    assert b >= 0 and bool(fp.is_plateau.values[b]) and fp.n_unstable.values[b] >= 1
    assert fp.Q_space.dims == ("branch", "eigenspace", "student", "student_")
    assert fp.symmetric_coordinate.sizes["coordinate"] == 8  # (Q, C, R, S) per eigenspace
    np.testing.assert_allclose(fp.Q.values, np.einsum("l,blij->bij", TWO.eigenvalues,
                                                      fp.Q_space.values), atol=1e-14)
    # every eigenvalue counted: the multiplicities sum to K N for each branch
    assert np.all(h.multiplicity.sum("eigen").values == 2 * 900)
    ev = np.where(h.multiplicity.values > 0, h.eigenvalue.values, np.nan)
    np.testing.assert_allclose(h.lambda_max.values, np.nanmax(ev, axis=1), rtol=1e-14)
    np.testing.assert_allclose(h.lambda_min.values, np.nanmin(ev, axis=1), rtol=1e-14)
    assert h.attrs["input_block_sizes"] == "600, 300"
    assert "complement@1" in set(h.block.values.ravel())


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_escape_time_maps_exactly(norm):
    """The escape analyzer from the perturbed plateau: Sigma = c I at eta escapes at the
    same alpha as the isotropic map at c eta (weight norm c q for batch norm)."""
    grid = {"alpha_max": 1500.0, "n_points": 301}
    a = Experiment(model=TeacherStudent(2, 2, inputs={"eigenvalues": [C]}),
                   normalization=norm, eta=0.2,
                   analyzers=[{"name": "escape", **grid}]).run()["escape"]
    extra = {} if norm == "plain" else {"weight_norm": C}
    b = Experiment(model=TeacherStudent(2, 2, T=C * np.eye(2)), normalization=norm,
                   eta=C * 0.2, analyzers=[{"name": "escape", **grid, **extra}]).run()["escape"]
    assert bool(a.escaped) and 10.0 < float(a.alpha_escape) < 1500.0
    assert float(a.alpha_escape) == pytest.approx(float(b.alpha_escape), rel=1e-6)
    assert float(a.unstable_rate) == pytest.approx(C * float(b.unstable_rate), rel=1e-6)
    assert a.unstable_dQ.dims == ("eigenspace", "student", "student_")


def test_initial_state_per_eigenspace():
    """An explicit initial state per eigenspace is integrated and realized as given."""
    m = TeacherStudent(2, 2, inputs=TWO)
    Q = np.array([0.2 * np.eye(2), 0.05 * np.eye(2)])
    R = np.array([[[0.01, 0.0], [0.0, 0.02]], [[0.0, 0.0], [0.01, 0.0]]])
    from framework import OrderParameters

    op = OrderParameters(Q, R, TWO.lift(m.T))
    grid = [0.0, 1.0, 2.0]
    res = Experiment(model=m, init=op, eta=0.5, analyzers=[
        {"name": "dynamics", "alpha": grid},
        {"name": "simulation", "N": 300, "alpha": grid, "replicas": 2}]).run()
    np.testing.assert_allclose(res["dynamics"].Q_space.values[0], Q, atol=1e-15)
    np.testing.assert_allclose(res["simulation"].Q_space.values[:, 0], np.broadcast_to(
        Q, (2, *Q.shape)), atol=1e-12)
    with pytest.raises(Exception, match="one block per eigenspace"):
        Experiment(model=TeacherStudent(2, 2, inputs={"eigenvalues": [1.0, 2.0, 3.0]}),
                   init=op, analyzers=["dynamics"])
