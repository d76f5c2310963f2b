"""Hairer's DOP853 and its compiled (numba) port for the erf order-parameter ODE.

Coefficients
------------
The explicit Runge-Kutta pair of order 8(5,3) with a 7th-order dense output of
E. Hairer, S. P. Norsett and G. Wanner, *Solving Ordinary Differential Equations I*
(2nd ed., Springer 1993), Sec. II.10, as published in their Fortran code ``dop853.f``
(http://www.unige.ch/~hairer/software.html). The numbers below are exactly the ones
scipy's :class:`scipy.integrate.DOP853` uses (``tests/test_integrator.py`` compares them
with scipy's private table to 1e-16), written out here so that no module of the
framework depends on a private scipy module:

* ``C`` (16,): the nodes of the 12 stages and of the 4 extra dense-output stages;
* ``A`` (16, 16): the Runge-Kutta matrix (rows 12..15: the dense-output stages, row
  12 is also the 8th-order weights ``B = A[12, :12]``: FSAL);
* ``E3``, ``E5`` (13,): the 3rd- and 5th-order error estimators (stage 12 = the
  derivative at the new point);
* ``D`` (4, 16): the last four coefficient rows of the dense output (the first three
  follow from the step, see :func:`_dop853_dense`).

Compiled integrator
-------------------
:func:`_dop853_nb` is a line-by-line port of scipy's DOP853 (same tableau, error norm,
step control and dense output) on the packed state of
:func:`framework.theory._kernels.pack_state`, calling the numba right-hand side
directly. Its argument tuple is ``(T, K, M, eta, inv_batch, noise_var,
second_order)`` for the plain network, extended by ``(scale_fn, jac_fn, has_jac)``
for a scale ``s(Q)`` or by ``(scale_fn, jac_fn, has_jac, p)`` for the compiled scale
kernels of a normalization, ``s(Q, p)`` (:class:`framework.normalization.ScaleKernels`).
The functions enter as first-class function types, so one compiled integrator
(cached on disk) serves every scale function of the same signature.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from framework.theory._kernels import (
    HAVE_NUMBA,
    _eff_cov_nb,
    _eps_g_nb,
    _njit,
    _rhs_nb,
    _state_status,
    _unit_weights_nb,
    numba,
    pack_state,
)


def _drop_stale_cache(cache: Any = None, kernels_file: Any = None) -> None:
    """Remove this module's numba cache files when ``_kernels.py`` changed since they were
    written. The compiled integrator inlines the kernels' functions, but numba keys a
    cache on the source file of the function it compiles only, so an edited kernel would
    otherwise keep running in its old, cached form (seen in development; an install
    replaces both files). The kernels' content hash is kept next to the cache files."""
    import hashlib
    from pathlib import Path

    from framework.theory import _kernels

    cache = Path(__file__).with_name("__pycache__") if cache is None else Path(cache)
    source = Path(_kernels.__file__ if kernels_file is None else kernels_file)
    try:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        marker = cache / "_dop853.kernels-sha256"
        if marker.is_file() and marker.read_text() == digest:
            return
        for stale in [*cache.glob("_dop853.*.nbi"), *cache.glob("_dop853.*.nbc")]:
            stale.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        marker.write_text(digest)
    except OSError:  # a read-only install: numba caches elsewhere or not at all
        return


if HAVE_NUMBA:
    _drop_stale_cache()

__all__ = [
    "E3",
    "E5",
    "INTERPOLATOR_POWER",
    "N_STAGES",
    "N_STAGES_EXTENDED",
    "A",
    "B",
    "C",
    "D",
]

# --------------------------------------------------------------------------------------
# Coefficients (Hairer, Norsett & Wanner, dop853.f)
# --------------------------------------------------------------------------------------

N_STAGES = 12
N_STAGES_EXTENDED = 16
INTERPOLATOR_POWER = 7

C = np.array([0.0,
              0.526001519587677318785587544488e-01,
              0.789002279381515978178381316732e-01,
              0.118350341907227396726757197510,
              0.281649658092772603273242802490,
              0.333333333333333333333333333333,
              0.25,
              0.307692307692307692307692307692,
              0.651282051282051282051282051282,
              0.6,
              0.857142857142857142857142857142,
              1.0,
              1.0,
              0.1,
              0.2,
              0.777777777777777777777777777778])

A = np.zeros((N_STAGES_EXTENDED, N_STAGES_EXTENDED))
A[1, 0] = 5.26001519587677318785587544488e-2

A[2, 0] = 1.97250569845378994544595329183e-2
A[2, 1] = 5.91751709536136983633785987549e-2

A[3, 0] = 2.95875854768068491816892993775e-2
A[3, 2] = 8.87627564304205475450678981324e-2

A[4, 0] = 2.41365134159266685502369798665e-1
A[4, 2] = -8.84549479328286085344864962717e-1
A[4, 3] = 9.24834003261792003115737966543e-1

A[5, 0] = 3.7037037037037037037037037037e-2
A[5, 3] = 1.70828608729473871279604482173e-1
A[5, 4] = 1.25467687566822425016691814123e-1

A[6, 0] = 3.7109375e-2
A[6, 3] = 1.70252211019544039314978060272e-1
A[6, 4] = 6.02165389804559606850219397283e-2
A[6, 5] = -1.7578125e-2

A[7, 0] = 3.70920001185047927108779319836e-2
A[7, 3] = 1.70383925712239993810214054705e-1
A[7, 4] = 1.07262030446373284651809199168e-1
A[7, 5] = -1.53194377486244017527936158236e-2
A[7, 6] = 8.27378916381402288758473766002e-3

A[8, 0] = 6.24110958716075717114429577812e-1
A[8, 3] = -3.36089262944694129406857109825
A[8, 4] = -8.68219346841726006818189891453e-1
A[8, 5] = 2.75920996994467083049415600797e1
A[8, 6] = 2.01540675504778934086186788979e1
A[8, 7] = -4.34898841810699588477366255144e1

A[9, 0] = 4.77662536438264365890433908527e-1
A[9, 3] = -2.48811461997166764192642586468
A[9, 4] = -5.90290826836842996371446475743e-1
A[9, 5] = 2.12300514481811942347288949897e1
A[9, 6] = 1.52792336328824235832596922938e1
A[9, 7] = -3.32882109689848629194453265587e1
A[9, 8] = -2.03312017085086261358222928593e-2

A[10, 0] = -9.3714243008598732571704021658e-1
A[10, 3] = 5.18637242884406370830023853209
A[10, 4] = 1.09143734899672957818500254654
A[10, 5] = -8.14978701074692612513997267357
A[10, 6] = -1.85200656599969598641566180701e1
A[10, 7] = 2.27394870993505042818970056734e1
A[10, 8] = 2.49360555267965238987089396762
A[10, 9] = -3.0467644718982195003823669022

A[11, 0] = 2.27331014751653820792359768449
A[11, 3] = -1.05344954667372501984066689879e1
A[11, 4] = -2.00087205822486249909675718444
A[11, 5] = -1.79589318631187989172765950534e1
A[11, 6] = 2.79488845294199600508499808837e1
A[11, 7] = -2.85899827713502369474065508674
A[11, 8] = -8.87285693353062954433549289258
A[11, 9] = 1.23605671757943030647266201528e1
A[11, 10] = 6.43392746015763530355970484046e-1

A[12, 0] = 5.42937341165687622380535766363e-2
A[12, 5] = 4.45031289275240888144113950566
A[12, 6] = 1.89151789931450038304281599044
A[12, 7] = -5.8012039600105847814672114227
A[12, 8] = 3.1116436695781989440891606237e-1
A[12, 9] = -1.52160949662516078556178806805e-1
A[12, 10] = 2.01365400804030348374776537501e-1
A[12, 11] = 4.47106157277725905176885569043e-2

A[13, 0] = 5.61675022830479523392909219681e-2
A[13, 6] = 2.53500210216624811088794765333e-1
A[13, 7] = -2.46239037470802489917441475441e-1
A[13, 8] = -1.24191423263816360469010140626e-1
A[13, 9] = 1.5329179827876569731206322685e-1
A[13, 10] = 8.20105229563468988491666602057e-3
A[13, 11] = 7.56789766054569976138603589584e-3
A[13, 12] = -8.298e-3

A[14, 0] = 3.18346481635021405060768473261e-2
A[14, 5] = 2.83009096723667755288322961402e-2
A[14, 6] = 5.35419883074385676223797384372e-2
A[14, 7] = -5.49237485713909884646569340306e-2
A[14, 10] = -1.08347328697249322858509316994e-4
A[14, 11] = 3.82571090835658412954920192323e-4
A[14, 12] = -3.40465008687404560802977114492e-4
A[14, 13] = 1.41312443674632500278074618366e-1

A[15, 0] = -4.28896301583791923408573538692e-1
A[15, 5] = -4.69762141536116384314449447206
A[15, 6] = 7.68342119606259904184240953878
A[15, 7] = 4.06898981839711007970213554331
A[15, 8] = 3.56727187455281109270669543021e-1
A[15, 12] = -1.39902416515901462129418009734e-3
A[15, 13] = 2.9475147891527723389556272149
A[15, 14] = -9.15095847217987001081870187138

B = A[N_STAGES, :N_STAGES]

E3 = np.zeros(N_STAGES + 1)
E3[:-1] = B.copy()
E3[0] -= 0.244094488188976377952755905512
E3[8] -= 0.733846688281611857341361741547
E3[11] -= 0.220588235294117647058823529412e-1

E5 = np.zeros(N_STAGES + 1)
E5[0] = 0.1312004499419488073250102996e-1
E5[5] = -0.1225156446376204440720569753e+1
E5[6] = -0.4957589496572501915214079952
E5[7] = 0.1664377182454986536961530415e+1
E5[8] = -0.3503288487499736816886487290
E5[9] = 0.3341791187130174790297318841
E5[10] = 0.8192320648511571246570742613e-1
E5[11] = -0.2235530786388629525884427845e-1

D = np.zeros((INTERPOLATOR_POWER - 3, N_STAGES_EXTENDED))
D[0, 0] = -0.84289382761090128651353491142e+1
D[0, 5] = 0.56671495351937776962531783590
D[0, 6] = -0.30689499459498916912797304727e+1
D[0, 7] = 0.23846676565120698287728149680e+1
D[0, 8] = 0.21170345824450282767155149946e+1
D[0, 9] = -0.87139158377797299206789907490
D[0, 10] = 0.22404374302607882758541771650e+1
D[0, 11] = 0.63157877876946881815570249290
D[0, 12] = -0.88990336451333310820698117400e-1
D[0, 13] = 0.18148505520854727256656404962e+2
D[0, 14] = -0.91946323924783554000451984436e+1
D[0, 15] = -0.44360363875948939664310572000e+1

D[1, 0] = 0.10427508642579134603413151009e+2
D[1, 5] = 0.24228349177525818288430175319e+3
D[1, 6] = 0.16520045171727028198505394887e+3
D[1, 7] = -0.37454675472269020279518312152e+3
D[1, 8] = -0.22113666853125306036270938578e+2
D[1, 9] = 0.77334326684722638389603898808e+1
D[1, 10] = -0.30674084731089398182061213626e+2
D[1, 11] = -0.93321305264302278729567221706e+1
D[1, 12] = 0.15697238121770843886131091075e+2
D[1, 13] = -0.31139403219565177677282850411e+2
D[1, 14] = -0.93529243588444783865713862664e+1
D[1, 15] = 0.35816841486394083752465898540e+2

D[2, 0] = 0.19985053242002433820987653617e+2
D[2, 5] = -0.38703730874935176555105901742e+3
D[2, 6] = -0.18917813819516756882830838328e+3
D[2, 7] = 0.52780815920542364900561016686e+3
D[2, 8] = -0.11573902539959630126141871134e+2
D[2, 9] = 0.68812326946963000169666922661e+1
D[2, 10] = -0.10006050966910838403183860980e+1
D[2, 11] = 0.77771377980534432092869265740
D[2, 12] = -0.27782057523535084065932004339e+1
D[2, 13] = -0.60196695231264120758267380846e+2
D[2, 14] = 0.84320405506677161018159903784e+2
D[2, 15] = 0.11992291136182789328035130030e+2

D[3, 0] = -0.25693933462703749003312586129e+2
D[3, 5] = -0.15418974869023643374053993627e+3
D[3, 6] = -0.23152937917604549567536039109e+3
D[3, 7] = 0.35763911791061412378285349910e+3
D[3, 8] = 0.93405324183624310003907691704e+2
D[3, 9] = -0.37458323136451633156875139351e+2
D[3, 10] = 0.10409964950896230045147246184e+3
D[3, 11] = 0.29840293426660503123344363579e+2
D[3, 12] = -0.43533456590011143754432175058e+2
D[3, 13] = 0.96324553959188282948394950600e+2
D[3, 14] = -0.39177261675615439165231486172e+2
D[3, 15] = -0.14972683625798562581422125276e+3

for _arr in (A, B, C, D, E3, E5):
    _arr.flags.writeable = False
del _arr


# --------------------------------------------------------------------------------------
# Compiled DOP853
# --------------------------------------------------------------------------------------

_N_ST = N_STAGES
_DOP_A = np.ascontiguousarray(A)
_DOP_B = np.ascontiguousarray(B)
_DOP_E3 = np.ascontiguousarray(E3)
_DOP_E5 = np.ascontiguousarray(E5)
_DOP_D = np.ascontiguousarray(D)

# The integrator's argument tuple is ``(T, K, M, eta, inv_batch, noise_var,
# second_order)`` for the plain network, extended by ``(scale_fn, jac_fn, has_jac)``
# for a Q-dependent scale ``s(Q)`` and by ``(scale_fn, jac_fn, has_jac, p)`` for the
# compiled kernels of a normalization, ``s(Q, p)`` with constant parameters ``p``.
# ``_scale_of``/``_jac_of`` resolve the scale at compile time from the tuple's length.
# The functions enter as first-class function types (``_SCALED_ARGS``,
# ``_KERNEL_ARGS``), not as dispatcher types: the compiled code is shared by all scale
# functions of one signature and safely cached on disk.
_N_PLAIN_ARGS = 7
_N_SCALED_ARGS = 10


def _scale_of(Q, args):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


def _jac_of(Q, args):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


if HAVE_NUMBA:
    from numba import types as _nt

    _SCALE_SIG = _nt.float64[::1](_nt.float64[:, ::1])
    _JAC_SIG = _nt.float64[:, :, ::1](_nt.float64[:, ::1])
    _SCALED_ARGS = _nt.Tuple((
        _nt.float64[:, ::1], _nt.int64, _nt.int64, _nt.float64, _nt.float64, _nt.float64,
        _nt.boolean, _nt.FunctionType(_SCALE_SIG), _nt.FunctionType(_JAC_SIG), _nt.boolean,
    ))
    _KERNEL_SCALE_SIG = _nt.float64[::1](_nt.float64[:, ::1], _nt.float64[:, ::1])
    _KERNEL_JAC_SIG = _nt.float64[:, :, ::1](_nt.float64[:, ::1], _nt.float64[:, ::1])
    _KERNEL_ARGS = _nt.Tuple((
        *_SCALED_ARGS.types[:_N_PLAIN_ARGS], _nt.FunctionType(_KERNEL_SCALE_SIG),
        _nt.FunctionType(_KERNEL_JAC_SIG), _nt.boolean, _nt.float64[:, ::1],
    ))

    @numba.extending.overload(_scale_of, jit_options={"cache": True})  # type: ignore[typeddict-unknown-key]
    def _ol_scale_of(Q, args):
        if len(args) == _N_PLAIN_ARGS:
            return lambda Q, args: np.ones(Q.shape[0])
        if len(args) == _N_SCALED_ARGS:
            return lambda Q, args: args[7](Q)
        return lambda Q, args: args[7](Q, args[10])

    @numba.extending.overload(_jac_of, jit_options={"cache": True})  # type: ignore[typeddict-unknown-key]
    def _ol_jac_of(Q, args):
        if len(args) == _N_PLAIN_ARGS:
            return lambda Q, args: (np.zeros((1, 1, 1)), False)
        if len(args) == _N_SCALED_ARGS:
            def impl(Q, args):
                if args[9]:
                    return args[8](Q), True
                return np.zeros((1, 1, 1)), False
        else:
            def impl(Q, args):
                if args[9]:
                    return args[8](Q, args[10]), True
                return np.zeros((1, 1, 1)), False

        return impl


@_njit
def _packed_rhs(y, out, args):
    T, K, M, eta, inv_batch, noise_var, second_order = args[:_N_PLAIN_ARGS]
    Q = y[: K * K].reshape((K, K))
    R = y[K * K :].reshape((K, M))
    jac, has_jac = _jac_of(Q, args)
    _rhs_nb(Q, R, T, _scale_of(Q, args), jac, has_jac, eta, inv_batch, noise_var,
            second_order, _unit_weights_nb(K, K + M), out[: K * K].reshape((K, K)),
            out[K * K :].reshape((K, M)))


@_njit
def _rms(v):
    return math.sqrt(np.sum(v * v) / v.size)


@_njit
def _dop853_initial_step(args, y0, f0, t_span, rtol, atol):
    scale = atol + np.abs(y0) * rtol
    d0 = _rms(y0 / scale)
    d1 = _rms(f0 / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, t_span)
    f1 = np.empty_like(y0)
    _packed_rhs(y0 + h0 * f0, f1, args)
    d2 = _rms((f1 - f0) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / 8.0)
    return min(100.0 * h0, h1, t_span)


@_njit
def _dop853_dense(args, K, t_old, h, y_old, y_new, f_new, t_eval, j0, j1, out, ytmp):
    """Evaluate the 7th-order interpolant of the last step at ``t_eval[j0:j1]``."""
    n = y_old.size
    for s in range(_N_ST + 1, _DOP_A.shape[0]):
        ytmp[:] = y_old
        for r in range(s):
            ytmp += (h * _DOP_A[s, r]) * K[r]
        _packed_rhs(ytmp, K[s], args)
    F = np.empty((7, n))
    F[0] = y_new - y_old
    F[1] = h * K[0] - F[0]
    F[2] = 2.0 * F[0] - h * (f_new + K[0])
    for m in range(4):
        F[3 + m] = 0.0
        for r in range(K.shape[0]):
            F[3 + m] += (h * _DOP_D[m, r]) * K[r]
    for j in range(j0, j1):
        x = (t_eval[j] - t_old) / h
        yv = np.zeros(n)
        for i in range(7):
            yv += F[6 - i]
            yv *= x if i % 2 == 0 else 1.0 - x
        out[j] = yv + y_old


@_njit
def _dop853_nb(args, y0, t_eval, rtol, atol, Kdim, max_value):
    """Adaptive DOP853 from ``t_eval[0]`` to ``t_eval[-1]``, output on ``t_eval``.

    A line-by-line port of :class:`scipy.integrate.DOP853` (same tableau, error
    norm, step control and dense output).  Returns ``(out, n_out, status,
    t_fail, nfev)``; ``out[:n_out]`` are valid rows, ``status`` as in
    ``_STATUS_MESSAGES``, ``t_fail`` the alpha where the failure was detected.
    """
    n = y0.size
    n_t = t_eval.size
    out = np.full((n_t, n), np.nan)
    out[0] = y0
    t = t_eval[0]
    t_end = t_eval[-1]
    y = y0.copy()
    Kst = np.empty((_DOP_A.shape[0], n))
    _packed_rhs(y, Kst[0], args)
    fcur = Kst[0].copy()
    nfev = 1
    status = _state_status(y, Kdim, max_value)
    if status != 0 or n_t == 1:
        return out, (0 if status != 0 else 1), status, (t if status != 0 else np.nan), nfev
    h_abs = _dop853_initial_step(args, y, fcur, t_end - t, rtol, atol)
    nfev += 1
    j_next = 1
    ytmp = np.empty(n)
    y_new = np.empty(n)
    f_new = np.empty(n)
    while t < t_end:
        min_step = 10.0 * abs(np.nextafter(t, np.inf) - t)
        if not h_abs >= min_step:  # also catches NaN
            h_abs = min_step
        rejected = False
        while True:
            if not h_abs >= min_step:
                return out, j_next, 4, t, nfev
            t_new = min(t + h_abs, t_end)
            h = t_new - t
            Kst[0] = fcur
            for s in range(1, _N_ST):
                ytmp[:] = y
                for r in range(s):
                    ytmp += (h * _DOP_A[s, r]) * Kst[r]
                _packed_rhs(ytmp, Kst[s], args)
            y_new[:] = y
            for r in range(_N_ST):
                y_new += (h * _DOP_B[r]) * Kst[r]
            _packed_rhs(y_new, f_new, args)
            Kst[_N_ST] = f_new
            nfev += _N_ST
            err5 = 0.0
            err3 = 0.0
            for m in range(n):
                sc = atol + max(abs(y[m]), abs(y_new[m])) * rtol
                e5 = 0.0
                e3 = 0.0
                for r in range(_N_ST + 1):
                    e5 += _DOP_E5[r] * Kst[r, m]
                    e3 += _DOP_E3[r] * Kst[r, m]
                err5 += (e5 / sc) ** 2
                err3 += (e3 / sc) ** 2
            if err5 == 0.0 and err3 == 0.0:
                err = 0.0
            else:
                err = h * err5 / math.sqrt((err5 + 0.01 * err3) * n)
            if err < 1.0:  # NaN compares False: rejected below
                factor = 10.0 if err == 0.0 else min(10.0, 0.9 * err ** (-1.0 / 8.0))
                if rejected:
                    factor = min(1.0, factor)
                h_abs *= factor
                break
            factor = 0.9 * err ** (-1.0 / 8.0)
            h_abs *= factor if factor > 0.2 else 0.2  # also for NaN
            rejected = True
        status = _state_status(y_new, Kdim, max_value)
        if status != 0:
            return out, j_next, status, t_new, nfev
        j_stop = j_next
        while j_stop < n_t and t_eval[j_stop] <= t_new:
            j_stop += 1
        if j_stop > j_next:
            _dop853_dense(args, Kst, t, h, y, y_new, f_new, t_eval, j_next, j_stop, out, ytmp)
            nfev += Kst.shape[0] - _N_ST - 1
            if t_new == t_end:
                out[n_t - 1] = y_new
            j_next = j_stop
        t = t_new
        y[:] = y_new
        fcur[:] = f_new
    return out, j_next, 0, np.nan, nfev


@_njit
def _zero_jac(Q):  # stands in for an absent Jacobian (never called)
    K = Q.shape[0]
    return np.zeros((K, K, K))


@_njit
def _eps_g_path_nb(ys, n_rows, args):
    T, K, M, noise_var = args[0], args[1], args[2], args[5]
    eps = np.full(ys.shape[0], np.nan)
    S = np.empty((K + M, K + M))
    for j in range(n_rows):
        Q = ys[j, : K * K].reshape((K, K))
        R = ys[j, K * K :].reshape((K, M))
        _eff_cov_nb(Q, R, T, _scale_of(Q, args), S)
        eps[j] = _eps_g_nb(S, K, noise_var)
    return eps


def _dop853_scaled(args, y0, t_eval, rtol, atol, Kdim, max_value):
    return _dop853_nb(args, y0, t_eval, rtol, atol, Kdim, max_value)


def _eps_g_path_scaled(ys, n_rows, args):
    return _eps_g_path_nb(ys, n_rows, args)


@functools.cache
def _scaled_entry_points():
    """Compiled integrator and eps_g path for user scale functions (typed once)."""
    f64, i64 = numba.types.float64, numba.types.int64
    jit = functools.partial(numba.njit, cache=True, error_model="numpy")
    dop = jit((_SCALED_ARGS, f64[::1], f64[::1], f64, f64, i64, f64))(_dop853_scaled)
    eps = jit((f64[:, ::1], i64, _SCALED_ARGS))(_eps_g_path_scaled)
    return dop, eps



def _dop853_kernel(args, y0, t_eval, rtol, atol, Kdim, max_value):
    return _dop853_nb(args, y0, t_eval, rtol, atol, Kdim, max_value)


def _eps_g_path_kernel(ys, n_rows, args):
    return _eps_g_path_nb(ys, n_rows, args)


@functools.cache
def _kernel_entry_points():
    """Compiled integrator and eps_g path for the scale kernels ``s(Q, p)`` of a
    normalization (:class:`framework.normalization.ScaleKernels`; typed once)."""
    f64, i64 = numba.types.float64, numba.types.int64
    jit = functools.partial(numba.njit, cache=True, error_model="numpy")
    dop = jit((_KERNEL_ARGS, f64[::1], f64[::1], f64, f64, i64, f64))(_dop853_kernel)
    eps = jit((f64[:, ::1], i64, _KERNEL_ARGS))(_eps_g_path_kernel)
    return dop, eps


def _run_numba(Q0, R0, T, scale_fn, scale_jac_fn, eta, batch_size, noise_var, alpha,
               rtol, atol, second_order, max_value, kernels=None, kernel_params=None):
    """Integrate on the compiled DOP853; returns ``(ys, eps_g, status, t_fail, nfev)``.

    ``kernels`` (a :class:`~framework.normalization.ScaleKernels`, with its parameters
    ``kernel_params`` of shape ``(n_params, K)``) takes precedence over ``scale_fn`` and
    ``scale_jac_fn``; its Jacobian is always used (it is zero for a normalization that
    passes no gradient through its statistics).
    """
    K, M = R0.shape
    args: tuple[Any, ...] = (T, K, M, float(eta), 1.0 / batch_size, float(noise_var),
                             bool(second_order))
    dop, eps_path = _dop853_nb, _eps_g_path_nb
    if kernels is not None:
        p = np.ascontiguousarray(kernel_params, dtype=np.float64)
        args = (*args, kernels.scale, kernels.jacobian, True, p)
        dop, eps_path = _kernel_entry_points()
    elif scale_fn is not None:
        has_jac = scale_jac_fn is not None
        args = (*args, scale_fn, scale_jac_fn if has_jac else _zero_jac, has_jac)
        dop, eps_path = _scaled_entry_points()
    y0 = pack_state(Q0, R0)
    ys, n_rows, status, t_fail, nfev = dop(args, y0, alpha, rtol, atol, K, max_value)
    eps = eps_path(ys, n_rows, args)
    return ys[:n_rows], eps[:n_rows], int(status), float(t_fail), int(nfev)
