"""Weak-lensing convergence maps ``x ~ p(map | Omega_m, sigma_8, w_0)`` in flat wCDM.

The model (``SIMULATORS.md``, section "Cosmology"):

* **Background**: :math:`E^2(z) = \\Omega_m (1+z)^3 + (1-\\Omega_m)(1+z)^{3(1+w_0)}`, comoving
  distance :math:`\\chi(z) = (c/H_0)\\int_0^z dz'/E(z')` in Mpc/h; fixed :math:`h = 0.7`,
  :math:`n_s = 0.96`, :math:`\\Omega_b = 0.045`.
* **Growth**: :math:`D(z) = \\exp(-\\int_0^z \\Omega_m(z')^\\gamma\\, dz'/(1+z'))`, normalized to
  :math:`D(0) = 1`, with Linder's growth index :math:`\\gamma = 0.55 + 0.05(1+w_0)` for
  :math:`w_0 > -1` and :math:`0.55 + 0.02(1+w_0)` otherwise (so :math:`D` has a kink in
  :math:`w_0` at :math:`-1`, as the fit has).
* **Matter power**: :math:`P(k, z) = A k^{n_s} T^2(k/\\Gamma) D^2(z)` with the BBKS transfer
  function, Sugiyama's shape parameter :math:`\\Gamma` and :math:`A` fixed by :math:`\\sigma_8`.
* **Convergence spectrum** (one source plane at ``z_s``, Limber):
  :math:`C_\\ell = \\tfrac94 \\Omega_m^2 (H_0/c)^4 \\int_0^{\\chi_s} d\\chi\\,
  ((\\chi_s-\\chi)/\\chi_s)^2 (1+z)^2 P((\\ell+\\tfrac12)/\\chi, z)`. On the periodic
  :math:`N \\times N` grid with pixel size :math:`\\Delta` (radians) a Fourier mode of
  multipole :math:`\\ell = 2\\pi|\\mathbf{n}|/L` has power :math:`S = C_\\ell/\\Delta^2` in the
  convention of :func:`numpy.fft.fft2`, i.e. :math:`E|\\tilde\\kappa_k|^2 = N^2 S_k`. The mean
  (:math:`k = 0`) mode has no power.
* **Maps**: :math:`\\kappa = \\mathrm{ifft2}(\\sqrt{S}\\,\\mathrm{fft2}(\\epsilon))`,
  :math:`\\epsilon \\sim N(0, I)` -- exactly Gaussian with circulant covariance -- and
  :math:`x = \\kappa + n` with white shape noise of variance
  :math:`\\sigma_n^2 = \\sigma_e^2/(n_{gal} A_{pix})`. The lognormal variant maps a Gaussian
  field ``g`` to :math:`\\kappa = \\lambda_s(e^{g - \\sigma_g^2/2} - 1)`, with the spectrum of
  ``g`` chosen so that :math:`\\kappa` keeps (up to clipping of negative powers) the same
  two-point function: :math:`\\xi_g = \\ln(1 + \\xi_\\kappa/\\lambda_s^2)`.

Speed: the spectrum per parameter point is not integrated afresh. :math:`S = \\sigma_8^2
\\hat S(\\Omega_m, w_0)` exactly, and :math:`\\ln \\hat S` is tabulated once per process (and
source redshift) on a grid in :math:`(\\ln\\Omega_m, w_0, \\ln\\ell)` covering the prior box, then
evaluated by tensor-product cubic splines (separately on each side of :math:`w_0 = -1`, so the
kink of the growth fit is kept rather than smoothed). The tabulated spectrum agrees with the
direct integration (:func:`convergence_power`) to about :math:`10^{-6}` relative; parameters
outside the box are integrated directly.

Example:
    >>> import numpy as np
    >>> sim = CosmologySimulator(n_pix=32)
    >>> theta = np.array([[0.3, 0.8, -1.0], [0.2, 0.9, -0.8]])
    >>> out = sim.simulate(theta, np.random.default_rng(0))
    >>> out["x"].shape, out["x"].dtype, out["latents"]["kappa"].shape
    ((2, 32, 32), dtype('float32'), (2, 32, 32))
    >>> sim.summary(out["x"]).shape
    (2, 12)
    >>> sim.log_likelihood(out["x"], theta).shape
    (2, 2)
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import numpy as np
import torch
from scipy.interpolate import BSpline, make_interp_spline

from sbi_gen.priors import BoxUniform
from sbi_gen.simulate import Simulator

__all__ = [
    "C_OVER_H0",
    "HUBBLE_H",
    "N_S",
    "OMEGA_B",
    "CosmologySimulator",
    "bbks_transfer",
    "comoving_distance",
    "convergence_power",
    "growth_factor",
    "matter_power",
    "sigma_8_of",
]

C_OVER_H0 = 2997.92458
"""Hubble distance :math:`c/H_0` in Mpc/h."""
HUBBLE_H = 0.7
"""Dimensionless Hubble constant :math:`h` (fixed)."""
N_S = 0.96
"""Scalar spectral index (fixed)."""
OMEGA_B = 0.045
"""Baryon density (fixed; enters the BBKS shape parameter)."""

_LOG_2PI = math.log(2.0 * math.pi)
_ARCMIN = math.pi / (180.0 * 60.0)
_DEFAULT_PIXEL_ARCMIN = 9.375  # SIMULATORS.md: 64 pixels over 10 degrees
# Quadrature: Gauss-Legendre nodes in z for the Limber integral, and for chi(z) and ln D(z)
# at each of them; trapezoid in ln k for the sigma_8 integral. All converge to ~1e-8 relative.
_N_LIMBER = 96
_N_INNER = 24
_LN_K_SIGMA8 = np.linspace(math.log(1e-5), math.log(1e2), 1024)
# The spectrum table: prior box of (Omega_m, w_0), nodes in ln Omega_m and in w_0 on each side
# of -1, and a log-ell grid wide enough for any sensible pixel size and field.
_TABLE_OMEGA_M = (0.1, 0.5)
_TABLE_W0 = (-1.5, -0.5)
_TABLE_N_OMEGA_M = 25
_TABLE_N_W0 = 9
_TABLE_ELL = (0.5, 3e5)
_TABLE_N_ELL = 112
_SUPPORTED_ELL = (1.0, 2e5)
_RANK_TOLERANCE = 1e-9  # on ln C_ell: the low-rank form of the spline coefficients (see _SpectrumSpline)
# Number of float64 elements one block of work may hold (bounds memory on big batches).
_BLOCK_ELEMENTS = 4_000_000
# Smallest power of a lognormal map's Gaussian field, relative to its largest.
_LOGNORMAL_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------
# Cosmology: background, growth, matter power, Limber spectrum (direct computation)
# --------------------------------------------------------------------------------------------


def _params(*arrays: Any) -> list[np.ndarray]:
    """Broadcast parameter arguments to 1-D float64 arrays of one length."""
    out = np.broadcast_arrays(*[np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in arrays])
    if out[0].ndim != 1:
        raise ValueError(f"cosmological parameters must be scalars or 1-D arrays, got shape {out[0].shape}")
    return [np.array(a) for a in out]


def _e2(z: np.ndarray, omega_m: np.ndarray, w_0: np.ndarray) -> np.ndarray:
    """:math:`E^2(z)`; ``z`` broadcasts against the parameters."""
    return omega_m * (1.0 + z) ** 3 + (1.0 - omega_m) * (1.0 + z) ** (3.0 * (1.0 + w_0))


def _growth_index(w_0: np.ndarray) -> np.ndarray:
    """Linder's (2005) growth index :math:`\\gamma(w_0)`."""
    return np.where(w_0 > -1.0, 0.55 + 0.05 * (1.0 + w_0), 0.55 + 0.02 * (1.0 + w_0))


def _gauss_legendre(n: int, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (a + b) + 0.5 * (b - a) * x, 0.5 * (b - a) * w


def _background(z: np.ndarray, omega_m: np.ndarray, w_0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(chi, ln D)`` at redshifts ``z`` (1-D) for parameter arrays ``(n,)``, each ``(n, len(z))``."""
    u, wu = _gauss_legendre(_N_INNER, 0.0, 1.0)
    zz = z[:, None] * u[None, :]  # (n_z, n_inner): nodes on [0, z_i]
    om, w0 = omega_m[:, None, None], w_0[:, None, None]
    e2 = _e2(zz[None], om, w0)
    chi = C_OVER_H0 * z * np.sum(wu / np.sqrt(e2), axis=-1)
    omega_m_z = om * (1.0 + zz) ** 3 / e2
    ln_d = -z * np.sum(wu * omega_m_z ** _growth_index(w0) / (1.0 + zz), axis=-1)
    return chi, ln_d


def comoving_distance(z: Any, omega_m: Any, w_0: Any) -> np.ndarray:
    """Comoving distance :math:`\\chi(z)` in Mpc/h (flat wCDM).

    Arguments:
        z: Redshifts, scalar or 1-D, ``z >= 0``.
        omega_m: Matter density, scalar or ``(n,)``.
        w_0: Dark-energy equation of state, scalar or ``(n,)``.

    Returns:
        ``(n, len(z))``.

    Example:
        >>> round(float(comoving_distance(1.0, 0.3, -1.0)[0, 0]), 1)
        2312.7
    """
    omega_m, w_0 = _params(omega_m, w_0)
    return _background(np.atleast_1d(np.asarray(z, dtype=np.float64)), omega_m, w_0)[0]


def growth_factor(z: Any, omega_m: Any, w_0: Any) -> np.ndarray:
    """Linear growth factor :math:`D(z)/D(0)` from Linder's growth-index fit.

    Arguments:
        z: Redshifts, scalar or 1-D.
        omega_m: Matter density, scalar or ``(n,)``.
        w_0: Dark-energy equation of state, scalar or ``(n,)``.

    Returns:
        ``(n, len(z))``.

    Example:
        >>> round(float(growth_factor(1.0, 0.3, -1.0)[0, 0]), 3)
        0.612
    """
    omega_m, w_0 = _params(omega_m, w_0)
    return np.exp(_background(np.atleast_1d(np.asarray(z, dtype=np.float64)), omega_m, w_0)[1])


def bbks_transfer(q: Any) -> np.ndarray:
    """BBKS transfer function :math:`T(q)`, ``q = k/Gamma`` with ``k`` in h/Mpc.

    Example:
        >>> round(float(bbks_transfer(1e-8)), 6)
        1.0
    """
    q = np.maximum(np.asarray(q, dtype=np.float64), 1e-300)
    poly = 1.0 + 3.89 * q + (16.1 * q) ** 2 + (5.46 * q) ** 3 + (6.71 * q) ** 4
    return np.log1p(2.34 * q) / (2.34 * q) * poly**-0.25


def _shape_parameter(omega_m: np.ndarray) -> np.ndarray:
    """Sugiyama's shape parameter :math:`\\Gamma = \\Omega_m h e^{-\\Omega_b(1 + \\sqrt{2h}/\\Omega_m)}`."""
    return omega_m * HUBBLE_H * np.exp(-OMEGA_B * (1.0 + math.sqrt(2.0 * HUBBLE_H) / omega_m))


def _top_hat(x: np.ndarray) -> np.ndarray:
    """Fourier transform of a spherical top hat, :math:`3(\\sin x - x\\cos x)/x^3`."""
    small = np.abs(x) < 1e-3
    xs = np.where(small, 1.0, x)
    return np.where(small, 1.0 - x**2 / 10.0, 3.0 * (np.sin(xs) - xs * np.cos(xs)) / xs**3)


def _sigma_8_unit_amplitude(omega_m: np.ndarray) -> np.ndarray:
    """:math:`\\sigma_8^2` of :math:`P = k^{n_s} T^2(k/\\Gamma)` (amplitude ``A = 1``), per ``Omega_m``."""
    k = np.exp(_LN_K_SIGMA8)
    q = k[None, :] / _shape_parameter(omega_m)[:, None]
    integrand = k ** (3.0 + N_S) * bbks_transfer(q) ** 2 * _top_hat(8.0 * k) ** 2 / (2.0 * math.pi**2)
    return np.trapezoid(integrand, _LN_K_SIGMA8, axis=-1)


def matter_power(k: Any, z: float, omega_m: Any, sigma_8: Any, w_0: Any) -> np.ndarray:
    """Linear matter power spectrum :math:`P(k, z)` in (Mpc/h)^3, normalized to ``sigma_8``.

    Arguments:
        k: Wavenumbers in h/Mpc, scalar or 1-D.
        z: One redshift.
        omega_m: Matter density, scalar or ``(n,)``.
        sigma_8: Amplitude, scalar or ``(n,)``.
        w_0: Dark-energy equation of state, scalar or ``(n,)``.

    Returns:
        ``(n, len(k))``.

    Example:
        >>> p = matter_power([0.01, 0.1, 1.0], 0.0, 0.3, 0.8, -1.0)
        >>> p.shape
        (1, 3)
    """
    omega_m, sigma_8, w_0 = _params(omega_m, sigma_8, w_0)
    k = np.atleast_1d(np.asarray(k, dtype=np.float64))
    amplitude = sigma_8**2 / _sigma_8_unit_amplitude(omega_m)
    growth2 = np.exp(2.0 * _background(np.array([float(z)]), omega_m, w_0)[1])  # (n, 1)
    transfer = bbks_transfer(k[None, :] / _shape_parameter(omega_m)[:, None])
    return amplitude[:, None] * k[None, :] ** N_S * transfer**2 * growth2


def sigma_8_of(omega_m: Any, sigma_8: Any, w_0: Any) -> np.ndarray:
    """:math:`\\sigma_8` measured from :func:`matter_power` at ``z = 0``.

    An independent check of the normalization (it should return ``sigma_8``): the integral
    :math:`\\sigma_8^2 = (2\\pi^2)^{-1}\\int k^2 P(k, 0) W^2(8k)\\,dk` by composite 16-point
    Gauss-Legendre quadrature in ``ln k`` over a wider range than the normalization uses.

    Example:
        >>> round(float(sigma_8_of(0.3, 0.8, -1.0)[0]), 6)
        0.8
    """
    omega_m, sigma_8, w_0 = _params(omega_m, sigma_8, w_0)
    edges = np.linspace(math.log(1e-7), math.log(1e3), 801)
    x, w = np.polynomial.legendre.leggauss(16)
    ln_k = (0.5 * (edges[:-1] + edges[1:])[:, None] + 0.5 * np.diff(edges)[:, None] * x).ravel()
    weight = (0.5 * np.diff(edges)[:, None] * w).ravel()
    k = np.exp(ln_k)
    power = matter_power(k, 0.0, omega_m, sigma_8, w_0)
    return np.sqrt(power * k**3 * _top_hat(8.0 * k) ** 2 @ weight / (2.0 * math.pi**2))


def _limber(ell: np.ndarray, omega_m: np.ndarray, w_0: np.ndarray, z_s: float) -> np.ndarray:
    """:math:`C_\\ell` at ``sigma_8 = 1`` for parameter arrays ``(n,)`` and ``ell`` ``(n_ell,)``."""
    z, wz = _gauss_legendre(_N_LIMBER, 0.0, z_s)
    chi, ln_d = _background(np.concatenate([z, [z_s]]), omega_m, w_0)
    chi, chi_s, ln_d = chi[:, :-1], chi[:, -1:], ln_d[:, :-1]
    amplitude = 1.0 / _sigma_8_unit_amplitude(omega_m)
    weight = wz * C_OVER_H0 / np.sqrt(_e2(z, omega_m[:, None], w_0[:, None]))
    weight = weight * ((chi_s - chi) / chi_s) ** 2 * (1.0 + z) ** 2 * np.exp(2.0 * ln_d)  # (n, n_z)
    prefactor = 2.25 * omega_m**2 / C_OVER_H0**4 * amplitude
    gamma = _shape_parameter(omega_m)
    out = np.empty((len(omega_m), len(ell)))
    step = max(1, _BLOCK_ELEMENTS // (len(z) * max(len(ell), 1)))
    for start in range(0, len(omega_m), step):
        s = slice(start, start + step)
        k = (ell[None, None, :] + 0.5) / chi[s, :, None]  # (b, n_z, n_ell)
        power = k**N_S * bbks_transfer(k / gamma[s, None, None]) ** 2
        out[s] = prefactor[s, None] * np.einsum("bz,bzl->bl", weight[s], power)
    return out


def convergence_power(ell: Any, omega_m: Any, sigma_8: Any, w_0: Any, z_s: float = 1.0) -> np.ndarray:
    """Convergence angular power spectrum :math:`C_\\ell` by direct (Limber) integration.

    No tabulation: this is the reference that :class:`CosmologySimulator`'s tables reproduce.

    Arguments:
        ell: Multipoles, scalar or 1-D.
        omega_m: Matter density, scalar or ``(n,)``.
        sigma_8: Amplitude, scalar or ``(n,)``.
        w_0: Dark-energy equation of state, scalar or ``(n,)``.
        z_s: Source redshift.

    Returns:
        ``(n, len(ell))``.

    Example:
        >>> cl = convergence_power([100.0, 1000.0], [0.3, 0.3], [0.8, 1.6], -1.0)
        >>> bool(np.allclose(cl[1] / cl[0], 4.0))
        True
    """
    omega_m, sigma_8, w_0 = _params(omega_m, sigma_8, w_0)
    ell = np.atleast_1d(np.asarray(ell, dtype=np.float64))
    return sigma_8[:, None] ** 2 * _limber(ell, omega_m, w_0, float(z_s))


# --------------------------------------------------------------------------------------------
# The spectrum table
# --------------------------------------------------------------------------------------------


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread for the small table set-up: multithreaded OpenBLAS on a busy
    machine makes its tiny SVD and spline solves take seconds instead of milliseconds."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@functools.lru_cache(maxsize=8)
def _universal_table(z_s: float) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    """Spline of ``ln C_ell`` at ``sigma_8 = 1`` over ``(ln Omega_m, w_0)`` on a grid of ``ln ell`` nodes.

    One piece per side of ``w_0 = -1``. ``ln C_ell`` is tabulated on ``(ln Omega_m, w_0, ln ell)``
    nodes; cubic (not-a-knot) interpolation along the two parameter axes gives B-spline
    coefficients ``(n_w0, n_om, n_ell_nodes)``. These have low rank over ``ell`` (``ln C_ell`` is
    smooth in ``ell``): they are stored as ``weights (n_w0, n_om, r + 1) @ basis (r + 1, n_ell_nodes)``
    with the fewest singular vectors (plus the mean) that reproduce them to ``_RANK_TOLERANCE``.

    Returns ``(ln_ell_nodes, [(knots_ln_om, knots_w0, weights, basis), ...])``.
    """
    with _single_threaded_blas():
        return _build_table(z_s)


def _build_table(z_s: float) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    ln_ell = np.linspace(math.log(_TABLE_ELL[0]), math.log(_TABLE_ELL[1]), _TABLE_N_ELL)
    ln_om = np.linspace(math.log(_TABLE_OMEGA_M[0]), math.log(_TABLE_OMEGA_M[1]), _TABLE_N_OMEGA_M)
    pieces = []
    for lo, hi in ((_TABLE_W0[0], -1.0), (-1.0, _TABLE_W0[1])):
        w0 = np.linspace(lo, hi, _TABLE_N_W0)
        grid_om, grid_w0 = np.meshgrid(np.exp(ln_om), w0, indexing="ij")
        table = np.log(_limber(np.exp(ln_ell), grid_om.ravel(), grid_w0.ravel(), z_s))
        along_om = make_interp_spline(ln_om, table.reshape(len(ln_om), len(w0), len(ln_ell)), k=3, axis=0)
        along_w0 = make_interp_spline(w0, along_om.c, k=3, axis=1)  # .c is (w0 coef, Omega_m coef, ell)
        coef = along_w0.c.reshape(-1, len(ln_ell))
        mean = coef.mean(axis=0)
        u, sv, vt = np.linalg.svd(coef - mean, full_matrices=False)
        rank = len(sv)
        for r in range(1, len(sv) + 1):
            if np.abs((u[:, :r] * sv[:r]) @ vt[:r] + mean - coef).max() < _RANK_TOLERANCE:
                rank = r
                break
        weights = np.concatenate([u[:, :rank] * sv[:rank], np.ones((len(coef), 1))], axis=1)
        basis = np.concatenate([vt[:rank], mean[None]], axis=0)
        pieces.append((along_om.t, along_w0.t, weights.reshape(*along_w0.c.shape[:2], rank + 1), basis))
    return ln_ell, pieces


class _SpectrumSpline:
    """Tensor-product cubic spline of ``ln C_ell`` (sigma_8 = 1) over ``(ln Omega_m, w_0)`` at fixed ells.

    The low-rank basis of :func:`_universal_table` is interpolated (cubic spline in ``ln ell``)
    to the requested multipoles; evaluation costs 16 products of ``rank + 1`` weights per
    parameter point and one small matrix product.
    """

    def __init__(self, ell: np.ndarray, z_s: float):
        ln_ell_nodes, pieces = _universal_table(z_s)
        self.pieces = []
        for t_om, t_w0, weights, basis in pieces:
            at_ell = make_interp_spline(ln_ell_nodes, basis, k=3, axis=1)(np.log(ell))  # (rank + 1, n_ell)
            self.pieces.append((t_om, t_w0, weights, at_ell))

    @staticmethod
    def _basis(x: np.ndarray, knots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices and values ``(n, 4)`` of the cubic B-splines that are nonzero at each ``x``."""
        matrix = BSpline.design_matrix(x, knots, 3).tocsr()
        matrix.sort_indices()
        if matrix.nnz != 4 * len(x):  # pragma: no cover - guards against a change in scipy
            dense = matrix.toarray()
            first = np.clip(np.argmax(dense != 0, axis=1), 0, dense.shape[1] - 4)
            index = first[:, None] + np.arange(4)
            return index, np.take_along_axis(dense, index, axis=1)
        return matrix.indices.reshape(-1, 4), matrix.data.reshape(-1, 4)

    def __call__(self, omega_m: np.ndarray, w_0: np.ndarray) -> np.ndarray:
        """``ln C_ell`` at ``sigma_8 = 1``, ``(n, n_ell)``; every point must lie in the table's box."""
        n_ell = self.pieces[0][3].shape[-1]
        out = np.empty((len(omega_m), n_ell))
        for side, (t_om, t_w0, coef, basis) in enumerate(self.pieces):
            rows = np.flatnonzero(w_0 <= -1.0) if side == 0 else np.flatnonzero(w_0 > -1.0)
            if rows.size == 0:
                continue
            i_om, b_om = self._basis(np.log(omega_m[rows]), t_om)
            i_w0, b_w0 = self._basis(w_0[rows], t_w0)
            acc = np.zeros((rows.size, coef.shape[-1]))
            for a in range(4):
                for b in range(4):
                    acc += (b_om[:, a] * b_w0[:, b])[:, None] * coef[i_w0[:, b], i_om[:, a]]
            out[rows] = acc @ basis
        return out


@functools.lru_cache(maxsize=16)
def _spectrum_spline(ell_key: tuple[float, ...], z_s: float) -> _SpectrumSpline:
    return _SpectrumSpline(np.array(ell_key), z_s)


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class CosmologySimulator(Simulator):
    """Gaussian or lognormal weak-lensing convergence maps on a periodic ``n_pix x n_pix`` grid.

    Parameters ``theta = (Omega_m, sigma_8, w_0)`` with the prior
    ``BoxUniform([0.1, 0.6, -1.5], [0.5, 1.0, -0.5])``. Each map is ``x = kappa + noise``;
    ``kappa`` is an exactly Gaussian field with per-mode power :math:`S = C_\\ell/\\Delta^2`
    (see the module docstring), or its lognormal transform.

    Arguments:
        n_pix: Pixels per side ``N`` (maps are ``N x N``).
        field_deg: Side of the square field in degrees. Default: ``n_pix`` pixels of 9.375
            arcmin (5 degrees for ``N = 32``, 10 degrees for ``N = 64``).
        lognormal: Lognormal instead of Gaussian convergence.
        noise: Add white shape noise of variance ``sigma_e**2 / (n_gal * pixel area)``.
        lambda_s: Shift parameter of the lognormal field (the smallest possible convergence is
            ``-lambda_s``); unused for Gaussian maps.
        sigma_e: Intrinsic ellipticity dispersion.
        n_gal: Source galaxy density per square arcminute.
        z_s: Source redshift (one source plane).

    Attributes:
        sigma_n: Noise standard deviation per pixel (0 without noise).
        pixel_rad: Pixel side in radians.
        ell: Multipole of each mode of the ``fft2`` grid, ``(N, N)``.

    Example:
        >>> import numpy as np
        >>> sim = CosmologySimulator(n_pix=32)
        >>> theta = sim.prior.sample((3,)).numpy().astype(np.float64)
        >>> sim.simulate(theta, np.random.default_rng(0))["x"].shape
        (3, 32, 32)
        >>> round(sim.sigma_n, 4)
        0.0062
    """

    name = "cosmology"
    version = "1.0"
    parameter_names = ["Omega_m", "sigma_8", "w_0"]
    parameter_units = ["", "", ""]
    observable_names = None

    def __init__(
        self,
        n_pix: int = 32,
        field_deg: float | None = None,
        lognormal: bool = False,
        noise: bool = True,
        lambda_s: float = 0.02,
        sigma_e: float = 0.26,
        n_gal: float = 20.0,
        z_s: float = 1.0,
    ):
        if isinstance(n_pix, bool) or not isinstance(n_pix, (int, np.integer)) or n_pix < 2:
            raise ValueError(f"n_pix must be an integer >= 2, got {n_pix!r}")
        n_pix = int(n_pix)
        if field_deg is None:
            field_deg = n_pix * _DEFAULT_PIXEL_ARCMIN / 60.0
        for label, value in (("field_deg", field_deg), ("lambda_s", lambda_s), ("n_gal", n_gal), ("z_s", z_s)):
            if not (math.isfinite(float(value)) and float(value) > 0.0):
                raise ValueError(f"{label} must be a positive number, got {value!r}")
        if not (math.isfinite(float(sigma_e)) and float(sigma_e) >= 0.0):
            raise ValueError(f"sigma_e must be a non-negative number, got {sigma_e!r}")
        if float(z_s) > 10.0:
            raise ValueError(f"z_s must be at most 10, got {z_s!r}")
        self.n_pix = n_pix
        self.field_deg = float(field_deg)
        self.lognormal = bool(lognormal)
        self.noise = bool(noise)
        self.lambda_s = float(lambda_s)
        self.sigma_e = float(sigma_e)
        self.n_gal = float(n_gal)
        self.z_s = float(z_s)

        self.observable_shape = (n_pix, n_pix)
        self.prior = BoxUniform(
            [0.1, 0.6, -1.5], [0.5, 1.0, -0.5], names=self.parameter_names, units=self.parameter_units
        )
        self.pixel_rad = math.radians(self.field_deg) / n_pix
        pixel_arcmin2 = (self.pixel_rad / _ARCMIN) ** 2
        self.sigma_n = math.sqrt(self.sigma_e**2 / (self.n_gal * pixel_arcmin2)) if self.noise else 0.0

        # Modes of the rfft2 grid (N, N//2 + 1): integer |n|^2, multipole, Hermitian weight.
        nx = np.fft.fftfreq(n_pix, 1.0 / n_pix)
        ny = np.fft.rfftfreq(n_pix, 1.0 / n_pix)
        n2_half = np.rint(nx[:, None] ** 2 + ny[None, :] ** 2).astype(np.int64)
        n2_full = np.rint(nx[:, None] ** 2 + nx[None, :] ** 2).astype(np.int64)
        ell_fundamental = 2.0 * math.pi / math.radians(self.field_deg)
        self.ell = ell_fundamental * np.sqrt(n2_full)
        unique_n2 = np.unique(n2_half[n2_half > 0])
        self._ell_unique = ell_fundamental * np.sqrt(unique_n2)
        if self._ell_unique.min() < _SUPPORTED_ELL[0] or self._ell_unique.max() > _SUPPORTED_ELL[1]:
            raise ValueError(
                f"the grid's multipoles {self._ell_unique.min():.3g}..{self._ell_unique.max():.3g} leave the supported "
                f"range {_SUPPORTED_ELL[0]:g}..{_SUPPORTED_ELL[1]:g}; choose another field_deg or n_pix"
            )
        # Index into [0, unique...]: 0 is the mean mode (no power).
        self._index_half = np.searchsorted(unique_n2, n2_half) + 1
        self._index_half[n2_half == 0] = 0
        self._index_full = np.searchsorted(unique_n2, n2_full) + 1
        self._index_full[n2_full == 0] = 0
        weight = np.full(ny.shape, 2.0)
        weight[0] = 1.0
        if n_pix % 2 == 0:
            weight[-1] = 1.0
        self._weight_half = np.broadcast_to(weight, n2_half.shape).copy()
        self._spline = _spectrum_spline(tuple(self._ell_unique.tolist()), self.z_s)
        self._bin_cache: dict[int, np.ndarray] = {}

    def config(self) -> dict[str, Any]:
        """JSON-serializable arguments that rebuild this simulator."""
        return {
            "n_pix": self.n_pix,
            "field_deg": self.field_deg,
            "lognormal": self.lognormal,
            "noise": self.noise,
            "lambda_s": self.lambda_s,
            "sigma_e": self.sigma_e,
            "n_gal": self.n_gal,
            "z_s": self.z_s,
        }

    # ---------------------------------------------------------------------------- inputs

    def _theta(self, theta: Any) -> np.ndarray:
        if isinstance(theta, torch.Tensor):
            theta = theta.detach().cpu().numpy()
        out = np.asarray(theta, dtype=np.float64)
        if out.ndim == 1 and out.shape[0] == 3:
            out = out[None]
        if out.ndim != 2 or out.shape[1] != 3:
            raise ValueError(f"theta must have shape (n, 3) = (Omega_m, sigma_8, w_0) per row, got {out.shape}")
        return out

    def _maps(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        out = np.asarray(x, dtype=np.float64)
        shape = (self.n_pix, self.n_pix)
        if out.shape == shape:
            out = out[None]
        if out.ndim != 3 or out.shape[1:] != shape:
            raise ValueError(f"x must have shape (m, {self.n_pix}, {self.n_pix}) or {shape}, got {out.shape}")
        return out

    # ---------------------------------------------------------------------------- spectra

    def _unique_power(self, theta: np.ndarray) -> np.ndarray:
        """Signal power per unique ``|n|``, ``(n, 1 + n_unique)`` with column 0 (mean mode) zero.

        Rows with unphysical parameters (not finite, ``Omega_m`` outside (0, 1], ``sigma_8 <= 0``)
        are NaN.
        """
        omega_m, sigma_8, w_0 = theta[:, 0], theta[:, 1], theta[:, 2]
        out = np.zeros((len(theta), 1 + len(self._ell_unique)))
        valid = np.isfinite(theta).all(axis=1) & (omega_m > 0.0) & (omega_m <= 1.0) & (sigma_8 > 0.0)
        in_box = (
            valid
            & (omega_m >= _TABLE_OMEGA_M[0])
            & (omega_m <= _TABLE_OMEGA_M[1])
            & (w_0 >= _TABLE_W0[0])
            & (w_0 <= _TABLE_W0[1])
        )
        if in_box.all():
            ln_cl = self._spline(omega_m, w_0)
        else:
            ln_cl = np.full((len(theta), len(self._ell_unique)), np.nan)
            if in_box.any():
                ln_cl[in_box] = self._spline(omega_m[in_box], w_0[in_box])
            outside = valid & ~in_box
            if outside.any():
                ln_cl[outside] = np.log(_limber(self._ell_unique, omega_m[outside], w_0[outside], self.z_s))
        with np.errstate(invalid="ignore", divide="ignore"):
            ln_cl += (2.0 * np.log(np.where(valid, sigma_8, np.nan)) - 2.0 * math.log(self.pixel_rad))[:, None]
        np.exp(ln_cl, out=out[:, 1:])
        return out

    def _half_power(self, theta: np.ndarray) -> np.ndarray:
        """Signal power ``S`` on the rfft2 grid, ``(n, N, N//2 + 1)``."""
        return self._unique_power(theta)[:, self._index_half]

    def power_spectrum(self, theta: Any) -> np.ndarray:
        """Expected power per ``fft2`` mode of ``x``: :math:`E|\\tilde x_k|^2 / N^2`.

        That is :math:`S_k = C_\\ell/\\Delta^2` plus the noise power :math:`\\sigma_n^2` if the
        simulator has noise; the mean mode ``[0, 0]`` carries only noise. For lognormal maps ``S``
        is the target spectrum of ``kappa`` (met up to the flooring of negative powers of ``g``).

        Arguments:
            theta: Parameters ``(n, 3)`` (or one row ``(3,)``).

        Returns:
            ``(n, N, N)`` float64, on the grid of :func:`numpy.fft.fft2` (see :attr:`ell`).

        Example:
            >>> sim = CosmologySimulator(n_pix=8, noise=False)
            >>> s = sim.power_spectrum([[0.3, 0.8, -1.0], [0.3, 1.6, -1.0]])
            >>> bool(np.allclose(s[1], 4 * s[0]))
            True
        """
        theta = self._theta(theta)
        return self._unique_power(theta)[:, self._index_full] + self.sigma_n**2

    def _lognormal_spectrum(self, power_half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spectrum ``S_g`` (rfft2 grid) and variance of ``g`` for target kappa spectra ``(b, N, N//2+1)``."""
        shape = (self.n_pix, self.n_pix)
        xi_kappa = np.fft.irfft2(power_half, s=shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            xi_g = np.log1p(xi_kappa / self.lambda_s**2)
        power_g = np.fft.rfft2(xi_g).real
        # A periodic kappa spectrum says nothing about g's mean mode (its transform is <= 0);
        # give it the fundamental mode's power so that g, and the density of kappa, are full rank.
        power_g[:, 0, 0] = power_g[:, 0, 1]
        # Negative powers (none seen over the prior away from the mean mode) are raised to a floor.
        floor = _LOGNORMAL_FLOOR * power_g.max(axis=(1, 2), keepdims=True)
        power_g = np.maximum(power_g, floor)
        variance_g = np.einsum("bij,ij->b", power_g, self._weight_half) / self.n_pix**2
        return power_g, variance_g

    # ---------------------------------------------------------------------------- simulation

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Simulate one map per parameter row.

        Arguments:
            theta: ``(n, 3)`` rows ``(Omega_m, sigma_8, w_0)``.
            rng: Random generator (the only source of randomness).

        Returns:
            ``{"x": (n, N, N) float32, "latents": {"kappa": (n, N, N) float32}, "augmented": {}}``;
            lognormal maps add ``latents["g"]``, the underlying Gaussian field. Rows with
            unphysical parameters give NaN maps.

        Example:
            >>> sim = CosmologySimulator(n_pix=16, lognormal=True)
            >>> out = sim.simulate(np.array([[0.3, 0.8, -1.0]]), np.random.default_rng(1))
            >>> sorted(out["latents"])
            ['g', 'kappa']
        """
        # The spectra's small matrix products gain nothing from BLAS threads, and lose a lot to
        # them on a busy machine (10,000 maps: 0.5 s single-threaded, 1.2 s with 2 threads
        # beside another job); workers in parallel processes then scale without contention.
        with _single_threaded_blas():
            return self._simulate(theta, rng)

    def _simulate(self, theta: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        theta = self._theta(theta)
        n, shape = len(theta), (self.n_pix, self.n_pix)
        x = np.empty((n, *shape), dtype=np.float32)
        kappa = np.empty((n, *shape), dtype=np.float32)
        g_field = np.empty((n, *shape), dtype=np.float32) if self.lognormal else None
        step = max(1, _BLOCK_ELEMENTS // (4 * self.n_pix**2))
        for start in range(0, n, step):
            s = slice(start, min(n, start + step))
            if self.lognormal:
                power, variance_g = self._lognormal_spectrum(self._half_power(theta[s]))
                amplitude = np.sqrt(power)
            else:
                amplitude = np.sqrt(self._unique_power(theta[s]))[:, self._index_half]
            white = rng.standard_normal((s.stop - s.start, *shape))
            field = np.fft.irfft2(amplitude * np.fft.rfft2(white), s=shape)
            if self.lognormal:
                g_field[s] = field
                field = self.lambda_s * np.expm1(field - 0.5 * variance_g[:, None, None])
            kappa[s] = field
            x[s] = kappa[s]
            if self.noise:
                x[s] += np.float32(self.sigma_n) * rng.standard_normal(field.shape, dtype=np.float32)
        latents = {"kappa": kappa}
        if self.lognormal:
            latents["g"] = g_field
        return {"x": x, "latents": latents, "augmented": {}}

    # ---------------------------------------------------------------------------- likelihood

    def log_likelihood(self, x: Any, theta: Any) -> np.ndarray:
        """Exact log-likelihood :math:`\\log p(x \\mid \\theta)` for every pair of rows.

        Gaussian maps (with or without noise): the density of the mean-subtracted map on the
        ``N^2 - 1`` dimensional subspace orthogonal to the constant map (the mean mode has no
        signal power, so it carries no information on ``theta``),

        .. math:: -\\tfrac12 \\sum_{k \\neq 0} \\Big[\\frac{|\\tilde x_k|^2}{N^2 S_{tot,k}}
                  + \\ln S_{tot,k}\\Big] - \\frac{N^2 - 1}{2}\\ln 2\\pi,
                  \\qquad S_{tot} = S + \\sigma_n^2.

        Lognormal maps without noise: the full ``N^2``-dimensional density
        :math:`\\log N(g; S_g) - \\sum_i \\ln(\\kappa_i + \\lambda_s)` with
        :math:`g = \\ln(1 + \\kappa/\\lambda_s) + \\sigma_g^2/2` (``-inf`` where some
        :math:`\\kappa_i \\le -\\lambda_s`). With noise the lognormal likelihood is intractable.

        Arguments:
            x: Maps ``(m, N, N)`` (or one ``(N, N)``).
            theta: Parameters ``(k, 3)`` (or one row ``(3,)``).

        Returns:
            ``(m, k)`` float64; ``-inf`` for unphysical parameters.

        Raises:
            ValueError: For lognormal maps with noise, or inputs of the wrong shape.

        Example:
            >>> sim = CosmologySimulator(n_pix=16)
            >>> x = sim.simulate(np.array([[0.3, 0.8, -1.0]]), np.random.default_rng(0))["x"]
            >>> grid = np.array([[0.3, s8, -1.0] for s8 in (0.6, 0.8, 1.0)])
            >>> sim.log_likelihood(x, grid).shape
            (1, 3)
        """
        if self.lognormal and self.noise:
            raise ValueError(
                "the exact likelihood is only available for Gaussian maps (with or without noise) and for "
                "noiseless lognormal maps; build CosmologySimulator(lognormal=True, noise=False)"
            )
        x, theta = self._maps(x), self._theta(theta)
        if self.lognormal:
            return self._lognormal_log_likelihood(x, theta)
        n_pix2 = self.n_pix**2
        weight = self._weight_half.ravel().copy()
        weight[0] = 0.0  # drop the mean mode
        periodogram = (np.abs(np.fft.rfft2(x)) ** 2).reshape(len(x), weight.size) / n_pix2  # (m, modes)
        out = np.empty((len(x), len(theta)))
        step = max(1, _BLOCK_ELEMENTS // weight.size)
        for start in range(0, len(theta), step):
            s = slice(start, start + step)
            total = self._half_power(theta[s]).reshape(-1, weight.size) + self.sigma_n**2
            with np.errstate(divide="ignore", invalid="ignore"):
                inverse = np.where(weight > 0, weight / total, 0.0)
                log_det = np.sum(np.where(weight > 0, weight * np.log(total), 0.0), axis=1)
            out[:, s] = -0.5 * (periodogram @ inverse.T + log_det) - 0.5 * (n_pix2 - 1) * _LOG_2PI
        return np.where(np.isfinite(out), out, -np.inf)

    def _lognormal_log_likelihood(self, kappa: np.ndarray, theta: np.ndarray) -> np.ndarray:
        n_pix2 = self.n_pix**2
        weight = self._weight_half.ravel().copy()
        shifted = kappa + self.lambda_s
        positive = (shifted > 0.0).all(axis=(1, 2))
        safe = np.where(positive[:, None, None], shifted, self.lambda_s)
        h = np.log(safe / self.lambda_s)  # g up to its theta-dependent offset sigma_g^2 / 2
        jacobian = np.where(positive, -np.log(safe).sum(axis=(1, 2)), -np.inf)
        h_tilde = np.fft.rfft2(h).reshape(len(kappa), weight.size)
        periodogram = np.abs(h_tilde) ** 2 / n_pix2
        periodogram[:, 0] = 0.0  # the mean mode depends on theta through sigma_g^2: added below
        out = np.empty((len(kappa), len(theta)))
        step = max(1, _BLOCK_ELEMENTS // (2 * weight.size))
        for start in range(0, len(theta), step):
            s = slice(start, start + step)
            power_g, variance_g = self._lognormal_spectrum(self._half_power(theta[s]))
            power_g = power_g.reshape(-1, weight.size)
            with np.errstate(divide="ignore", invalid="ignore"):
                log_det = np.sum(weight * np.log(power_g), axis=1)
                quad = periodogram @ (weight / power_g).T
                mean_mode = h_tilde[:, :1].real + 0.5 * n_pix2 * variance_g[None, :]  # (m, b)
                quad = quad + mean_mode**2 / (n_pix2 * power_g[None, :, 0])
            out[:, s] = -0.5 * (quad + log_det[None, :]) - 0.5 * n_pix2 * _LOG_2PI + jacobian[:, None]
        return np.where(np.isfinite(out), out, -np.inf)

    # ---------------------------------------------------------------------------- summaries

    def bin_edges(self, n_bins: int = 12) -> np.ndarray:
        """Log-spaced multipole edges ``(n_bins + 1,)`` from the fundamental mode to the grid's corner."""
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        lo, hi = self._ell_unique.min(), self._ell_unique.max()
        return np.geomspace(lo * (1.0 - 1e-9), hi * (1.0 + 1e-9), int(n_bins) + 1)

    def bin_centers(self, n_bins: int = 12) -> np.ndarray:
        """Geometric centers ``(n_bins,)`` of :meth:`bin_edges`, the multipoles of :meth:`summary`."""
        edges = self.bin_edges(n_bins)
        return np.sqrt(edges[:-1] * edges[1:])

    def _binning(self, n_bins: int) -> np.ndarray:
        """Averaging matrix ``(n_bins, modes)`` over the rfft2 grid (Hermitian weights, mean mode excluded)."""
        n_bins = int(n_bins)
        if n_bins not in self._bin_cache:
            edges = self.bin_edges(n_bins)
            ell_half = np.concatenate([[0.0], self._ell_unique])[self._index_half].ravel()
            which = np.digitize(ell_half, edges) - 1  # mean mode (ell = 0) gets -1
            matrix = np.zeros((n_bins, ell_half.size))
            inside = (which >= 0) & (which < n_bins) & (ell_half > 0)
            matrix[which[inside], np.flatnonzero(inside)] = self._weight_half.ravel()[inside]
            counts = matrix.sum(axis=1)
            if np.any(counts == 0):
                raise ValueError(
                    f"{int(np.sum(counts == 0))} of {n_bins} log-spaced bins hold no Fourier mode of a {self.n_pix}x{self.n_pix} "
                    "grid; use fewer bins"
                )
            self._bin_cache[n_bins] = matrix / counts[:, None]
        return self._bin_cache[n_bins]

    def summary(self, x: Any, n_bins: int = 12, log: bool = False) -> np.ndarray:
        """Binned power spectrum of maps: the mean of :math:`|\\tilde x_k|^2/N^2` over the modes of each bin.

        Maps are mean-subtracted (the mean mode is in no bin); bins are :meth:`bin_edges`. For
        Gaussian maps this is an unbiased estimate of :meth:`expected_summary`.

        Arguments:
            x: Maps ``(m, N, N)`` (or one ``(N, N)``).
            n_bins: Number of log-spaced multipole bins.
            log: Return the natural logarithm (a better-scaled input for networks).

        Returns:
            ``(m, n_bins)`` float64.

        Example:
            >>> sim = CosmologySimulator(n_pix=32)
            >>> x = sim.simulate(np.array([[0.3, 0.8, -1.0]]), np.random.default_rng(0))["x"]
            >>> sim.summary(x, n_bins=10).shape
            (1, 10)
        """
        x = self._maps(x)
        x = x - x.mean(axis=(1, 2), keepdims=True)
        periodogram = (np.abs(np.fft.rfft2(x)) ** 2).reshape(len(x), self._weight_half.size) / self.n_pix**2
        out = periodogram @ self._binning(n_bins).T
        return np.log(out) if log else out

    def expected_summary(self, theta: Any, n_bins: int = 12) -> np.ndarray:
        """Expectation of :meth:`summary` for Gaussian maps: the bin averages of :meth:`power_spectrum`.

        Example:
            >>> sim = CosmologySimulator(n_pix=32)
            >>> sim.expected_summary([0.3, 0.8, -1.0]).shape
            (1, 12)
        """
        theta = self._theta(theta)
        total = self._half_power(theta).reshape(len(theta), self._weight_half.size) + self.sigma_n**2
        return total @ self._binning(n_bins).T
