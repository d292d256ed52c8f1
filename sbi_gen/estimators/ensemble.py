r"""Deep ensembles: several estimators of one family, trained together, sampled as their mixture.

:math:`q(z \mid h) = \frac{1}{K} \sum_k q_k(z \mid h)` on the standardized, unconstrained
:math:`z` (see :mod:`sbi_gen.estimators.base`), where each member :math:`q_k` is the core of
an estimator of the chosen family with its own initial weights, and the training loss is the
mean of the members' own losses (each member is fitted as if alone; the mixture is not trained
as a mixture, which would let its members specialize). The members share the standardization
and the embedding of the condition.

Why: a single flow trained by early stopping on a modest simulation budget is often
over-confident (its posteriors too narrow for the truths they should contain), and averaging
independently initialized members widens each posterior where the members disagree, which is
where the data did not decide. Measured on the cosmology simulator's 12-bin log power spectrum
(NPE, 10,000 simulations, NSF members with 8 bins and the NSF's training defaults of the time,
without their stopping threshold; expected HPD coverage over 1,000 held-out maps, 500 draws
each; area: mean signed distance of the coverage curve from the diagonal, negative =
over-confident):

=====================================  ==========================  =============
model                                  area (KS p)                 time to train
=====================================  ==========================  =============
one NSF, 6 training seeds              −0.025 to −0.040 (≤ 0.003)  6 s
``ensemble``, 5 members, 2 seeds       −0.023 (0.001), −0.019      36 s
                                       (0.057)
5 NSFs trained apart, mixed, 2 sets    −0.015 (0.10), −0.018       30 s
                                       (0.036)
=====================================  ==========================  =============

So the ensemble shrank the calibration error of one NSF by about 40 % there, and separately trained members
(each with its own validation split and its own early stop) did a little better still. Without
the per-member resampling of the batches (below) the joint ensemble reached −0.025 and −0.029.

Costs: every step trains all members (``members`` times a single model's step); sampling draws
from every member and keeps one draw per sample, and ``log_prob`` evaluates every member.

Example:
    >>> import torch
    >>> est = Ensemble(2, (3,), family="nsf", members=3, family_kwargs={"transforms": 1, "hidden_features": [16]})
    >>> est(torch.randn(4, 3)).sample((5,)).shape
    torch.Size([5, 4, 2])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Size, Tensor
from torch.distributions import Distribution, constraints

from sbi_gen.estimators.base import ConditionalEstimator
from sbi_gen.estimators.flows import FLOW_TRAINING_DEFAULTS
from sbi_gen.nn import HyperparameterError, check_int

__all__ = ["Ensemble"]

# Families an ensemble cannot usefully hold: itself, and the Gaussian, whose closed-form
# maximum-likelihood fit does not depend on the initial weights (every member would be the same).
_NOT_MEMBERS = ("ensemble", "gaussian")


class _UniformMixture(Distribution):
    """The equal-weight mixture of distributions that share batch and event shapes."""

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}

    def __init__(self, components: Sequence[Distribution]):
        self.components = list(components)
        first = self.components[0]
        super().__init__(first.batch_shape, first.event_shape, validate_args=False)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return all(c.has_rsample for c in self.components)

    @property
    def support(self) -> Any:
        return self.components[0].support

    def expand(self, batch_shape: Size | Sequence[int], _instance: Distribution | None = None) -> Distribution:
        return _UniformMixture([c.expand(Size(batch_shape)) for c in self.components])

    def _pick(self, draws: Tensor, sample_shape: Size) -> Tensor:
        """One member's draw per sample and batch element, from ``draws (K, *sample, *batch, D)``."""
        shape = sample_shape + self.batch_shape
        member = torch.randint(len(self.components), shape, device=draws.device)
        index = member.reshape(1, *shape, 1).expand(1, *shape, *self.event_shape)
        return draws.gather(0, index)[0]

    def rsample(self, sample_shape: Size | Sequence[int] = Size()) -> Tensor:
        sample_shape = Size(sample_shape)
        return self._pick(torch.stack([c.rsample(sample_shape) for c in self.components]), sample_shape)

    def sample(self, sample_shape: Size | Sequence[int] = Size()) -> Tensor:
        sample_shape = Size(sample_shape)
        with torch.no_grad():
            return self._pick(torch.stack([c.sample(sample_shape) for c in self.components]), sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        log_probs = torch.stack([c.log_prob(value) for c in self.components])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.components))


class Ensemble(ConditionalEstimator):
    r"""``members`` estimators of ``family`` trained jointly; their equal-weight mixture is the model.

    Each member is an estimator of ``family`` (with ``family_kwargs``) whose condition is this
    ensemble's embedded condition; only its core is used (the ensemble standardizes and embeds
    once). Its training defaults are the flows' shared ones with a 0.005-nat stopping threshold
    (the NSF's before it trained at twice the rate), whatever the family.

    Arguments:
        y_dim: Dimension of :math:`y`.
        c_shape: Shape of one condition.
        embedding: Embedding name (see :class:`ConditionalEstimator`), shared by the members.
        embedding_kwargs: Embedding keyword arguments.
        y_prior: Prior of :math:`y` as a dict, for bounded supports.
        family: Name of the members' family in :data:`sbi_gen.estimators.ESTIMATORS`
            (not ``"gaussian"``: its closed-form fit would make every member the same).
        members: Number of members (at least 2).
        family_kwargs: The members' hyperparameters (JSON values), e.g. ``{"transforms": 3}``.

    Example:
        >>> import torch
        >>> est = Ensemble(1, (2,), members=2, family="maf", family_kwargs={"transforms": 1})
        >>> est.set_standardization(torch.randn(100, 1), torch.randn(100, 2))
        >>> est.loss(torch.randn(8, 1), torch.randn(8, 2)).shape
        torch.Size([])
    """

    name = "ensemble"
    # Whatever the family (NPE.train_config and the CLI read them from the class, before any
    # family is chosen): the NSF's defaults before its rate was doubled and its stopping
    # threshold raised, which were measured for one NSF, not for members trained jointly.
    training_defaults: ClassVar[dict[str, Any]] = {**FLOW_TRAINING_DEFAULTS, "min_delta": 0.005}

    def __init__(
        self,
        y_dim: int,
        c_shape: Sequence[int],
        *,
        embedding: str | None = None,
        embedding_kwargs: dict[str, Any] | None = None,
        y_prior: dict[str, Any] | None = None,
        family: str = "nsf",
        members: int = 5,
        family_kwargs: dict[str, Any] | None = None,
    ):
        from sbi_gen.estimators import ESTIMATORS, build_estimator  # the registry holds this class too

        super().__init__(y_dim, c_shape, embedding=embedding, embedding_kwargs=embedding_kwargs, y_prior=y_prior)
        if not isinstance(family, str) or family not in ESTIMATORS or family in _NOT_MEMBERS:
            allowed = ", ".join(sorted(set(ESTIMATORS) - set(_NOT_MEMBERS)))
            raise HyperparameterError(f"ensemble: family must be one of {allowed}, got {family!r}")
        if family_kwargs is not None and not isinstance(family_kwargs, dict):
            raise HyperparameterError(f"ensemble: family_kwargs must be a dict of the family's hyperparameters, got {family_kwargs!r}")
        self.family = family
        self.n_members = check_int(self.name, "members", members, minimum=2)
        self.family_kwargs = copy.deepcopy(dict(family_kwargs or {}))
        self.members = nn.ModuleList(
            build_estimator(family, self.y_dim, (self.context_features,), embedding="identity", **self.family_kwargs)
            for _ in range(self.n_members)
        )

    def core(self, h: Tensor) -> Distribution:
        return _UniformMixture([member.core(h) for member in self.members])

    def core_loss(self, z: Tensor, h: Tensor) -> Tensor:
        if not self.training:  # validation: every member on the same rows
            return torch.stack([member.core_loss(z, h) for member in self.members]).mean()
        # Training: each member on its own resample (with replacement) of the batch, so that the
        # members follow different paths, as separately shuffled trainings would.
        n = len(z)
        losses = []
        for member in self.members:
            rows = torch.randint(n, (n,), device=z.device)
            losses.append(member.core_loss(z[rows], h[rows]))
        return torch.stack(losses).mean()

    def hyperparameters(self) -> dict[str, Any]:
        return {"family": self.family, "members": self.n_members, "family_kwargs": copy.deepcopy(self.family_kwargs)}
