r"""Neural-network building blocks: MLPs, a CNN and a U-Net for periodic maps, a time embedding.

Every module maps a tensor with arbitrary leading batch dimensions, ``(*, ...)``, and
creates no tensor outside the device of its input or its own parameters and buffers,
so ``module.to("cuda")`` is all a GPU needs.

Embeddings of a condition :math:`c` (an observation in NPE, parameters in NLE) are built
by name through :data:`EMBEDDINGS` and :func:`build_embedding`, which also returns the
number of features the embedding outputs. Their keyword arguments are JSON values
(activations are given by name), so an estimator's config stays JSON.

Example:
    >>> net, features = build_embedding("cnn", (16, 16), out_features=8)
    >>> features
    8
    >>> net(torch.randn(5, 16, 16)).shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "EMBEDDINGS",
    "MLP",
    "Flatten",
    "HyperparameterError",
    "ResidualMLP",
    "TimeEmbedding",
    "UNet",
    "build_embedding",
    "check_int",
    "check_number",
    "check_widths",
    "default_embedding",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}
"""Activation constructors by name."""

Activation = str | Callable[[], nn.Module]


class HyperparameterError(ValueError, TypeError):
    """An unknown hyperparameter (of an estimator, an embedding ...), or a bad value of a known one.

    A ``ValueError``, so that callers which report bad input as one line (the command line)
    report it, and a ``TypeError``, what Python raises for an unexpected keyword argument and
    what callers of :func:`~sbi_gen.estimators.build_estimator` caught before it existed.
    It lives here, the lowest module that raises it, so the estimators can share it.
    """


def _at_least(minimum: int) -> str:
    return {0: "non-negative", 1: "positive"}.get(minimum, f"at least {minimum}")


def _is_integer(value: Any) -> bool:
    """Integers and integral floats (``3.0``), not booleans, strings or fractions: ``int()`` would
    turn ``"3"`` into 3 but also ``2.5`` silently into 2."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return real and math.isfinite(value) and value == int(value)


def check_int(owner: str, name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
    """``value`` as an ``int`` of at least ``minimum`` (``None`` passes when ``optional``), else a
    :class:`HyperparameterError` naming ``owner`` and ``name``.

    Example:
        >>> check_int("nsf", "transforms", -2)
        Traceback (most recent call last):
        ...
        sbi_gen.nn.HyperparameterError: nsf: transforms must be positive, got -2
    """
    if optional and value is None:
        return None
    if not _is_integer(value):
        raise HyperparameterError(f"{owner}: {name} must be an integer{' or None' if optional else ''}, got {value!r}")
    if value < minimum:
        raise HyperparameterError(f"{owner}: {name} must be {_at_least(minimum)}, got {value}")
    return int(value)


def check_number(owner: str, name: str, value: Any) -> float:
    """``value`` as a positive finite ``float``, else a :class:`HyperparameterError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HyperparameterError(f"{owner}: {name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise HyperparameterError(f"{owner}: {name} must be positive, got {value}")
    return float(value)


def check_widths(owner: str, name: str, value: Any) -> list[int]:
    """``value`` (layer widths) as a list of positive ``int``, else a :class:`HyperparameterError`.

    An empty list passes: no hidden layer is a valid network.
    """
    valid = not isinstance(value, (str, bytes)) and isinstance(value, Iterable)
    widths = list(value) if valid else []
    if not valid or not all(_is_integer(w) and w >= 1 for w in widths):
        raise HyperparameterError(f"{owner}: {name} must be a list of positive integers, got {value!r}")
    return [int(w) for w in widths]


def _activation(activation: Activation) -> Callable[[], nn.Module]:
    if callable(activation):
        return activation
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):  # TypeError: a list or dict from JSON is unhashable
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None


class MLP(nn.Sequential):
    r"""Multi-layer perceptron ``Linear → act → … → Linear``.

    Arguments:
        in_features: Input features :math:`D_{in}`.
        out_features: Output features :math:`D_{out}`.
        hidden: Widths of the hidden layers.
        activation: Activation name (a key of :data:`ACTIVATIONS`) or constructor.

    Shapes:
        ``(*, in_features) → (*, out_features)``.

    Example:
        >>> net = MLP(3, 2, hidden=(16, 16))
        >>> net(torch.randn(4, 5, 3)).shape
        torch.Size([4, 5, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (128, 128),
        activation: Activation = "silu",
    ):
        act = _activation(activation)
        widths = [int(in_features), *(int(h) for h in hidden), int(out_features)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            if i > 0:
                layers.append(act())
            layers.append(nn.Linear(a, b))
        super().__init__(*layers)
        self.in_features = widths[0]
        self.out_features = widths[-1]


class _ResidualBlock(nn.Module):
    """``x + Linear(act(Linear(act(LayerNorm(x)))))``: a pre-activation residual block."""

    def __init__(self, features: int, activation: Callable[[], nn.Module]):
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.net = nn.Sequential(
            activation(), nn.Linear(features, features), activation(), nn.Linear(features, features)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(self.norm(x))


class ResidualMLP(nn.Module):
    r"""MLP of pre-activation residual blocks (LayerNorm, act, Linear, act, Linear, skip).

    Deeper than :class:`MLP` at equal width while still easy to optimize.

    Arguments:
        in_features: Input features :math:`D_{in}`.
        out_features: Output features :math:`D_{out}`.
        hidden: Width of the residual stream.
        blocks: Number of residual blocks.
        activation: Activation name (a key of :data:`ACTIVATIONS`) or constructor.

    Shapes:
        ``(*, in_features) → (*, out_features)``.

    Example:
        >>> net = ResidualMLP(3, 2, hidden=32, blocks=2)
        >>> net(torch.randn(7, 3)).shape
        torch.Size([7, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 128,
        blocks: int = 2,
        activation: Activation = "silu",
    ):
        super().__init__()
        act = _activation(activation)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.input = nn.Linear(self.in_features, int(hidden))
        self.blocks = nn.Sequential(*(_ResidualBlock(int(hidden), act) for _ in range(int(blocks))))
        self.output = nn.Sequential(nn.LayerNorm(int(hidden)), act(), nn.Linear(int(hidden), self.out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.blocks(self.input(x)))


class Flatten(nn.Module):
    r"""Flattens the last ``ndim`` dimensions: ``(*, s_1, …, s_n) → (*, s_1 ⋯ s_n)``.

    With ``ndim=1`` it is the identity.

    Example:
        >>> Flatten(2)(torch.randn(4, 3, 5, 6)).shape
        torch.Size([4, 3, 30])
    """

    def __init__(self, ndim: int = 1):
        super().__init__()
        self.ndim = int(ndim)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.ndim == 1 else x.flatten(start_dim=x.dim() - self.ndim)


# On the CPU the CNN convolves a batch in passes whose largest activation is at most this many
# bytes. glibc's malloc gives every block above its mmap threshold (32 MiB at most) its own
# mapping and unmaps it when freed, so a whole batch of 512 maps of 32 × 32 through 64 channels
# (128 MiB a layer) was faulted in and zeroed by the kernel at every step. Two epochs of NPE on
# 1,600 cosmology maps, one thread: 52.5 s in one pass (31.5 s of it in the kernel, peak memory
# 3.0 GB); in passes of at most 16 MiB 29–34 s (9–13 s, 2.3 GB), 8 MiB 28–30 s, 4 MiB 21–25 s
# (2–3 s, 2.4–2.7 GB), 2 MiB 22 s, 1 MiB 24 s (smaller convolutions run slower); the losses
# agree to 4 decimals. (Keeping freed blocks in the heap with mallopt was as fast as 16 MiB
# passes but doubled the peak memory.)
CPU_ACTIVATION_BYTES = 4 << 20


class CNN(nn.Module):
    r"""Shift-invariant CNN embedding of periodic 2-D maps.

    A stack of convolutions with circular padding (the maps are periodic), then global
    average pooling over the map and an MLP head. Two ways to reach across the map:

    - ``pool=True`` (the default): convolutions with 2 × 2 average pooling after every layer
      but the last (while the halved map is at least 2 pixels and the kernel's width across),
      so each layer works on a quarter of the pixels of the one before. Pooling commutes with
      circular shifts by multiples of 2 pixels per level, so the output is exactly invariant
      to shifts by multiples of :math:`2^{\text{levels}}` pixels and close to invariant to any
      other.
    - ``pool=False``: the dilation doubles at each layer (1, 2, 4, …, capped at half the map
      size) and nothing decimates the map: every layer is exactly equivariant to circular
      shifts and the output exactly invariant to all of them (up to float rounding). With 5
      layers the receptive field is 63 pixels across, but every layer runs at full resolution.

    Measured (NPE with the default NSF on 3,000 cosmology maps of 32 × 32, default channels,
    one CPU thread, training seed 0): the pooled CNN took 1.2 s an epoch, the dilated one 23 s.
    Best validation loss after 12 epochs 2.25 against 2.42, after 40 epochs 2.13 (49 s) against
    2.15 (930 s); early stopping ended the pooled one at 2.09 (95 epochs, 112 s). NPE on the
    maps' binned power spectrum, a near-sufficient summary of these Gaussian fields, stopped at
    2.16 (``benchmarks/bench_cnn_embedding.py``). So the pooled network is the default: 20 times
    cheaper an epoch, and no worse for it.

    Arguments:
        in_shape: Shape of one map, ``(H, W)`` or ``(C, H, W)`` for ``C`` channels.
        out_features: Output features.
        channels: Channels of the successive convolution layers.
        kernel_size: Odd kernel size of every convolution.
        hidden: Hidden widths of the MLP head.
        activation: Activation name (a key of :data:`ACTIVATIONS`) or constructor.
        pool: Average pooling between layers (``True``) or dilated convolutions at full
            resolution (``False``).

    Shapes:
        ``(*, H, W) → (*, out_features)`` (or ``(*, C, H, W) → (*, out_features)``).

    Example:
        >>> net = CNN((16, 16), out_features=4, channels=(8, 8, 8))  # pooled: 16 → 8 → 4 pixels
        >>> x = torch.randn(3, 16, 16)
        >>> torch.allclose(net(x), net(torch.roll(x, shifts=(4, -8), dims=(-2, -1))), atol=1e-5)
        True
        >>> dilated = CNN((16, 16), out_features=4, channels=(8, 8), pool=False)
        >>> torch.allclose(dilated(x), dilated(torch.roll(x, shifts=(5, -3), dims=(-2, -1))), atol=1e-5)
        True
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_features: int = 64,
        channels: Sequence[int] = (16, 32, 32, 64, 64),
        kernel_size: int = 3,
        hidden: Sequence[int] = (128,),
        activation: Activation = "silu",
        pool: bool = True,
    ):
        super().__init__()
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) not in (2, 3):
            raise ValueError(f"the CNN embeds maps of shape (H, W) or (C, H, W), got {in_shape}")
        self.pool = bool(pool)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if len(channels) == 0:
            raise ValueError("the CNN needs at least one convolution layer")
        self.in_shape = in_shape
        self.out_features = int(out_features)
        act = _activation(activation)
        height, width = in_shape[-2:]
        half = kernel_size // 2
        # Taps beyond half the map size wrap onto pixels already seen; circular padding
        # also needs padding <= size.
        max_dilation = max(1, min(height, width) // (2 * half)) if half > 0 else 1
        layers: list[nn.Module] = []
        c_in = in_shape[0] if len(in_shape) == 3 else 1
        self._activation_pixels = []  # pixels of each layer's output, for rows_per_pass
        for i, c_out in enumerate(channels):
            dilation = 1 if self.pool else min(2**i, max_dilation)
            layers.append(
                nn.Conv2d(
                    c_in,
                    int(c_out),
                    kernel_size,
                    padding=dilation * half,
                    dilation=dilation,
                    padding_mode="circular",
                )
            )
            layers.append(act())
            self._activation_pixels.append(int(c_out) * height * width)
            c_in = int(c_out)
            # Pool while the halved map stays at least 2 pixels, and as wide as the kernel's
            # reach (circular padding wraps at most once around the map).
            halved = min(height, width) // 2
            if self.pool and i < len(channels) - 1 and height % 2 == 0 and width % 2 == 0 and halved >= max(2, 2 * half):
                layers.append(nn.AvgPool2d(2))
                height, width = height // 2, width // 2
        self.convs = nn.Sequential(*layers)
        self.head = MLP(c_in, self.out_features, hidden=hidden, activation=activation)

    def rows_per_pass(self, dtype: torch.dtype = torch.float32) -> int:
        """Maps convolved together on the CPU: the largest activation of a pass stays within
        :data:`CPU_ACTIVATION_BYTES`."""
        per_map = max(self._activation_pixels) * torch.finfo(dtype).bits // 8
        return max(1, CPU_ACTIVATION_BYTES // per_map)

    def forward(self, x: Tensor) -> Tensor:
        event = len(self.in_shape)
        batch = x.shape[: x.dim() - event]
        x = x.reshape(-1, *self.in_shape)
        if event == 2:
            x = x.unsqueeze(1)
        if x.device.type == "cpu":  # see CPU_ACTIVATION_BYTES
            parts = x.split(self.rows_per_pass(x.dtype))
            features = torch.cat([self.convs(part).mean(dim=(-2, -1)) for part in parts])
        else:
            features = self.convs(x).mean(dim=(-2, -1))  # global average pooling
        return self.head(features).reshape(*batch, self.out_features)


class TimeEmbedding(nn.Module):
    r"""Sinusoidal embedding of a (diffusion) time :math:`t \in [0, 1]`.

    .. math:: e(t) = (\cos(s t \omega_1), \dots, \cos(s t \omega_K),
        \sin(s t \omega_1), \dots, \sin(s t \omega_K)),
        \quad \omega_k = P^{-(k-1)/K}

    with :math:`K = \lfloor dim / 2 \rfloor`, scale :math:`s` and maximal period :math:`P`,
    as in transformers and DDPM (there with integer steps, here :math:`s t` with :math:`s = 1000`).
    An odd ``dim`` gets one zero feature appended.

    Arguments:
        dim: Output features.
        scale: Multiplier :math:`s` of the time.
        max_period: Longest period :math:`P` (in units of :math:`s t`).

    Shapes:
        ``(*) → (*, dim)``.

    Example:
        >>> emb = TimeEmbedding(16)
        >>> emb(torch.rand(8)).shape
        torch.Size([8, 16])
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"the time embedding needs dim >= 2, got {dim}")
        self.dim = int(dim)
        self.scale = float(scale)
        half = self.dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = self.scale * t.to(self.freqs.dtype)[..., None] * self.freqs
        emb = torch.cat((angles.cos(), angles.sin()), dim=-1)
        if self.dim % 2:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb


def _identity(c_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    return Flatten(len(c_shape)), math.prod(c_shape)


def _mlp(
    c_shape: tuple[int, ...],
    out_features: int = 64,
    hidden: Sequence[int] = (128, 128),
    activation: str = "silu",
) -> tuple[nn.Module, int]:
    out_features = check_int("mlp embedding", "out_features", out_features)
    hidden = check_widths("mlp embedding", "hidden", hidden)
    net = MLP(math.prod(c_shape), out_features, hidden=hidden, activation=activation)
    return nn.Sequential(Flatten(len(c_shape)), net), out_features


def _resmlp(
    c_shape: tuple[int, ...],
    out_features: int = 64,
    hidden: int = 128,
    blocks: int = 2,
    activation: str = "silu",
) -> tuple[nn.Module, int]:
    out_features = check_int("resmlp embedding", "out_features", out_features)
    hidden = check_int("resmlp embedding", "hidden", hidden)
    blocks = check_int("resmlp embedding", "blocks", blocks, minimum=0)
    net = ResidualMLP(math.prod(c_shape), out_features, hidden=hidden, blocks=blocks, activation=activation)
    return nn.Sequential(Flatten(len(c_shape)), net), out_features


def _cnn(
    c_shape: tuple[int, ...],
    out_features: int = 64,
    channels: Sequence[int] = (16, 32, 32, 64, 64),
    kernel_size: int = 3,
    hidden: Sequence[int] = (128,),
    activation: str = "silu",
    pool: bool = True,
) -> tuple[nn.Module, int]:
    out_features = check_int("cnn embedding", "out_features", out_features)
    channels = check_widths("cnn embedding", "channels", channels)
    kernel_size = check_int("cnn embedding", "kernel_size", kernel_size)
    hidden = check_widths("cnn embedding", "hidden", hidden)
    if not isinstance(pool, bool):
        raise HyperparameterError(f"cnn embedding: pool must be true or false, got {pool!r}")
    net = CNN(c_shape, out_features, channels=channels, kernel_size=kernel_size, hidden=hidden, activation=activation,
              pool=pool)
    return net, out_features


EMBEDDINGS: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "cnn": _cnn,
    "identity": _identity,
    "mlp": _mlp,
    "resmlp": _resmlp,
}
"""Embedding builders by name: ``EMBEDDINGS[name](c_shape, **kwargs) -> (module, out_features)``.

- ``"identity"``: flattens ``c``; no parameters.
- ``"mlp"``: flatten, then :class:`MLP` (``out_features=64, hidden=(128, 128), activation="silu"``).
- ``"resmlp"``: flatten, then :class:`ResidualMLP` (``out_features=64, hidden=128, blocks=2``).
- ``"cnn"``: :class:`CNN` for maps ``(H, W)`` or ``(C, H, W)`` (``out_features=64``,
  ``channels=(16, 32, 32, 64, 64)``, ``kernel_size=3``, ``hidden=(128,)``, ``pool=True``).
"""


def default_embedding(c_shape: Sequence[int]) -> str:
    """The embedding used when none is named: ``"identity"`` for vectors, ``"cnn"`` for maps.

    Vectors are z-scored and fed to the estimator's own conditioner: on the benchmark tasks
    at 10,000 simulations an extra MLP embedding only added parameters to overfit (NPE on
    gaussian_linear: C2ST 0.61 with it, 0.60 without, with the first training defaults).
    Measured again with NPE's default (``"auto"``; ``benchmarks/study_nsf_defaults.py
    --variants auto auto_resmlp --baseline auto``, 4 observations, 2000 draws, training seeds):
    ``"resmlp"`` lowered slcp's C2ST by 0.010 ± 0.004 (4 seeds, every one lower; held-out loss
    0.3–0.6 nats lower) and left two_moons (0.544 vs 0.546) and gaussian_linear (0.520 vs
    0.520) where they were (2 seeds each), but two_moons trained 40 % longer (83 vs 60 s). It
    is one argument away (``NPE(prior, embedding="resmlp")``) for posteriors whose width varies
    strongly with x.

    Example:
        >>> default_embedding((7,)), default_embedding((64, 64))
        ('identity', 'cnn')
    """
    return "identity" if len(tuple(c_shape)) <= 1 else "cnn"


def build_embedding(name: str, c_shape: Sequence[int], **kwargs: Any) -> tuple[nn.Module, int]:
    """Builds the embedding ``name`` for conditions of shape ``c_shape``.

    Arguments:
        name: A key of :data:`EMBEDDINGS`.
        c_shape: Shape of one condition, ``(d,)`` or ``(H, W)`` (or ``(C, H, W)``).
        kwargs: Keyword arguments of that embedding (see :data:`EMBEDDINGS`); unknown ones and
            bad sizes raise :class:`HyperparameterError`.

    Returns:
        The module, mapping ``(*, *c_shape) → (*, F)``, and its number of output features ``F``.

    Example:
        >>> net, features = build_embedding("mlp", (5,), out_features=10, hidden=[32])
        >>> features, net(torch.randn(2, 5)).shape
        (10, torch.Size([2, 10]))
    """
    c_shape = tuple(int(s) for s in c_shape)
    if len(c_shape) == 0 or any(s < 1 for s in c_shape):
        raise ValueError(f"a condition shape must be non-empty and positive, got {c_shape}")
    if name not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {name!r}; known: {', '.join(sorted(EMBEDDINGS))}")
    accepted = list(inspect.signature(EMBEDDINGS[name]).parameters)[1:]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise HyperparameterError(f"embedding {name!r} got unknown arguments {unknown}; it accepts {accepted}")
    return EMBEDDINGS[name](c_shape, **kwargs)


def _groups(channels: int) -> int:
    """Groups of a GroupNorm over ``channels``: the largest of 8, 4, 2, 1 that divides them."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class _FiLMBlock(nn.Module):
    """Residual block ``x + conv(act(FiLM(norm(conv(act(norm(x)))))))`` with circular 3x3 convolutions.

    FiLM: the normalized features are scaled by ``1 + γ(e)`` and shifted by ``β(e)``, per channel,
    from the conditioning embedding ``e``.
    """

    def __init__(self, c_in: int, c_out: int, embedding: int, activation: Callable[[], nn.Module]):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="circular")
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.film = nn.Linear(embedding, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode="circular")
        self.act = activation()
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.act(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class UNet(nn.Module):
    r"""Small U-Net for periodic maps, conditioned on a vector by FiLM (feature-wise scale and shift).

    Levels of residual blocks (GroupNorm, activation, 3 x 3 convolution with circular padding,
    as :class:`CNN`: the maps are periodic), halving the resolution between levels by 2 x 2
    average pooling and doubling it back by nearest-neighbour upsampling, with skip
    connections between levels of equal resolution. The conditioning vector (e.g. a time
    embedding and parameters :math:`\theta`) goes through an MLP to an embedding that scales
    and shifts the features of every block. Pooling, upsampling and circular convolutions all
    commute with circular shifts by multiples of :math:`2^{L-1}` pixels, so the network is
    equivariant to those shifts.

    Arguments:
        in_channels: Channels of the input map.
        out_channels: Channels of the output map.
        channels: Channels of the levels, from full resolution down; ``H`` and ``W`` must be
            divisible by ``2 ** (len(channels) - 1)``.
        cond_features: Size of the conditioning vector (0: unconditional).
        embedding: Size of the conditioning embedding.
        blocks: Residual blocks per level on the way down (and up).
        activation: Activation name (a key of :data:`ACTIVATIONS`) or constructor.

    Shapes:
        ``x (*, C_in, H, W)`` and ``cond (*, F)`` → ``(*, C_out, H, W)``.

    Example:
        >>> net = UNet(1, 1, channels=(8, 16), cond_features=3, embedding=16)
        >>> x, cond = torch.randn(4, 1, 16, 16), torch.randn(4, 3)
        >>> net(x, cond).shape
        torch.Size([4, 1, 16, 16])
        >>> shifted = torch.roll(x, shifts=(2, -4), dims=(-2, -1))
        >>> torch.allclose(net(shifted, cond), torch.roll(net(x, cond), shifts=(2, -4), dims=(-2, -1)), atol=1e-5)
        True
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        cond_features: int = 0,
        embedding: int = 64,
        blocks: int = 1,
        activation: Activation = "silu",
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1 or int(blocks) < 1:
            raise ValueError(f"the U-Net needs at least one level and block, got channels={channels}, blocks={blocks}")
        act = _activation(activation)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.cond_features, self.levels = int(cond_features), len(channels)
        self.cond = MLP(max(self.cond_features, 1), int(embedding), hidden=(int(embedding),), activation=activation)
        self.stem = nn.Conv2d(self.in_channels, channels[0], 3, padding=1, padding_mode="circular")
        self.down = nn.ModuleList()
        current = channels[0]
        for c in channels:
            self.down.append(nn.ModuleList(_FiLMBlock(current if i == 0 else c, c, int(embedding), act) for i in range(int(blocks))))
            current = c
        self.middle = _FiLMBlock(current, current, int(embedding), act)
        self.up = nn.ModuleList()
        for c in reversed(channels):
            self.up.append(
                nn.ModuleList(_FiLMBlock((current + c) if i == 0 else c, c, int(embedding), act) for i in range(int(blocks)))
            )
            current = c
        self.head = nn.Sequential(nn.GroupNorm(_groups(current), current), act(), nn.Conv2d(current, self.out_channels, 3, padding=1, padding_mode="circular"))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        batch, (height, width) = x.shape[:-3], x.shape[-2:]
        factor = 2 ** (self.levels - 1)
        if height % factor or width % factor:
            raise ValueError(f"the U-Net's {self.levels} levels need map sides divisible by {factor}, got {height} x {width}")
        x = x.reshape(-1, *x.shape[-3:])
        if cond is None or self.cond_features == 0:
            cond = x.new_zeros(x.shape[0], max(self.cond_features, 1))
        e = self.cond(cond.reshape(-1, cond.shape[-1]).to(x.dtype))
        h = self.stem(x)
        skips = []
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, e)
            skips.append(h)
            if i < self.levels - 1:
                h = nn.functional.avg_pool2d(h, 2)
        h = self.middle(h, e)
        for i, level in zip(reversed(range(self.levels)), self.up):
            h = torch.cat([h, skips[i]], dim=1)
            for block in level:
                h = block(h, e)
            if i > 0:
                h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        return self.head(h).reshape(*batch, self.out_channels, height, width)
