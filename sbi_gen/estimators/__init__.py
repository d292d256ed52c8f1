r"""Conditional density estimators :math:`q(y \mid c)` and their registry.

Every estimator is a :class:`ConditionalEstimator`: ``est(c)`` is a distribution over
:math:`y`, ``est.loss(y, c)`` its training loss, ``est.config()`` a JSON description from
which :func:`build_estimator` rebuilds it (weights via ``state_dict``).

Example:
    >>> import torch
    >>> est = build_estimator("nsf", 2, (3,), transforms=2, hidden_features=[32, 32])
    >>> est.set_standardization(torch.randn(100, 2), torch.randn(100, 3))
    >>> dist = est(torch.randn(5, 3))
    >>> dist.sample((7,)).shape
    torch.Size([7, 5, 2])
    >>> again = build_estimator(**est.config())
    >>> _ = again.load_state_dict(est.state_dict())
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from sbi_gen.estimators.base import ConditionalEstimator, SupportTransform
from sbi_gen.estimators.diffusion import Diffusion
from sbi_gen.estimators.ensemble import Ensemble
from sbi_gen.estimators.flows import CNF, MAF, NSF
from sbi_gen.estimators.gaussian import Gaussian
from sbi_gen.estimators.vae import VAE
from sbi_gen.nn import HyperparameterError

__all__ = [
    "CNF",
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "MAF",
    "NSF",
    "VAE",
    "ConditionalEstimator",
    "Diffusion",
    "Ensemble",
    "Gaussian",
    "HyperparameterError",
    "SupportTransform",
    "build_estimator",
]

ESTIMATORS: dict[str, type[ConditionalEstimator]] = {
    "cnf": CNF,
    "diffusion": Diffusion,
    "ensemble": Ensemble,
    "gaussian": Gaussian,
    "maf": MAF,
    "nsf": NSF,
    "vae": VAE,
}
"""Estimator classes by name (``cls.name``); the CLI resolves ``--estimator`` through it."""

DEFAULT_ESTIMATOR = "nsf"
"""The estimator of a method that sets no default of its own. NPE's default races this family
against MAF and the linear Gaussian (``"auto"``), NLE's is MAF: see :mod:`sbi_gen.inference`."""

_COMMON = ("y_dim", "c_shape", "embedding", "embedding_kwargs", "y_prior")


def build_estimator(
    name: str,
    y_dim: int,
    c_shape: Sequence[int],
    *,
    embedding: str | None = None,
    embedding_kwargs: dict[str, Any] | None = None,
    y_prior: dict[str, Any] | None = None,
    **hyperparameters: Any,
) -> ConditionalEstimator:
    """Builds the estimator ``ESTIMATORS[name]``.

    Arguments:
        name: A key of :data:`ESTIMATORS` (``"nsf"`` is the default elsewhere).
        y_dim: Dimension of :math:`y`.
        c_shape: Shape of one condition: ``(d,)`` or ``(H, W)`` (or ``(C, H, W)``).
        embedding: Name in :data:`sbi_gen.nn.EMBEDDINGS`; ``None``: ``"identity"`` for vectors,
            ``"cnn"`` for maps.
        embedding_kwargs: Keyword arguments of the embedding.
        y_prior: ``prior.to_dict()`` of a bounded prior of :math:`y`.
        hyperparameters: The estimator's own keyword arguments (see its class); unknown ones and
            bad values raise :class:`HyperparameterError` (a ``ValueError`` and a ``TypeError``).

    Returns:
        The estimator; ``build_estimator(**est.config())`` rebuilds the same architecture.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(sorted(ESTIMATORS))}")
    cls = ESTIMATORS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in _COMMON]
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise HyperparameterError(f"estimator {name!r} got unknown hyperparameters {unknown}; it accepts {accepted}")
    return cls(
        y_dim,
        c_shape,
        embedding=embedding,
        embedding_kwargs=embedding_kwargs,
        y_prior=y_prior,
        **hyperparameters,
    )
