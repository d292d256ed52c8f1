"""Priors over simulator parameters.

Every prior is a :class:`torch.distributions.Distribution` over vectors ``(*, D)``
with named parameters (and units), a ``support``, a bijection ``transform`` from
:math:`\\mathbb{R}^D` onto that support (used to train and run MCMC in unconstrained
space) and a JSON form (:meth:`to_dict` / :func:`prior_from_dict`).

Example:
    >>> prior = BoxUniform([0.0, -1.0], [1.0, 1.0], names=["a", "b"])
    >>> theta = prior.sample((4,))
    >>> u = prior.transform.inv(theta)  # unconstrained, shape (4, 2)
    >>> torch.allclose(prior.transform(u), theta, atol=1e-5)
    True
    >>> prior_from_dict(prior.to_dict()).names
    ['a', 'b']
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import (
    Beta,
    Distribution,
    Exponential,
    Gamma,
    HalfNormal,
    LogNormal,
    MultivariateNormal,
    Normal,
    Uniform,
    biject_to,
    constraints,
)
from torch.distributions.transforms import CatTransform, IndependentTransform, Transform

__all__ = [
    "BoxUniform",
    "Gaussian",
    "IndependentPrior",
    "PointMass",
    "Prior",
    "prior_from_dict",
    "prior_from_json",
    "sample_prior",
]


def _names(names: Sequence[str] | None, dim: int, default: str = "theta") -> list[str]:
    if dim < 1:
        raise ValueError("a prior needs at least one parameter")
    if names is None:
        return [f"{default}_{i}" for i in range(dim)]
    if isinstance(names, str):  # list("ab") would silently make two one-letter names
        raise ValueError(f"names must be a list of strings, one per parameter, got the string {names!r}")
    names = [str(n) for n in names]
    if len(names) != dim:
        raise ValueError(f"got {len(names)} parameter names for a {dim}-dimensional prior")
    if len(set(names)) != dim:
        raise ValueError(f"parameter names must be unique, got {names}")
    return names


def _units(units: Sequence[str] | None, dim: int) -> list[str]:
    if units is None:
        return [""] * dim
    if isinstance(units, str):
        raise ValueError(f"units must be a list of strings, one per parameter, got the string {units!r}")
    units = [str(u) for u in units]
    if len(units) != dim:
        raise ValueError(f"got {len(units)} units for a {dim}-dimensional prior")
    return units


class Prior(Distribution, abc.ABC):
    """Base of all priors: a distribution over ``(*, D)`` with names, units and a bijection.

    Subclasses set ``names``, ``units``, implement ``sample``, ``log_prob``, ``support``,
    ``transform`` and ``to_dict``. Out-of-support values have ``log_prob = -inf``.
    """

    arg_constraints: dict = {}
    names: list[str]
    units: list[str]

    def __init__(self, dim: int, names: Sequence[str] | None, units: Sequence[str] | None):
        self.names = _names(names, dim)
        self.units = _units(units, dim)
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([dim]), validate_args=False)

    @property
    def dim(self) -> int:
        return self.event_shape[0]

    @property
    def labels(self) -> list[str]:
        """Parameter names with units, for plots: ``"m_X [GeV]"``."""
        return [f"{n} [{u}]" if u else n for n, u in zip(self.names, self.units, strict=True)]

    @property
    def transform(self) -> Transform:
        """Bijection from unconstrained :math:`\\mathbb{R}^D` onto the support."""
        return biject_to(self.support)

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable description; :func:`prior_from_dict` rebuilds the prior."""

    @abc.abstractmethod
    def sample_numpy(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` draws as a float64 array ``(n, D)`` from a numpy generator (used for reproducible runs)."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def _as_theta(self, value: Any, dtype: torch.dtype) -> Tensor:
        """``value`` as a tensor ``(*, D)``; ValueError if its rows are not D wide (broadcasting
        a narrower θ against the prior's D parameters would give a plausible, wrong density)."""
        value = torch.as_tensor(value, dtype=dtype)
        if value.ndim == 0 or value.shape[-1] != self.dim:
            got = "theta is a scalar" if value.ndim == 0 else f"theta has {value.shape[-1]} parameters per row"
            raise ValueError(f"{got}, but the prior has {self.dim} ({', '.join(self.names)})")
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)})"


def _plain(values: Any) -> Any:
    """Numbers for JSON, each the shortest decimal that reads back as the same value in its own
    dtype: a float32 bound 0.1 is written ``0.1``, not ``0.10000000149011612``."""
    array = torch.as_tensor(values).detach().cpu().numpy()
    plain = np.array([float(str(v)) for v in array.reshape(-1)]).reshape(array.shape)
    return plain.tolist()


class BoxUniform(Prior):
    r"""Independent uniform prior on the box :math:`[low_i, high_i]`.

    Its bijection to :math:`\mathbb{R}^D` is the elementwise logit (sigmoid, then affine).

    Arguments:
        low: Lower bounds, shape ``(D,)``.
        high: Upper bounds, shape ``(D,)``.
        names: Parameter names.
        units: Parameter units.

    Example:
        >>> prior = BoxUniform([60.0, 0.5], [140.0, 2.0], names=["m_X", "lam"], units=["GeV", ""])
        >>> prior.sample((3,)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        low: Sequence[float] | Tensor,
        high: Sequence[float] | Tensor,
        names: Sequence[str] | None = None,
        units: Sequence[str] | None = None,
    ):
        self.low = torch.as_tensor(low, dtype=torch.get_default_dtype()).reshape(-1)
        self.high = torch.as_tensor(high, dtype=torch.get_default_dtype()).reshape(-1)
        if self.low.shape != self.high.shape:
            raise ValueError(f"low has shape {tuple(self.low.shape)} but high has {tuple(self.high.shape)}")
        if not (torch.isfinite(self.low).all() and torch.isfinite(self.high).all()):
            raise ValueError(f"the bounds of a uniform prior must be finite, got low={self.low.tolist()}, high={self.high.tolist()}")
        if not torch.all(self.high > self.low):
            raise ValueError("every upper bound must exceed its lower bound")
        super().__init__(self.low.numel(), names, units)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.interval(self.low, self.high), 1)

    @property
    def mean(self) -> Tensor:
        return (self.low + self.high) / 2

    @property
    def variance(self) -> Tensor:
        return (self.high - self.low) ** 2 / 12

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.event_shape
        u = torch.rand(shape, dtype=self.low.dtype)
        return self.low + (self.high - self.low) * u

    def sample_numpy(self, n: int, rng: np.random.Generator) -> np.ndarray:
        low, high = self.low.double().numpy(), self.high.double().numpy()
        return low + (high - low) * rng.random((n, self.dim))

    def log_prob(self, value: Tensor) -> Tensor:
        value = self._as_theta(value, self.low.dtype)
        inside = ((value >= self.low) & (value <= self.high)).all(dim=-1)
        density = -torch.log(self.high - self.low).sum()
        return torch.where(inside, density, torch.tensor(-torch.inf, dtype=value.dtype))

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "BoxUniform",
            "low": _plain(self.low),
            "high": _plain(self.high),
            "names": self.names,
            "units": self.units,
        }


class Gaussian(Prior):
    r"""Gaussian prior, diagonal (``scale``) or full (``covariance``).

    Arguments:
        mean: Mean, shape ``(D,)``.
        scale: Standard deviations, shape ``(D,)`` or a scalar (diagonal case).
        covariance: Full covariance matrix ``(D, D)``; exclusive with ``scale``.
        names: Parameter names.
        units: Parameter units.

    Example:
        >>> prior = Gaussian([0.0, 0.0], scale=0.1)
        >>> prior.log_prob(torch.zeros(2)).shape
        torch.Size([])
    """

    def __init__(
        self,
        mean: Sequence[float] | Tensor,
        scale: float | Sequence[float] | Tensor | None = None,
        covariance: Sequence[Sequence[float]] | Tensor | None = None,
        names: Sequence[str] | None = None,
        units: Sequence[str] | None = None,
    ):
        dtype = torch.get_default_dtype()
        self.loc = torch.as_tensor(mean, dtype=dtype).reshape(-1)
        dim = self.loc.numel()
        if not torch.isfinite(self.loc).all():
            raise ValueError(f"the mean of a Gaussian prior must be finite, got {self.loc.tolist()}")
        if (scale is None) == (covariance is None):
            raise ValueError("give exactly one of scale (diagonal) or covariance (full)")
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=dtype)
            if scale.ndim > 1 or scale.numel() not in (1, dim):
                raise ValueError(f"scale must be one number or {dim} (one per parameter of the mean), got shape {tuple(scale.shape)}")
            scale = scale.expand(dim).clone()
            if not torch.isfinite(scale).all():
                raise ValueError(f"Gaussian prior scales must be finite, got {scale.tolist()}")
            if not torch.all(scale > 0):
                raise ValueError("Gaussian prior scales must be positive")
            self.covariance = torch.diag(scale**2)
            self.diagonal = True
        else:
            self.covariance = torch.as_tensor(covariance, dtype=dtype)
            if self.covariance.shape != (dim, dim):
                raise ValueError(f"covariance must have shape ({dim}, {dim}), got {tuple(self.covariance.shape)}")
            if not torch.isfinite(self.covariance).all():
                raise ValueError("the covariance matrix must be finite")
            self.diagonal = False
        symmetric = torch.allclose(self.covariance, self.covariance.T)
        if not symmetric or torch.linalg.cholesky_ex(self.covariance).info != 0:
            raise ValueError("the covariance matrix is not symmetric positive definite")
        self._mvn = MultivariateNormal(self.loc, covariance_matrix=self.covariance)
        super().__init__(dim, names, units)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, 1)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return torch.diagonal(self.covariance)

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        return self._mvn.sample(torch.Size(sample_shape))

    def sample_numpy(self, n: int, rng: np.random.Generator) -> np.ndarray:
        cholesky = torch.linalg.cholesky(self.covariance.double()).numpy()
        return self.loc.double().numpy() + rng.standard_normal((n, self.dim)) @ cholesky.T

    def log_prob(self, value: Tensor) -> Tensor:
        return self._mvn.log_prob(self._as_theta(value, self.loc.dtype))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "Gaussian", "mean": _plain(self.loc), "names": self.names, "units": self.units}
        if self.diagonal:
            out["scale"] = _plain(torch.sqrt(torch.diagonal(self.covariance)))
        else:
            out["covariance"] = _plain(self.covariance)
        return out


# 1-D distributions an IndependentPrior may hold, by name, with their JSON arguments.
_UNIVARIATE: dict[str, tuple[type[Distribution], tuple[str, ...]]] = {
    "Uniform": (Uniform, ("low", "high")),
    "Normal": (Normal, ("loc", "scale")),
    "LogNormal": (LogNormal, ("loc", "scale")),
    "HalfNormal": (HalfNormal, ("scale",)),
    "Gamma": (Gamma, ("concentration", "rate")),
    "Beta": (Beta, ("concentration1", "concentration0")),
    "Exponential": (Exponential, ("rate",)),
}


class IndependentPrior(Prior):
    r"""Product of independent 1-D priors, one per parameter.

    Each factor is one of ``Uniform``, ``Normal``, ``LogNormal``, ``HalfNormal``, ``Gamma``,
    ``Beta`` or ``Exponential`` with scalar arguments. The bijection applies each factor's
    own (``exp`` for positive, logit for intervals, identity for the real line).

    Example:
        >>> from torch.distributions import Gamma, Normal
        >>> prior = IndependentPrior([Normal(0.0, 1.0), Gamma(2.0, 1.0)], names=["mu", "tau"])
        >>> prior.sample((5,)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        factors: Sequence[Distribution],
        names: Sequence[str] | None = None,
        units: Sequence[str] | None = None,
    ):
        self.factors = list(factors)
        for factor in self.factors:
            if type(factor).__name__ not in _UNIVARIATE or factor.batch_shape != () or factor.event_shape != ():
                allowed = ", ".join(_UNIVARIATE)
                raise ValueError(f"each factor must be a scalar one of {allowed}; got {factor!r}")
        super().__init__(len(self.factors), names, units)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(
            constraints.cat([f.support for f in self.factors], dim=-1, lengths=[1] * self.dim), 1
        )

    @property
    def transform(self) -> Transform:
        parts = [biject_to(f.support) for f in self.factors]
        return IndependentTransform(CatTransform(parts, dim=-1, lengths=[1] * self.dim), 1)

    @property
    def mean(self) -> Tensor:
        return torch.stack([f.mean for f in self.factors])

    @property
    def variance(self) -> Tensor:
        return torch.stack([f.variance for f in self.factors])

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        return torch.stack([f.sample(torch.Size(sample_shape)) for f in self.factors], dim=-1)

    def sample_numpy(self, n: int, rng: np.random.Generator) -> np.ndarray:
        columns = []
        for factor in self.factors:
            kind = type(factor).__name__
            a = [float(getattr(factor, arg)) for arg in _UNIVARIATE[kind][1]]
            draw = {
                "Uniform": lambda a: rng.uniform(a[0], a[1], n),
                "Normal": lambda a: rng.normal(a[0], a[1], n),
                "LogNormal": lambda a: rng.lognormal(a[0], a[1], n),
                "HalfNormal": lambda a: np.abs(rng.normal(0.0, a[0], n)),
                "Gamma": lambda a: rng.gamma(a[0], 1.0 / a[1], n),
                "Beta": lambda a: rng.beta(a[0], a[1], n),
                "Exponential": lambda a: rng.exponential(1.0 / a[0], n),
            }[kind]
            columns.append(draw(a))
        return np.stack(columns, axis=-1)

    def log_prob(self, value: Tensor) -> Tensor:
        value = self._as_theta(value, torch.get_default_dtype())
        total = torch.zeros(value.shape[:-1], dtype=value.dtype)
        for i, factor in enumerate(self.factors):
            v = value[..., i]
            inside = factor.support.check(v)
            # Evaluate at a safe in-support point where outside, then mask to -inf.
            safe = torch.where(inside, v, factor.mean.expand_as(v).to(v.dtype))
            total = total + torch.where(inside, factor.log_prob(safe), torch.tensor(-torch.inf, dtype=v.dtype))
        return total

    def to_dict(self) -> dict[str, Any]:
        factors = []
        for factor in self.factors:
            kind = type(factor).__name__
            _, args = _UNIVARIATE[kind]
            factors.append({"type": kind, **{a: _plain(getattr(factor, a)) for a in args}})
        return {"type": "IndependentPrior", "factors": factors, "names": self.names, "units": self.units}


class _EqualTo(constraints.Constraint):
    """The one point ``value``: the support of :class:`PointMass`."""

    event_dim = 1

    def __init__(self, value: Tensor):
        self.value = value
        super().__init__()

    def check(self, value: Tensor) -> Tensor:
        return (torch.as_tensor(value, dtype=self.value.dtype) == self.value).all(dim=-1)


class PointMass(Prior):
    r"""All mass on one parameter vector: simulations at a fixed :math:`\theta`.

    Not a prior to train on: it is how a file of observations at chosen parameters (``sbi-gen
    simulate SIMULATOR --theta ...``, or :func:`~sbi_gen.store.simulate_to_hdf5` with
    ``prior=PointMass(theta)``) records where its θ came from, in the training-set format.
    NPE and NLE refuse to train on such a file. It has no bijection to :math:`\mathbb{R}^D`.

    Arguments:
        value: The parameters, shape ``(D,)``.
        names: Parameter names.
        units: Parameter units.

    Example:
        >>> prior = PointMass([0.3, 0.8], names=["a", "b"])
        >>> prior.sample((2,))
        tensor([[0.3000, 0.8000],
                [0.3000, 0.8000]])
        >>> prior.log_prob(torch.tensor([[0.3, 0.8], [0.3, 0.7]]))
        tensor([0., -inf])
    """

    def __init__(self, value: Sequence[float] | Tensor, names: Sequence[str] | None = None,
                 units: Sequence[str] | None = None):
        self.value = torch.as_tensor(value, dtype=torch.get_default_dtype()).reshape(-1)
        if self.value.numel() == 0 or not torch.isfinite(self.value).all():
            raise ValueError(f"a point mass needs finite parameters, got {self.value.tolist()}")
        super().__init__(self.value.numel(), names, units)

    @property
    def support(self) -> constraints.Constraint:
        return _EqualTo(self.value)

    @property
    def transform(self) -> Transform:
        raise ValueError("a point mass has no bijection to R^D: it is not a prior to train or run MCMC on")

    @property
    def mean(self) -> Tensor:
        return self.value

    @property
    def variance(self) -> Tensor:
        return torch.zeros_like(self.value)

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        return self.value.expand(torch.Size(sample_shape) + self.event_shape).clone()

    def sample_numpy(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.repeat(self.value.double().numpy()[None], n, axis=0)

    def log_prob(self, value: Tensor) -> Tensor:
        at_point = self.support.check(self._as_theta(value, self.value.dtype))
        return torch.where(at_point, 0.0, -torch.inf).to(self.value.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "PointMass", "value": _plain(self.value), "names": self.names, "units": self.units}


def prior_from_dict(spec: dict[str, Any]) -> Prior:
    """Rebuild a prior from :meth:`Prior.to_dict` output.

    Example:
        >>> prior_from_dict({"type": "BoxUniform", "low": [0.0], "high": [1.0]}).dim
        1
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a prior description must be a dict with a 'type' key, got {spec!r}")
    kind = spec["type"]
    names, units = spec.get("names"), spec.get("units")
    if kind == "BoxUniform":
        return BoxUniform(spec["low"], spec["high"], names=names, units=units)
    if kind == "Gaussian":
        return Gaussian(spec["mean"], scale=spec.get("scale"), covariance=spec.get("covariance"), names=names, units=units)
    if kind == "IndependentPrior":
        factors = []
        for factor in spec["factors"]:
            if factor.get("type") not in _UNIVARIATE:
                raise ValueError(f"unknown 1-D prior {factor.get('type')!r}; known: {', '.join(_UNIVARIATE)}")
            cls, args = _UNIVARIATE[factor["type"]]
            factors.append(cls(*[torch.tensor(float(factor[a])) for a in args]))
        return IndependentPrior(factors, names=names, units=units)
    if kind == "PointMass":
        return PointMass(spec["value"], names=names, units=units)
    raise ValueError(f"unknown prior type {kind!r}; known: BoxUniform, Gaussian, IndependentPrior, PointMass")


def prior_from_json(text: str) -> Prior:
    """Rebuild a prior from its JSON string."""
    return prior_from_dict(json.loads(text))


def sample_prior(prior: Distribution, n: int, seed: int | Sequence[int] | np.random.SeedSequence) -> Tensor:
    """Draw ``n`` samples from ``prior`` reproducibly, without touching the global torch RNG.

    ``seed`` is an int, a sequence of ints or a :class:`numpy.random.SeedSequence`. The priors
    of this module draw from a numpy generator with the full entropy of the seed. Any other
    torch distribution is sampled under a forked torch generator, whose seed torch reduces
    to 32 bits (so distinct seeds may, rarely, give the same draws).

    Example:
        >>> prior = BoxUniform([0.0], [1.0])
        >>> torch.equal(sample_prior(prior, 3, 7), sample_prior(prior, 3, 7))
        True
    """
    seed_sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    if isinstance(prior, Prior):
        draws = prior.sample_numpy(n, np.random.default_rng(seed_sequence))
        return torch.as_tensor(draws, dtype=torch.get_default_dtype())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed_sequence.generate_state(1, np.uint32)[0]))
        return prior.sample((n,))
