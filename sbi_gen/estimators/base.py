r"""The conditional-estimator protocol shared by flows, VAEs and diffusion models.

A :class:`ConditionalEstimator` models :math:`q(y \mid c)`: in NPE :math:`y = \theta`
and :math:`c = x`; in NLE :math:`y = x` and :math:`c = \theta`. Calling it on a
condition returns a :class:`torch.distributions.Distribution` over :math:`y`.

Around the estimator-specific *core* the base class puts, in this order,

.. code-block:: text

    c ──standardize──► c̃ ──embedding──► h  (*batch, F)
                                         │
    z ~ core(h)   (standardized, unconstrained y)
    u = μ_u + σ_u z                      (undo the z-scoring)
    y = T(u)                             (prior bijection R^D → support; identity without y_prior)

so subclasses only model :math:`z \mid h` and never see units, bounds or raw maps. The
returned distribution is a :class:`~torch.distributions.TransformedDistribution`:
``log_prob`` is a density in the original :math:`y` space (both log-Jacobians added) and
is :math:`-\infty` outside the prior's support; samples lie in the support.

Subclasses (one level of inheritance) set the class attribute ``name`` and implement

- ``core(h) -> Distribution``: batch shape ``h.shape[:-1]``, event shape ``(y_dim,)``;
- ``hyperparameters() -> dict``: their own constructor arguments, as JSON values;
- optionally ``core_loss(z, h)`` when the training loss is not the negative log-likelihood.
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Size, Tensor
from torch.distributions import AffineTransform, Distribution, TransformedDistribution, constraints
from torch.distributions.transforms import Transform

from sbi_gen.nn import CNN, build_embedding, default_embedding
from sbi_gen.priors import prior_from_dict

__all__ = [
    "ConditionalEstimator",
    "SupportTransform",
]

# Relative floor of standard deviations: below ~1e-6 |mean| a float32 feature is rounding noise.
_STD_FLOOR = 1e-6
# Rows processed at once when computing standardization statistics (bounds memory for maps).
_STATS_CHUNK = 4096


def _support_bounds(prior_spec: dict[str, Any], dim: int) -> tuple[Tensor, Tensor]:
    """Elementwise lower and upper bounds (±inf where open) of a prior's support."""
    prior = prior_from_dict(prior_spec)
    if prior.dim != dim:
        raise ValueError(f"y_prior has dimension {prior.dim} but y_dim is {dim}")

    def bounds(constraint: constraints.Constraint, size: int) -> tuple[list[float], list[float]]:
        while isinstance(constraint, constraints.independent):
            constraint = constraint.base_constraint
        if isinstance(constraint, constraints.cat):
            lower, upper = [], []
            for part, length in zip(constraint.cseq, constraint.lengths, strict=True):
                lo, hi = bounds(part, length)
                lower += lo
                upper += hi
            return lower, upper
        bounded = hasattr(constraint, "lower_bound") or hasattr(constraint, "upper_bound")
        real = isinstance(constraint, type(constraints.real))
        if constraint.is_discrete or constraint.event_dim != 0 or not (bounded or real):
            raise ValueError(f"cannot map the support {constraint} of y_prior onto R^D")
        lo = torch.as_tensor(getattr(constraint, "lower_bound", -math.inf), dtype=torch.float64)
        hi = torch.as_tensor(getattr(constraint, "upper_bound", math.inf), dtype=torch.float64)
        return lo.expand(size).tolist(), hi.expand(size).tolist()

    lower, upper = bounds(prior.support, dim)
    return torch.tensor(lower), torch.tensor(upper)


class SupportTransform(Transform):
    r"""Elementwise bijection from :math:`\mathbb{R}^D` onto a box with open or closed sides.

    Per coordinate, with bounds :math:`l` and :math:`u` (possibly infinite):
    :math:`y = l + (u - l)\,\sigma(x)` if both are finite, :math:`l + e^x` if only
    :math:`l` is, :math:`u - e^{-x}` if only :math:`u` is, and :math:`y = x` otherwise —
    the bijections of :func:`torch.distributions.biject_to`, but built from tensors that
    live on the estimator's device. Images are clamped into :math:`[l, u]` and the inverse
    clamps its argument a float epsilon inside, so values on the boundary map to finite points.

    Arguments:
        lower: Lower bounds, shape ``(D,)``, ``-inf`` where unbounded.
        upper: Upper bounds, shape ``(D,)``, ``+inf`` where unbounded.

    Example:
        >>> t = SupportTransform(torch.tensor([0.0, -math.inf]), torch.tensor([2.0, math.inf]))
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
        True
        >>> t.log_abs_det_jacobian(x, t(x)).shape
        torch.Size([5])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, lower: Tensor, upper: Tensor, cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        self.lower = lower
        self.upper = upper
        finite_lower, finite_upper = torch.isfinite(lower), torch.isfinite(upper)
        self._both = finite_lower & finite_upper
        self._lower_only = finite_lower & ~finite_upper
        self._upper_only = ~finite_lower & finite_upper
        self._lo = torch.where(finite_lower, lower, torch.zeros_like(lower))
        self._hi = torch.where(finite_upper, upper, torch.zeros_like(upper))
        self._width = torch.where(self._both, self._hi - self._lo, torch.ones_like(lower))

    def _call(self, x: Tensor) -> Tensor:
        # Each branch sees a harmless argument where it is not selected, so that neither the
        # value nor the gradient of an unselected branch can be inf or nan.
        zero = torch.zeros_like(x)
        y_both = self._lo + self._width * torch.sigmoid(torch.where(self._both, x, zero))
        y_lower = self._lo + torch.exp(torch.where(self._lower_only, x, zero))
        y_upper = self._hi - torch.exp(-torch.where(self._upper_only, x, zero))
        y = torch.where(
            self._both, y_both, torch.where(self._lower_only, y_lower, torch.where(self._upper_only, y_upper, x))
        )
        return torch.minimum(torch.maximum(y, self.lower), self.upper)

    def _inverse(self, y: Tensor) -> Tensor:
        # Values on (or within float resolution of) a bound map to |x| <= ~16 in float32, not
        # to ±87 (log of the tiniest float): a boundary value in a training set (a uniform draw
        # of exactly 0) must not become a huge outlier after the z-scoring.
        eps = torch.finfo(y.dtype).eps
        one = torch.ones_like(y)
        p = torch.where(self._both, (y - self._lo) / self._width, 0.5 * one).clamp(eps, 1 - eps)
        x_both = torch.log(p) - torch.log1p(-p)
        x_lower = torch.log(torch.where(self._lower_only, y - self._lo, one).clamp_min(eps * (1 + self._lo.abs())))
        x_upper = -torch.log(torch.where(self._upper_only, self._hi - y, one).clamp_min(eps * (1 + self._hi.abs())))
        return torch.where(
            self._both, x_both, torch.where(self._lower_only, x_lower, torch.where(self._upper_only, x_upper, y))
        )

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        zero = torch.zeros_like(x)
        x_both = torch.where(self._both, x, zero)
        ladj_both = torch.log(self._width) + nn.functional.logsigmoid(x_both) + nn.functional.logsigmoid(-x_both)
        ladj = torch.where(
            self._both, ladj_both, torch.where(self._lower_only, x, torch.where(self._upper_only, -x, zero))
        )
        return ladj.sum(dim=-1)


class _EstimatorDistribution(TransformedDistribution):
    r"""``q(y | c)``: the core distribution over standardized unconstrained ``z`` pushed through
    ``y = T(μ + σ z)``; ``log_prob`` is ``-inf`` outside ``[lower, upper]``."""

    def __init__(self, core: Distribution, transforms: list[Transform], lower: Tensor | None, upper: Tensor | None):
        super().__init__(core, transforms, validate_args=False)
        self._lower = lower
        self._upper = upper

    def expand(self, batch_shape: Size | Sequence[int], _instance: Distribution | None = None) -> Distribution:
        return _EstimatorDistribution(
            self.base_dist.expand(Size(batch_shape)), self.transforms, self._lower, self._upper
        )

    @property
    def core(self) -> Distribution:
        """The core distribution over standardized unconstrained ``z``."""
        return self.base_dist

    @property
    def support(self) -> constraints.Constraint:
        if self._lower is None:
            return constraints.real_vector
        return constraints.independent(constraints.interval(self._lower, self._upper), 1)

    def _cast(self, value: Tensor) -> Tensor:
        like = self.transforms[0].loc
        return torch.as_tensor(value).to(device=like.device, dtype=like.dtype)

    def _mask(self, value: Tensor, log_prob: Tensor) -> Tensor:
        if self._lower is None:
            return log_prob
        inside = ((value >= self._lower) & (value <= self._upper)).all(dim=-1)
        return log_prob.masked_fill(~inside, -math.inf)

    def log_prob(self, value: Tensor) -> Tensor:
        value = self._cast(value)
        # Broadcast against the batch up front: not every core broadcasts internally (zuko's
        # exact CNF trace needs the full shape).
        value = value.expand(torch.broadcast_shapes(value.shape, self.batch_shape + self.event_shape))
        return self._mask(value, super().log_prob(value))

    def rsample_and_log_prob(self, sample_shape: Size | Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """Samples ``(*sample_shape, *batch, y_dim)`` and their log-densities ``(*sample_shape, *batch)``.

        Uses the core's own ``rsample_and_log_prob`` where it has one (zuko flows: one pass
        instead of a sample pass plus an inverse pass, which matters for autoregressive and
        continuous flows); otherwise samples, then evaluates ``log_prob``.
        """
        shape = Size(sample_shape)
        if hasattr(self.base_dist, "rsample_and_log_prob"):
            x, log_prob = self.base_dist.rsample_and_log_prob(shape)
            for transform in self.transforms:
                y = transform(x)
                log_prob = log_prob - transform.log_abs_det_jacobian(x, y)
                x = y
            return x, log_prob
        y = self.rsample(shape) if self.has_rsample else self.sample(shape)
        return y, self.log_prob(y)

    def sample_and_log_prob(self, sample_shape: Size | Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """:meth:`rsample_and_log_prob` without gradients."""
        with torch.no_grad():
            return self.rsample_and_log_prob(sample_shape)


class ConditionalEstimator(nn.Module, abc.ABC):
    r"""Abstract conditional density estimator :math:`q(y \mid c)`.

    Owns the standardization statistics (buffers, saved in the state dict), the optional
    prior bijection of :math:`y` and the embedding of :math:`c`, which is trained jointly
    with the core. See the module docstring for the data flow and what subclasses implement.

    Arguments:
        y_dim: Dimension :math:`D` of :math:`y`.
        c_shape: Shape of one condition: ``(d,)`` for vectors, ``(H, W)`` (or ``(C, H, W)``) for maps.
        embedding: Name in :data:`sbi_gen.nn.EMBEDDINGS`; ``None`` picks ``"identity"`` for vectors,
            ``"cnn"`` for maps.
        embedding_kwargs: Keyword arguments of the embedding (JSON values).
        y_prior: ``prior.to_dict()`` of the prior of :math:`y` (NPE with bounded priors): the
            model then lives in the unconstrained space of the prior's support, its samples in
            the support and its ``log_prob`` is a density over the original :math:`y`.

    Shapes:
        ``est(c)`` with ``c`` of shape ``(*batch, *c_shape)`` is a distribution with
        ``batch_shape == batch`` and ``event_shape == (y_dim,)``.

    Example:
        >>> from sbi_gen.estimators import NSF
        >>> from sbi_gen.priors import BoxUniform
        >>> prior = BoxUniform([0.0, 0.0], [1.0, 5.0])
        >>> est = NSF(2, (3,), y_prior=prior.to_dict(), transforms=2, hidden_features=(32,))
        >>> theta, x = prior.sample((100,)), torch.randn(100, 3)
        >>> est.set_standardization(theta, x)
        >>> loss = est.loss(theta, x)  # minimize this
        >>> samples = est(x[:4]).sample((10,))  # (10, 4, 2), inside the box
        >>> bool(prior.support.check(samples).all())
        True
    """

    name: ClassVar[str]
    #: :class:`~sbi_gen.train.TrainConfig` fields this family trains best with (chosen by
    #: measurement, see the subclass's docstring). NPE/NLE use them when ``fit`` gets no config,
    #: ``NPE.train_config(**overrides)`` starts from them and the CLI fills unset options with them.
    training_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        y_dim: int,
        c_shape: Sequence[int],
        *,
        embedding: str | None = None,
        embedding_kwargs: dict[str, Any] | None = None,
        y_prior: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.y_dim = int(y_dim)
        self.c_shape = tuple(int(s) for s in c_shape)
        if self.y_dim < 1:
            raise ValueError(f"y_dim must be positive, got {y_dim}")
        # Statistics of c: per feature for vectors, one global value for (H, W) maps and one
        # per channel for (C, H, W) maps.
        stats_shape = {1: self.c_shape, 2: (1, 1), 3: (*self.c_shape[:1], 1, 1)}.get(len(self.c_shape))
        if stats_shape is None:
            raise ValueError(f"conditions must be vectors (d,) or maps (H, W) / (C, H, W), got {self.c_shape}")
        self.embedding_name = default_embedding(self.c_shape) if embedding is None else str(embedding)
        self.embedding_kwargs = copy.deepcopy(dict(embedding_kwargs or {}))
        self.embedding, self.context_features = build_embedding(
            self.embedding_name, self.c_shape, **self.embedding_kwargs
        )
        if isinstance(self.embedding, CNN):
            # Recorded explicitly: a checkpoint then rebuilds this architecture whatever later
            # versions choose as the default (the pooled and dilated CNNs share weight shapes).
            self.embedding_kwargs.setdefault("pool", self.embedding.pool)
        self.y_prior = None if y_prior is None else copy.deepcopy(dict(y_prior))

        self.register_buffer("c_mean", torch.zeros(stats_shape))
        self.register_buffer("c_std", torch.ones(stats_shape))
        self.register_buffer("y_mean", torch.zeros(self.y_dim))
        self.register_buffer("y_std", torch.ones(self.y_dim))
        if self.y_prior is not None:
            lower, upper = _support_bounds(self.y_prior, self.y_dim)
            self.register_buffer("y_lower", lower.to(torch.get_default_dtype()))
            self.register_buffer("y_upper", upper.to(torch.get_default_dtype()))
        else:
            self.register_buffer("y_lower", None)
            self.register_buffer("y_upper", None)

    # ----------------------------------------------------------------- subclass interface

    @abc.abstractmethod
    def core(self, h: Tensor) -> Distribution:
        """The distribution of standardized unconstrained ``z`` given embedded conditions.

        Arguments:
            h: Embedded conditions, shape ``(*batch, F)`` with ``F = self.context_features``.

        Returns:
            A distribution with batch shape ``(*batch)`` and event shape ``(y_dim,)``.
        """

    @abc.abstractmethod
    def hyperparameters(self) -> dict[str, Any]:
        """The subclass's own constructor arguments, as JSON values (see :meth:`config`)."""

    def core_loss(self, z: Tensor, h: Tensor) -> Tensor:
        """Training loss on standardized ``z`` ``(n, y_dim)`` and embedded ``h`` ``(n, F)``.

        Default: mean negative log-likelihood ``-core(h).log_prob(z).mean()``.
        """
        return -self.core(h).log_prob(z).mean()

    # ----------------------------------------------------------------- public API

    def config(self) -> dict[str, Any]:
        """JSON-serializable description: ``build_estimator(**est.config())`` rebuilds the architecture.

        Weights and standardization statistics are in :meth:`state_dict`.
        """
        return {
            "name": self.name,
            "y_dim": self.y_dim,
            "c_shape": list(self.c_shape),
            "embedding": self.embedding_name,
            "embedding_kwargs": copy.deepcopy(self.embedding_kwargs),
            "y_prior": copy.deepcopy(self.y_prior),
            **self.hyperparameters(),
        }

    @torch.no_grad()
    def set_standardization(self, y: Tensor, c: Tensor) -> None:
        r"""Sets the z-scoring statistics from training data (call once, before training).

        :math:`y` is z-scored per dimension *after* the prior bijection; vector :math:`c`
        per feature, maps :math:`c` by one global mean and standard deviation (one per
        channel for ``(C, H, W)``). Rows with non-finite values are ignored; standard
        deviations are floored at ``1e-6 (1 + |mean|)``.

        Arguments:
            y: Training values of :math:`y`, shape ``(n, y_dim)``.
            c: Training conditions, shape ``(n, *c_shape)``.
        """
        y = torch.as_tensor(y)
        c = torch.as_tensor(c)
        if y.shape[1:] != (self.y_dim,) or tuple(c.shape[1:]) != self.c_shape or len(y) != len(c):
            raise ValueError(
                f"expected y (n, {self.y_dim}) and c (n, *{self.c_shape}), got {tuple(y.shape)} and {tuple(c.shape)}"
            )
        u = self._prior_transform(y.device, torch.float64).inv(y.to(torch.float64)) if self.y_prior else y
        ok = torch.isfinite(u).all(dim=-1) & _finite_rows(c)
        if not ok.any():
            raise ValueError("no training row has finite y and c")
        ok = ok.nonzero().squeeze(-1)
        c_dims = (0,) if len(self.c_shape) == 1 else (0, -2, -1)
        for (mean_buffer, std_buffer), values, dims in (
            ((self.y_mean, self.y_std), u, (0,)),
            ((self.c_mean, self.c_std), c, c_dims),
        ):
            mean, std = _mean_std(values, ok, dims)
            mean_buffer.copy_(mean.reshape(mean_buffer.shape))
            std_buffer.copy_(std.reshape(std_buffer.shape))

    def embed(self, c: Tensor) -> Tensor:
        """Standardizes and embeds conditions: ``(*batch, *c_shape) → (*batch, F)``."""
        c = torch.as_tensor(c).to(device=self.c_mean.device, dtype=self.c_mean.dtype)
        if c.dim() < len(self.c_shape) or tuple(c.shape[c.dim() - len(self.c_shape) :]) != self.c_shape:
            raise ValueError(f"conditions must have shape (*batch, *{self.c_shape}), got {tuple(c.shape)}")
        return self.embedding((c - self.c_mean) / self.c_std)

    def forward(self, c: Tensor) -> Distribution:
        """The estimated distribution :math:`q(y \\mid c)`.

        Arguments:
            c: Conditions, shape ``(*batch, *c_shape)``.

        Returns:
            A distribution with batch shape ``(*batch)`` and event shape ``(y_dim,)``:
            ``sample((n,))`` has shape ``(n, *batch, y_dim)``; ``log_prob(y)`` takes
            ``(..., *batch, y_dim)`` and returns ``(..., *batch)``; ``rsample`` where the
            core supports it; plus ``sample_and_log_prob`` / ``rsample_and_log_prob``.
        """
        core = self.core(self.embed(c))
        transforms: list[Transform] = [AffineTransform(self.y_mean, self.y_std, event_dim=1)]
        if self.y_prior is not None:
            transforms.append(self._prior_transform())
        return _EstimatorDistribution(core, transforms, self.y_lower, self.y_upper)

    def loss(self, y: Tensor, c: Tensor) -> Tensor:
        """Scalar training loss on a batch (see :meth:`core_loss`).

        For flows it is the mean negative log-likelihood of the standardized unconstrained
        ``y``; it differs from ``-est(c).log_prob(y).mean()`` by terms that depend on ``y``
        only (the Jacobians of the prior bijection and of the z-scoring).

        Arguments:
            y: Values, shape ``(n, y_dim)``.
            c: Conditions, shape ``(n, *c_shape)``.
        """
        y = torch.as_tensor(y).to(device=self.y_mean.device, dtype=self.y_mean.dtype)
        u = self._prior_transform().inv(y) if self.y_prior is not None else y
        return self.core_loss((u - self.y_mean) / self.y_std, self.embed(c))

    def extra_repr(self) -> str:
        return f"y_dim={self.y_dim}, c_shape={self.c_shape}, y_prior={'yes' if self.y_prior else 'no'}"

    # ----------------------------------------------------------------- helpers

    def _prior_transform(
        self, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> SupportTransform:
        lower, upper = self.y_lower, self.y_upper
        if device is not None or dtype is not None:
            lower = lower.to(device=device, dtype=dtype)
            upper = upper.to(device=device, dtype=dtype)
        return SupportTransform(lower, upper)


def _mean_std(values: Tensor, rows: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and floored standard deviation over ``dims`` of ``values[rows]``, in float64, by chunks."""
    chunks = [rows[start : start + _STATS_CHUNK] for start in range(0, len(rows), _STATS_CHUNK)]
    total, count = 0.0, 0
    for index in chunks:
        chunk = values[index].to(torch.float64)
        partial = chunk.sum(dim=dims)
        total, count = total + partial, count + chunk.numel() // partial.numel()
    mean = total / count
    squares = 0.0
    for index in chunks:
        chunk = values[index].to(torch.float64)
        squares = squares + ((chunk - mean.reshape(_keepdim_shape(chunk, dims))) ** 2).sum(dim=dims)
    std = torch.sqrt(squares / (count - 1)) if count > 1 else torch.ones_like(mean)
    return mean, torch.maximum(std, _STD_FLOOR * (1 + mean.abs()))


def _finite_rows(x: Tensor) -> Tensor:
    """``isfinite(x).all()`` per row ``(n,)``, by chunks (no full-size mask for big maps)."""
    parts = [torch.isfinite(x[i : i + _STATS_CHUNK].flatten(1)).all(dim=-1) for i in range(0, len(x), _STATS_CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=x.device)


def _keepdim_shape(x: Tensor, dims: tuple[int, ...]) -> list[int]:
    """Shape of ``x.sum(dims, keepdim=True)``."""
    reduced = {d % x.dim() for d in dims}
    return [1 if i in reduced else s for i, s in enumerate(x.shape)]
