"""The simulator protocol, and simulation in memory.

A simulator is an object with ``name``, ``version``, ``parameter_names``, ``observable_shape``
(and ``observable_names`` where x is a vector), a default ``prior`` and a batched call

.. code-block:: python

    simulate(theta: ndarray (n, D), rng: numpy.random.Generator) -> dict

returning ``{"x": (n, *observable_shape), "latents": {name: (n, ...)}, "augmented": {name: (n, ...)}}``
(``latents`` and ``augmented`` optional). Failed simulations return non-finite ``x``; the
framework counts them and keeps them out of training. A plain function ``theta -> x`` becomes
a simulator with :func:`as_simulator`.

Example:
    >>> import numpy as np
    >>> from sbi_gen.priors import BoxUniform
    >>> sim = as_simulator(lambda theta, rng: theta + rng.normal(size=theta.shape),
    ...                    prior=BoxUniform([0.0, 0.0], [1.0, 1.0]), name="noisy")
    >>> out = simulate(sim, n=5, seed=0)
    >>> out["theta"].shape, out["x"].shape
    ((5, 2), (5, 2))
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sbi_gen.priors import Prior, sample_prior

__all__ = [
    "FunctionSimulator",
    "Simulator",
    "SimulatorOutputError",
    "as_simulator",
    "chunk_seeds",
    "concatenate_chunks",
    "run_chunk",
    "simulate",
]


class SimulatorOutputError(ValueError):
    """A simulator returned something malformed (not a dict with ``x``, the wrong number of rows,
    the wrong shape, not numbers): a bug in its code, which no row-by-row retry can fix."""


def check_simulator(simulator: Any, prior: Any = None) -> None:
    """A one-line ``TypeError`` if ``simulator`` does not follow the protocol (a plain function
    passed where a simulator goes, say), a ``ValueError`` if ``prior`` draws another number of
    parameters than it takes (which would otherwise surface as a wrong output shape)."""
    missing = [a for a in ("simulate", "name", "parameter_names", "observable_shape") if not hasattr(simulator, a)]
    if missing:
        hint = "; wrap a plain function with sbi_gen.as_simulator(fn, prior)" if callable(simulator) else ""
        raise TypeError(f"{type(simulator).__name__} is not a simulator: it lacks {', '.join(missing)}{hint}")
    names = list(simulator.parameter_names)
    if prior is not None and getattr(prior, "dim", len(names)) != len(names):
        raise ValueError(f"the prior has {prior.dim} parameters, but simulator {simulator.name!r} takes "
                         f"{len(names)} ({', '.join(names)})")


class Simulator(abc.ABC):
    """Base of the built-in simulators (user code may duck-type the same attributes).

    Subclasses set the class attributes and implement :meth:`simulate`; :meth:`config`
    returns the JSON-serializable arguments that rebuild the simulator.
    """

    name: str = "simulator"
    version: str = "0"
    parameter_names: list[str] = []
    parameter_units: list[str] = []
    observable_shape: tuple[int, ...] = ()
    observable_names: list[str] | None = None
    prior: Prior

    def config(self) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Simulate a batch: ``theta`` (n, D) → ``{"x": (n, *observable_shape), ...}``."""

    def __call__(self, theta: np.ndarray, seed: int | np.random.Generator | None = None) -> dict[str, Any]:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return self.simulate(np.atleast_2d(np.asarray(theta, dtype=np.float64)), rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


class FunctionSimulator(Simulator):
    """A plain function wrapped into the protocol; see :func:`as_simulator`."""

    def __init__(
        self,
        fn: Callable[..., Any],
        prior: Prior,
        name: str,
        observable_shape: Sequence[int] | None,
        observable_names: Sequence[str] | None,
        batched: bool,
        version: str,
    ):
        self.fn = fn
        self.prior = prior
        self.name = name
        self.version = version
        self.parameter_names = list(prior.names)
        self.parameter_units = list(prior.units)
        self.batched = batched
        self._takes_rng = _accepts_rng(fn)
        if observable_shape is None:
            probe = self.simulate(prior.mean.detach().numpy().astype(np.float64)[None], np.random.default_rng(0))
            observable_shape = probe["x"].shape[1:]
        self.observable_shape = tuple(int(s) for s in observable_shape)
        self.observable_names = list(observable_names) if observable_names is not None else None
        if self.observable_names is not None and (len(self.observable_shape) != 1 or len(self.observable_names) != self.observable_shape[0]):
            raise ValueError(f"{len(self.observable_names)} observable names for observables of shape {self.observable_shape}")

    def config(self) -> dict[str, Any]:
        return {"function": getattr(self.fn, "__qualname__", repr(self.fn)), "batched": self.batched}

    def _call(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._numbers(self._call_fn(theta, rng))

    def _numbers(self, out: Any) -> np.ndarray:
        x = _to_numpy(out)
        if x.dtype.kind not in "biuf":
            raise SimulatorOutputError(f"simulator {self.name!r} returned {type(out).__name__} of {x.dtype}; "
                                       "the function must return x as numbers (a numpy array or torch tensor)")
        return x

    def _call_fn(self, theta: np.ndarray, rng: np.random.Generator) -> Any:
        if self._takes_rng:
            return self.fn(theta, rng=rng)
        # The function draws from global generators: seed them from rng so runs stay reproducible.
        seed = int(rng.integers(2**63))
        np_state = np.random.get_state()
        try:
            np.random.seed(seed % 2**32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.fn(theta)
        finally:
            np.random.set_state(np_state)

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        if self.batched:
            x = self._call(theta, rng)
        else:
            x = np.stack([self._call(row, rng) for row in theta])
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim == 0 or x.shape[0] != theta.shape[0]:
            rows = "a scalar" if x.ndim == 0 else f"{x.shape[0]} rows of x"
            raise SimulatorOutputError(f"simulator {self.name!r} returned {rows} for {theta.shape[0]} parameter rows")
        return {"x": x}


def _accepts_rng(fn: Callable[..., Any]) -> bool:
    try:
        return "rng" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_simulator(
    fn: Callable[..., Any],
    prior: Prior,
    name: str = "user",
    observable_shape: Sequence[int] | None = None,
    observable_names: Sequence[str] | None = None,
    batched: bool = True,
    version: str = "0",
) -> Simulator:
    """Wrap a plain function ``theta -> x`` (numpy or torch) into the simulator protocol.

    Arguments:
        fn: ``fn(theta)`` or ``fn(theta, rng=...)``. With ``batched=True`` it takes ``(n, D)``
            and returns ``(n, *shape)``; with ``batched=False`` it takes one ``(D,)`` row and
            returns one ``(*shape)`` observation. If it has an ``rng`` argument it receives a
            :class:`numpy.random.Generator`; otherwise the global numpy and torch generators are
            seeded from the run's random stream around each call, so results stay reproducible.
        prior: The prior over ``theta`` (gives the parameter names).
        name: Name recorded in files.
        observable_shape: Shape of one observation; probed with one call at the prior mean if omitted.
        observable_names: Names of the observables (vector x only).
        batched: Whether ``fn`` takes a batch.
        version: Version string recorded in files.

    Example:
        >>> from sbi_gen.priors import BoxUniform
        >>> sim = as_simulator(lambda t: t**2, BoxUniform([0.0], [1.0]), batched=False)
        >>> sim.observable_shape
        (1,)
    """
    if not callable(fn):
        raise TypeError(f"as_simulator needs a callable, got {type(fn).__name__}")
    if not isinstance(prior, Prior):
        raise TypeError(f"as_simulator needs a prior from sbi_gen.priors (BoxUniform, Gaussian, ...), got {type(prior).__name__}")
    return FunctionSimulator(fn, prior, name, observable_shape, observable_names, batched, version)


def chunk_seeds(seed: int, n_chunks: int) -> list[np.random.SeedSequence]:
    """One independent random stream per chunk, from ``SeedSequence(seed).spawn``."""
    return np.random.SeedSequence(seed).spawn(n_chunks)


def _check_output(simulator: Any, out: Any, n: int) -> dict[str, Any]:
    if not isinstance(out, dict) or "x" not in out:
        raise SimulatorOutputError(f"simulator {simulator.name!r} must return a dict with key 'x', got {type(out).__name__}")
    x = _to_numpy(out["x"])
    shape = tuple(simulator.observable_shape)
    if x.shape != (n, *shape):
        raise SimulatorOutputError(f"simulator {simulator.name!r} returned x of shape {x.shape}, expected {(n, *shape)}")
    result = {"x": x}
    for group in ("latents", "augmented"):
        arrays = {k: _to_numpy(v) for k, v in (out.get(group) or {}).items()}
        for key, value in arrays.items():
            if value.shape[:1] != (n,):
                raise SimulatorOutputError(
                    f"simulator {simulator.name!r} returned {group}/{key} with {value.shape[:1]} rows for {n}"
                )
        result[group] = arrays
    return result


def run_chunk(simulator: Any, prior: Any, n: int, seed_sequence: np.random.SeedSequence) -> dict[str, Any]:
    """Simulate one chunk: draw ``theta`` from the prior and simulate, all from one random stream.

    Returns ``{"theta", "x", "latents", "augmented", "valid", "n_failed", "first_error"}``. If the
    batched call raises, rows are retried one at a time; rows that still raise are marked
    invalid (x = NaN) and the first error message is kept. Non-finite x is marked invalid.
    """
    prior_seed, sim_seed = seed_sequence.spawn(2)
    theta = sample_prior(prior, n, prior_seed).detach().cpu().numpy()
    theta64 = theta.astype(np.float64)
    first_error = ""
    n_failed = 0
    try:
        raw = simulator.simulate(theta64, np.random.default_rng(sim_seed))
    except SimulatorOutputError:
        raise  # malformed for every θ: retrying row by row would hide the bug (and run n times slower)
    except Exception as batch_error:
        rows = []
        for i, row_seed in enumerate(sim_seed.spawn(n)):
            try:
                raw_row = simulator.simulate(theta64[i : i + 1], np.random.default_rng(row_seed))
            except Exception as error:
                n_failed += 1
                if not first_error:
                    first_error = f"{type(error).__name__}: {error}"
                rows.append(None)
                continue
            # A wrong output shape is a bug in the simulator's wrapper, not a failed row: raise it.
            rows.append(_check_output(simulator, raw_row, 1))
        good = [r for r in rows if r is not None]
        if not good:
            raise RuntimeError(f"simulator {simulator.name!r} failed for every parameter in a chunk: {first_error}") from batch_error
        template = good[0]

        def _stack(get: Callable[[dict[str, Any]], np.ndarray]) -> np.ndarray:
            ref = get(template)
            filler = np.full_like(ref, np.nan) if np.issubdtype(ref.dtype, np.floating) else np.zeros_like(ref)
            return np.concatenate([get(r) if r is not None else filler for r in rows])

        result = {"x": _stack(lambda r: r["x"])}
        for group in ("latents", "augmented"):
            result[group] = {k: _stack(lambda r, g=group, k=k: r[g][k]) for k in template[group]}
    else:
        result = _check_output(simulator, raw, n)
    x = result["x"]
    finite = np.isfinite(x.reshape(n, -1)).all(axis=1) if np.issubdtype(x.dtype, np.floating) else np.ones(n, bool)
    return {
        "theta": theta,
        **result,
        "valid": finite,
        "n_failed": n_failed,
        "first_error": first_error,
    }


def simulate(
    simulator: Any,
    n: int | None = None,
    seed: int = 0,
    theta: np.ndarray | torch.Tensor | None = None,
    prior: Any = None,
    chunk_size: int = 1000,
) -> dict[str, Any]:
    """Simulate in memory.

    Give either ``n`` (``theta`` drawn from ``prior``, by default the simulator's own, in chunks
    with exactly the random streams of :func:`sbi_gen.store.simulate_to_hdf5` for the same
    ``seed`` and ``chunk_size``, so the two give identical data) or an explicit ``theta``
    array ``(n, D)`` simulated with ``numpy.random.default_rng(seed)``.

    Returns ``{"theta", "x", "latents", "augmented", "valid"}`` as numpy arrays.
    """
    from sbi_gen.store import check_seed  # not at the top: sbi_gen.store imports this module

    check_simulator(simulator)
    check_seed(seed)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"the chunk size must be a positive integer, got {chunk_size!r}")
    if theta is not None:
        theta = _to_numpy(theta).astype(np.float64)
        if theta.ndim != 2 or theta.shape[1] != len(simulator.parameter_names):
            raise ValueError(f"theta must have shape (n, {len(simulator.parameter_names)}), got {theta.shape}")
        out = _check_output(simulator, simulator.simulate(theta, np.random.default_rng(seed)), theta.shape[0])
        x = out["x"]
        valid = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        return {"theta": theta, **out, "valid": valid}
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"the number of simulations must be a positive integer, got {n!r}")
    prior = prior if prior is not None else simulator.prior
    check_simulator(simulator, prior)
    n, chunk_size = int(n), int(chunk_size)
    sizes = [min(chunk_size, n - start) for start in range(0, n, chunk_size)]
    chunks = [run_chunk(simulator, prior, m, ss) for m, ss in zip(sizes, chunk_seeds(seed, len(sizes)), strict=True)]
    return concatenate_chunks(chunks)


def concatenate_chunks(chunks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join :func:`run_chunk` results row-wise."""
    first = chunks[0]
    return {
        "theta": np.concatenate([c["theta"] for c in chunks]),
        "x": np.concatenate([c["x"] for c in chunks]),
        "latents": {k: np.concatenate([c["latents"][k] for c in chunks]) for k in first["latents"]},
        "augmented": {k: np.concatenate([c["augmented"][k] for c in chunks]) for k in first["augmented"]},
        "valid": np.concatenate([c["valid"] for c in chunks]),
    }
