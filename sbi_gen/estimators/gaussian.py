r"""The linear-Gaussian conditional estimator: the simplest model a flow has to beat.

:math:`z \mid h \sim \mathcal{N}(W h + b,\ L L^\top)` on the standardized, unconstrained
:math:`z` (see :mod:`sbi_gen.estimators.base`), with :math:`h` the embedded condition and one
full covariance :math:`L L^\top` for every condition. It is exact where the posterior is a
Gaussian whose mean is affine in :math:`x` and whose covariance does not depend on it (linear
models with Gaussian noise and a Gaussian prior, e.g. the ``gaussian_linear`` task), and a
fast, few-parameter baseline elsewhere.

Its maximum-likelihood fit has a closed form, least squares of :math:`z` on :math:`(h, 1)`
with the residual covariance, and :meth:`Gaussian.set_standardization` starts from it, so
training begins at the optimum for fixed :math:`h` and only an embedding with weights has
anything left to learn. With such an embedding, whose untrained features are nearly collinear,
the start is a ridge fit instead (penalized on z-scored features), so that its weights stay of
the data's scale. With :math:`D(F + 1) + D(D + 1)/2` parameters it cannot overfit the
way a flow with tens of thousands does: on ``gaussian_linear`` at 10,000 simulations its C2ST
is at the floor two sets of exact draws reach, where the flows stop about 0.02 above it (see
:mod:`sbi_gen.inference`, whose ``"auto"`` races it against the flows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributions import Distribution, MultivariateNormal

from sbi_gen.estimators.base import _STATS_CHUNK, ConditionalEstimator, _finite_rows
from sbi_gen.estimators.flows import FLOW_TRAINING_DEFAULTS

__all__ = ["Gaussian"]

# Rows of the closed-form fit when the embedding has weights: the fit is then only a start
# (the embedding is still untrained), and embedding every map of a large set would cost minutes.
_INIT_ROWS_TRAINED_EMBEDDING = 4096
# Ridge penalty, per row, of the start when the embedding has weights, on z-scored features.
# Untrained features are tiny and nearly collinear (an untrained CNN's: standard deviations
# near 0.003, a condition number near 1e6), and plain least squares on them fits noise with
# weights near 1e5, whose float32 cancellation costs 0.03 nats and whose size multiplies every
# gradient reaching the embedding. With this penalty a standardized weight is at most
# 1 / (2 sqrt(1e-3)) ~ 16 standard deviations of z per standard deviation of a feature.
_RIDGE_TRAINED_EMBEDDING = 1e-3
# Added to the residual covariance's diagonal (standardized units, where it is at most 1), and
# raised tenfold until its Cholesky factor exists, only when it is singular: a coordinate of y
# that is an exact affine function of the condition, or fewer rows than dimensions.
_COVARIANCE_JITTER = 1e-6


class Gaussian(ConditionalEstimator):
    r"""Conditional Gaussian with a mean affine in the embedded condition and one full covariance.

    ``set_standardization`` (called by :func:`~sbi_gen.train.fit` before training) also sets
    :math:`W`, :math:`b` and :math:`L` to the maximum-likelihood fit on the same rows: least
    squares of the standardized :math:`y` on the embedded condition and a constant, and the
    Cholesky factor of the residuals' covariance. Training then refines it (and trains the
    embedding, if it has weights: the start is then a ridge fit on the untrained features).
    Sampling and ``log_prob`` are one matrix product each.

    Arguments:
        y_dim: Dimension of :math:`y`.
        c_shape: Shape of one condition.
        embedding: Embedding name (see :class:`ConditionalEstimator`).
        embedding_kwargs: Embedding keyword arguments.
        y_prior: Prior of :math:`y` as a dict, for bounded supports.

    Example:
        >>> import torch
        >>> c = torch.randn(2000, 3)
        >>> y = c[:, :2] @ torch.tensor([[1.0, 0.5], [0.0, 2.0]]) + 0.1 * torch.randn(2000, 2)
        >>> est = Gaussian(2, (3,))
        >>> est.set_standardization(y, c)  # the closed-form fit
        >>> est(c[:4]).sample((10,)).shape
        torch.Size([10, 4, 2])
        >>> bool(est.loss(y, c) < -1.0)  # already far below an untrained model's loss
        True
    """

    name = "gaussian"
    # The flows' (NLE's race trains the MAF and this with them; NPE's race, and the family it
    # keeps, trains with the NSF's, see NPE.train_config).
    training_defaults: ClassVar[dict[str, Any]] = dict(FLOW_TRAINING_DEFAULTS)

    def __init__(
        self,
        y_dim: int,
        c_shape: Sequence[int],
        *,
        embedding: str | None = None,
        embedding_kwargs: dict[str, Any] | None = None,
        y_prior: dict[str, Any] | None = None,
    ):
        super().__init__(y_dim, c_shape, embedding=embedding, embedding_kwargs=embedding_kwargs, y_prior=y_prior)
        self.mean = nn.Linear(self.context_features, self.y_dim)
        nn.init.zeros_(self.mean.weight)
        nn.init.zeros_(self.mean.bias)
        rows, cols = torch.tril_indices(self.y_dim, self.y_dim, offset=-1)
        self.register_buffer("_tril_rows", rows, persistent=False)
        self.register_buffer("_tril_cols", cols, persistent=False)
        self.log_scale = nn.Parameter(torch.zeros(self.y_dim))  # log of L's diagonal
        self.scale_lower = nn.Parameter(torch.zeros(len(rows)))  # L below its diagonal, row by row

    def scale_tril(self) -> Tensor:
        """The Cholesky factor :math:`L` of the covariance of standardized :math:`z`, ``(D, D)``."""
        scale = torch.diag_embed(self.log_scale.exp())
        return scale.index_put((self._tril_rows, self._tril_cols), self.scale_lower)

    def core(self, h: Tensor) -> Distribution:
        return MultivariateNormal(self.mean(h), scale_tril=self.scale_tril())

    def hyperparameters(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def set_standardization(self, y: Tensor, c: Tensor) -> None:
        """Sets the z-scoring statistics (see :class:`ConditionalEstimator`), then the maximum-
        likelihood :math:`W`, :math:`b` and :math:`L` on the rows with finite values."""
        super().set_standardization(y, c)
        y, c = torch.as_tensor(y), torch.as_tensor(c)
        u = self._prior_transform(y.device, torch.float64).inv(y.to(torch.float64)) if self.y_prior else y
        ok = (torch.isfinite(u).all(dim=-1) & _finite_rows(c)).nonzero().squeeze(-1)
        trained_embedding = any(p.requires_grad for p in self.embedding.parameters())
        if trained_embedding:
            ok = ok[:_INIT_ROWS_TRAINED_EMBEDDING]
        z = ((u[ok].to(torch.float64) - self.y_mean.double().to(u.device)) / self.y_std.double().to(u.device)).cpu()
        h = torch.cat([self.embed(c[ok[i : i + _STATS_CHUNK]]).double().cpu() for i in range(0, len(ok), _STATS_CHUNK)])
        design = torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], dim=1)
        if trained_embedding:
            solution = _ridge_start(h, z)
        else:
            # gelsd: the least-norm solution when h has fewer rows than columns or repeated features.
            solution = torch.linalg.lstsq(design, z, driver="gelsd").solution  # (F + 1, D)
        residuals = z - design @ solution
        covariance = residuals.T @ residuals / len(z)
        factor, singular = torch.linalg.cholesky_ex(covariance)
        jitter = _COVARIANCE_JITTER
        while singular and jitter <= 1.0:  # a y that is an exact affine function of c (or too few rows)
            factor, singular = torch.linalg.cholesky_ex(covariance + jitter * torch.eye(self.y_dim, dtype=torch.float64))
            jitter *= 10
        dtype, device = self.log_scale.dtype, self.log_scale.device
        self.mean.weight.copy_(solution[:-1].T.to(device=device, dtype=dtype))
        self.mean.bias.copy_(solution[-1].to(device=device, dtype=dtype))
        self.log_scale.copy_(factor.diagonal().log().to(device=device, dtype=dtype))
        self.scale_lower.copy_(factor[self._tril_rows.cpu(), self._tril_cols.cpu()].to(device=device, dtype=dtype))


def _ridge_start(h: Tensor, z: Tensor) -> Tensor:
    """Ridge regression of ``z`` on ``(h, 1)``, penalized on z-scored features and mapped back to
    ``h``'s units: ``(F + 1, D)``, the constant's row last (as ``lstsq`` of the design returns)."""
    h_mean, h_std = h.mean(0), h.std(0)
    h_std = torch.where(h_std > 0, h_std, torch.ones_like(h_std))  # a constant feature gets weight 0
    features = (h - h_mean) / h_std
    gram = features.T @ features + _RIDGE_TRAINED_EMBEDDING * len(h) * torch.eye(h.shape[1], dtype=h.dtype)
    weight = torch.linalg.solve(gram, features.T @ (z - z.mean(0))) / h_std[:, None]  # (F, D)
    return torch.cat([weight, (z.mean(0) - h_mean @ weight)[None]])
