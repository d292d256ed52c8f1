r"""Neural posterior and likelihood estimation.

:class:`NPE` learns :math:`q(\theta \mid x)` and samples it directly; :class:`NLE` learns
:math:`q(x \mid \theta)` and samples :math:`p(\theta \mid x_{1..m}) \propto p(\theta)\prod_i q(x_i \mid \theta)`
by MCMC. Both only decide what the estimator's :math:`y` and :math:`c` are; estimator,
training loop and samplers are shared.

Example:
    >>> import simulators, sbi_gen
    >>> from sbi_gen.train import TrainConfig
    >>> task = simulators.get("two_moons")
    >>> data = sbi_gen.simulate(task, n=500, seed=0)
    >>> npe = NPE(task.prior, "nsf", estimator_kwargs={"transforms": 1, "hidden_features": [16]})
    >>> _ = npe.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=2, progress=False))
    >>> npe.posterior(data["x"][0]).sample((10,)).shape
    torch.Size([10, 2])
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from sbi_gen.distributed import process_info
from sbi_gen.estimators import DEFAULT_ESTIMATOR, ESTIMATORS, ConditionalEstimator, build_estimator
from sbi_gen.mcmc import SAMPLERS, MCMCResult, run_mcmc
from sbi_gen.nn import default_embedding
from sbi_gen.priors import PointMass, Prior, prior_from_dict
from sbi_gen.store import TrainingSet, load, read_info
from sbi_gen.train import History, InMemoryState, TrainConfig, checked_config, fit, resolve_device, seeded_torch

__all__ = ["NLE", "NPE", "NLEPosterior", "NPEPosterior"]

# Below this share of samples inside the prior's support, NPE sampling warns; below the
# second it stops rather than loop for a very long time.
_LEAKAGE_WARN = 0.5
_LEAKAGE_FAIL = 1e-3
# Rows (draws × observations) per sampling pass. Memory stays bounded for any n (an NSF in 10-D
# holds ~1 KB of intermediates per row), and on CPU passes of a few thousand rows reuse the
# allocator's memory instead of faulting in fresh pages: 10,000 draws of the default 10-D NSF,
# one thread, 0.98–1.01 s in one pass, 0.88–0.92 s in passes of 4,096 (with zuko's inverse of
# every feature in every pass: 2.2 s and 1.7 s). A GPU wants large batches.
_SAMPLE_ROWS = {"cpu": 4096, "cuda": 1 << 18}


def _sample_in_passes(dist: Distribution, n: int, device: torch.device | str) -> Tensor:
    """``dist.sample((n,))`` drawn in passes of at most ``_SAMPLE_ROWS`` rows (draws × batch)."""
    rows = _SAMPLE_ROWS.get(torch.device(device).type, _SAMPLE_ROWS["cuda"])
    per_pass = max(1, rows // max(1, math.prod(dist.batch_shape)))
    if n <= per_pass:
        return dist.sample((n,))
    return torch.cat([dist.sample((min(per_pass, n - start),)) for start in range(0, n, per_pass)])


def _as_training_data(data: Any) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(theta, x, info) from a path, a TrainingSet or a (theta, x) pair."""
    if isinstance(data, (str, os.PathLike)):
        data = load(data, valid_only=True)
    if isinstance(data, TrainingSet):
        return data.theta, data.x, data.info
    if isinstance(data, (tuple, list)) and len(data) == 2:
        theta, x = (torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v) for v in data)
        # One observable per simulation may come as a vector (n,): it is (n, 1).
        return theta.float(), (x[:, None] if x.ndim == 1 else x).float(), {}
    raise TypeError("data must be an HDF5 training-set path, a TrainingSet or a (theta, x) pair")


# ``estimator="auto"`` (NPE's default) races these families: each is trained on the same split
# (``config.seed``) for the first ``AUTO_RACE_EPOCHS`` epochs (at least ``AUTO_RACE_STEPS``
# optimizer steps), and the one with the lower validation loss (a held-out negative
# log-likelihood of θ, in the same units for all) is then trained in full, exactly as a fit of
# that family alone. The ranking is settled early: NPE at 10,000 simulations,
# ``benchmarks/compare_sbi.py`` seeds 0–3, validation loss after the 3-epoch race NSF / MAF /
# Gaussian: gaussian_linear 10.89 / 10.81 / 10.71, 10.94 / 10.83 / 10.75, 10.94 / 10.89 / 10.80,
# 10.89 / 10.80 / 10.72 (Gaussian kept; the MAF trained alone to the end, 10.89 / 10.81 and
# 10.92 / 10.86 on seeds 0 and 1, and the posterior's own expected loss is 10.72); two_moons
# −1.16 / 0.08 / 0.76 and slcp 3.99 / 5.62 / 6.52 on seed 0, the NSF ahead of the MAF by as much
# on seeds 1–3 (NSF kept; at the end −2.56 / −2.25, 1.93 / 3.38 on seed 0). The posterior of
# gaussian_linear is a Gaussian whose mean is linear in x and whose covariance is fixed: the
# linear Gaussian is the exact family, with 165 parameters against the flows' tens of thousands,
# which only add variance there; neither it nor the MAF can fit two_moons' crescents or slcp's
# modes. C2ST over those 4 seeds (3 observations each): gaussian_linear 0.499 ± 0.001 with the
# race (0.500 ± 0.001 since the NSF's defaults, which every raced family trains with, doubled
# the rate), at the floor of exact draws against exact draws (0.502 ± 0.002,
# ``benchmarks/c2st_floor.py``), against 0.525 ± 0.003 when the race kept the MAF and sbi's NPE
# 0.523 ± 0.007; two_moons and slcp unchanged (the same NSF is trained). The race on fewer
# simulations (``_race_epochs``: at least 50 steps per family) still kept the NSF on two_moons
# (300 and 1,000 simulations), slcp (1,000) and the particle simulator (2,000). The winner goes
# on from its race's training state, so the race costs the other families' 3 epochs, one thread:
# the MAF's 0.5 s and the Gaussian's 0.06 s of a 16–21 s two_moons fit and of a 17 s slcp fit;
# on gaussian_linear, where the Gaussian is kept, the NSF's 1.9 s of a 2.4 s fit.
AUTO = "auto"
AUTO_FAMILIES = ("nsf", "maf", "gaussian")


def families_text(families: Sequence[str]) -> str:
    """``"nsf, maf and gaussian"``: the raced families, for messages."""
    return f"{', '.join(families[:-1])} and {families[-1]}" if len(families) > 1 else families[0]


# NLE's race: the affine flow against the linear Gaussian, no spline flow. Raced with the NSF
# (10,000 simulations, seed 0), NLE kept the NSF on slcp after 3 epochs (validation loss 6.43
# against the MAF's 6.49) and its posterior came out worse (C2ST 0.790 against the MAF's 0.734).
NLE_AUTO_FAMILIES = ("maf", "gaussian")
AUTO_RACE_EPOCHS = 3
AUTO_RACE_STEPS = 50
# With a CNN embedding (maps), each family of the race would train its own CNN, which is most of
# the cost of a step: the race (at least 50 steps per family) on 3,000 maps would add 3 × 9 CNN
# epochs to the fit. Maps are not raced; ``"auto"`` trains this family there.
AUTO_UNRACED_EMBEDDINGS = ("cnn",)
AUTO_FAMILY_UNRACED = "nsf"


def _race_epochs(n_rows: int, config: TrainConfig) -> int:
    """Epochs of the family race for ``n_rows`` training pairs: ``AUTO_RACE_EPOCHS``, more for
    small sets so that every family takes at least ``AUTO_RACE_STEPS`` steps."""
    n_train = max(1, n_rows - round(config.val_fraction * n_rows))
    steps_per_epoch = max(1, math.ceil(n_train / config.batch_size))
    return max(AUTO_RACE_EPOCHS, math.ceil(AUTO_RACE_STEPS / steps_per_epoch))


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _parameter_rows(theta: Any, prior: Prior, device: torch.device | str = "cpu") -> Tensor:
    """θ ``(*, D)`` as float32 on ``device``, or a one-line error naming the prior's parameters.

    With one parameter, a number is one θ and a vector ``(n,)`` is n of them (``(n, 1)``)."""
    theta = torch.as_tensor(np.asarray(theta) if not isinstance(theta, Tensor) else theta, dtype=torch.float32, device=device)
    if prior.dim == 1 and theta.ndim <= 1 and theta.shape != (1,):
        theta = theta.unsqueeze(-1)
    if theta.ndim == 0 or theta.shape[-1] != prior.dim:
        got = "a scalar" if theta.ndim == 0 else f"rows of {theta.shape[-1]}"
        raise ValueError(f"theta must have shape (*, {prior.dim}) for the parameters {', '.join(prior.names)}, got {got}")
    # NaN is no point of the parameter space: its density would come out as -inf or NaN, silently.
    nan_rows = int(torch.isnan(theta).any(dim=-1).sum())
    if nan_rows:
        raise ValueError(f"theta holds NaN in {nan_rows} of its {theta[..., 0].numel()} rows")
    return theta


def _sample_shape(sample_shape: torch.Size | Sequence[int] | int) -> torch.Size:
    """``sample((n,))``'s shape; a bare ``n`` is taken as ``(n,)``, and negative sizes are refused."""
    shape = torch.Size([sample_shape] if isinstance(sample_shape, int) else sample_shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"sample_shape must have non-negative sizes, got {tuple(shape)}")
    return shape


def _check_inside_support(prior: Prior, theta: Tensor) -> None:
    """NPE's training θ outside the prior would be clamped by its bijection, or never sampled
    again: refused, since it means they were drawn from another prior. Non-finite rows are fit's
    to drop."""
    theta = torch.as_tensor(theta)
    finite = torch.isfinite(theta).all(dim=-1)
    if theta.ndim != 2 or theta.shape[1] != prior.dim or not finite.any():
        return  # fit names the shape problem, or that there is nothing to train on
    outside = int((~prior.support.check(theta[finite].to(torch.get_default_dtype()))).sum())
    if outside:
        raise ValueError(f"{outside:,} of {int(finite.sum()):,} training θ lie outside the prior's support: "
                         "they were drawn from another prior; pass that one")


def check_drawn_from_prior(prior: Prior, path: str | os.PathLike[str] | None = None) -> None:
    """Raise a ``ValueError`` if ``prior`` is a :class:`~sbi_gen.priors.PointMass`: simulations
    at one fixed θ (``sbi-gen simulate --theta``) are observations, and neither training nor
    calibration (which needs θ drawn from the prior) can use them. ``path`` names the file."""
    if isinstance(prior, PointMass):
        where = f"{path} holds" if path is not None else "these are"
        raise ValueError(f"{where} simulations at one fixed θ {prior.to_dict()['value']}: observations, not "
                         f"simulations from a prior (simulate those without --theta)")


class _Method(abc.ABC):
    """What NPE and NLE share: the prior, the estimator, fitting and bookkeeping."""

    method: str = ""
    # The estimator used when none is named (NPE and NLE differ, see their docstrings).
    default_estimator: str = DEFAULT_ESTIMATOR
    # The families ``"auto"`` races, in order (the first one's training defaults are the race's).
    auto_families: tuple[str, ...] = AUTO_FAMILIES
    # The family that ``estimator_kwargs`` given without an estimator name apply to (None: refused).
    family_for_kwargs: str | None = None
    # The datasets of a training-set file that play the estimator's y and c (as ``_roles``).
    _file_roles: tuple[str, str] = ("theta", "x")

    @classmethod
    def estimator_for(cls, estimator: str | None, estimator_kwargs: dict[str, Any] | None = None) -> str:
        """The estimator name ``estimator`` means (``None``: the method's default); hyperparameters
        given with no family named are ``family_for_kwargs``'s (NLE: the MAF's)."""
        if estimator is not None:
            return estimator
        return cls.family_for_kwargs if estimator_kwargs and cls.family_for_kwargs else cls.default_estimator

    def __init__(
        self,
        prior: Prior | None = None,
        estimator: str | None = None,
        *,
        embedding: str | None = None,
        estimator_kwargs: dict[str, Any] | None = None,
        embedding_kwargs: dict[str, Any] | None = None,
        device: str = "cpu",
    ):
        estimator = self.estimator_for(estimator, estimator_kwargs)
        if estimator not in ESTIMATORS and estimator != AUTO:
            raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(sorted(ESTIMATORS))}, or {AUTO!r}")
        if estimator == AUTO and estimator_kwargs:
            raise ValueError(
                "estimator_kwargs set the hyperparameters of one family: name it (e.g. estimator='nsf') "
                f"instead of 'auto', which races {families_text(self.auto_families)}"
            )
        if prior is not None and not isinstance(prior, Prior):
            raise TypeError("prior must be an sbi_gen prior (BoxUniform, Gaussian, IndependentPrior)")
        self.prior = prior
        # With "auto" the name becomes the family chosen by ``fit``.
        self.auto = estimator == AUTO
        self.estimator_name = estimator
        self.embedding = embedding
        self.estimator_kwargs = dict(estimator_kwargs or {})
        self.embedding_kwargs = dict(embedding_kwargs or {})
        self.device = resolve_device(device)
        self.estimator: ConditionalEstimator | None = None
        self.x_shape: tuple[int, ...] | None = None
        self.history: History | None = None
        self.metadata: dict[str, Any] = {}

    @abc.abstractmethod
    def _roles(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, c)`` of the estimator: NPE ``(theta, x)``, NLE ``(x, theta)``."""

    @abc.abstractmethod
    def _build(self, theta_dim: int, x_shape: tuple[int, ...], name: str | None = None) -> ConditionalEstimator:
        """The untrained estimator (of family ``name``, default this model's) for these dimensions."""

    def fit(
        self, data: Any, *, config: TrainConfig | None = None, state_path: str | os.PathLike[str] | None = None
    ) -> History:
        """Train on ``data``: an HDF5 training set path, a :class:`~sbi_gen.store.TrainingSet` or
        a ``(theta, x)`` pair. Only valid rows of a file are used. Returns the training history.

        ``state_path``: resumable training (see :func:`sbi_gen.train.fit`); with ``"auto"`` the
        race is run again (it is short and seeded, so it keeps the same family) and the kept
        family's training resumes."""
        if isinstance(data, (str, os.PathLike)):
            # ``fit`` reads the file itself: loaded, or streamed when large (TrainConfig.streaming).
            info = read_info(data)
            theta_shape, x_shape_full = tuple(info["shapes"]["theta"]), tuple(info["shapes"]["x"])
            n_rows = int(info["n_valid"])  # only valid rows are trained on
            training_data: Any = data
        else:
            theta, x, info = _as_training_data(data)
            theta_shape, x_shape_full = tuple(theta.shape), tuple(x.shape)
            n_rows = theta_shape[0]
            training_data = self._roles(theta, x)
        if len(theta_shape) != 2:
            raise ValueError(f"theta must have shape (n, D), got {theta_shape}")
        if theta_shape[0] != x_shape_full[0]:
            raise ValueError(f"theta has {theta_shape[0]} rows but x has {x_shape_full[0]}")
        if info:
            file_prior = prior_from_dict(info["prior_decoded"])
            if self.prior is None:
                self.prior = file_prior
            elif self.prior.to_dict() != file_prior.to_dict():
                warnings.warn("the training set was simulated from a different prior than the one given", stacklevel=2)
            self.metadata = {
                "simulator": info.get("simulator"),
                "simulator_config": info.get("simulator_config"),
                "observable_names": info.get("observable_names_decoded"),
                "n_simulations": info.get("n_simulations"),
                "seed": info.get("seed"),  # held-out data must not share it (see sbi-gen diagnose)
            }
        if self.prior is None:
            raise ValueError("no prior: pass prior= or train from an HDF5 training set, which records its prior")
        check_drawn_from_prior(self.prior, data if isinstance(data, (str, os.PathLike)) else None)
        # NPE learns the posterior under the prior its θ came from; NLE's likelihood does not
        # depend on it (θ from a wider proposal are fine there). A file's θ came from its prior.
        if not info and self.method == "npe":
            _check_inside_support(self.prior, theta)
        if theta_shape[1] != self.prior.dim:
            raise ValueError(f"theta has {theta_shape[1]} parameters but the prior has {self.prior.dim}")
        x_shape = x_shape_full[1:]
        # A given config decides the device (``"auto"`` included); without one, the model's device.
        config = checked_config(config) if config is not None else self.train_config()
        self.device = resolve_device(config.device)
        try:
            if self.auto:
                return self._fit_auto(training_data, x_shape, n_rows, config, state_path)
            if self.estimator is None or self.x_shape != x_shape:
                self.x_shape = x_shape
                self.estimator = self._seeded_build(x_shape, config)
            y_key, c_key = self._file_roles
            self.history = fit(
                self.estimator, training_data, config=config, y_key=y_key, c_key=c_key, state_path=state_path
            )
        except BaseException:
            # A failed or interrupted training leaves no half-trained estimator to sample from
            # (Ctrl-C after a validated epoch is not a failure: fit returns the best weights).
            self.estimator, self.x_shape, self.history = None, None, None
            raise
        self.estimator.to(self.device)
        return self.history

    def _fit_auto(
        self, training_data: Any, x_shape: tuple[int, ...], n_rows: int, config: TrainConfig, state_path: Any = None
    ) -> History:
        """Race the families of ``auto_families`` for a few epochs on the same split
        (``config.seed``), then train the one with the lower validation loss in full; the race's
        losses are in ``metadata["estimator_selection"]``, its length in
        ``metadata["estimator_race_epochs"]`` and its training time in
        ``metadata["estimator_race_seconds"]`` (the returned history is the winner's full training).
        A family whose training diverges (``FloatingPointError``) loses the race with a warning
        (its loss recorded as ``None``); if every family diverges, the first one's error is raised.
        Ctrl-C during the race ends it: the best family raced so far is kept as the race trained
        it (``history.interrupted``, ``metadata["estimator_race_interrupted"]``; families not
        raced are absent from the selection)."""
        assert self.prior is not None
        y_key, c_key = self._file_roles
        embedding = self.embedding if self.embedding is not None else default_embedding(x_shape)
        if embedding in AUTO_UNRACED_EMBEDDINGS:
            self._train_family(AUTO_FAMILY_UNRACED, training_data, x_shape, config, state_path)
            self.metadata.update(
                estimator_selection={}, estimator_race_epochs=0, estimator_race_seconds=0.0,
                estimator_race_interrupted=False,
                estimator_unraced=f"{embedding} embedding: each family would train its own {embedding.upper()}",
            )
            return self.history
        race_epochs = _race_epochs(n_rows, config)
        # A race as long as the whole training is the whole training: its winner is kept as it is.
        whole = race_epochs >= config.max_epochs
        race_config = config if whole else dataclasses.replace(config, max_epochs=race_epochs)
        # Every family, and the winner's full training, starts from the initial weights a fit of
        # that family alone would start from (config.seed's): the kept model is the one
        # ``NPE(prior, winner)`` would have trained.
        fitted, diverged = {}, {}
        interrupted = False
        # Each family's race keeps its training state (in memory), and the winner's full training
        # goes on from it instead of running the race's epochs again: a resumed training ends
        # exactly as an uninterrupted one (``fit``), so the kept model is the same. Not with a
        # cosine schedule (the race's shorter max_epochs shapes its learning rates) nor under
        # torchrun (no training states there); nor when the race is the whole training and no
        # state file is asked for (the raced winner is kept as it is).
        resumable = (
            config.lr_schedule != "cosine" and process_info().world_size == 1 and not (whole and state_path is None)
        )
        race_states = {name: InMemoryState() for name in self.auto_families} if resumable else {}
        race_started = time.perf_counter()
        for name in self.auto_families:
            estimator = self._seeded_build(x_shape, config, name)
            try:
                history = fit(estimator, training_data, config=race_config, y_key=y_key, c_key=c_key,
                              state_path=race_states.get(name))
            except FloatingPointError as error:  # a diverging family loses the race; the others may not diverge
                diverged[name] = error
                warnings.warn(f"estimator race: {name} diverged and is not kept ({error})", stacklevel=3)
                continue
            except KeyboardInterrupt:  # before this family's first epoch: the ones raced stand
                if not fitted:
                    raise
                interrupted = True
                warnings.warn(f"training interrupted before {name}'s first epoch: the race ends with "
                              f"{', '.join(fitted)} as raced", stacklevel=3)
                break
            fitted[name] = (history, estimator)
            if history.interrupted:
                interrupted = True
                break
        if not fitted:
            raise next(iter(diverged.values()))
        # A family whose validation loss is not finite is never kept over one that is.
        best = min(fitted, key=lambda name: _finite_or_inf(fitted[name][0].best_val_loss))
        race = {name: history.best_val_loss for name, (history, _) in fitted.items()}
        race_seconds = time.perf_counter() - race_started
        # A race as long as the whole training already trained the winner, except for the state
        # file a resumable run keeps: then the race's state is written there, and the winner's
        # training, resumed from it, has no epoch left to run.
        if interrupted or (whole and state_path is None):
            self.history, self.estimator = fitted[best]
            self.estimator_name, self.x_shape = best, x_shape
            self.history.interrupted = self.history.interrupted or interrupted
        else:
            winner_state = race_states.get(best)
            del fitted, race_states  # the race's models are dropped before the winner's full training
            self._train_family(best, training_data, x_shape, config, state_path, winner_state)
        # Validation losses by family, in auto_families order; None for a family that diverged
        # (strict JSON in the checkpoint's config, which has no infinity); families a Ctrl-C
        # kept from the race are left out.
        self.metadata["estimator_selection"] = {
            name: float(race[name]) if name in race and math.isfinite(race[name]) else None
            for name in self.auto_families
            if name in race or name in diverged
        }
        self.metadata["estimator_race_epochs"] = min(race_epochs, config.max_epochs)
        self.metadata["estimator_race_seconds"] = race_seconds
        self.metadata["estimator_race_interrupted"] = interrupted
        self.metadata.pop("estimator_unraced", None)
        self.estimator.to(self.device)
        return self.history

    def _train_family(
        self, name: str, training_data: Any, x_shape: tuple[int, ...], config: TrainConfig, state_path: Any = None,
        race_state: InMemoryState | None = None,
    ) -> None:
        """A fresh estimator of family ``name`` trained in full: what ``"auto"`` keeps. With
        ``race_state`` (the family's training state after the race), training goes on from
        there: written to ``state_path`` first when that is given and holds no state yet (one
        that does is resumed as it is)."""
        assert self.prior is not None
        y_key, c_key = self._file_roles
        if race_state is not None:
            if state_path is None:
                race_state.recording = False  # nothing later reads the epochs after the race
                state_path = race_state
            elif not Path(state_path).exists():
                race_state.write(state_path)
        self.estimator_name, self.x_shape = name, x_shape
        self.estimator = self._seeded_build(x_shape, config, name)
        self.history = fit(
            self.estimator, training_data, config=config, y_key=y_key, c_key=c_key, state_path=state_path
        )
        self.estimator.to(self.device)

    def _seeded_build(self, x_shape: tuple[int, ...], config: TrainConfig, name: str | None = None) -> ConditionalEstimator:
        """A fresh estimator whose initial weights come from ``config.seed`` (not from torch's
        global state, which differs from process to process)."""
        assert self.prior is not None
        with seeded_torch(config.seed, "weights"):
            return self._build(self.prior.dim, x_shape, name)

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The estimator family's recommended :class:`~sbi_gen.train.TrainConfig` on this model's
        device, with ``overrides`` (any ``TrainConfig`` field) applied.

        Example:
            >>> NPE(None, "diffusion").train_config(progress=False).progress
            False
        """
        defaults = ESTIMATORS[self.auto_families[0] if self.auto else self.estimator_name].training_defaults
        return TrainConfig(**{"device": str(self.device), **defaults, **overrides})

    def _require_fitted(self) -> ConditionalEstimator:
        if self.estimator is None or self.x_shape is None:
            raise RuntimeError(f"this {self.method.upper()} is not trained yet: call .fit(data) first")
        return self.estimator

    def _observations(self, x_obs: Any, allow_many: bool) -> Tensor:
        self._require_fitted()
        assert self.x_shape is not None
        x = torch.as_tensor(np.asarray(x_obs) if not isinstance(x_obs, Tensor) else x_obs, dtype=torch.float32)
        if self.x_shape == (1,) and x.ndim <= 1:
            x = x.reshape(-1, 1)  # one observable: a number, or a vector of k observations
        if tuple(x.shape) == self.x_shape:
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) == self.x_shape and x.shape[0] > 1 and not allow_many:
            raise ValueError(
                f"x_obs holds {x.shape[0]} observations of shape {self.x_shape}, but {self.method.upper()} conditions "
                "on one; for several i.i.d. observations of one θ, train NLE, whose likelihoods add"
            )
        if tuple(x.shape[1:]) != self.x_shape or (x.shape[0] != 1 and not allow_many):
            expected = f"{self.x_shape}" + (f" or (n_obs, {', '.join(map(str, self.x_shape))})" if allow_many else "")
            raise ValueError(f"x_obs has shape {tuple(x.shape)}, but the model was trained on observations of shape {expected}")
        if len(x) == 0:
            raise ValueError("x_obs holds no observation")
        if not torch.isfinite(x).all():
            raise ValueError("x_obs contains NaN or infinite values")
        return x.to(self.device)

    def to(self, device: str | torch.device) -> _Method:
        """Move the model to ``device`` (``"cpu"``, ``"cuda"``)."""
        self.device = resolve_device(device)
        if self.estimator is not None:
            self.estimator.to(self.device)
        return self

    def __repr__(self) -> str:
        state = "trained" if self.estimator is not None else "untrained"
        return f"{type(self).__name__}(estimator={self.estimator_name!r}, prior={self.prior!r}, {state})"


class NPE(_Method):
    r"""Neural posterior estimation: :math:`q(\theta \mid x)` trained on (θ, x) pairs.

    Posterior samples never leave the prior's support: draws outside are rejected (or, with
    ``bijection=True``, the estimator lives in the prior's unconstrained space and none fall
    outside); maps get a CNN embedding by default.
    With ``config`` given to :meth:`fit`, its ``device`` is where training (and the model) goes.

    Arguments:
        prior: The prior (``None``: taken from the HDF5 file given to :meth:`fit`).
        estimator: Name in :data:`sbi_gen.estimators.ESTIMATORS`, or ``"auto"`` (``None``, the
            default): NSF, MAF and the linear Gaussian raced for the first few epochs on the
            same split, the one with the lower validation loss then trained in full
            (:data:`AUTO_FAMILIES`; the race's losses in ``metadata["estimator_selection"]``).
            Default by measurement, 10,000 simulations, ``benchmarks/compare_sbi.py``: the race
            keeps the linear Gaussian on gaussian_linear (a Gaussian posterior with a mean
            linear in x: C2ST 0.499 ± 0.001 over 4 replicate seeds, where the NSF alone gave
            0.536 ± 0.006 and the MAF 0.525 ± 0.003) and the NSF on two_moons and slcp. Maps (a CNN embedding) are not
            raced: ``"auto"`` trains the NSF there (:data:`AUTO_UNRACED_EMBEDDINGS`;
            ``metadata["estimator_unraced"]`` says why).
        embedding: Embedding of x (``None``: the z-scored vector itself, a CNN for maps).
        estimator_kwargs: Hyperparameters of the estimator.
        embedding_kwargs: Hyperparameters of the embedding.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        bijection: ``False`` (default): θ is z-scored as it is, and draws outside the prior's
            support are rejected (with the acceptance estimate and the leakage warning of
            :class:`NPEPosterior`; ``log_prob`` is renormalized by that share). ``True``: θ is
            modelled in the prior's unconstrained space (a logit per bounded side, the
            log-Jacobian included), so no draw can leave the support and nothing is rejected.
            Default by measurement, 10,000 simulations: ``benchmarks/compare_sbi.py`` (4
            replicate seeds × 4 observations) gave C2ST 0.529 ± 0.008 without the bijection
            against 0.547 ± 0.009 with it on two_moons (lower on every seed), 0.852 against
            0.855 on slcp; ``benchmarks/study_nsf_defaults.py`` (its own 4 observations × 4
            training seeds) 0.546 against 0.558 and 0.862 against 0.872, lower on every seed of
            both. Matching the logit space's z-scoring to θ's in the bulk did not close the gap
            (two_moons 0.553–0.571 on three seeds): the warp itself costs. Gaussian priors are
            unbounded: no difference.
    """

    method = "npe"
    default_estimator = AUTO

    def __init__(self, prior: Prior | None = None, estimator: str | None = None, *, bijection: bool = False, **kwargs: Any):
        super().__init__(prior, estimator, **kwargs)
        self.bijection = bool(bijection)

    def _roles(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return theta, x

    def _build(self, theta_dim: int, x_shape: tuple[int, ...], name: str | None = None) -> ConditionalEstimator:
        assert self.prior is not None
        return build_estimator(
            name or self.estimator_name,
            theta_dim,
            x_shape,
            embedding=self.embedding,
            embedding_kwargs=self.embedding_kwargs or None,
            y_prior=self.prior.to_dict() if self.bijection else None,
            **self.estimator_kwargs,
        ).to(self.device)

    def posterior(self, x_obs: Any) -> NPEPosterior:
        """The posterior distribution given one observation ``x_obs`` of the training shape."""
        return NPEPosterior(self, self._observations(x_obs, allow_many=False))

    @torch.no_grad()
    def sample_batched(self, x: Any, n: int, batch_size: int = 256) -> Tensor:
        """``n`` posterior samples for each of many observations: ``x`` (B, *x_shape) → (n, B, D).

        One batched pass per group of ``batch_size`` observations (used by the diagnostics).
        """
        estimator = self._require_fitted()
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32)
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {', '.join(map(str, self.x_shape or ()))})")
        out = [self._draw_inside(estimator(x[i : i + batch_size].to(self.device)), n) for i in range(0, len(x), batch_size)]
        return torch.cat(out, dim=1)

    def inside_support(self, theta: Tensor) -> Tensor:
        """Whether each θ of ``(*batch, D)`` lies in the prior's support: a bool ``(*batch)`` on θ's device."""
        assert self.prior is not None
        log_prior = self.prior.log_prob(theta.reshape(-1, self.prior.dim).cpu())
        return torch.isfinite(log_prior).reshape(theta.shape[:-1]).to(theta.device)

    def _draw_inside(self, dist: Distribution, n: int, max_rounds: int = 20) -> Tensor:
        """``n`` draws per observation of a batched ``dist``, inside the prior's support.

        Without the bijection, draws outside are replaced by the next draws inside for the same
        observation: each round draws, for every observation, enough to fill the holes of the one
        that needs most at its own acceptance so far (plus 10 %), at most ``10 n + 100``.
        """
        draws = _sample_in_passes(dist, n, self.device)
        if self.bijection:
            return draws
        outside = ~self.inside_support(draws)
        # Per observation: one that leaks badly must not wait on the acceptance of the others.
        drawn, kept = torch.full(outside.shape[1:], n, dtype=torch.float64), (~outside).sum(0).double().cpu()
        for _ in range(max_rounds):
            holes = outside.sum(0)
            if not bool(holes.any()):
                return draws
            acceptance = (kept / drawn).clamp_min(1e-3)
            needed = float((holes.double().cpu() / acceptance).max())
            # Capped so that a badly leaking batch costs rounds (then the error below), not memory.
            extra = _sample_in_passes(dist, min(math.ceil(1.1 * needed) + 10, 10 * n + 100), self.device)
            inside_extra = self.inside_support(extra)
            outside_extra = ~inside_extra
            drawn, kept = drawn + len(extra), kept + inside_extra.sum(0).double().cpu()
            # The r-th hole of a column takes the column's r-th new draw inside the support.
            order = torch.argsort(outside_extra.to(torch.int8), dim=0, stable=True)
            rank = (torch.cumsum(outside.to(torch.int64), dim=0) - 1).clamp(0, len(extra) - 1)
            source = order.gather(0, rank)
            filled = outside & (rank < inside_extra.sum(0))
            candidates = extra.gather(0, source.unsqueeze(-1).expand(-1, -1, draws.shape[-1]))
            draws = torch.where(filled.unsqueeze(-1), candidates, draws)
            outside = outside & ~filled
        worst = float((kept / drawn).min())
        raise RuntimeError(
            f"posterior draws kept falling outside the prior's support ({100 * worst:.2g}% inside for the worst "
            f"observation, {100 * float(kept.sum() / drawn.sum()):.1f}% overall); "
            "the estimator is badly trained for some observations (NPE(..., bijection=True) never leaves the support)"
        )


class _DrawnPosterior(Distribution):
    """What a posterior known through its draws and density has no closed form for: each says
    what to use instead, rather than torch's bare ``NotImplementedError``."""

    @property
    def mean(self) -> Tensor:
        raise NotImplementedError("this posterior has no closed-form mean: use posterior.sample((n,)).mean(0)")

    @property
    def variance(self) -> Tensor:
        raise NotImplementedError("this posterior has no closed-form variance: use posterior.sample((n,)).var(0)")

    def entropy(self) -> Tensor:
        raise NotImplementedError("this posterior has no closed-form entropy: estimate -log_prob(sample((n,))).mean()")

    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        raise NotImplementedError("this posterior's draws are not reparameterized (rejection or MCMC): use sample()")


class NPEPosterior(_DrawnPosterior):
    r"""Posterior :math:`q(\theta \mid x_{obs})` of an :class:`NPE`, restricted to the prior's support.

    ``sample`` draws from the estimator and keeps draws inside the support (with the prior's
    bijection built in, all of them); :attr:`acceptance` is the share kept by the last call.
    ``log_prob`` is the estimator's normalized density, renormalized by its mass inside the
    support, estimated once from 8,192 draws with a fixed seed (so it is the same on every call
    and for a reloaded model; the global random state is left as it was).
    """

    arg_constraints: dict = {}

    def __init__(self, npe: NPE, x_obs: Tensor):
        assert npe.prior is not None and npe.estimator is not None
        self.npe = npe
        self.prior = npe.prior
        self.x_obs = x_obs
        self._q = npe.estimator(x_obs[0])
        # With the prior's bijection inside the estimator no mass leaks out of the support.
        bounded = npe.estimator.config().get("y_prior") is not None
        self.acceptance: float | None = 1.0 if bounded else None
        self._log_mass: float | None = 0.0 if bounded else None
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([self.prior.dim]), validate_args=False)

    @property
    def support(self) -> Any:
        return self.prior.support

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | Sequence[int] | int = torch.Size()) -> Tensor:
        shape = _sample_shape(sample_shape)
        n = math.prod(shape)
        if n == 0:
            return torch.empty(*shape, self.prior.dim, device=self.x_obs.device)
        accepted: list[Tensor] = []
        drawn = kept = 0
        while kept < n:
            # Each round draws what the acceptance so far says is missing, plus 10 %.
            size = n if not drawn else min(math.ceil(1.1 * (n - kept) / max(kept / drawn, 0.01)) + 100, 10 * n + 10_000)
            batch = _sample_in_passes(self._q, size, self.x_obs.device)
            inside = self.npe.inside_support(batch)
            accepted.append(batch[inside])
            drawn += len(batch)
            kept += int(inside.sum())
            if drawn >= 10_000 and kept / drawn < _LEAKAGE_FAIL:
                raise RuntimeError(
                    f"only {kept} of {drawn} posterior samples fell inside the prior's support; "
                    "the estimator is badly trained for this observation"
                )
        self.acceptance = kept / drawn
        if self.acceptance < _LEAKAGE_WARN:
            warnings.warn(f"only {100 * self.acceptance:.1f}% of posterior samples fell inside the prior's support", stacklevel=2)
        return torch.cat(accepted)[:n].reshape(*shape, self.prior.dim)

    @torch.no_grad()
    def log_prob(self, theta: Tensor) -> Tensor:
        theta = _parameter_rows(theta, self.prior, self.x_obs.device)
        log_q = self._q.log_prob(theta)
        if self._log_mass is None:
            devices = [self.x_obs.device] if self.x_obs.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                draws = self._q.sample((8192,))
            self._log_mass = math.log(max(float(self.npe.inside_support(draws).float().mean()), 1e-12))
        log_q = log_q - self._log_mass
        return torch.where(self.npe.inside_support(theta), log_q, torch.full_like(log_q, -math.inf))


class NLE(_Method):
    r"""Neural likelihood estimation: :math:`q(x \mid \theta)`, sampled by MCMC.

    The posterior of one or several i.i.d. observations is
    :math:`p(\theta \mid x_{1..m}) \propto p(\theta) \prod_i q(x_i \mid \theta)`.

    Arguments:
        prior: The prior (``None``: taken from the HDF5 file given to :meth:`fit`).
        estimator: Name in :data:`sbi_gen.estimators.ESTIMATORS`, or ``"auto"`` (``None``, the
            default): the MAF and the linear Gaussian (:data:`NLE_AUTO_FAMILIES`) raced as in
            :class:`NPE`, the one with the lower validation loss trained in full. With
            ``estimator_kwargs`` and no name, the MAF.
        embedding: Embedding of θ (``None``: the z-scored vector itself).
        estimator_kwargs: Hyperparameters of the estimator.
        embedding_kwargs: Hyperparameters of the embedding.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    method = "nle"
    # A masked autoregressive (affine) flow by default: many likelihoods are close to Gaussian
    # in x given θ, which affine transforms fit exactly, and MCMC evaluates it thousands of
    # times. 10,000 simulations, 4 observations × 2 training seeds, default sampler, measured
    # when the maf still trained with plain TrainConfig: C2ST gaussian_linear maf 0.514 / 0.522
    # vs nsf 0.535 / 0.545 (sbi's NLE 0.526), two_moons maf 0.531 / 0.536 vs nsf 0.523 / 0.519
    # (sbi's 0.601); maf trains 2–4× and samples 2–4× faster. With the NSF's training defaults,
    # now its own, the maf reached 0.515 on two_moons (4 seeds; see ``posterior``). Raced against
    # the linear Gaussian (``"auto"``, the default; 10,000 simulations, seed 0): the maf is kept on
    # two_moons and slcp (the same models), the Gaussian on gaussian_linear, whose likelihood is
    # exactly linear-Gaussian: C2ST 0.498 against the maf's 0.525 (sbi's 0.523).
    default_estimator = AUTO
    auto_families = NLE_AUTO_FAMILIES
    family_for_kwargs = "maf"  # NLE's default before the race: its hyperparameters still mean the MAF's
    _file_roles = ("x", "theta")

    def _roles(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, theta

    def _build(self, theta_dim: int, x_shape: tuple[int, ...], name: str | None = None) -> ConditionalEstimator:
        if len(x_shape) != 1:
            raise ValueError(
                f"NLE models vector observations; these have shape {x_shape}. "
                "Use NPE (with a CNN embedding) for maps, or train NLE on summaries."
            )
        return build_estimator(
            name or self.estimator_name,
            x_shape[0],
            (theta_dim,),
            embedding=self.embedding,
            embedding_kwargs=self.embedding_kwargs or None,
            **self.estimator_kwargs,
        ).to(self.device)

    def posterior(
        self,
        x_obs: Any,
        *,
        sampler: str = "imh",
        n_chains: int | None = None,
        warmup: int | None = None,
        thin: int | None = None,
        seed: int = 0,
    ) -> NLEPosterior:
        r"""The posterior given ``x_obs``: one observation ``x_shape`` or several i.i.d. ``(m, *x_shape)``.

        Sampling options go to :func:`sbi_gen.mcmc.run_mcmc` (``sampler="hmc"`` differentiates
        through the estimator). The default sampler is population-adapted independence
        Metropolis-Hastings (:func:`sbi_gen.mcmc.imh_sample`): one likelihood row per chain and
        step where slice sampling needs about 5 per dimension, and global proposals (a kernel
        density estimate, a Gaussian and a Gaussian mixture fitted to the chains, weighted by how
        well each covers the target) that jump between modes.

        ``n_chains=None`` runs ``clip(n / 40, 100, 250)`` chains for ``n`` draws with ``imh``
        (the population is the proposal; 40 kept draws per chain keep :math:`\hat R`
        meaningful), 100 otherwise; ``warmup=None`` is 60 steps with ``imh`` and 100 otherwise
        (slice and HMC adapt their frame over it); ``thin=None`` lets ``imh`` keep every
        :math:`\lceil 1/a \rceil`-th step (2 to 20) for a warm-up acceptance :math:`a`, so that
        a chain moves about once between kept draws, and keeps every step otherwise. Measured
        with ``benchmarks/compare_sbi.py`` (maf likelihood with its training defaults, 10,000
        simulations, 4 replicate seeds × 4 observations, 10,000 draws each, one thread): C2ST
        0.515 ± 0.005 / 0.726 ± 0.027 / 0.518 ± 0.001 in 1.02 / 1.13 / 1.06 s per observation on
        two_moons / slcp / gaussian_linear, against 0.597 ± 0.007 / 0.731 ± 0.030 / 0.523 ± 0.004
        in 15.4 / 36.8 / 76 s for sbi's default NLE on the same simulations and observations
        (one earlier seed on slcp with sbibm's 10,000-draw C2ST: 0.796 against 0.800). Trained
        with plain :class:`~sbi_gen.train.TrainConfig` instead, the MAF gave 0.529 / 0.741 /
        0.518 (paired differences of the defaults −0.014 ± 0.008, −0.015 ± 0.009, 0.000 ±
        0.003) and trained in 37.9 / 26.3 / 6.6 s against 37.1 / 25.4 / 2.8 s.
        On slcp (four sign-degenerate modes, each much narrower than their spread) the mixture
        part raised the acceptance from 0.10–0.27 to 0.27–0.44 and, on one trained likelihood,
        gave the slice sampler's answer (C2ST 0.915 vs 0.917 at the hardest observation) 13
        times faster.
        Where the acceptance (``posterior.mcmc.acceptance``) stays below about 0.1 the draws
        are strongly correlated: check with ``sampler="slice"``.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
        for name, value, least in (("n_chains", n_chains, 1), ("warmup", warmup, 0), ("thin", thin, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an integer of at least {least} (or None for the default), got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return NLEPosterior(self, self._observations(x_obs, allow_many=True), sampler, n_chains, warmup, thin, seed)

    def log_likelihood(self, theta: Tensor, x_obs: Tensor) -> Tensor:
        """:math:`\\sum_i \\log q(x_i \\mid \\theta)`: θ (C, D), x_obs (m, dx) → (C,)."""
        estimator = self._require_fitted()
        theta = torch.as_tensor(theta, dtype=torch.float32).to(self.device)
        dist = estimator(theta)  # batch (C,)
        return dist.log_prob(x_obs.to(self.device).unsqueeze(1)).sum(0)


class NLEPosterior(_DrawnPosterior):
    r"""Posterior of an :class:`NLE` given i.i.d. observations; sampled by vectorized MCMC.

    ``log_prob`` is the *unnormalized* log posterior :math:`\log p(\theta) + \sum_i \log q(x_i \mid \theta)`.
    Each ``sample`` call runs fresh chains (seeded ``seed``, ``seed + 1``, ...); the last run's
    diagnostics (R-hat, effective sample size) are in :attr:`mcmc`.
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        nle: NLE,
        x_obs: Tensor,
        sampler: str,
        n_chains: int | None,
        warmup: int | None,
        thin: int | None,
        seed: int,
    ):
        assert nle.prior is not None
        self.nle = nle
        self.prior = nle.prior
        self.x_obs = x_obs
        self.sampler, self.n_chains, self.warmup, self.thin = sampler, n_chains, warmup, thin
        self.seed = seed
        self.mcmc: MCMCResult | None = None
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([self.prior.dim]), validate_args=False)

    @property
    def support(self) -> Any:
        return self.prior.support

    def log_prob(self, theta: Tensor) -> Tensor:
        theta = _parameter_rows(theta, self.prior)
        return self._log_posterior(theta.reshape(-1, self.prior.dim)).reshape(theta.shape[:-1])

    def _log_posterior(self, flat: Tensor) -> Tensor:
        """``log_prob`` of ``(N, D)`` rows without the checks of a user's θ: MCMC's potential,
        called every step, for which a NaN proposal is a rejected one (``mcmc`` maps NaN to -inf)."""
        flat = flat.to(device="cpu", dtype=torch.float32)
        log_prior = self.prior.log_prob(flat)
        inside = torch.isfinite(log_prior)
        out = torch.full((len(flat),), -math.inf)
        if inside.any():
            with torch.set_grad_enabled(self.sampler == "hmc" and torch.is_grad_enabled()):
                log_lik = self.nle.log_likelihood(flat[inside], self.x_obs).cpu()
            out = out.masked_scatter(inside, log_prior[inside] + log_lik)
        return out

    def sample(self, sample_shape: torch.Size | Sequence[int] | int = torch.Size()) -> Tensor:
        shape = _sample_shape(sample_shape)
        if math.prod(shape) == 0 and len(shape) > 0:
            return torch.empty(*shape, self.prior.dim)
        n = max(math.prod(shape), 1)
        imh = self.sampler == "imh"
        n_chains = self.n_chains or (min(max(n // 40, 100), 250) if imh else 100)
        warmup = self.warmup if self.warmup is not None else (60 if imh else 100)
        thin = self.thin if self.thin is not None else (None if imh else 1)
        self.mcmc = run_mcmc(
            self._log_posterior,
            self.prior,
            n,
            n_chains=n_chains,
            warmup=warmup,
            thin=thin,
            sampler=self.sampler,
            seed=self.seed,
        )
        self.seed += 1
        return self.mcmc.samples[:n].reshape(*shape, self.prior.dim)
