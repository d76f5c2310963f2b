"""The normalization contract as a pytest base class (subclass it in your plugin's tests).

Two optional class attributes of a normalization change what is checked:

``statistics_gradient = False``
    The statistics are constants in the backward pass (stop-gradient): the
    vector-Jacobian products ``population_statistics_vjp`` and
    ``batch_statistics_vjp`` (and ``scale_jacobian`` on the diagonal-scale fast path)
    must be zero, instead of matching finite differences. Engines that chain them
    (theory, simulation) then need no special case.
``supports_batch_statistics = False``
    There are no minibatch statistics (e.g. weight norm, whose statistic is a
    property of the weights): ``batch_statistics`` must raise ``NotImplementedError``
    with an explanation.

``scale_parameters`` / ``shift_parameters``
    Trainable parameters on the fast path: ``scale_parameter_jacobian`` must match
    finite differences of ``scale``, a shift must add to ``forward``'s output, and the
    exact engine with the parameters as state must agree with the generic engine
    (right-hand side and parameter rates) within its error estimate.

``scale_kernels()``
    When it returns compiled scale functions (:class:`~framework.ScaleKernels`), they
    must agree with ``scale``, ``scale_jacobian`` and ``scale_parameter_jacobian`` to
    1e-12 on random states, their shift rows must add to ``forward``'s output, and the
    same object must be returned on every call.

The contract also runs the generic theory engine once on the normalization (finite,
symmetric right-hand side) and, on the diagonal-scale fast path, checks that the
generic engine and the closed form agree within the engine's error estimate -- which
catches a ``scale`` inconsistent with ``forward``/``backward``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from framework.model import TeacherStudent
from framework.normalization import Normalization

__all__ = ["NormalizationContract", "assert_directional_derivative"]

K = 3
BATCH = 5


def assert_directional_derivative(
    f: Callable[[np.ndarray], float],
    point: np.ndarray,
    gradient: np.ndarray,
    rng: np.random.Generator,
    *,
    directions: int = 4,
    h: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-8,
) -> None:
    """Check ``<gradient, v> == d/dt f(point + t v)`` by central differences.

    The tolerance covers the O(h^2) truncation and O(eps/h) rounding of a central
    difference at ``h = 1e-6`` for O(1) functions.
    """
    for _ in range(directions):
        v = rng.standard_normal(point.shape)
        numeric = (f(point + h * v) - f(point - h * v)) / (2 * h)
        analytic = float(np.sum(gradient * v))
        assert abs(numeric - analytic) <= atol + rtol * max(abs(numeric), abs(analytic), 1.0), (
            f"directional derivative mismatch: finite difference {numeric!r}, "
            f"gradient {analytic!r}"
        )


def _statistics_gradient(normalization: Normalization) -> bool:
    return bool(normalization.statistics_gradient)


def _random_Q(rng: np.random.Generator, lead: tuple[int, ...] = ()) -> np.ndarray:
    A = rng.standard_normal((*lead, K, K + 2))
    return A @ np.swapaxes(A, -1, -2) / (K + 2) + 0.3 * np.eye(K)


class NormalizationContract:
    """Tests every normalization must pass. Provide a ``normalization`` fixture."""

    @pytest.fixture
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(12345)

    @pytest.fixture
    def params(self, normalization: Normalization) -> dict[str, np.ndarray]:
        return normalization.parameters(K)

    @pytest.fixture
    def x(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal((2, BATCH, K))

    @pytest.fixture
    def stats(self, normalization: Normalization, rng: np.random.Generator) -> dict:
        Q = _random_Q(rng, (2,))
        return {k: v[:, None, :] for k, v in normalization.population_statistics(Q).items()}

    # -- metadata ------------------------------------------------------------------
    def test_metadata(self, normalization: Normalization) -> None:
        assert isinstance(normalization.name, str) and normalization.name.isidentifier()
        assert normalization.description.strip()
        assert set(normalization.trainable) <= set(normalization.parameters(K))
        again = type(normalization).from_dict(normalization.to_dict())
        assert again == normalization

    def test_parameters_shapes(self, normalization: Normalization, params: dict) -> None:
        for name, value in params.items():
            assert np.shape(value) == (K,), name

    # -- forward -------------------------------------------------------------------
    def test_forward_shape_and_determinism(
        self, normalization: Normalization, x: np.ndarray, stats: dict, params: dict
    ) -> None:
        out = normalization.forward(x, stats, params)
        assert out.shape == x.shape
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out, normalization.forward(x.copy(), stats, params))

    # -- backward against finite differences ------------------------------------------
    def test_backward_x(self, normalization, x, stats, params, rng) -> None:
        g = rng.standard_normal(x.shape)
        back = normalization.backward(x, stats, params, g)
        assert back.x.shape == x.shape
        assert_directional_derivative(
            lambda z: float(np.sum(g * normalization.forward(z, stats, params))), x, back.x, rng
        )

    def test_backward_stats(self, normalization, x, stats, params, rng) -> None:
        g = rng.standard_normal(x.shape)
        back = normalization.backward(x, stats, params, g)
        assert set(back.stats) == set(normalization.statistics_names)
        for name in normalization.statistics_names:
            grad = back.stats[name]
            assert grad.shape == x.shape, name
            reduced = np.sum(grad, axis=-2, keepdims=True)  # stats broadcast over the batch

            def f(value: np.ndarray, name: str = name) -> float:
                return float(np.sum(g * normalization.forward(x, {**stats, name: value}, params)))

            assert_directional_derivative(f, stats[name], reduced, rng)

    def test_backward_params(self, normalization, x, stats, params, rng) -> None:
        g = rng.standard_normal(x.shape)
        back = normalization.backward(x, stats, params, g)
        for name in normalization.trainable:
            grad = back.params[name]
            assert grad.shape == x.shape, name
            reduced = grad.reshape(-1, K).sum(axis=0)

            def f(value: np.ndarray, name: str = name) -> float:
                return float(np.sum(g * normalization.forward(x, stats, {**params, name: value})))

            assert_directional_derivative(f, params[name], reduced, rng)

    def test_backward_is_linear_in_grad_out(self, normalization, x, stats, params, rng) -> None:
        g1, g2 = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
        b1, b2 = (normalization.backward(x, stats, params, g) for g in (g1, g2))
        b12 = normalization.backward(x, stats, params, 2.0 * g1 - 3.0 * g2)
        np.testing.assert_allclose(b12.x, 2.0 * b1.x - 3.0 * b2.x, rtol=1e-10, atol=1e-12)
        for name in normalization.statistics_names:
            np.testing.assert_allclose(b12.stats[name], 2.0 * b1.stats[name] - 3.0 * b2.stats[name],
                                       rtol=1e-10, atol=1e-12)

    # -- statistics ----------------------------------------------------------------
    def test_population_statistics_vjp(self, normalization, rng) -> None:
        Q = _random_Q(rng, (2,))
        stats = normalization.population_statistics(Q)
        assert set(stats) == set(normalization.statistics_names)
        weights = {k: rng.standard_normal(v.shape) for k, v in stats.items()}
        for v in stats.values():
            assert v.shape == (2, K)
        grad = normalization.population_statistics_vjp(Q, weights)
        assert grad.shape == Q.shape
        if not _statistics_gradient(normalization):
            np.testing.assert_array_equal(grad, 0.0)
            return

        def f(q: np.ndarray) -> float:
            s = normalization.population_statistics(q)
            return float(sum(np.sum(weights[k] * s[k]) for k in s))

        assert_directional_derivative(f, Q, grad, rng)

    def test_batch_statistics_vjp(self, normalization, x, rng) -> None:
        if not normalization.supports_batch_statistics:
            with pytest.raises(NotImplementedError, match=normalization.name):
                normalization.batch_statistics(x)
            return
        stats = normalization.batch_statistics(x)
        assert set(stats) == set(normalization.statistics_names)
        for v in stats.values():
            assert v.shape == (*x.shape[:-2], 1, K)
        weights = {k: rng.standard_normal(v.shape) for k, v in stats.items()}
        grad = normalization.batch_statistics_vjp(x, weights)
        assert grad.shape == x.shape
        if not _statistics_gradient(normalization):
            np.testing.assert_array_equal(grad, 0.0)
            return

        def f(z: np.ndarray) -> float:
            s = normalization.batch_statistics(z)
            return float(sum(np.sum(weights[k] * s[k]) for k in s))

        assert_directional_derivative(f, x, grad, rng)

    # -- diagonal-scale fast path ----------------------------------------------------
    def test_diagonal_scale(self, normalization, params, rng) -> None:
        if not normalization.is_diagonal_scale():
            pytest.skip(f"{normalization.name!r} is not of the diagonal-scale family")
        Q = _random_Q(rng, (2,))
        s = normalization.scale(Q, params)
        assert s.shape == (2, K)
        x = rng.standard_normal((2, BATCH, K))
        stats = {k: v[:, None, :] for k, v in normalization.population_statistics(Q).items()}
        np.testing.assert_allclose(
            normalization.forward(x, stats, params), s[:, None, :] * x, rtol=1e-12, atol=1e-14
        )
        jac = normalization.scale_jacobian(Q, params)
        assert jac.shape == (2, K, K, K)
        if not _statistics_gradient(normalization):
            np.testing.assert_array_equal(jac, 0.0)
            return
        w = rng.standard_normal((2, K))
        assert_directional_derivative(
            lambda q: float(np.sum(w * normalization.scale(q, params))),
            Q,
            np.einsum("ri,rijk->rjk", w, jac),
            rng,
        )

    def test_scale_parameters(self, normalization, params, rng) -> None:
        names = tuple(normalization.scale_parameters)
        if not names:
            pytest.skip(f"{normalization.name!r} declares no scale_parameters")
        assert set(names) <= set(normalization.trainable), "scale parameters must be trainable"
        Q = _random_Q(rng, (2,))
        jac = normalization.scale_parameter_jacobian(Q, params)
        assert set(jac) == set(names)
        w = rng.standard_normal((2, K))
        for name in names:
            assert np.shape(jac[name]) == (2, K, K)
            value = np.broadcast_to(np.asarray(params[name], dtype=float), (2, K)).copy()

            def f(theta: np.ndarray, name: str = name) -> float:
                return float(np.sum(w * normalization.scale(Q, {**params, name: theta})))

            assert_directional_derivative(f, value, np.einsum("ri,rij->rj", w, jac[name]), rng)

    def test_shift_parameters(self, normalization, params, rng) -> None:
        names = tuple(normalization.shift_parameters)
        if not names:
            pytest.skip(f"{normalization.name!r} declares no shift_parameters")
        assert set(names) <= set(normalization.trainable), "shift parameters must be trainable"
        Q = _random_Q(rng)
        x = rng.standard_normal((BATCH, K))
        stats = normalization.population_statistics(Q) if normalization.statistics_names \
            else {}
        base = normalization.forward(x, stats, params)
        for name in names:
            b = rng.standard_normal(K)
            moved = normalization.forward(x, stats, {**params, name: params[name] + b})
            np.testing.assert_allclose(moved - base, np.broadcast_to(b, base.shape),
                                       rtol=1e-12, atol=1e-12)

    def test_scale_kernels(self, normalization, params, rng) -> None:
        kernels = normalization.scale_kernels()
        if kernels is None:
            pytest.skip(f"{normalization.name!r} provides no compiled scale kernels")
        assert normalization.scale_kernels() is kernels, \
            "scale_kernels() must return the same object on every call"
        assert tuple(kernels.names) == tuple(params), \
            f"ScaleKernels.names must be the parameters in order {tuple(params)!r}"
        assert set(kernels.shift) <= set(kernels.names)
        scale_names = tuple(normalization.scale_parameters)
        for _ in range(3):  # random states: Q, and parameters away from their initial values
            Q = np.ascontiguousarray(_random_Q(rng))
            values = {k: np.asarray(v, dtype=float) * rng.uniform(0.6, 1.4, K)
                      + (rng.standard_normal(K) if k in kernels.shift else 0.0)
                      for k, v in params.items()}
            p = kernels.pack(values, K)
            assert p.shape == (len(kernels.names), K) and p.flags.c_contiguous
            s = kernels.scale(Q, p)
            np.testing.assert_allclose(s, normalization.scale(Q, values), rtol=1e-12,
                                       atol=1e-12)
            jac = kernels.jacobian(Q, p)
            assert jac.shape == (K, K, K)
            np.testing.assert_allclose(jac, normalization.scale_jacobian(Q, values),
                                       rtol=1e-12, atol=1e-12)
            pjac = kernels.parameter_jacobian(Q, p)
            assert pjac.shape == (len(kernels.names), K, K)
            exact = normalization.scale_parameter_jacobian(Q, values) if scale_names else {}
            w = rng.standard_normal(K)
            for a, name in enumerate(kernels.names):
                if name in exact:
                    np.testing.assert_allclose(pjac[a], exact[name], rtol=1e-12, atol=1e-12)
                elif name in kernels.shift:
                    np.testing.assert_array_equal(pjac[a], 0.0)
                else:  # a fixed parameter of the scale: finite differences of kernels.scale

                    def f(row: np.ndarray, a: int = a, p: np.ndarray = p, w: np.ndarray = w,
                          Q: np.ndarray = Q) -> float:
                        q = p.copy()
                        q[a] = row
                        return float(np.sum(w * kernels.scale(Q, q)))

                    assert_directional_derivative(f, p[a].copy(), w @ pjac[a], rng)
            if normalization.is_diagonal_scale() or kernels.shift:
                x = rng.standard_normal((BATCH, K))
                stats = normalization.population_statistics(Q) \
                    if normalization.statistics_names else {}
                shift = sum((p[a] for a, k in enumerate(kernels.names) if k in kernels.shift),
                            np.zeros(K))
                np.testing.assert_allclose(normalization.forward(x, stats, values),
                                           s * x + shift, rtol=1e-12, atol=1e-12)

    def test_scale_invariance(self, normalization, params, rng) -> None:
        if not normalization.scale_invariant:
            pytest.skip(f"{normalization.name!r} does not declare scale invariance")
        Q = _random_Q(rng)
        d = rng.uniform(0.3, 3.0, K)
        x = rng.standard_normal((BATCH, K))
        out = normalization.forward(x, normalization.population_statistics(Q), params)
        scaled = normalization.forward(
            d * x, normalization.population_statistics(Q * np.outer(d, d)), params
        )
        np.testing.assert_allclose(scaled, out, rtol=1e-12, atol=1e-13)

    # -- the theory engines ------------------------------------------------------------
    def _order_parameters(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        M = 2
        A = rng.standard_normal((K + M, K + M + 2))
        C = A @ A.T / (K + M + 2) + 0.3 * np.eye(K + M)
        return C[:K, :K], C[:K, K:], C[K:, K:]

    def test_generic_engine_runs(self, normalization, rng) -> None:
        from framework import theory

        Q, R, T = self._order_parameters(rng)
        model = TeacherStudent(K, 2, T=T, noise=0.05)
        engine = theory.expectation_engine(model, normalization, {"accuracy": 1.0},
                                           engine="generic")
        r = engine.rates(Q, R, eta=0.3, second_order=False)
        assert np.all(np.isfinite(r.dQ)) and np.all(np.isfinite(r.dR))
        assert np.isfinite(r.eps_g) and r.eps_g >= 0.05 / 2 - 5 * r.eps_g_error
        np.testing.assert_allclose(r.dQ, r.dQ.T, rtol=1e-12, atol=1e-14)
        assert set(r.dparams) == set(normalization.trainable)

    def test_generic_engine_matches_closed_form(self, normalization, rng) -> None:
        from framework import theory

        model_probe = TeacherStudent(K, 2)
        if not theory.has_closed_form(model_probe, normalization):
            pytest.skip(f"{normalization.name!r} has no closed form to compare with")
        Q, R, T = self._order_parameters(rng)
        model = TeacherStudent(K, 2, T=T, noise=0.05)
        engine = theory.expectation_engine(model, normalization, engine="generic")
        r = engine.rates(Q, R, eta=0.3)
        dQ, dR = theory.ode_rhs(model, normalization, Q, R, 0.3, engine="closed_form")
        # 6 standard errors (plus rounding): a deterministic test, rarely this close
        assert np.all(np.abs(r.dQ - dQ) <= 6 * r.dQ_error + 1e-12), (r.dQ, dQ, r.dQ_error)
        assert np.all(np.abs(r.dR - dR) <= 6 * r.dR_error + 1e-12), (r.dR, dR, r.dR_error)

    def test_closed_form_with_parameters_matches_quadrature(self, normalization, rng) -> None:
        from framework import theory

        if not (normalization.trainable
                and theory.has_closed_form(TeacherStudent(K, 2), normalization)):
            pytest.skip(f"{normalization.name!r} has no closed form with trainable parameters")
        Q, R, T = self._order_parameters(rng)
        model = TeacherStudent(K, 2, T=T, noise=0.05)
        exact = theory.expectation_engine(model, normalization)
        generic = theory.expectation_engine(model, normalization, engine="generic")
        assert exact.exact and exact.name == "closed_form"
        p = exact.params()
        for name in exact.trainable:  # away from the initial values, unit by unit
            p[name] = p[name] * rng.uniform(0.6, 1.4, K)
        a = exact.rates(Q, R, p, eta=0.3)
        g = generic.rates(Q, R, p, eta=0.3)
        assert np.all(np.abs(a.dQ - g.dQ) <= 6 * g.dQ_error + 1e-12), (a.dQ, g.dQ, g.dQ_error)
        assert np.all(np.abs(a.dR - g.dR) <= 6 * g.dR_error + 1e-12), (a.dR, g.dR, g.dR_error)
        assert set(a.dparams) == set(exact.trainable)
        for name in exact.trainable:
            assert np.all(np.abs(a.dparams[name] - g.dparams[name])
                          <= 6 * g.dparams_error[name] + 1e-12), name
        for name in exact.held:  # a shift held at 0: no drift there (odd activation)
            assert np.all(np.abs(g.dparams[name]) <= 6 * g.dparams_error[name] + 1e-12), name
