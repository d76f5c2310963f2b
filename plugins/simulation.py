"""The ``simulation`` analyzer: finite-N online SGD of the teacher-student network.

What it does
------------
For each of ``replicas`` independent runs it realises the experiment's initial
order parameters (``Experiment.initial_order_parameters()``, or the ``initial``
option) in dimension ``N`` with :meth:`OrderParameters.realize` -- so the student
starts exactly where the ``dynamics`` ODE starts and the teacher has
``B B^T / N = T`` exactly -- and runs online SGD on fresh Gaussian inputs, recording
the order parameters ``Q``, ``R`` and the generalization error at the requested times.

The update (DESIGN.md conventions). Per sample: ``x = J xi / sqrt N``,
``y = B xi / sqrt N``, statistics ``stats``, ``x~ = n(x; stats, params)``,
``sigma = sum_i a_i g(x~_i)``, ``zeta = sum_n b_n g(y_n) + sqrt(noise) * N(0, 1)``
with the model's output weights (``Model.layers()``: ``a = c_K v``, ``b = c_M v*``;
all ones for the soft committee machine), ``d loss / d x~ = -(zeta - sigma) a
g'(x~)``, then the normalization's ``backward`` gives ``d loss / d x``,
``d loss / d stats`` and ``d loss / d params``.

* ``statistics="population"``: ``stats = population_statistics(Q)`` with
  ``Q = J J^T / N`` of the current weights; the statistics gradient is pulled back
  with ``population_statistics_vjp`` to ``G = d loss / d Q`` and, as
  ``dQ/dJ_i = (2/N) sym``, adds ``sum_k (G + G^T)_ik J_k / N`` to ``d loss / d J_i``.
* ``statistics="batch"``: true minibatch statistics ``batch_statistics(x)`` of the
  ``batch_size`` samples of a step, gradient through them with
  ``batch_statistics_vjp`` (needs ``batch_size >= 2``).

``grad_J = (d loss / d x)^T xi / sqrt N`` (+ the statistics path), averaged over the
minibatch, and ``J <- J - eta * grad_J`` (a step ``eta / sqrt N`` along ``xi``).
Trainable normalization parameters (``normalization.trainable``) take the step
``theta <- theta - (eta / N) * (batch mean of d loss / d theta)``: ``eta / N`` per
step so that they move on the ``alpha`` time scale like the order parameters.
First-layer weight decay ``lambda`` (``Layers.weight_decay``) is applied with the
gradient step, both at the same ``J``: ``J <- J - eta * grad_J - (lambda / N) J``.
A trained readout (``second_layer="trained"``) is per replica, starts at
``Layers.readout`` and takes, at the same state as the ``J`` step,
``v <- v - (eta_v / N) * (batch mean of d loss / d v) - (weight_decay_v / N) v`` with
``d loss / d v_i = -(zeta - sigma) c_K g(x~_i)``; it is recorded as ``param_v`` and
``eps_g`` is evaluated at each replica's current ``v``.
Time ``alpha = steps / N`` (a step is one minibatch).

Learning rules. The experiment's ``learning_rule`` maps the minibatch gradient to the
update direction (:meth:`framework.LearningRule.direction`): ``J <- J - eta * D``
(``sgd``: ``D = grad_J``; ``natural_gradient``: the inverse population Fisher at each
replica's current ``Q``, through the span/complement reduction, ``O(N K)`` a step).
Weight decay is added to the step as above (not preconditioned). Only the numpy
backend applies a rule other than ``sgd``: ``backend="numba"`` is refused with the
reason, ``"auto"`` takes numpy.

Randomness
----------
Replica ``r`` draws everything from ``experiment.rng(STREAM_SIMULATION, r)``: first
the realisation of the initial weights, then two 64-bit keys, one for the input
stream and one for the output noise. Inputs ``xi`` are a counter-based Gaussian
stream of that key (SplitMix64 words through numpy's 256-layer ziggurat; normal
number ``step * batch_size * N + b * N + n`` is component ``n`` of sample ``b`` of
step ``step``); the noise of sample ``b`` of step ``step`` is normal number
``step * batch_size + b`` of the noise stream. Same seed -> identical results;
replicas are independent; results do not depend on the backend or on chunking.

Backends
--------
``"numpy"``: the generic path, any registered normalization through its
per-sample API, replicas advancing together as ``(replicas, K + M, N)`` arrays.
``"numba"``: a compiled kernel for the erf activation and population statistics,
replicas in parallel on a pool of ``threads`` threads (default :func:`default_threads`:
the usable CPUs, at most ``numba.get_num_threads()``, i.e. ``NUMBA_NUM_THREADS`` or
``numba.set_num_threads``; at most one per replica); each replica takes ~4e6
multiply-adds of steps in a row, so its weights stay in cache; results do not depend
on the number of threads. It applies to any normalization that provides compiled scale
functions (:meth:`~framework.Normalization.scale_kernels`: ``x~_i = s_i(Q, p) x_i``
plus optional shift parameters). The gradient through the statistics comes from the
compiled ``ds_i / dQ_jk``, trainable parameters are stepped with ``ds_i / dp`` (or,
for a shift, ``d loss / d x~``), and ``Q = J J^T / N`` is updated in closed form
(O(B N (K + M + B)) work a step; a term K^2 N more where ``ds/dQ`` couples units);
the output weights, weight decay and the trained readout are in the kernel too.
The built-in ``plain``, ``batchnorm``,
``weightnorm``, ``batchnorm_affine`` (``gamma`` and ``beta`` trained),
``batchnorm_stopgrad`` and ``meanonly`` provide them. ``"auto"`` picks the kernel
when it applies. Both consume the same random stream and agree step for step
(``tests/test_simulation.py``).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr

from framework import (
    Analyzer,
    Experiment,
    OrderParameters,
    SpecificationError,
    hookimpl,
    theory,
)
from framework.streams import STREAM_SIMULATION
from framework.validators import (
    check_real_array,
    gt,
    integer,
    one_of,
    optional_boolean,
    optional_integer,
    to_bool,
    to_float,
)

try:  # numba is optional (extra "fast")
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None  # type: ignore[assignment]
    HAVE_NUMBA = False

__all__ = ["HAVE_NUMBA", "Simulation", "default_threads", "normals", "normals_numpy"]


def njit(*args: Any, **kwargs: Any) -> Any:
    """``numba.njit`` if numba is installed, else the identity decorator."""
    if HAVE_NUMBA:
        return numba.njit(*args, **kwargs)

    def wrap(fn: Any) -> Any:
        return fn

    return wrap


# ==================================================================================
# Counter-based Gaussian input stream
# ==================================================================================
# A step needs N fresh normals but only ~6 K N flops, so the generator dominates:
# numpy's PCG64 ziggurat costs ~10-20 ns a normal (~10 us a step at N = 1000). The
# stream below costs ~2.2 ns a normal compiled (fill_nb: a SIMD pass for the fast path,
# ~1.4 ns, and a second pass for the 1.5 % it rejects, ~0.8 ns; one number at a time,
# normal_nb in a loop, 2.1-2.3 ns), has no state to carry (normal i of a key is a pure
# function of (key, i)), and has a vectorized numpy twin giving the same values, so the
# kernel and the generic path consume identical inputs with or without numba
# (bench/simulation.py measures them next to numpy's generators).
#   word(k, c)    = splitmix64_mix(k + (c + 1) * 0x9E3779B97F4A7C15)   (mod 2^64)
#   uniform(k, c) = (word(k, c) >> 11) * 2^-53
#   normal(key, i): numpy's 256-layer ziggurat fed with w0 = word(key, i); when the
#   fast path rejects (0.7 %), further words come from word(w0, j), j = 0, 1, ...
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_S8 = np.uint64(8)
_S1 = np.uint64(1)
_ONE = np.uint64(1)
_FF = np.uint64(0xFF)
_MASK52 = np.uint64(0x000FFFFFFFFFFFFF)
_TWO_M53 = 1.0 / 9007199254740992.0

ZIG_R = 3.6541528853610088
ZIG_INV_R = 1.0 / ZIG_R


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ki, wi, fi)`` of the 256-layer double ziggurat (Marsaglia & Tsang 2000)."""
    m1 = 2.0**52
    dn = tn = ZIG_R
    vn = 0.00492867323399
    ki = np.zeros(256, dtype=np.uint64)
    wi = np.zeros(256)
    fi = np.zeros(256)
    q = vn / math.exp(-0.5 * dn * dn)
    ki[0] = np.uint64(int((dn / q) * m1))
    ki[1] = np.uint64(0)
    wi[0] = q / m1
    wi[255] = dn / m1
    fi[0] = 1.0
    fi[255] = math.exp(-0.5 * dn * dn)
    for i in range(254, 0, -1):
        dn = math.sqrt(-2.0 * math.log(vn / dn + math.exp(-0.5 * dn * dn)))
        ki[i + 1] = np.uint64(int((dn / tn) * m1))
        tn = dn
        fi[i] = math.exp(-0.5 * dn * dn)
        wi[i] = dn / m1
    return ki, wi, fi


KI, WI, FI = _ziggurat_tables()


# ----------------------------------------------------------------------------------
# numpy implementation (vectorized over arbitrary index arrays)
# ----------------------------------------------------------------------------------
def _mix_np(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _word_np(k: np.ndarray, c: np.ndarray) -> np.ndarray:
    return _mix_np(k + (c + _ONE) * _GAMMA)


def _unpack_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = (w & _FF).astype(np.intp)
    r = w >> _S8
    rabs = (r >> _S1) & _MASK52
    x = rabs.astype(np.float64) * WI[idx]
    x = np.where((r & _ONE) == _ONE, -x, x)
    return idx, rabs, x


def normals_numpy(keys: np.ndarray, start: int, count: int) -> np.ndarray:
    """Normals ``start .. start+count-1`` of each stream; shape ``(len(keys), count)``."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    c = np.arange(start, start + count, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        w = _word_np(keys, c)
        idx, rabs, x = _unpack_np(w)
        out = x
        bad = np.nonzero(rabs >= KI[idx])
        if bad[0].size:
            out = x.copy()
            out[bad] = _slow_np(w[bad])
    return out


def _slow_np(w0: np.ndarray) -> np.ndarray:
    """The ziggurat's slow path for the words ``w0`` the fast path rejected."""
    k2 = w0.copy()
    w = w0.copy()
    j = np.zeros(w0.shape, dtype=np.uint64)
    out = np.empty(w0.shape)
    active = np.arange(w0.size)
    while active.size:
        kk, jj, ww = k2[active], j[active], w[active]
        idx, rabs, x = _unpack_np(ww)
        tail = idx == 0
        done = np.zeros(active.size, dtype=bool)
        val = np.zeros(active.size)
        # tail: one pair attempt
        if np.any(tail):
            t = np.nonzero(tail)[0]
            u1 = (_word_np(kk[t], jj[t]) >> _S11).astype(np.float64) * _TWO_M53
            u2 = (_word_np(kk[t], jj[t] + _ONE) >> _S11).astype(np.float64) * _TWO_M53
            jj[t] += np.uint64(2)
            xx = -ZIG_INV_R * np.log1p(-u1)
            yy = -np.log1p(-u2)
            acc = yy + yy > xx * xx
            neg = ((rabs[t] >> _S8) & _ONE) == _ONE
            val[t] = np.where(neg, -(ZIG_R + xx), ZIG_R + xx)
            done[t] = acc
        # wedge: one attempt, then a fresh word with its fast-path test
        if np.any(~tail):
            e = np.nonzero(~tail)[0]
            ie = idx[e]
            u = (_word_np(kk[e], jj[e]) >> _S11).astype(np.float64) * _TWO_M53
            jj[e] += _ONE
            acc = (FI[ie - 1] - FI[ie]) * u + FI[ie] < np.exp(-0.5 * x[e] * x[e])
            val[e] = x[e]
            done[e] = acc
            r = e[~acc]
            if r.size:
                nw = _word_np(kk[r], jj[r])
                jj[r] += _ONE
                ww[r] = nw
                nidx, nrabs, nx = _unpack_np(nw)
                fast = nrabs < KI[nidx]
                val[r] = nx
                done[r] = fast
        out[active[done]] = val[done]
        j[active] = jj
        w[active] = ww
        active = active[~done]
    return out


# ----------------------------------------------------------------------------------
# compiled implementation (scalar; identical values)
# ----------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def _mix_nb(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(inline="always", cache=True)
def _word_nb(k, c):
    return _mix_nb(k + (c + _ONE) * _GAMMA)


@njit(cache=True)
def _slow_nb(w0):
    # The tables are globals, frozen as constants: passing them as arguments costs
    # reference counting on every call (7x slower).
    k2 = w0
    w = w0
    j = np.uint64(0)
    while True:
        idx = np.intp(w & _FF)
        r = w >> _S8
        rabs = (r >> _S1) & _MASK52
        x = np.float64(rabs) * WI[idx]
        if (r & _ONE) == _ONE:
            x = -x
        if idx == 0:
            while True:
                u1 = np.float64(_word_nb(k2, j) >> _S11) * _TWO_M53
                u2 = np.float64(_word_nb(k2, j + _ONE) >> _S11) * _TWO_M53
                j += np.uint64(2)
                xx = -ZIG_INV_R * math.log1p(-u1)
                yy = -math.log1p(-u2)
                if yy + yy > xx * xx:
                    if ((rabs >> _S8) & _ONE) == _ONE:
                        return -(ZIG_R + xx)
                    return ZIG_R + xx
        else:
            u = np.float64(_word_nb(k2, j) >> _S11) * _TWO_M53
            j += _ONE
            if (FI[idx - 1] - FI[idx]) * u + FI[idx] < math.exp(-0.5 * x * x):
                return x
        w = _word_nb(k2, j)
        j += _ONE
        idx = np.intp(w & _FF)
        r = w >> _S8
        rabs = (r >> _S1) & _MASK52
        x = np.float64(rabs) * WI[idx]
        if (r & _ONE) == _ONE:
            x = -x
        if rabs < KI[idx]:
            return x


@njit(inline="always", cache=True)
def normal_nb(key, i):
    """Normal number ``i`` (uint64) of stream ``key`` (uint64)."""
    w = _word_nb(key, i)
    idx = np.intp(w & _FF)
    r = w >> _S8
    rabs = (r >> _S1) & _MASK52
    x = np.float64(rabs) * WI[idx]
    if (r & _ONE) == _ONE:
        x = -x
    if rabs < KI[idx]:
        return x
    return _slow_nb(w)


@njit(cache=True)
def fill_one_at_a_time_nb(key, start, out):
    """``out[i] = normal_nb(key, start + i)``: the stream one number at a time, the
    reference :func:`fill_nb` equals bit for bit (tests) and is timed against (bench)."""
    for i in range(out.shape[0]):
        out[i] = normal_nb(key, start + np.uint64(i))


@njit(cache=True)
def fill_nb(key, start, out):
    """Normals ``start .. start + len(out) - 1`` of stream ``key`` into ``out`` (1-D).

    Same values as :func:`normal_nb`, in two passes: the fast path of every number
    without a branch (SIMD: the words, the table gathers and the conversions four at a
    time), marking the 1.5 % the fast path rejects with a NaN, then the slow path for
    those. The first pass costs ~1.4 ns a number, the second ~0.8 (the slow path's
    exp/log1p); together 0-8 % faster than :func:`normal_nb` in a loop (2.1-2.2 ns on
    the development machine; bench/simulation.py), ~6 % on a K = 2 kernel step.
    """
    n = out.shape[0]
    bad = False
    for i in range(n):
        w = _word_nb(key, start + np.uint64(i))
        idx = np.intp(w & _FF)
        r = w >> _S8
        rabs = (r >> _S1) & _MASK52
        x = np.float64(np.int64(rabs)) * WI[idx]  # rabs < 2^52: exact either way
        if (r & _ONE) == _ONE:
            x = -x
        ok = rabs < KI[idx]
        out[i] = x if ok else np.nan
        bad |= not ok
    if bad:
        for i in range(n):
            if math.isnan(out[i]):
                out[i] = _slow_nb(_word_nb(key, start + np.uint64(i)))


@njit(cache=True)
def _fill_nb(keys, start, out):
    # Serial on purpose: inside a numba parallel region (prange over keys, as before)
    # the same fill measured 3-7x slower on a loaded 2-core machine (7-15 ns a number).
    P, count = out.shape
    for p in range(P):
        row = out[p]  # a C-contiguous row (out[p, a:b] would not be typed contiguous)
        for c0 in range(0, count, 4096):  # blocks that stay in L1 for the second pass
            fill_nb(keys[p], start + np.uint64(c0), row[c0:min(count, c0 + 4096)])


def normals(keys: np.ndarray, start: int, count: int) -> np.ndarray:
    """Like :func:`normals_numpy` (same values), compiled when numba is installed."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    if not HAVE_NUMBA:
        return normals_numpy(keys, start, count)
    out = np.empty((keys.size, count))
    _fill_nb(keys, np.uint64(start), out)
    return out


# ==================================================================================
# Compiled kernel: erf activation, a normalization with compiled scale kernels
# ==================================================================================
# Under population statistics the normalization is x~_i = s_i(Q, p) x_i + t_i (t the sum
# of its shift rows of p). Its compiled scale functions (Normalization.scale_kernels())
# enter as first-class numba function types, so this kernel is compiled (and cached
# on disk) once for every normalization. Per step, with go = d loss / d x~:
#   d loss / d x_i      = go_i s_i
#   d loss / d Q_jk     = sum_i go_i x_i ds_i/dQ_jk         (batch mean: G)
#   d loss / d p[a, j]  = sum_i go_i x_i ds_i/dp[a, j]      (a scale row)
#                       = go_j                               (a shift row)
#   J <- A J + C Xi,  A = I - (eta/N) (G + G^T),  C_kb = -(eta / (B sqrt N)) go_bk s_k
# Q = J J^T / N is then updated in closed form, Q <- A Q A^T + A X C^T + C X^T A^T
# + C H C^T with X = J Xi^T / N (= the pre-activations / sqrt N, already known) and
# H = Xi Xi^T / N: O(B^2 N) instead of O(K^2 N) (when B (B + 1) <= K (K + 1); else Q is
# recomputed from the updated weights). Q is also recomputed from the weights at every
# step number divisible by _Q_REFRESH, which bounds the rounding drift of the update and,
# being a function of the step number, keeps results independent of chunking.
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_Q_REFRESH = np.uint64(1024)

#: Roles of the rows of p (parameters of the scale kernels) in the kernel.
_FIXED, _TRAINED_SCALE, _FIXED_SHIFT, _TRAINED_SHIFT = 0, 1, 2, 3


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _gram_nb(W, K, Q):
    N = W.shape[1]
    for k in range(K):
        for m in range(k + 1):
            acc = 0.0
            for n in range(N):
                acc += W[k, n] * W[m, n]
            Q[k, m] = acc / N
            Q[m, k] = Q[k, m]


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _advance_impl(W, Q, p, v, K, key, key_noise, step0, nsteps, batch, eta, noise_sd, role,
                  lay, tw, lam, fns):
    KM, N = W.shape
    M = KM - K
    npar = p.shape[0]
    inv_sqn = 1.0 / math.sqrt(N)
    xi = np.empty((batch, N))
    pre = np.empty((batch, KM))
    go = np.empty((batch, K))  # d loss / d x~
    ca = np.empty((batch, K))  # coefficient of xi_b in the step of J_k (C^T)
    xt = np.empty(K)
    shift = np.zeros(K)
    wq = np.empty(K)  # sum_b go_bi x_bi
    G = np.empty((K, K))
    A = np.empty((K, K))
    H = np.empty((batch, batch))
    AX = np.empty((K, batch))
    CH = np.empty((K, batch))
    AQ = np.empty((K, K))
    Qn = np.empty((K, K))
    Jold = np.empty((K, N))
    dp = np.zeros((npar, K))
    pj0 = np.zeros((npar, K, K))  # ds/dp where no scale parameter is trained
    train_scale = False
    any_shift = False
    for a in range(npar):
        train_scale = train_scale or role[a] == _TRAINED_SCALE
        any_shift = any_shift or role[a] >= _FIXED_SHIFT
    # structured inputs (whitened coordinates): the step is preconditioned by the
    # per-coordinate eigenvalues lam (empty: isotropic inputs); Q is then recomputed
    aniso = lam.shape[0] > 0
    incremental = batch * (batch + 1) <= K * (K + 1) and not aniso
    per_step = np.uint64(batch * N)
    c = -eta * inv_sqn / batch
    # the two layers: lay = (c_K, weight decay, eta_v, weight decay of v, input mean's
    # whitened shift m / sqrt(lambda_mu), its coordinate), tw = c_M v*
    c_k, decay, eta_v, decay_v = lay[0], lay[1], lay[2], lay[3]
    mshift = lay[4]
    mcoord = int(lay[5])
    keep = 1.0 - decay / N if aniso else 1.0
    train_v = eta_v > 0.0
    a_w = np.empty(K)  # effective student weights c_K v of this step
    gv = np.zeros(K)  # sum_b (zeta - sigma) g(x~_bk)
    for s in range(nsteps):
        step = step0 + np.uint64(s)
        if step % _Q_REFRESH == np.uint64(0):
            _gram_nb(W, K, Q)
        sv = fns[0](Q, p)
        jac = fns[1](Q, p)
        pj = fns[2](Q, p) if train_scale else pj0
        for k in range(K):
            shift[k] = 0.0
        if any_shift:
            for a in range(npar):
                if role[a] >= _FIXED_SHIFT:
                    for k in range(K):
                        shift[k] += p[a, k]
        # forward: inputs, pre-activations (and their Gram matrix)
        base = step * per_step
        for b in range(batch):
            fill_nb(key, base + np.uint64(b * N), xi[b])
            if mshift != 0.0:  # inputs with a mean (plain statistics only)
                xi[b, mcoord] += mshift
            acc = 0.0
            sq = 0.0
            for n in range(N):  # the first pre-activation and |xi|^2 in one pass
                acc += W[0, n] * xi[b, n]
                sq += xi[b, n] * xi[b, n]
            pre[b, 0] = acc * inv_sqn
            H[b, b] = sq / N
            for u in range(1, KM):
                acc = 0.0
                for n in range(N):
                    acc += W[u, n] * xi[b, n]
                pre[b, u] = acc * inv_sqn
            if incremental:
                for b2 in range(b):
                    acc = 0.0
                    for n in range(N):
                        acc += xi[b, n] * xi[b2, n]
                    H[b, b2] = acc / N
                    H[b2, b] = H[b, b2]
        # backward through the erf network and the scale
        for k in range(K):
            wq[k] = 0.0
            gv[k] = 0.0
            a_w[k] = c_k * v[k]
        for b in range(batch):
            zeta = 0.0
            for m in range(M):
                zeta += tw[m] * math.erf(pre[b, K + m] * _INV_SQRT2)
            if noise_sd > 0.0:
                zeta += noise_sd * normal_nb(
                    key_noise, step * np.uint64(batch) + np.uint64(b)
                )
            sigma = 0.0
            for k in range(K):
                xt[k] = sv[k] * pre[b, k] + shift[k]
                sigma += a_w[k] * math.erf(xt[k] * _INV_SQRT2)
            err = zeta - sigma
            if train_v:
                for k in range(K):
                    gv[k] += err * math.erf(xt[k] * _INV_SQRT2)
            for k in range(K):
                gk = -err * a_w[k] * _SQRT_2_OVER_PI * math.exp(-0.5 * xt[k] * xt[k])
                go[b, k] = gk
                ca[b, k] = c * gk * sv[k]
                wq[k] += gk * pre[b, k]
        # the path through the population statistics: G = batch mean of d loss / d Q
        offdiag = False
        for j in range(K):
            for m in range(K):
                acc = 0.0
                for i in range(K):
                    acc += wq[i] * jac[i, j, m]
                G[j, m] = acc / batch
        for j in range(K):
            for m in range(K):
                A[j, m] = -(eta / N) * (G[j, m] + G[m, j])
                if j != m and A[j, m] != 0.0:
                    offdiag = True
            A[j, j] += 1.0 - decay / N  # first-layer weight decay: J <- J - (decay/N) J
        # parameter gradients (applied after the weight step, like the numpy path)
        for a in range(npar):
            if role[a] == _TRAINED_SCALE:
                for j in range(K):
                    acc = 0.0
                    for i in range(K):
                        acc += wq[i] * pj[a, i, j]
                    dp[a, j] = acc / batch
            elif role[a] == _TRAINED_SHIFT:
                for j in range(K):
                    acc = 0.0
                    for b in range(batch):
                        acc += go[b, j]
                    dp[a, j] = acc / batch
        if incremental:  # A X and C H before the weights change
            for k in range(K):
                for b in range(batch):
                    acc = 0.0
                    for m in range(K):
                        acc += A[k, m] * pre[b, m]
                    AX[k, b] = acc * inv_sqn
                    acc = 0.0
                    for b2 in range(batch):
                        acc += ca[b2, k] * H[b2, b]
                    CH[k, b] = acc
        # the weight step, loops over n innermost (vectorized)
        if aniso:  # J' <- keep J' + lam * (sum_m (A - keep I)_km J'_m + sum_b c_bk xi_b)
            for k in range(K):
                for n in range(N):
                    Jold[k, n] = W[k, n]
            for k in range(K):
                for n in range(N):
                    acc = 0.0
                    for m in range(K):
                        a_km = A[k, m] - keep if m == k else A[k, m]
                        acc += a_km * Jold[m, n]
                    for b in range(batch):
                        acc += ca[b, k] * xi[b, n]
                    W[k, n] = keep * Jold[k, n] + lam[n] * acc
        else:
            if offdiag:
                for k in range(K):
                    for n in range(N):
                        Jold[k, n] = W[k, n]
            for k in range(K):
                if offdiag:
                    for n in range(N):
                        W[k, n] = 0.0
                    for m in range(K):
                        a_km = A[k, m]
                        if a_km != 0.0:
                            for n in range(N):
                                W[k, n] += a_km * Jold[m, n]
                elif A[k, k] != 1.0:
                    a_kk = A[k, k]
                    for n in range(N):
                        W[k, n] *= a_kk
                for b in range(batch):
                    cb = ca[b, k]
                    for n in range(N):
                        W[k, n] += cb * xi[b, n]
        # Q of the new weights
        if incremental:
            for k in range(K):
                for m in range(K):
                    acc = 0.0
                    for l2 in range(K):
                        acc += A[k, l2] * Q[l2, m]
                    AQ[k, m] = acc
            for k in range(K):
                for m in range(k + 1):
                    acc = 0.0
                    for l2 in range(K):
                        acc += AQ[k, l2] * A[m, l2]
                    for b in range(batch):
                        acc += AX[k, b] * ca[b, m] + AX[m, b] * ca[b, k] + CH[k, b] * ca[b, m]
                    Qn[k, m] = acc
            for k in range(K):
                for m in range(k + 1):
                    Q[k, m] = Qn[k, m]
                    Q[m, k] = Qn[k, m]
        else:
            _gram_nb(W, K, Q)
        for a in range(npar):
            if role[a] == _TRAINED_SCALE or role[a] == _TRAINED_SHIFT:
                for j in range(K):
                    p[a, j] -= (eta / N) * dp[a, j]
        if train_v:  # d loss / d v_k = -(zeta - sigma) c_K g(x~_k), batch mean
            for k in range(K):
                v[k] -= (eta_v / N) * (-c_k * gv[k] / batch) + (decay_v / N) * v[k]


def _advance_one(W, Q, p, v, K, key, key_noise, step0, nsteps, batch, eta, noise_sd, role,
                 lay, tw, lam, scale, jacobian, parameter_jacobian):
    _advance_impl(W, Q, p, v, K, key, key_noise, step0, nsteps, batch, eta, noise_sd, role,
                  lay, tw, lam, (scale, jacobian, parameter_jacobian))


@functools.cache
def _kernel_entry_point() -> Any:
    """The kernel for one replica, typed once for any scale functions (first-class
    function types, so compiled once and cached on disk). It releases the GIL: replicas
    run on a thread pool (:meth:`_KernelStepper.advance`) taking them one at a time,
    not in a numba ``prange`` (a parallel region per call with a static share of
    replicas per thread: under load two threads were 2.5x slower than one there)."""
    t = numba.types
    f2 = t.float64[:, ::1]
    with warnings.catch_warnings():  # first-class function types are "experimental"
        warnings.simplefilter("ignore", numba.NumbaExperimentalFeatureWarning)
        fns = tuple(t.FunctionType(sig) for sig in _kernel_signatures())
        f1 = t.float64[::1]
        common = (t.int64, t.uint64, t.uint64, t.uint64, t.int64, t.int64, t.float64,
                  t.float64, t.int64[::1], f1, f1, f1, *fns)
        return numba.njit((f2, f2, f2, f1, *common), cache=True, nogil=True)(_advance_one)


# ==================================================================================
# The analyzer
# ==================================================================================
#: Errors of framework.theory that send eps_g to the Monte Carlo fallback.
#: What the generic engine raises when it cannot give an accurate eps_g.
_THEORY_ERRORS: tuple[type[BaseException], ...] = (
    theory.ClosedFormUnavailable, theory.AccuracyError,
)

#: Seed of the fixed Gaussian sample of the Monte Carlo eps_g fallback.
MC_SEED = 20200915


def _alpha_grid(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    grid = np.atleast_1d(check_real_array("alpha", value))
    out = tuple(float(a) for a in grid.ravel())
    if (grid.ndim > 1 or not out or not np.all(np.isfinite(out)) or min(out) < 0
            or np.any(np.diff(out) < 0)):
        raise SpecificationError(
            f"'alpha' must be a non-empty non-decreasing grid of finite values >= 0, "
            f"got {value!r}"
        )
    return out


def _to_initial(value: Any) -> OrderParameters | None:
    if value is None or isinstance(value, OrderParameters):
        return value
    if isinstance(value, Mapping):
        return OrderParameters.from_dict(value)
    raise TypeError(f"'initial' must be None, OrderParameters or a mapping, got {value!r}")


def default_threads() -> int:
    """Default number of kernel threads: the CPUs this process may run on, at most
    ``numba.get_num_threads()`` (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, numba.get_num_threads() if HAVE_NUMBA else 1))


def _progress_default(progress: bool | None, work: float) -> bool:
    if progress is not None:
        return bool(progress)
    return bool(sys.stderr.isatty()) and work > 2e9


@attrs.frozen
class Simulation(Analyzer):
    """Finite-N online SGD, ``replicas`` independent runs advancing together.

    Shared training settings (``eta``, ``batch_size``, ``init``, ``seed``) come from
    the :class:`~framework.Experiment`; see the module docstring for the update, the
    random streams and the backends.

    Parameters
    ----------
    N : int
        Input dimension (>= K + M).
    alpha_max : float
        Last recorded time (> 0) of the default grid of ``records`` equally spaced
        times ``0 .. alpha_max``.
    records : int
        Number of recorded times of the default grid (>= 2).
    alpha : sequence of float, optional
        Explicit record times (non-decreasing, >= 0); overrides ``alpha_max`` and
        ``records``. Each is rounded to a whole number of steps; the dataset's
        ``alpha`` coordinate holds the times actually recorded (``steps / N``).
    replicas : int
        Number of independent runs (>= 1).
    statistics : str
        ``"population"`` (statistics from ``Q`` of the current weights) or ``"batch"``
        (minibatch statistics; needs ``batch_size >= 2``).
    initial : OrderParameters, optional
        Start from these order parameters instead of the experiment's.
    backend : str
        ``"auto"``, ``"numpy"`` (generic) or ``"numba"`` (erf, population
        statistics, a normalization with compiled scale functions).
    mc_samples : int
        Size of the fixed Gaussian sample of the Monte Carlo ``eps_g`` used when no
        closed form applies (>= 1000).
    progress : bool, optional
        Show a tqdm progress bar; default: on long runs when stderr is a terminal.
    threads : int, optional
        Threads of the compiled kernel (replicas run in parallel, one replica per
        thread at a time; results do not depend on it); default
        :func:`default_threads` (at most one per replica).
    """

    name: ClassVar[str] = "simulation"
    description: ClassVar[str] = "finite-N online SGD, replicas batched (erf kernel compiled)"
    size_options: ClassVar[dict[str, str]] = {
        "records": "trajectory", "N": "system", "mc_samples": "system", "replicas": "replicas"}
    #: The experiment's learning rule is applied (framework.LearningRule).
    supports_learning_rules: ClassVar[bool] = True
    #: The model's input distribution is applied (structured inputs, framework.inputs).
    supports_structured_inputs: ClassVar[bool] = True
    supports_input_mean: ClassVar[bool] = True

    N: int = attrs.field(default=1000, validator=integer(minimum=1))
    alpha_max: float = attrs.field(default=10.0, converter=to_float, validator=gt(0.0))
    records: int = attrs.field(default=101, validator=integer(minimum=2))
    alpha: tuple[float, ...] | None = attrs.field(default=None, converter=_alpha_grid)
    replicas: int = attrs.field(default=8, validator=integer(minimum=1))
    statistics: str = attrs.field(default="population",
                                  validator=one_of("population", "batch"))
    initial: OrderParameters | None = attrs.field(default=None, converter=_to_initial)
    backend: str = attrs.field(default="auto", validator=one_of("auto", "numpy", "numba"))
    mc_samples: int = attrs.field(default=100_000, validator=integer(minimum=1000))
    progress: bool | None = attrs.field(default=None, converter=to_bool,
                                        validator=optional_boolean())
    threads: int | None = attrs.field(default=None, validator=optional_integer(minimum=1))

    # -- specification ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["initial"] = None if self.initial is None else self.initial.to_dict()
        out["alpha"] = None if self.alpha is None else list(self.alpha)
        if self.threads is None:  # an execution setting: specs (and hashes) as before
            out.pop("threads", None)
        return out

    def record_steps(self) -> np.ndarray:
        """The recorded step numbers (sorted, unique)."""
        grid = (np.linspace(0.0, self.alpha_max, self.records) if self.alpha is None
                else np.asarray(self.alpha))
        return np.unique(np.rint(grid * self.N).astype(np.int64))

    def _kernel_applies(self, experiment: Experiment) -> str:
        """'' if the compiled kernel applies, else the reason it does not."""
        act = experiment.model.activation_function()
        norm = experiment.normalization
        if not HAVE_NUMBA:
            return "numba is not installed"
        rule = experiment.learning_rule
        if not rule.engine_native:
            return (f"learning rule {rule.name!r} is not in the compiled kernel (it knows "
                    "the plain gradient step only)")
        if not experiment.model.committee_machine:
            return (f"model {experiment.model.name!r} is not a soft committee machine "
                    "(its forward/readout run through numpy)")
        if act.closed_form != "erf":
            return f"activation {act.name!r} is not erf"
        if self.statistics != "population":
            return "statistics='batch'"
        if norm.statistics_names and not experiment.model.input_distribution().centred:
            return (f"normalization {norm.name!r} has statistics and the inputs have a mean "
                    "(the kernel's population statistics are of centred pre-activations)")
        if norm.weight_statistics and not experiment.model.input_distribution().isotropic:
            return (f"normalization {norm.name!r} computes its statistics from the weights "
                    "and the inputs are structured (the kernel's statistics are of the "
                    "pre-activations)")
        kernels = norm.scale_kernels()
        if kernels is None:
            return (f"normalization {norm.name!r} provides no compiled scale functions "
                    "(scale_kernels() is None)")
        if not (norm.is_diagonal_scale() or kernels.shift):
            return (f"normalization {norm.name!r} is not a diagonal scale with these "
                    "parameters and its scale kernels declare no shift")
        missing = [k for k in norm.trainable if k not in kernels.names]
        if missing:
            return (f"trainable parameters {missing!r} of normalization {norm.name!r} are "
                    f"not parameters of its scale kernels {tuple(kernels.names)!r}")
        return ""

    def check(self, experiment: Experiment) -> None:
        model = experiment.model
        K, M = model.K, model.M
        if self.N < K + M:
            raise SpecificationError(f"'N' must be >= K + M = {K + M}, got {self.N}")
        if self.statistics == "batch" and experiment.batch_size < 2:
            raise SpecificationError(
                f"'batch_size' must be >= 2 with statistics='batch' (minibatch statistics "
                f"of one sample are degenerate), got {experiment.batch_size}"
            )
        if self.backend == "numba":
            reason = self._kernel_applies(experiment)
            if reason:
                raise SpecificationError(
                    f"'backend' must be 'auto' or 'numpy' here ({reason}), got 'numba'"
                )
        if self.initial is not None:
            op = self.initial
            if op.K != K or op.M != M:
                raise SpecificationError(
                    f"'initial' must have K={K}, M={M} like the model, got K={op.K}, M={op.M}"
                )
            if not np.allclose(op.T, model.T, rtol=1e-10, atol=1e-12):
                raise SpecificationError("'initial.T' must equal the model's T")

    # -- running ---------------------------------------------------------------------
    def run(self, experiment: Experiment) -> xr.Dataset:
        self.check(experiment)
        model, norm = experiment.model, experiment.normalization
        K, M, N, P = model.K, model.M, self.N, self.replicas
        B = experiment.batch_size
        op = self.initial if self.initial is not None else experiment.initial_order_parameters()
        reason = self._kernel_applies(experiment)
        use_kernel = self.backend == "numba" or (self.backend == "auto" and not reason)

        # initial weights and stream keys, replica by replica
        inputs = model.input_distribution()
        W = np.empty((P, K + M, N))
        keys = np.empty((P, 2), dtype=np.uint64)
        for r in range(P):
            rng = experiment.rng(STREAM_SIMULATION, r)
            if inputs.isotropic:
                J0, B0 = experiment.model.realize(op, N, rng)
            else:  # in the eigenbasis, each eigenspace holding its share of the state
                J0, B0 = inputs.realize(experiment.model, op, N, rng)
            W[r, :K], W[r, K:] = J0, B0
            keys[r] = rng.integers(0, 2**64 - 1, size=2, dtype=np.uint64, endpoint=True)
        # structured inputs: whitened coordinates W' = W Sigma^(1/2), where the inputs are
        # isotropic and the step is preconditioned by Sigma (module docstring)
        lam = np.zeros(0) if inputs.isotropic else inputs.coordinate_eigenvalues(N)
        if lam.size:
            W *= np.sqrt(lam)
        params = {name: np.broadcast_to(np.asarray(v, dtype=float), (P, 1, K)).copy()
                  for name, v in norm.parameters(K).items()}
        trainable = tuple(norm.trainable)
        layers = model.layers()
        # the student readout of every replica (its initial value when trained)
        v = np.broadcast_to(np.asarray(layers.readout, dtype=float), (P, K)).copy()

        steps = self.record_steps()
        A = steps.size
        Qs = np.empty((P, A, K, K))
        Rs = np.empty((P, A, K, M))
        phist = {name: np.empty((P, A, K)) for name in trainable}
        vhist = np.empty((P, A, K)) if layers.readout_trained else None

        stepper = _KernelStepper(self, experiment, W, keys, params, v, lam) if use_kernel \
            else _GenericStepper(self, experiment, W, keys, params, v, lam)
        spaces = None if not lam.size else (np.empty((P, A, inputs.L, K, K)),
                                            np.empty((P, A, inputs.L, K, M)))
        # inputs with a mean: r = J u / sqrt(N) = J'[:, c] / sqrt(lambda_mu N)
        rhist = None if inputs.centred else np.empty((P, A, K))
        mcoord = 0 if inputs.centred else inputs.mean_coordinate(N)
        pbar = _progress_bar(_progress_default(self.progress, float(steps[-1]) * P * N * B),
                             int(steps[-1]))
        step = 0
        try:
            for a, target in enumerate(steps):
                while step < target:
                    n = min(int(target) - step, stepper.chunk)
                    stepper.advance(step, n)
                    step += n
                    if pbar is not None:
                        pbar.update(n)
                J, Bt = W[:, :K], W[:, K:]
                Qs[:, a] = J @ J.transpose(0, 2, 1) / N  # structured: J Sigma J^T / N
                Rs[:, a] = J @ Bt.transpose(0, 2, 1) / N
                if spaces is not None:  # Q_l = J'^(l) J'^(l)^T / (N lambda_l)
                    inv = (1.0 / inputs.eigenvalues)[:, None, None]
                    spaces[0][:, a] = inputs.space_overlaps(J, J) * inv
                    spaces[1][:, a] = inputs.space_overlaps(J, Bt) * inv
                if rhist is not None:
                    rhist[:, a] = J[:, :, mcoord] / math.sqrt(
                        inputs.mean_eigenvalue_of_direction * N)
                for name in trainable:
                    phist[name][:, a] = params[name][:, 0]
                if vhist is not None:
                    vhist[:, a] = v
        finally:
            stepper.close()
            if pbar is not None:
                pbar.close()

        # eps_g at each replica's current parameters (the trained readout as "v")
        allp = phist if vhist is None else {**phist, "v": vhist}
        eps, eps_attrs, eps_err = self._generalization_error(
            experiment, Qs, Rs, allp, rhist, None if spaces is None else spaces)
        ds = self._dataset(experiment, steps, Qs, Rs, eps, eps_attrs, phist, vhist,
                           "numba" if use_kernel else "numpy")
        if spaces is not None:
            from framework.datasets import add_input_spaces

            add_input_spaces(ds, inputs, spaces[0], spaces[1], ("replica", "alpha"), N=N,
                             r=rhist)
        ds["eps_g_error"] = xr.DataArray(eps_err, dims=("replica", "alpha"), attrs={
            "long_name": "error estimate of eps_g at the recorded order parameters (0: exact "
                         "engine; the quadrature's or the Monte Carlo fallback's standard "
                         "error otherwise)", "units": "1"})
        return ds

    # -- generalization error ----------------------------------------------------------
    def _generalization_error(
        self, experiment: Experiment, Qs: np.ndarray, Rs: np.ndarray,
        phist: dict[str, np.ndarray], rhist: np.ndarray | None = None,
        spaces: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
        """``eps_g`` at the recorded states, how it was computed, and its error estimate
        (0 where exact). Inputs with a mean: at the recorded per-eigenspace state and
        mean overlaps ``rhist`` (no Monte Carlo fallback: it knows centred inputs only);
        weight statistics with structured inputs: at the per-eigenspace state (their Gram
        matrix is ``sum_l Q_l``)."""
        model, norm = experiment.model, experiment.normalization
        try:  # the engine of framework.theory: exact where it can be, else the quadrature
            eng = theory.select_engine(model, norm, model.activation_function(),
                                       params=phist or None)
            lead = Qs.shape[:2]
            eps = np.empty(lead)
            err = np.empty(lead)
            for j in np.ndindex(*lead):  # records x replicas engine calls
                pj = {k: v[j] for k, v in phist.items()}
                if spaces is not None and (rhist is not None or norm.weight_statistics):
                    if rhist is not None:
                        pj[theory.MEAN_OVERLAP] = rhist[j]
                    eps[j], err[j] = eng.generalization_error(spaces[0][j], spaces[1][j], pj)
                else:
                    eps[j], err[j] = eng.generalization_error(Qs[j], Rs[j], pj)
        except _THEORY_ERRORS as exc:
            if rhist is not None:
                raise
            why = f"{type(exc).__name__}: {exc}"
        else:
            return eps, {
                "method": f"framework.theory.select_engine ({eng.name}: {eng.describe()}) "
                          "at the recorded order parameters and parameters",
                "eps_g_engine": eng.name}, err
        eps, err = _eps_g_monte_carlo(model, norm, Qs, Rs, phist, self.mc_samples)
        note = (f"Monte Carlo over a fixed sample of {self.mc_samples} Gaussian (x, y) "
                f"(seed {MC_SEED}, common to all entries) with population statistics "
                f"and the recorded parameters; fallback because the theory raised {why}")
        return eps, {"method": note, "eps_g_engine": "monte_carlo"}, err

    # -- dataset -------------------------------------------------------------------------
    def _dataset(self, experiment: Experiment, steps: np.ndarray, Qs: np.ndarray,
                 Rs: np.ndarray, eps: np.ndarray, eps_attrs: dict[str, Any],
                 phist: dict[str, np.ndarray], vhist: np.ndarray | None,
                 backend: str) -> xr.Dataset:
        model = experiment.model
        layers = model.layers()
        K, M, N, P = model.K, model.M, self.N, self.replicas
        alpha = steps / N
        coords = {
            "replica": np.arange(P),
            "alpha": xr.DataArray(alpha, dims="alpha",
                                  attrs={"long_name": "time alpha = steps / N", "units": "1"}),
            "step": xr.DataArray(steps, dims="alpha",
                                 attrs={"long_name": "number of SGD steps", "units": "1"}),
            "student": np.arange(K),
            "student_": np.arange(K),
            "teacher": np.arange(M),
        }

        def mean_sem(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            mean = arr.mean(axis=0)
            if P < 2:
                return mean, np.full(mean.shape, np.nan)
            return mean, arr.std(axis=0, ddof=1) / np.sqrt(P)

        def var(data: np.ndarray, dims: tuple[str, ...], long_name: str,
                **extra: Any) -> xr.DataArray:
            return xr.DataArray(data, dims=dims,
                                attrs={"long_name": long_name, "units": "1", **extra})

        dQ = ("student", "student_")
        dR = ("student", "teacher")
        ds = xr.Dataset(coords=coords)
        ds["eps_g"] = var(eps, ("replica", "alpha"), "generalization error of each replica",
                          **eps_attrs)
        ds["Q"] = var(Qs, ("replica", "alpha", *dQ), "student-student overlap Q = J J^T / N")
        ds["R"] = var(Rs, ("replica", "alpha", *dR), "student-teacher overlap R = J B^T / N")
        means: list[tuple[str, np.ndarray, tuple[str, ...]]] = [
            ("eps_g", eps, ()), ("Q", Qs, dQ), ("R", Rs, dR)]
        if vhist is not None:  # named like the dynamics analyzer's trainable parameters
            ds["param_v"] = var(vhist, ("replica", "alpha", "student"),
                                "trained student readout v (second-layer weights, before "
                                "c_K: sigma = c_K sum_i v_i g(x~_i))")
            means.append(("param_v", vhist, ("student",)))
        for name, data, dims in means:
            mean, sem = mean_sem(data)
            ds[f"{name}_mean"] = var(mean, ("alpha", *dims), f"replica mean of {name}")
            ds[f"{name}_sem"] = var(sem, ("alpha", *dims),
                                    f"standard error of the replica mean of {name} "
                                    f"(std with ddof=1 / sqrt(replicas); NaN for 1 replica)")
        for name, data in phist.items():
            ds[f"param_{name}"] = var(data, ("replica", "alpha", "student"),
                                      f"trainable normalization parameter {name}")
        try:
            from framework import convention_attrs
        except ImportError:  # pragma: no cover - older framework
            conventions: dict[str, Any] = {}
        else:
            conventions = dict(convention_attrs(experiment))
        ds.attrs.update(conventions)
        ds.attrs.update(experiment.learning_rule.attrs())
        ds.attrs.update({
            "N": N,
            "replicas": P,
            "eta": experiment.eta,
            "batch_size": experiment.batch_size,
            "statistics": self.statistics,
            "backend": backend,
            "learning_rate_scaling": "J <- J - eta * D, D = the learning rule's direction "
                                     "of the batch mean of grad_J loss (sgd: D = grad_J, a "
                                     "step eta/sqrt(N) along xi on weights with O(1) "
                                     "components)",
            "normalization_parameter_step": "theta <- theta - (eta/N) * (batch mean of "
                                            "d loss/d theta) per step (alpha time scale)",
            "time": "alpha = steps / N (one step = one minibatch)",
            "output": ("sum over units, unit second-layer weights"
                       if layers.committee_machine else layers.describe()),
            "readout_step": ("v <- v - (eta_v/N) * (batch mean of d loss/d v) - "
                             "(weight_decay_v/N) * v per step, d loss/d v_i = "
                             "-(zeta - sigma) c_K g(x~_i), at the same state as the J step"
                             if layers.readout_trained else "readout fixed"),
            "weight_decay_step": ("J <- J - eta * grad_J - (weight_decay/N) * J per step "
                                  "(both at the same J)" if layers.weight_decay else "none"),
            "statistics_meaning": (
                "population: stats from Q = J J^T/N of the current weights, gradient "
                "through them; batch: minibatch statistics, gradient through them"
            ) if experiment.normalization.statistics_names else "normalization has none",
            "eps_g_statistics": "population statistics of the recorded weights",
            "init": ("analyzer option 'initial'" if self.initial is not None else
                     "Experiment.initial_order_parameters() realised in dimension N with "
                     "OrderParameters.realize (teacher B B^T/N = T exactly)"),
            "random_streams": "replica r: experiment.rng(STREAM_SIMULATION=1, r) realises the "
                              "weights then draws two uint64 keys of counter-based Gaussian "
                              "streams (inputs, output noise); see plugins/simulation.py",
        })
        return ds


def _kernel_signatures() -> tuple[Any, Any, Any]:
    """numba signatures of ``scale``, ``jacobian`` and ``parameter_jacobian``."""
    t = numba.types
    f2 = t.float64[:, ::1]
    f3 = t.float64[:, :, ::1]
    return t.float64[::1](f2, f2), f3(f2, f2), f3(f2, f2)


class _FirstClass:
    """A compiled scale function as a first-class function value, typed once.

    Dispatchers are accepted by the kernel too, but numba then types and converts them
    on every call (~0.2 ms, as much as 100 steps at N = 1000); this object carries its
    numba type (``_numba_type_``) and the address of the compiled function
    (``__wrapper_address__``, numba's wrapper address protocol).
    """

    __slots__ = ("_address", "_cres", "_numba_type_")

    def __init__(self, fn: Any, sig: Any) -> None:
        from numba.core.types.function_type import CompileResultWAP

        wap = CompileResultWAP(fn.get_compile_result(sig))
        self._cres, self._address = wap.cres, wap.address  # type: ignore[attr-defined]
        self._numba_type_ = numba.types.FunctionType(sig)

    def __wrapper_address__(self) -> int:
        return self._address


@functools.lru_cache(maxsize=64)
def _first_class(kernels: Any) -> tuple[Any, Any, Any]:
    """The scale functions of ``kernels`` as first-class function values."""
    out = []
    with warnings.catch_warnings():  # first-class function types are "experimental"
        warnings.simplefilter("ignore", numba.NumbaExperimentalFeatureWarning)
        for fn, sig in zip((kernels.scale, kernels.jacobian, kernels.parameter_jacobian),
                           _kernel_signatures(), strict=True):
            out.append(_FirstClass(fn, sig) if isinstance(fn, numba.core.registry.CPUDispatcher)
                       else fn)
    return out[0], out[1], out[2]


class _KernelStepper:
    """Advance all replicas with the compiled kernel and the normalization's compiled
    scale functions (:meth:`~framework.Normalization.scale_kernels`)."""

    def __init__(self, sim: Simulation, experiment: Experiment, W: np.ndarray,
                 keys: np.ndarray, params: dict[str, np.ndarray], v: np.ndarray,
                 lam: np.ndarray) -> None:
        norm = experiment.normalization
        kernels = norm.scale_kernels()
        #: per-coordinate eigenvalues of structured inputs (empty: isotropic)
        self.lam = np.ascontiguousarray(lam, dtype=float)
        if kernels is None:  # _kernel_applies() chose this stepper
            raise RuntimeError(f"normalization {norm.name!r} has no scale_kernels()")
        K = experiment.model.K
        P, _, N = W.shape
        self.W, self.K, self.params, self.v = W, K, params, v
        lay = experiment.model.layers()
        # (c_K, first-layer decay, eta_v, readout decay, input mean's whitened shift, its
        # coordinate); eta_v = 0: the readout is fixed
        shift, coord = _mean_shift(experiment.model.input_distribution(), N)
        self.lay = np.array([lay.c_student, lay.weight_decay,
                             lay.eta_v if lay.readout_trained else 0.0,
                             lay.weight_decay_v if lay.readout_trained else 0.0,
                             shift, float(coord)])
        self.tw = np.ascontiguousarray(lay.teacher_weights(), dtype=float)
        self.keys = np.ascontiguousarray(keys[:, 0])
        self.keys_noise = np.ascontiguousarray(keys[:, 1])
        self.batch = experiment.batch_size
        self.eta = experiment.eta
        self.noise_sd = math.sqrt(experiment.model.noise)
        self.names = tuple(kernels.names)
        trainable = set(norm.trainable)
        self.role = np.array([(_FIXED_SHIFT if k in kernels.shift else _FIXED)
                              + (1 if k in trainable else 0) for k in self.names],
                             dtype=np.int64)
        self.trained = tuple((a, k) for a, k in enumerate(self.names) if k in trainable)
        self.p = np.zeros((P, len(self.names), K))
        for a, k in enumerate(self.names):
            self.p[:, a] = params[k][:, 0]
        J = W[:, :K]
        self.Q = np.ascontiguousarray(J @ J.transpose(0, 2, 1) / N)
        self.one = _kernel_entry_point()
        self.fns = _first_class(kernels)
        # About 4e6 multiply-adds per replica between returns to Python (progress bar
        # updates): a replica then takes many steps in a row, its weights staying in
        # cache (a budget shared by all replicas gave one step per call at N = 10000 and
        # 32 replicas, every replica's weights reloaded from memory at every step).
        self.chunk = max(1, int(4e6 // (W.shape[1] * W.shape[2] * self.batch)))
        threads = min(P, sim.threads if sim.threads is not None else default_threads())
        #: replicas are independent: a pool of threads takes them one at a time
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def advance(self, step0: int, nsteps: int) -> None:
        rest = (np.uint64(step0), nsteps, self.batch, self.eta, self.noise_sd, self.role,
                self.lay, self.tw, self.lam, *self.fns)

        def replica(r: int) -> None:
            self.one(self.W[r], self.Q[r], self.p[r], self.v[r], self.K, self.keys[r],
                     self.keys_noise[r], *rest)

        with warnings.catch_warnings():  # first-class function types are "experimental"
            warnings.simplefilter("ignore", numba.NumbaExperimentalFeatureWarning)
            if self.pool is None:
                for r in range(self.W.shape[0]):
                    replica(r)
            else:
                for _ in self.pool.map(replica, range(self.W.shape[0])):
                    pass  # re-raises a replica's exception
        for a, k in self.trained:
            self.params[k][:, 0] = self.p[:, a]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _GenericStepper:
    """Advance all replicas with numpy through the normalization's per-sample API."""

    def __init__(self, sim: Simulation, experiment: Experiment, W: np.ndarray,
                 keys: np.ndarray, params: dict[str, np.ndarray], v: np.ndarray,
                 lam: np.ndarray) -> None:
        self.W, self.params = W, params
        #: per-coordinate eigenvalues of structured inputs (None: isotropic)
        self.lam = lam if lam.size else None
        self.model = experiment.model
        lay = experiment.model.layers()
        self.layers = lay
        #: the trained readout (P, K), updated in place; None: the model's fixed readout
        self.v = v if lay.readout_trained else None
        self.act = experiment.model.activation_function()
        self.norm = experiment.normalization
        self.K = experiment.model.K
        self.keys = keys
        self.batch = experiment.batch_size
        self.eta = experiment.eta
        self.noise_sd = math.sqrt(experiment.model.noise)
        self.population = sim.statistics == "population"
        self.stat_names = tuple(self.norm.statistics_names)
        #: weight statistics with structured inputs: the weights are whitened (J' = J
        #: Sigma^(1/2)), so J J^T / N = J' Sigma^-1 J'^T / N and its gradient is
        #: Sigma^-1-weighted (the step's Sigma preconditioning then leaves J)
        self.stat_metric = (1.0 / self.lam if self.lam is not None
                            and self.norm.weight_statistics else None)
        self.trainable = tuple(self.norm.trainable)
        self.rule = experiment.learning_rule
        self.rule_state: dict[str, Any] = {}  # the rule's memory over the run
        P, _, N = W.shape
        #: inputs with a mean: its shift m / sqrt(lambda_mu) in whitened coordinates
        self.mshift, self.mcoord = _mean_shift(experiment.model.input_distribution(), N)
        # inputs are drawn in chunks of ~2^20 numbers (8 MB)
        self.chunk = max(1, (1 << 20) // (P * N * self.batch))

    def close(self) -> None:
        pass

    def advance(self, step0: int, nsteps: int) -> None:
        W, Bsz = self.W, self.batch
        P, _, N = W.shape
        xi_all = normals(self.keys[:, 0], step0 * Bsz * N, nsteps * Bsz * N)
        xi_all = xi_all.reshape(P, nsteps, Bsz, N)
        if self.mshift:  # inputs with a mean: xi' = z + (m / sqrt(lambda_mu)) e_c
            xi_all[..., self.mcoord] += self.mshift
        noise_all = None
        if self.noise_sd > 0.0:
            noise_all = normals(self.keys[:, 1], step0 * Bsz, nsteps * Bsz)
            noise_all = noise_all.reshape(P, nsteps, Bsz)
        for s in range(nsteps):
            self._step(xi_all[:, s], None if noise_all is None else noise_all[:, s])

    def _step(self, xi: np.ndarray, noise: np.ndarray | None) -> None:
        W, K, Bsz, norm, params = self.W, self.K, self.batch, self.norm, self.params
        N = W.shape[2]
        inv_sqn = 1.0 / math.sqrt(N)
        J = W[:, :K]
        out = self.model.forward(W, xi, noise)  # the model's simulation step
        x, zeta = out.x, out.zeta
        Q = None
        mu = None
        stats: dict[str, np.ndarray] = {}
        if self.stat_names:
            if self.population:
                Js = J if self.stat_metric is None else J * self.stat_metric
                Q = np.matmul(Js, J.transpose(0, 2, 1)) / N
                if self.mshift:  # the pre-activation mean m J_i . u / sqrt(N)
                    mu = self.mshift * J[:, :, self.mcoord] * inv_sqn
                    pop = norm.population_statistics_with_mean(Q, mu)
                else:
                    pop = norm.population_statistics(Q)
                stats = {k: np.asarray(v)[:, None, :] for k, v in pop.items()}
            else:
                stats = dict(norm.batch_statistics(x))
        xt = norm.forward(x, stats, params)
        sigma, dsigma = self.model.readout(xt, self.v)
        grad_out = -(zeta - sigma)[..., None] * dsigma
        bw = norm.backward(x, stats, params, grad_out)
        dx = bw.x
        if self.stat_names and not self.population:
            dx = dx + norm.batch_statistics_vjp(
                x, {k: bw.stats[k].sum(axis=1, keepdims=True) for k in self.stat_names})
        grad = np.matmul(dx.transpose(0, 2, 1), xi) * (inv_sqn / Bsz)  # (P, K, N)
        if Q is not None:
            gst = {k: bw.stats[k].mean(axis=1) for k in self.stat_names}
            if mu is None:
                G = norm.population_statistics_vjp(Q, gst)
            else:  # and through the mean: d mu_i / d J'_(i, c) = m / sqrt(lambda_mu N)
                G, gm = norm.population_statistics_with_mean_vjp(Q, mu, gst)
                grad[:, :, self.mcoord] += np.asarray(gm) * (self.mshift * inv_sqn)
            grad += np.matmul(G + G.transpose(0, 2, 1), Js) / N
        grad = self.rule.direction(self.model, norm, J, grad, self.rule_state)  # sgd: grad
        if self.lam is not None:  # whitened coordinates: the step preconditioned by Sigma
            grad *= self.lam
        for name in self.trainable:
            params[name] -= (self.eta / N) * bw.params[name].mean(axis=1, keepdims=True)
        lay = self.layers
        if lay.weight_decay:  # J <- J - eta grad - (lambda / N) J (both at the old J)
            J -= self.eta * grad + (lay.weight_decay / N) * J
        else:
            J -= self.eta * grad
        if self.v is not None:  # d loss / d v_i = -(zeta - sigma) c_K g(x~_i), batch mean
            gv = -lay.c_student * ((zeta - sigma)[..., None] * self.act.g(xt)).mean(axis=1)
            self.v -= (lay.eta_v / N) * gv + (lay.weight_decay_v / N) * self.v


def _mean_shift(inputs: Any, N: int) -> tuple[float, int]:
    """The input mean in whitened coordinates: ``(m / sqrt(lambda_mu), its coordinate)``
    (``(0.0, 0)`` for centred inputs)."""
    if inputs.centred:
        return 0.0, 0
    return (inputs.mean / math.sqrt(inputs.mean_eigenvalue_of_direction),
            inputs.mean_coordinate(N))


def _progress_bar(show: bool, total: int) -> Any:
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, unit="step", desc="simulation", file=sys.stderr)


def _eps_g_monte_carlo(model: Any, norm: Any, Qs: np.ndarray, Rs: np.ndarray,
                       phist: dict[str, np.ndarray], samples: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``eps_g`` and its standard error by Monte Carlo over one fixed Gaussian sample
    (common random numbers)."""
    K, M = model.K, model.M
    act = model.activation_function()
    lay = model.layers()
    tw = lay.teacher_weights()
    z = np.random.default_rng(MC_SEED).standard_normal((samples, K + M))
    base = {k: np.asarray(v, dtype=float) for k, v in norm.parameters(K).items()}
    P, A = Qs.shape[:2]
    out = np.empty((P, A))
    err = np.empty((P, A))
    for p in range(P):
        for a in range(A):
            Q, R = Qs[p, a], Rs[p, a]
            cov = np.block([[Q, R], [R.T, model.T]])
            lam, vec = np.linalg.eigh(0.5 * (cov + cov.T))
            u = z @ (vec * np.sqrt(np.clip(lam, 0.0, None))).T
            x, y = u[:, :K], u[:, K:]
            stats = {k: np.asarray(v)[None, :]
                     for k, v in (norm.population_statistics(Q) if norm.statistics_names
                                  else {}).items()}
            params = {k: (phist[k][p, a] if k in phist else v) for k, v in base.items()}
            gxt = act.g(norm.forward(x, stats, params))
            if lay.committee_machine:
                diff = act.g(y).sum(axis=-1) - gxt.sum(axis=-1)
            else:  # weighted by the readouts (each replica's current v when trained)
                sw = lay.student_weights(phist["v"][p, a] if "v" in phist else None)
                diff = act.g(y) @ tw - gxt @ sw
            loss = 0.5 * diff**2
            out[p, a] = np.mean(loss) + 0.5 * model.noise
            err[p, a] = np.std(loss, ddof=1) / math.sqrt(samples)
    return out, err


@hookimpl
def symphase_register_analyzers(registry):
    registry.add_analyzer(Simulation)
