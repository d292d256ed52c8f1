"""Simulators for the Dask tests, in an importable module so that worker processes can unpickle them.

Example:
    >>> import numpy as np
    >>> sim = SlowNoisy(delay=0.0)
    >>> sim.simulate(np.zeros((3, 2)), np.random.default_rng(0))["x"].shape
    (3, 2)
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from sbi_gen.priors import BoxUniform
from sbi_gen.simulate import Simulator

__all__ = ["SlowNoisy", "always_fails", "crashes_its_process", "fragile"]


class SlowNoisy(Simulator):
    """x = θ + 0.1 ε with a latent ε, after sleeping ``delay`` seconds per batch (an expensive simulator).

    ``delay`` sets only the pace, never the data, so it is left out of :meth:`config`: a run with
    ``delay=0`` is the same training set, attribute for attribute.
    """

    name = "slow_noisy"
    version = "1"
    parameter_names = ["a", "b"]
    parameter_units = ["", ""]
    observable_shape = (2,)
    observable_names = ["x_a", "x_b"]

    def __init__(self, delay: float = 0.0):
        self.delay = float(delay)
        self.prior = BoxUniform([0.0, 0.0], [1.0, 1.0], names=["a", "b"])

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        time.sleep(self.delay)
        noise = rng.normal(size=theta.shape)
        x = theta + 0.1 * noise
        x[theta[:, 0] > 0.97] = np.nan  # a region where the simulation fails numerically
        return {"x": x, "latents": {"noise": noise.astype(np.float32)}}


def fragile(theta: np.ndarray) -> np.ndarray:
    """A batched simulator that raises for some parameters: those rows are failed, with an error message."""
    if np.any(theta[:, 1] < 0.1):
        raise FloatingPointError("negative variance")
    return theta * 2.0


def always_fails(theta: np.ndarray) -> np.ndarray:
    """A simulator that raises for every parameter."""
    raise ArithmeticError("this simulator never works")


def crashes_its_process(theta: np.ndarray) -> np.ndarray:
    """A simulator that takes down the process running it, as a segfault or the OOM killer would."""
    os._exit(13)
