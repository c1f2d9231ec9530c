"""Several stores mixed into one stream: each step draws one source, a pure function of (seed, step).

Every rank draws the same source at every step, and every source gives every rank the same number of
batches, so DDP ranks never wait on each other. A batch comes from one source. A source that runs out
starts its own next epoch; the mixed epoch has a fixed number of steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping

import numpy as np

from biofm.platform.stream import StreamLoader


def source_probabilities(
    sizes: Mapping[str, int], weights: Mapping[str, float] | None = None, temperature: float = 1.0
) -> dict[str, float]:
    """Explicit `weights`, or sizes ** (1 / temperature): 1 is proportional to size, large is uniform."""
    names = list(sizes)
    if weights:
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"mixing weights name sources {unknown} that are not loaded ({names})")
        raw = np.array([float(weights.get(n, 0.0)) for n in names])
    else:
        if temperature <= 0:
            raise ValueError(f"sampling temperature must be positive, got {temperature}")
        raw = np.array([float(sizes[n]) for n in names]) ** (1.0 / temperature)
    if np.any(raw < 0) or raw.sum() <= 0:
        raise ValueError(f"mixing weights must be non-negative with a positive sum, got {dict(zip(names, raw))}")
    return dict(zip(names, (raw / raw.sum()).tolist()))


def source_at(step: int, seed: int, cumulative: np.ndarray) -> int:
    """Index of the source for a global step: the same on every rank, worker and rerun."""
    u = np.random.default_rng([seed, step, 0x5EED]).random()
    return int(min(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1))


class MixedLoader:
    """Mixes several `StreamLoader`s (one per source) into one stream of batches."""

    def __init__(
        self,
        loaders: Mapping[str, StreamLoader],
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        confirm_trained: bool = False,
    ):
        if not loaders:
            raise ValueError("MixedLoader needs at least one source")
        self.loaders = dict(loaders)
        sizes = {name: loader.stream.n_selected for name, loader in self.loaders.items()}
        self.probabilities = source_probabilities(sizes, weights, temperature)
        self.names = list(self.loaders)
        self.cumulative = np.cumsum([self.probabilities[n] for n in self.names])
        self.seed = seed
        self._steps = steps_per_epoch
        self.step = 0  # global steps yielded
        self._iters: dict[str, Iterator] = {}
        # Lightning fetches a batch or two ahead of training; with `confirm_trained` the state counts only
        # batches confirmed by `mark_trained()` (lightning.ConfirmTrained, once Lightning counts a batch processed)
        self.confirm_trained = confirm_trained
        self._untrained: deque[str] = deque()

    def __len__(self) -> int:
        return self._steps if self._steps is not None else sum(len(l) for l in self.loaders.values())

    def __iter__(self) -> Iterator[dict]:
        steps = len(self)
        end = (self.step // steps + 1) * steps if self.step % steps else self.step + steps
        while self.step < end:
            name = self.names[source_at(self.step, self.seed, self.cumulative)]
            batch = self._next(name)
            self.step += 1
            if self.confirm_trained:
                self._untrained.append(name)
            yield batch

    def mark_trained(self) -> None:
        """The oldest yielded batch has been trained on."""
        if self._untrained:
            self._untrained.popleft()

    def _next(self, name: str):
        if name not in self._iters:
            self._iters[name] = iter(self.loaders[name])
        try:
            return next(self._iters[name])
        except StopIteration:
            self._iters[name] = iter(self.loaders[name])  # the source's next epoch
            return next(self._iters[name])

    def state_dict(self) -> dict:
        """Position after the last trained batch: a resumed run trains exactly the batches not yet trained."""
        sources = {}
        for name, loader in self.loaders.items():
            state = loader.state_dict()
            state["yielded"] = max(0, state["yielded"] - self._untrained.count(name))
            sources[name] = state
        return {"step": self.step - len(self._untrained), "sources": sources}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for name, loader_state in state["sources"].items():
            if name in self.loaders:
                self.loaders[name].load_state_dict(loader_state)
        self._iters = {}
        self._untrained.clear()


class ChainLoader:
    """Evaluation over several sources: every batch of each source in turn (equal counts per rank)."""

    def __init__(self, loaders: Mapping[str, StreamLoader]):
        self.loaders = dict(loaders)

    def __len__(self) -> int:
        return sum(len(l) for l in self.loaders.values())

    def __iter__(self) -> Iterator[dict]:
        for loader in self.loaders.values():
            yield from loader
