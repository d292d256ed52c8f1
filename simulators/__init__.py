"""Simulators shipped with sbi_gen, by name.

Example:
    >>> import simulators
    >>> sim = simulators.get("two_moons")
    >>> sim.parameter_names
    ['theta_1', 'theta_2']
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["REGISTRY", "get", "names", "simulator_class"]

# name -> "module:Class"; imported lazily so listing names stays cheap.
REGISTRY: dict[str, str] = {
    "particle": "simulators.particle:ParticleSimulator",
    "cosmology": "simulators.cosmology:CosmologySimulator",
    "gaussian_linear": "simulators.benchmarks:GaussianLinear",
    "two_moons": "simulators.benchmarks:TwoMoons",
    "slcp": "simulators.benchmarks:SLCP",
}


def names() -> list[str]:
    """Names of the registered simulators."""
    return sorted(REGISTRY)


def simulator_class(name: str) -> type:
    """The class registered as ``name`` (imported, not built)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown simulator {name!r}; registered: {', '.join(names())}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get(name: str, **config: Any) -> Any:
    """Build the simulator registered as ``name`` with keyword ``config``."""
    return simulator_class(name)(**config)
