"""sbi_gen: simulation-based inference with deep generative models.

Example:
    >>> import sbi_gen, simulators
    >>> sim = simulators.get("two_moons")
    >>> out = sbi_gen.simulate(sim, n=10, seed=0)
    >>> out["x"].shape
    (10, 2)
"""

__version__ = "0.1.0"

from sbi_gen.priors import BoxUniform, Gaussian, IndependentPrior, PointMass, Prior, prior_from_dict, prior_from_json
from sbi_gen.simulate import Simulator, as_simulator, simulate
from sbi_gen.store import StoreError, TrainingSet, load, read_info, simulate_to_hdf5, train_val_split

__all__ = [
    "BoxUniform",
    "Gaussian",
    "IndependentPrior",
    "PointMass",
    "Prior",
    "Simulator",
    "StoreError",
    "TrainingSet",
    "__version__",
    "as_simulator",
    "load",
    "prior_from_dict",
    "prior_from_json",
    "read_info",
    "simulate",
    "simulate_to_hdf5",
    "train_val_split",
]
