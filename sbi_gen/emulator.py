r"""Learned emulators of a map simulator, :math:`p(\mathrm{map} \mid \theta)`, and their physics check.

A :class:`MapEmulator` draws maps for given parameters far faster than a simulator that
is expensive, from a generative model trained on simulated (θ, map) pairs:

- ``"diffusion"`` (:class:`DiffusionMaps`): a conditional score-based diffusion model on the
  VP-SDE of :mod:`sbi_gen.estimators.diffusion`, whose noise predictor is a small
  :class:`~sbi_gen.nn.UNet` with circular padding (the maps are periodic), conditioned on
  time and θ by FiLM;
- ``"vae"`` (:class:`VAEMaps`): a convolutional conditional VAE with a Gaussian decoder.

The emulator owns its standardization (θ per parameter, maps by one global mean and standard
deviation) and has ``set_standardization(y, c)`` and ``loss(y, c)`` with ``y`` the maps and ``c``
θ, so :func:`sbi_gen.train.fit` trains it like any estimator (``y_key="x", c_key="theta"``);
:func:`train_emulator` does exactly that from an HDF5 training set. It is not a
:class:`~sbi_gen.estimators.ConditionalEstimator`: it has no density, only samples.

Quality is judged by physics: :func:`compare_power_spectra` compares the binned power
spectra of emulated and simulated maps at the same θ, with the standard error of their
ratio from the sample variances; :func:`plot_emulated_maps` shows both side by side.

Example:
    >>> import torch
    >>> emulator = MapEmulator("diffusion", (16, 16), 3, {"channels": [8, 8], "sampler_steps": 4})
    >>> maps, theta = torch.randn(64, 16, 16), torch.rand(64, 3)
    >>> emulator.set_standardization(maps, theta)
    >>> loss = emulator.loss(maps[:8], theta[:8])  # minimize this
    >>> emulator.sample(theta[0], 3, seed=0).shape
    torch.Size([3, 16, 16])
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from sbi_gen.estimators.diffusion import SAMPLERS, DiffusionTimeEmbedding, VPSchedule
from sbi_gen.nn import MLP, UNet
from sbi_gen.store import read_info
from sbi_gen.train import History, TrainConfig, fit, seeded_torch

__all__ = [
    "FAMILIES",
    "DiffusionMaps",
    "MapEmulator",
    "PixelComparison",
    "SpectrumComparison",
    "VAEMaps",
    "compare_pixel_histograms",
    "compare_power_spectra",
    "emulator_train_config",
    "plot_emulated_maps",
    "train_emulator",
]

# Relative floor of a standard deviation used for z-scoring (as the estimators').
_STD_FLOOR = 1e-6
# Training rows whose mean periodogram initializes the spectral base of a diffusion emulator.
_SPECTRUM_FIT_ROWS = 20_000
# Seed of the noise of the loss in eval mode: validation losses of successive epochs use common
# random numbers, so that early stopping compares models rather than draws.
_VALIDATION_SEED = 20_240_602


def _seeded(module: nn.Module, like: Tensor) -> torch.Generator | None:
    """``None`` (torch's global generator) in training mode, a fixed-seed generator in eval mode."""
    if module.training:
        return None
    return torch.Generator(device=like.device).manual_seed(_VALIDATION_SEED)


class DiffusionMaps(nn.Module):
    r"""Conditional diffusion model of standardized maps given standardized θ.

    Noise predictor :math:`\epsilon(x_t, t, \theta) = W_{t,\theta} (x_t - \alpha_t m_\theta) + \mathrm{UNet}(x_t; [e(t), \theta])`.
    The base :math:`W_{t,\theta}` (``spectral_base=True``) is the exact noise predictor of a
    homogeneous isotropic Gaussian field of mean level :math:`m_\theta`: in Fourier space the gain
    :math:`\sigma / (\alpha^2 P_\theta(|k|) + \sigma^2)` per mode, with the log power
    :math:`\ln P_\theta` per shell of equal :math:`|k|` and the level :math:`m_\theta` MLPs of
    θ, fitted by Whittle's likelihood of the clean maps' periodograms (added to the loss) as well
    as by the denoising loss; the U-Net starts almost silent and learns the departures
    (non-Gaussianity). The level matters for maps whose mean moves with θ, such as the log of
    a lognormal field (mean :math:`-\sigma_g^2(\theta)/2`; see ``pixel_transform`` of
    :class:`MapEmulator`): left to the U-Net it came out 3–4 standard errors off at two of four
    held-out θ, and the pixel histograms there were distinguishable from the simulator's. With
    ``spectral_base=False`` the base is :math:`\sigma(t) x_t`, exact only for white maps.

    Why: the denoising loss weighs every Fourier mode alike, and the few large-scale modes of a
    map hardly count in it, so a U-Net alone learned their power poorly. On 16 x 16 Gaussian
    maps (3,000 simulations, 12 epochs, channels (16, 32)) without the spectral base the mean
    emulated spectrum was off by up to 21 % in the lowest multipole bin, and by 8–15 % elsewhere
    at some θ (``benchmarks/bench_emulator.py``). With the spectral base (initialized at the
    training maps' mean periodogram, :meth:`initialize_spectrum`), at 4 held-out θ every bin
    above the lowest is within 6 %, but the lowest bin (the fundamental modes) was still 14–23 %
    low. The spectral base was right there (sampled with the U-Net silenced: 0.95–1.03); the
    U-Net's last raw weights damped the fundamental modes, which weigh little in its loss. A
    weight average (``training_defaults``: ``ema_decay=0.999``, validated and restored as for
    the flows) removes that: same data, same 12 epochs, lowest bin 1.01–1.07 at the same 4 θ,
    every bin within 10 %.

    Trained by the denoising loss with stratified :math:`t` and sampled by any of
    :data:`sbi_gen.estimators.diffusion.SAMPLERS` (default: Heun on the probability-flow ODE,
    32 steps = 64 U-Net evaluations; with the exact score of a Gaussian its error is below
    1e-3 standard deviations, while DDPM at the same cost narrows distributions by 2–3 %).

    Arguments:
        map_shape: ``(H, W)``; both divisible by ``2 ** (len(channels) - 1)``.
        theta_dim: Number of parameters.
        channels: U-Net channels per level.
        blocks: Residual blocks per U-Net level.
        embedding: Size of the U-Net's conditioning embedding.
        time_features: Size of the time embedding.
        beta_min: :math:`\beta(0)` of the VP-SDE.
        beta_max: :math:`\beta(1)`.
        t_min: Smallest diffusion time.
        sampler: Key of ``SAMPLERS``.
        sampler_steps: Steps of the sampler (``None``: 32 for ``"heun"``, the function's default otherwise).
        spectral_base: Use the learned Gaussian-field base above (maps must be statistically
            homogeneous and isotropic for it to help; it is exact only for Gaussian ones).
    """

    # TrainConfig fields this family trains best with (see above); train_emulator and the CLI use them.
    training_defaults: ClassVar[dict[str, Any]] = {"ema_decay": 0.999}

    def __init__(
        self,
        map_shape: Sequence[int],
        theta_dim: int,
        *,
        channels: Sequence[int] = (32, 64, 64),
        blocks: int = 1,
        embedding: int = 64,
        time_features: int = 32,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_min: float = 1e-3,
        sampler: str = "heun",
        sampler_steps: int | None = None,
        spectral_base: bool = True,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
        self.map_shape = tuple(int(s) for s in map_shape)
        self.channels = [int(c) for c in channels]
        self.blocks, self.embedding, self.time_features = int(blocks), int(embedding), int(time_features)
        self.schedule = VPSchedule(float(beta_min), float(beta_max), float(t_min))
        self.sampler = str(sampler)
        self.sampler_steps = None if sampler_steps is None else int(sampler_steps)
        self.spectral_base = bool(spectral_base)
        self.time = DiffusionTimeEmbedding(self.time_features)
        self.unet = UNet(
            1,
            1,
            self.channels,
            cond_features=self.time_features + int(theta_dim),
            embedding=self.embedding,
            blocks=self.blocks,
        )
        if self.spectral_base:
            shell, n_shells = _radial_shells(self.map_shape)
            self.register_buffer("shell", shell, persistent=False)
            self.spectrum = MLP(int(theta_dim), n_shells, hidden=(self.embedding, self.embedding))
            # The maps' mean level given θ (the k = 0 mode's mean): zero for Gaussian fields, but
            # the log of a lognormal field has mean -sigma_g^2(θ) / 2.
            self.level = MLP(int(theta_dim), 1, hidden=(self.embedding,))
            # Start near white maps (log power 0), where the base is the former sigma(t) x_t.
            with torch.no_grad():
                self.spectrum[-1].weight.mul_(0.1)
                self.spectrum[-1].bias.zero_()
                self.level[-1].weight.mul_(0.1)
                self.level[-1].bias.zero_()
                # The U-Net starts almost silent, so the model starts as the Gaussian field's
                # exact predictor and the U-Net learns departures from it (not exactly zero, so
                # that every weight gets a gradient from the first step).
                self.unet.head[-1].weight.mul_(0.01)
                self.unet.head[-1].bias.zero_()

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "channels": list(self.channels),
            "blocks": self.blocks,
            "embedding": self.embedding,
            "time_features": self.time_features,
            "beta_min": self.schedule.beta_min,
            "beta_max": self.schedule.beta_max,
            "t_min": self.schedule.t_min,
            "sampler": self.sampler,
            "sampler_steps": self.sampler_steps,
            "spectral_base": self.spectral_base,
        }

    @torch.no_grad()
    def initialize_spectrum(self, maps: Tensor) -> None:
        """Start the spectral base at the mean periodogram per shell of standardized training maps ``(n, H, W)``.

        That is the maximum-likelihood spectrum ignoring θ; training then learns its θ
        dependence (from a bias of 0, log powers of several units take an optimizer thousands
        of steps).
        """
        if not self.spectral_base:
            return
        total = torch.zeros(self.shell.shape, dtype=torch.float64, device=self.shell.device)
        for chunk in maps[:_SPECTRUM_FIT_ROWS].split(1024):
            total += torch.fft.rfft2(chunk.double().to(total.device)).abs().square().sum(0)
        per_mode = (total / (min(len(maps), _SPECTRUM_FIT_ROWS) * math.prod(self.map_shape))).flatten()
        shells = torch.zeros(int(self.shell.max()) + 1, dtype=torch.float64, device=total.device)
        counts = torch.zeros_like(shells)
        shells.index_add_(0, self.shell.flatten(), per_mode)
        counts.index_add_(0, self.shell.flatten(), torch.ones_like(per_mode))
        bias = self.spectrum[-1].bias
        bias.copy_((shells / counts).clamp_min(1e-12).log().to(bias))

    def log_power(self, theta: Tensor) -> Tensor:
        """Learned log power per Fourier mode of standardized maps, θ ``(B, d)`` → ``(B, H, W // 2 + 1)`` (rfft2 grid)."""
        if not self.spectral_base:
            raise ValueError("this diffusion emulator has no spectral base (spectral_base=False)")
        return self.spectrum(theta)[:, self.shell]

    def eps(self, x: Tensor, t: Tensor, theta: Tensor) -> Tensor:
        """Predicted noise: maps ``(B, H, W)``, times ``(B,)``, θ ``(B, d)`` → ``(B, H, W)``."""
        cond = torch.cat([self.time(t).to(x.dtype), theta], dim=-1)
        sigma = self.schedule.sigma(t)[:, None, None]
        if self.spectral_base:
            # The exact noise predictor of a Gaussian field of mean level m(θ): per mode
            # sigma / (alpha^2 P + sigma^2) of x_t - alpha m (a constant: only the k = 0 mode).
            alpha = self.schedule.alpha(t)[:, None, None]
            gain = sigma / (alpha.square() * self.log_power(theta).exp() + sigma.square())
            centred = x - alpha * self.level(theta)[:, :, None]
            base = torch.fft.irfft2(gain * torch.fft.rfft2(centred), s=self.map_shape)
        else:
            base = sigma * x
        return base + self.unet(x[:, None], cond)[:, 0]

    def loss(self, x: Tensor, theta: Tensor) -> Tensor:
        """Denoising loss on standardized maps ``(B, H, W)`` and θ ``(B, d)``."""
        generator = _seeded(self, x)
        t = self.schedule.sample_time(x.shape[0], x, generator)
        x_t, noise = self.schedule.noise(x, t, generator)
        denoising = (self.eps(x_t, t, theta) - noise).square().mean()
        if not self.spectral_base:
            return denoising
        # Whittle's negative log-likelihood of the clean maps' periodogram: the spectrum is fitted
        # to every mode of every map directly, not only through its small share of the denoising loss.
        periodogram = torch.fft.rfft2(x - self.level(theta)[:, :, None]).abs().square() / math.prod(self.map_shape)
        log_power = self.log_power(theta)
        return denoising + (log_power + periodogram * torch.exp(-log_power)).mean()

    def sample(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One standardized map per row of standardized θ ``(B, d)`` → ``(B, H, W)``."""
        noise = _randn((theta.shape[0], *self.map_shape), theta, generator)
        steps = self.sampler_steps or (32 if self.sampler == "heun" else None)
        options: dict[str, Any] = {"generator": generator}
        if steps is not None:
            options["steps"] = steps
        return SAMPLERS[self.sampler](self.eps, self.schedule, noise, theta, **options)


class VAEMaps(nn.Module):
    r"""Convolutional conditional VAE of standardized maps given standardized θ.

    Encoder :math:`q(z \mid x, \theta)`: the map with θ broadcast as extra constant channels,
    through levels of two circular 3 x 3 convolutions and 2 x 2 average pooling, then a linear
    layer to the mean and log-variance of a diagonal Gaussian. Decoder
    :math:`p(x \mid z, \theta) = \mathcal{N}(\mu(z, \theta), s^2(\theta) I)`: a linear layer from
    :math:`[z, \mathrm{MLP}(\theta)]` to the coarsest level, then nearest upsampling and circular
    convolutions; the pixel variance :math:`s^2(\theta)` is learned (an MLP of θ), so its white
    noise can stand for the shape noise of the maps and for the small scales the latent code
    misses. The loss is the negative ELBO per pixel (single-sample reparametrization);
    samples are :math:`\mu(z, \theta) + s(\theta)\epsilon` with :math:`z \sim \mathcal{N}(0, I)`.

    Arguments:
        map_shape: ``(H, W)``; both divisible by ``2 ** (len(channels) - 1)``.
        theta_dim: Number of parameters.
        channels: Channels per level, from full resolution down.
        latent_features: Dimension of :math:`z`.
        embedding: Size of the θ embedding of the decoder.
    """

    training_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        map_shape: Sequence[int],
        theta_dim: int,
        *,
        channels: Sequence[int] = (32, 64, 64),
        latent_features: int = 64,
        embedding: int = 64,
    ):
        super().__init__()
        self.map_shape = tuple(int(s) for s in map_shape)
        self.channels = [int(c) for c in channels]
        self.latent_features, self.embedding = int(latent_features), int(embedding)
        if not self.channels:
            raise ValueError("the VAE needs at least one level of channels")
        factor = 2 ** (len(self.channels) - 1)
        height, width = self.map_shape
        if height % factor or width % factor:
            raise ValueError(
                f"{len(self.channels)} levels need map sides divisible by {factor}, got {height} x {width}"
            )
        self.coarse = (self.channels[-1], height // factor, width // factor)
        layers: list[nn.Module] = []
        current = 1 + int(theta_dim)
        for i, c in enumerate(self.channels):
            layers += [_conv(current, c), nn.SiLU(), _conv(c, c), nn.SiLU()]
            if i < len(self.channels) - 1:
                layers.append(nn.AvgPool2d(2))
            current = c
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(math.prod(self.coarse), 2 * self.latent_features))
        self.theta_net = MLP(int(theta_dim), self.embedding, hidden=(self.embedding,))
        self.log_scale = MLP(int(theta_dim), 1, hidden=(self.embedding,))
        self.project = nn.Linear(self.latent_features + self.embedding, math.prod(self.coarse))
        layers = []
        for i, c in enumerate(reversed(self.channels)):
            if i > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers += [_conv(current, c), nn.SiLU(), _conv(c, c), nn.SiLU()]
            current = c
        self.decoder = nn.Sequential(*layers, _conv(current, 1))

    def hyperparameters(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "latent_features": self.latent_features, "embedding": self.embedding}

    def _decode(self, z: Tensor, theta: Tensor) -> Tensor:
        h = self.project(torch.cat([z, self.theta_net(theta)], dim=-1)).reshape(-1, *self.coarse)
        return self.decoder(h)[:, 0]

    def loss(self, x: Tensor, theta: Tensor) -> Tensor:
        """Negative ELBO per pixel on standardized maps ``(B, H, W)`` and θ ``(B, d)``."""
        planes = theta[:, :, None, None].expand(-1, -1, *self.map_shape)
        mean, log_var = self.encoder(torch.cat([x[:, None], planes], dim=1)).chunk(2, dim=-1)
        z = mean + (0.5 * log_var).exp() * _randn(mean.shape, mean, _seeded(self, x))
        log_scale = self.log_scale(theta)[:, :, None]  # (B, 1, 1)
        residual = (x - self._decode(z, theta)) * torch.exp(-log_scale)
        nll = (0.5 * residual.square() + log_scale + 0.5 * math.log(2 * math.pi)).flatten(1).sum(-1)
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(-1)
        return ((nll + kl) / math.prod(self.map_shape)).mean()

    def sample(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One standardized map per row of standardized θ ``(B, d)`` → ``(B, H, W)``."""
        z = _randn((theta.shape[0], self.latent_features), theta, generator)
        mean = self._decode(z, theta)
        return mean + self.log_scale(theta)[:, :, None].exp() * _randn(mean.shape, mean, generator)


FAMILIES: dict[str, Any] = {"diffusion": DiffusionMaps, "vae": VAEMaps}
"""Emulator families by name: ``nn.Module`` classes ``(map_shape, theta_dim, **hyperparameters)``
with ``training_defaults`` (``TrainConfig`` fields)."""

PIXEL_TRANSFORMS: tuple[str | None, ...] = (None, "shifted_log")
"""Pixel transforms of :class:`MapEmulator`: none, or :math:`u = \\ln(x + s)` with a given shift :math:`s`."""


def _radial_shells(map_shape: Sequence[int]) -> tuple[Tensor, int]:
    """Index of each rfft2 mode's shell of equal ``|k|`` ``(H, W // 2 + 1)``, and the number of shells."""
    height, width = (int(s) for s in map_shape)
    ny = torch.fft.fftfreq(height, 1.0 / height).round().long()
    nx = torch.fft.rfftfreq(width, 1.0 / width).round().long()
    # |k|^2 in units of 1 / (H W)^2 cycles^2 per pixel^2: an integer, so equal shells compare exactly.
    key = (ny[:, None] * width) ** 2 + (nx[None, :] * height) ** 2
    shells, index = torch.unique(key, return_inverse=True)
    return index, len(shells)


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="circular")


def _randn(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Normal draws on ``like``'s device and dtype; a CPU generator serves any device (same maps on CPU and GPU)."""
    if generator is None or generator.device == like.device:
        return torch.randn(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


class MapEmulator(nn.Module):
    r"""A learned emulator :math:`q(\mathrm{map} \mid \theta)` of a map simulator.

    Arguments:
        family: ``"diffusion"`` or ``"vae"`` (:data:`FAMILIES`).
        map_shape: Shape ``(H, W)`` of one map.
        theta_dim: Number of parameters.
        hyperparameters: Keyword arguments of the family's class (JSON values); unknown ones
            raise ``TypeError``.
        metadata: Free JSON description saved with the model (the training set's simulator,
            its configuration and prior, the parameter names).
        pixel_transform: ``None``, or ``"shifted_log"``: the model learns
            :math:`u = \ln(x + s)` of every pixel :math:`x` and maps are returned as
            :math:`e^u - s`, with :math:`s` = ``pixel_shift``. For shifted-lognormal fields
            (the cosmology simulator's lognormal maps, :math:`s = \lambda_s`) this makes the maps
            exactly Gaussian, which the diffusion family's spectral base models exactly, and every
            emulated pixel respects the floor :math:`x > -s`. Measured
            (``benchmarks/bench_emulator.py --variants lognormal``, 4 held-out θ): without it
            the emulated pixel skewness came out 4–7 % low wherever it is large (pulls −2 to −5
            for any U-Net size, training length or sampler steps tried); with it (and the mean
            level of :class:`DiffusionMaps`) the pulls are within ±1.5, and the pixel histograms
            are indistinguishable from the simulator's at 3 of the 4 θ after 3,000 training maps
            and at all 4 (χ² p 0.28–0.60) after 10,000. A transform fitted to the pooled pixel
            quantiles instead made things worse (the pooled distribution mixes θ), so the shift
            is the user's to give.
        pixel_shift: :math:`s` of ``"shifted_log"`` (positive); pixels must exceed :math:`-s`.

    Shapes:
        ``loss(y, c)``: maps ``(B, H, W)`` and θ ``(B, d)``; ``sample(theta, n)``: θ ``(d,)`` →
        ``(n, H, W)``, θ ``(k, d)`` → ``(n, k, H, W)``.

    Example:
        >>> emulator = MapEmulator("vae", (8, 8), 2, {"channels": [4, 4], "latent_features": 4})
        >>> emulator.set_standardization(torch.randn(32, 8, 8), torch.rand(32, 2))
        >>> emulator.sample(torch.rand(5, 2), 2, seed=1).shape
        torch.Size([2, 5, 8, 8])
        >>> again = MapEmulator(**emulator.config())
        >>> _ = again.load_state_dict(emulator.state_dict())
    """

    def __init__(
        self,
        family: str,
        map_shape: Sequence[int],
        theta_dim: int,
        hyperparameters: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        pixel_transform: str | None = None,
        pixel_shift: float | None = None,
    ):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown emulator family {family!r}; known: {', '.join(sorted(FAMILIES))}")
        if pixel_transform not in PIXEL_TRANSFORMS:
            known = ", ".join(repr(t) for t in PIXEL_TRANSFORMS)
            raise ValueError(f"unknown pixel transform {pixel_transform!r}; known: {known}")
        if (pixel_transform == "shifted_log") != (pixel_shift is not None):
            raise ValueError("pixel_transform='shifted_log' needs a pixel_shift, and only it takes one")
        if pixel_shift is not None and not (math.isfinite(pixel_shift) and pixel_shift > 0):
            raise ValueError(f"pixel_shift must be a positive number, got {pixel_shift!r}")
        self.pixel_transform = pixel_transform
        self.pixel_shift = None if pixel_shift is None else float(pixel_shift)
        self.family = str(family)
        self.map_shape = tuple(int(s) for s in map_shape)
        self.theta_dim = int(theta_dim)
        if len(self.map_shape) != 2 or min(self.map_shape) < 1:
            raise ValueError(f"an emulator models maps of shape (H, W), got {self.map_shape}")
        if self.theta_dim < 1:
            raise ValueError(f"theta_dim must be positive, got {theta_dim}")
        hyperparameters = copy.deepcopy(dict(hyperparameters or {}))
        cls = FAMILIES[self.family]
        accepted = [
            p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "map_shape", "theta_dim")
        ]
        unknown = sorted(set(hyperparameters) - set(accepted))
        if unknown:
            raise TypeError(f"emulator family {family!r} got unknown hyperparameters {unknown}; it accepts {accepted}")
        self.model = cls(self.map_shape, self.theta_dim, **hyperparameters)
        self.metadata = copy.deepcopy(dict(metadata or {}))
        self.register_buffer("theta_mean", torch.zeros(self.theta_dim))
        self.register_buffer("theta_std", torch.ones(self.theta_dim))
        self.register_buffer("map_mean", torch.zeros(()))
        self.register_buffer("map_std", torch.ones(()))

    def config(self) -> dict[str, Any]:
        """JSON description: ``MapEmulator(**emulator.config())`` rebuilds the architecture (weights: ``state_dict``)."""
        return {
            "family": self.family,
            "map_shape": list(self.map_shape),
            "theta_dim": self.theta_dim,
            "hyperparameters": self.model.hyperparameters(),
            "pixel_transform": self.pixel_transform,
            "pixel_shift": self.pixel_shift,
        }

    def to_scores(self, maps: Tensor) -> Tensor:
        """Pixel values → the space the model learns (the identity without a pixel transform).

        Raises:
            ValueError: With ``"shifted_log"``, for a pixel at or below ``-pixel_shift``.
        """
        if self.pixel_transform is None:
            return maps
        shifted = maps.double() + self.pixel_shift
        if not (shifted > 0).all():
            raise ValueError(
                f"pixel_transform='shifted_log' needs every pixel above -pixel_shift = {-self.pixel_shift:g}; "
                f"the smallest is {float(maps.min()):g}"
            )
        return shifted.log().to(maps.dtype)

    def from_scores(self, scores: Tensor) -> Tensor:
        """The inverse of :meth:`to_scores`."""
        if self.pixel_transform is None:
            return scores
        return (scores.double().exp() - self.pixel_shift).to(scores.dtype)

    def _check(self, maps: Tensor | None, theta: Tensor) -> None:
        if theta.shape[-1:] != (self.theta_dim,):
            raise ValueError(f"theta must have {self.theta_dim} values per row, got shape {tuple(theta.shape)}")
        if maps is not None and (tuple(maps.shape[1:]) != self.map_shape or len(maps) != len(theta)):
            raise ValueError(
                f"expected maps (n, {self.map_shape[0]}, {self.map_shape[1]}) and theta (n, {self.theta_dim}), "
                f"got {tuple(maps.shape)} and {tuple(theta.shape)}"
            )

    @torch.no_grad()
    def set_standardization(self, y: Tensor, c: Tensor) -> None:
        """Z-scoring statistics from training maps ``y`` ``(n, H, W)`` and parameters ``c`` ``(n, d)``.

        θ per parameter, maps by one global mean and standard deviation (the fields are
        statistically homogeneous); rows with non-finite values are ignored.
        """
        y, c = torch.as_tensor(y), torch.as_tensor(c)
        self._check(y, c)
        ok = torch.isfinite(y.flatten(1)).all(-1) & torch.isfinite(c).all(-1)
        if not ok.any():
            raise ValueError("no training row has finite maps and parameters")
        y, c = y[ok].double(), c[ok].double()
        y = self.to_scores(y)
        for mean_buffer, std_buffer, values, dims in (
            (self.theta_mean, self.theta_std, c, (0,)),
            (self.map_mean, self.map_std, y, (0, 1, 2)),
        ):
            mean = values.mean(dim=dims)
            std = values.std(dim=dims) if values.numel() > mean.numel() else torch.ones_like(mean)
            mean_buffer.copy_(mean)
            std_buffer.copy_(torch.maximum(std, _STD_FLOOR * (1 + mean.abs())))
        if hasattr(self.model, "initialize_spectrum"):
            self.model.initialize_spectrum((y - self.map_mean.double()) / self.map_std.double())

    def _theta(self, theta: Tensor) -> Tensor:
        theta = torch.as_tensor(theta).to(device=self.theta_mean.device, dtype=self.theta_mean.dtype)
        return (theta - self.theta_mean) / self.theta_std

    def loss(self, y: Tensor, c: Tensor) -> Tensor:
        """Training loss of the family on maps ``y`` ``(B, H, W)`` given θ ``c`` ``(B, d)`` (standardized inside)."""
        y = torch.as_tensor(y).to(device=self.map_mean.device, dtype=self.map_mean.dtype)
        c = torch.as_tensor(c)
        self._check(y, c)
        return self.model.loss((self.to_scores(y) - self.map_mean) / self.map_std, self._theta(c))

    @torch.no_grad()
    def sample(self, theta: Any, n: int, seed: int | None = None, *, batch_size: int = 256) -> Tensor:
        """``n`` emulated maps per parameter row.

        Arguments:
            theta: Parameters ``(d,)`` or ``(k, d)``.
            n: Maps per parameter row.
            seed: Seed of a CPU generator for all draws: the same seed and ``batch_size`` give
                the same maps, on any device up to rounding; ``None``: torch's global generator.
            batch_size: Maps generated at once.

        Returns:
            ``(n, H, W)`` for one parameter row, ``(n, k, H, W)`` for ``k`` rows, on the
            emulator's device and in the simulator's units.
        """
        theta = torch.as_tensor(np.asarray(theta) if not isinstance(theta, Tensor) else theta)
        single = theta.dim() == 1
        theta = theta.reshape(-1, theta.shape[-1]) if theta.dim() >= 1 else theta
        self._check(None, theta)
        if int(n) < 1:
            raise ValueError(f"the number of maps must be positive, got {n}")
        if not torch.isfinite(theta).all():
            raise ValueError("theta contains NaN or infinite values")
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        rows = self._theta(theta).repeat(int(n), 1)  # (n * k, d), sample-major
        was_training = self.training
        self.eval()
        try:
            parts = [self.model.sample(rows[i : i + batch_size], generator) for i in range(0, len(rows), batch_size)]
        finally:
            self.train(was_training)
        maps = self.from_scores(torch.cat(parts) * self.map_std + self.map_mean)
        maps = maps.reshape(int(n), len(theta), *self.map_shape)
        return maps[:, 0] if single else maps

    def extra_repr(self) -> str:
        return f"family={self.family!r}, map_shape={self.map_shape}, theta_dim={self.theta_dim}"


def emulator_train_config(family: str = "diffusion", **overrides: Any) -> TrainConfig:
    """The :class:`~sbi_gen.train.TrainConfig` a family trains best with (its ``training_defaults``),
    with ``overrides`` (any ``TrainConfig`` field) applied.

    Example:
        >>> emulator_train_config("diffusion", max_epochs=5).ema_decay
        0.999
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown emulator family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    return TrainConfig(**{**FAMILIES[family].training_defaults, **overrides})


def train_emulator(
    data: str | os.PathLike[str],
    family: str = "diffusion",
    hyperparameters: dict[str, Any] | None = None,
    *,
    config: TrainConfig | None = None,
    pixel_transform: str | None = None,
    pixel_shift: float | None = None,
    state_path: str | os.PathLike[str] | None = None,
) -> tuple[MapEmulator, History]:
    """Train a :class:`MapEmulator` on an HDF5 training set of maps (valid rows only) with :func:`~sbi_gen.train.fit`.

    The file's simulator, its configuration, prior and parameter names go into the emulator's
    ``metadata``, so a saved emulator knows what it emulates.

    Arguments:
        data: HDF5 training set whose ``x`` are maps ``(n, H, W)``.
        family: ``"diffusion"`` or ``"vae"``.
        hyperparameters: Of the family (see :class:`DiffusionMaps`, :class:`VAEMaps`).
        config: Training options (``None``: :func:`emulator_train_config` of the family).
        pixel_transform: ``None`` or ``"shifted_log"``, with ``pixel_shift`` (see :class:`MapEmulator`).
        pixel_shift: The shift of ``"shifted_log"``.
        state_path: Resumable training: the state file of :func:`~sbi_gen.train.fit`.

    Returns:
        The trained emulator (in eval mode) and the training history.
    """
    info = read_info(data)
    x_shape = tuple(info["shapes"]["x"][1:])
    theta_dim = int(info["shapes"]["theta"][1])
    if len(x_shape) != 2:
        raise ValueError(f"an emulator needs maps (n, H, W) as x; {data} holds x of shape {tuple(info['shapes']['x'])}")
    metadata = {
        "simulator": info.get("simulator"),
        "simulator_config": info.get("simulator_config"),
        "prior": info.get("prior_decoded"),
        "parameter_names": info.get("parameter_names_decoded"),
        "n_simulations": info.get("n_simulations"),
    }
    config = config or emulator_train_config(family)
    with seeded_torch(config.seed, "weights"):  # initial weights from config.seed, as NPE's and NLE's
        emulator = MapEmulator(family, x_shape, theta_dim, hyperparameters, metadata=metadata,
                              pixel_transform=pixel_transform, pixel_shift=pixel_shift)
    history = fit(emulator, data, config=config, y_key="x", c_key="theta", state_path=state_path)
    return emulator.eval(), history


# ----------------------------------------------------------------------------- physics check


@dataclass(frozen=True)
class SpectrumComparison:
    """Mean binned power spectra of simulated and emulated maps, and their ratio.

    Attributes:
        simulated: Mean spectrum of the simulated maps, ``(bins,)``.
        emulated: Mean spectrum of the emulated maps, ``(bins,)``.
        ratio: ``emulated / simulated``.
        ratio_error: Standard error of ``ratio`` from the sample variances of both sets
            (delta method: relative variances of the two means add).
        ell: Bin centres (multipoles), if known.
    """

    simulated: np.ndarray
    emulated: np.ndarray
    ratio: np.ndarray
    ratio_error: np.ndarray
    ell: np.ndarray | None = None

    @property
    def pulls(self) -> np.ndarray:
        """``(ratio - 1) / ratio_error``: about standard normal per bin when the emulator is exact."""
        return (self.ratio - 1.0) / self.ratio_error


def compare_power_spectra(
    simulated: Any,
    emulated: Any,
    spectrum: Callable[[np.ndarray], np.ndarray],
    ell: np.ndarray | None = None,
) -> SpectrumComparison:
    """Compare the mean binned power spectra of two sets of maps at the same θ.

    Arguments:
        simulated: Simulated maps ``(m, H, W)``.
        emulated: Emulated maps ``(n, H, W)``.
        spectrum: Maps ``(k, H, W)`` → binned spectra ``(k, bins)``, e.g.
            :meth:`simulators.cosmology.CosmologySimulator.summary`.
        ell: Bin centres, kept for plots.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> white = lambda maps: (np.abs(np.fft.rfft2(maps)) ** 2).reshape(len(maps), -1)[:, 1:5]
        >>> cmp = compare_power_spectra(rng.normal(size=(200, 8, 8)), rng.normal(size=(200, 8, 8)), white)
        >>> bool(np.all(np.abs(cmp.pulls) < 4))
        True
    """
    spectra = []
    for maps in (simulated, emulated):
        maps = maps.detach().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps)
        values = np.asarray(spectrum(maps.astype(np.float64)), dtype=np.float64)
        if values.ndim != 2 or len(values) < 2:
            raise ValueError(f"need at least 2 maps per set and spectra (k, bins), got {values.shape}")
        spectra.append(values)
    (sim, emu) = spectra
    sim_mean, emu_mean = sim.mean(0), emu.mean(0)
    ratio = emu_mean / sim_mean
    relative = np.sqrt(sim.var(0, ddof=1) / len(sim) / sim_mean**2 + emu.var(0, ddof=1) / len(emu) / emu_mean**2)
    return SpectrumComparison(
        sim_mean, emu_mean, ratio, np.abs(ratio) * relative, None if ell is None else np.asarray(ell)
    )


@dataclass(frozen=True)
class PixelComparison:
    r"""One-point (pixel) distributions of simulated and emulated maps at the same θ.

    The pixels of one map are correlated, so no statistic here treats them as independent
    draws: each map gives its histogram (the fraction of its pixels in each bin), its skewness
    and its excess kurtosis, and the maps of each set are independent. Differences of the
    set means then have standard errors from the map-to-map variances, and under the null
    hypothesis (the emulator draws from the simulator's distribution) the central limit
    theorem over maps makes

    - each ``pulls`` entry, ``skewness_pull`` and ``kurtosis_pull`` standard normal;
    - ``chi2 = d^T (C_s / m + C_e / n)^{-1} d``, with ``d`` the difference of the mean
      histograms in the first ``bins - 1`` bins (the last is fixed by the others) and ``C``
      the map-to-map covariances, chi-square with ``bins - 1`` degrees of freedom; ``p_value``
      is its upper tail.

    Attributes:
        edges: Bin edges of the pixel values ``(bins + 1,)``: quantiles of all simulated pixels,
            so each bin holds ``1 / bins`` of them, with open outer bins (``±inf``).
        simulated: Mean fraction of a simulated map's pixels per bin ``(bins,)``.
        emulated: The same for the emulated maps.
        ratio: ``emulated / simulated``.
        ratio_error: Standard error of ``ratio`` (delta method, as :class:`SpectrumComparison`).
        skewness: Mean per-map skewness, ``(simulated, emulated)``.
        kurtosis: Mean per-map excess kurtosis, ``(simulated, emulated)``.
        skewness_pull: Difference of the two mean skewnesses over its standard error.
        kurtosis_pull: The same for the excess kurtosis.
        chi2: The histogram statistic above.
        dof: Its degrees of freedom, ``bins - 1``.
        p_value: Upper-tail probability of ``chi2`` under chi-square with ``dof`` degrees.
    """

    edges: np.ndarray
    simulated: np.ndarray
    emulated: np.ndarray
    ratio: np.ndarray
    ratio_error: np.ndarray
    skewness: tuple[float, float]
    kurtosis: tuple[float, float]
    skewness_pull: float
    kurtosis_pull: float
    chi2: float
    dof: int
    p_value: float

    @property
    def pulls(self) -> np.ndarray:
        """``(ratio - 1) / ratio_error`` per bin: about standard normal when the emulator is exact."""
        return (self.ratio - 1.0) / self.ratio_error


def _per_map_moments(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skewness and excess kurtosis of each map's pixels ``(k, H, W)`` → two ``(k,)`` arrays."""
    centred = maps.reshape(len(maps), -1)
    centred = centred - centred.mean(-1, keepdims=True)
    variance = centred.var(-1) + np.finfo(np.float64).tiny
    return (centred**3).mean(-1) / variance**1.5, (centred**4).mean(-1) / variance**2 - 3.0


def compare_pixel_histograms(simulated: Any, emulated: Any, bins: int = 10) -> PixelComparison:
    """Compare the pixel histograms, skewness and kurtosis of two sets of maps at the same θ.

    Arguments:
        simulated: Simulated maps ``(m, H, W)``, ``m >= bins`` (they also set the bin edges).
        emulated: Emulated maps ``(n, H, W)``, ``n >= bins``.
        bins: Number of equal-probability bins of the simulated pixel values.

    Returns:
        A :class:`PixelComparison` (statistics and their null distributions there).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> cmp = compare_pixel_histograms(rng.lognormal(size=(300, 8, 8)), rng.lognormal(size=(300, 8, 8)), bins=5)
        >>> cmp.dof, bool(cmp.p_value > 1e-3), bool(np.all(np.abs(cmp.pulls) < 4))
        (4, True, True)
    """
    sets = []
    for maps in (simulated, emulated):
        maps = maps.detach().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps)
        if maps.ndim != 3:
            raise ValueError(f"expected maps (k, H, W), got shape {maps.shape}")
        sets.append(maps.astype(np.float64))
    bins = int(bins)
    if bins < 2 or min(len(s) for s in sets) < bins:
        raise ValueError(f"need at least 2 bins and at least `bins` maps per set, got {bins} bins and {[len(s) for s in sets]} maps")
    edges = np.quantile(sets[0], np.linspace(0.0, 1.0, bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    fractions = []
    for maps in sets:
        which = np.searchsorted(edges[1:-1], maps.reshape(len(maps), -1), side="right")  # (k, pixels) in 0..bins-1
        flat = (np.arange(len(maps))[:, None] * bins + which).ravel()
        fractions.append(np.bincount(flat, minlength=len(maps) * bins).reshape(len(maps), bins) / which.shape[1])
    (sim, emu) = fractions
    sim_mean, emu_mean = sim.mean(0), emu.mean(0)
    ratio = emu_mean / sim_mean
    relative = np.sqrt(sim.var(0, ddof=1) / len(sim) / sim_mean**2 + emu.var(0, ddof=1) / len(emu) / emu_mean**2)
    difference = (emu_mean - sim_mean)[:-1]
    covariance = np.atleast_2d(np.cov(sim[:, :-1].T) / len(sim) + np.cov(emu[:, :-1].T) / len(emu))
    chi2 = float(difference @ np.linalg.lstsq(covariance, difference, rcond=None)[0])
    from scipy.stats import chi2 as chi2_distribution

    moments = [_per_map_moments(maps) for maps in sets]

    def pull(i: int) -> float:
        a, b = moments[0][i], moments[1][i]
        return float((b.mean() - a.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))

    return PixelComparison(
        edges,
        sim_mean,
        emu_mean,
        ratio,
        np.abs(ratio) * relative,
        (float(moments[0][0].mean()), float(moments[1][0].mean())),
        (float(moments[0][1].mean()), float(moments[1][1].mean())),
        pull(0),
        pull(1),
        chi2,
        bins - 1,
        float(chi2_distribution.sf(chi2, bins - 1)),
    )


def plot_emulated_maps(
    simulated: Any,
    emulated: Any,
    theta: Any,
    *,
    n_show: int = 4,
    parameter_names: Sequence[str] | None = None,
    spectra: SpectrumComparison | None = None,
) -> Any:
    """Simulated and emulated maps at one θ side by side, on one colour scale, with their spectra.

    Arguments:
        simulated: Simulated maps ``(m, H, W)``.
        emulated: Emulated maps ``(n, H, W)``.
        theta: The parameters ``(d,)``, shown in the title.
        n_show: Maps shown per row (at most the number available).
        parameter_names: Names for the title.
        spectra: A :func:`compare_power_spectra` result: adds a panel with both mean spectra
            and their ratio with its ±1 standard-error band.

    Returns:
        A matplotlib ``Figure``: one row of simulated maps, one of emulated maps, and the
        spectrum panel when given.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> fig = plot_emulated_maps(rng.normal(size=(3, 8, 8)), rng.normal(size=(3, 8, 8)), [0.3, 0.8])
        >>> len(fig.axes)
        7
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    simulated = simulated.detach().cpu().numpy() if isinstance(simulated, Tensor) else np.asarray(simulated)
    emulated = emulated.detach().cpu().numpy() if isinstance(emulated, Tensor) else np.asarray(emulated)
    theta = np.asarray(theta.detach().cpu() if isinstance(theta, Tensor) else theta, dtype=np.float64).reshape(-1)
    columns = max(1, min(int(n_show), len(simulated), len(emulated)))
    shown = np.concatenate([simulated[:columns], emulated[:columns]])
    limit = float(np.quantile(np.abs(shown), 0.995)) or 1.0
    rows = 3 if spectra is not None else 2
    fig = Figure(figsize=(2.2 * columns + 1.0, 2.2 * rows + 0.4), layout="constrained")
    grid = fig.add_gridspec(rows, columns + 1, width_ratios=[1] * columns + [0.06])
    image = None
    for row, (label, maps) in enumerate((("simulated", simulated), ("emulated", emulated))):
        for col in range(columns):
            ax = fig.add_subplot(grid[row, col])
            image = ax.imshow(maps[col], cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label)
    fig.colorbar(image, cax=fig.add_subplot(grid[:2, columns]))
    if spectra is not None:
        ax = fig.add_subplot(grid[2, : max(1, columns // 2)])
        # Without multipoles the bins are numbered 1, 2, ... on a linear axis.
        x = spectra.ell if spectra.ell is not None else np.arange(1, len(spectra.ratio) + 1)
        ax.plot(x, spectra.simulated, "k-", label="simulated")
        ax.plot(x, spectra.emulated, "C1--", label="emulated")
        ax.set_yscale("log")
        ax.set_xlabel(r"$\ell$" if spectra.ell is not None else "bin")
        ax.set_ylabel("power")
        ax.legend(fontsize="small")
        ax = fig.add_subplot(grid[2, max(1, columns // 2) :])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.fill_between(
            x, spectra.ratio - spectra.ratio_error, spectra.ratio + spectra.ratio_error, color="C1", alpha=0.3
        )
        ax.plot(x, spectra.ratio, "C1o-", ms=3)
        for axis in fig.axes[-2:]:
            if spectra.ell is not None:
                axis.set_xscale("log")
                axis.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks collide on a short log range
        ax.set_xlabel(r"$\ell$" if spectra.ell is not None else "bin")
        ax.set_ylabel("emulated / simulated")
    names = list(parameter_names) if parameter_names is not None else [f"θ{i}" for i in range(len(theta))]
    fig.suptitle(", ".join(f"{name} = {value:.3g}" for name, value in zip(names, theta)))
    return fig
