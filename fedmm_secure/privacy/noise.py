"""DP-SGD noise for the next step, drawn on a second thread while this step computes.

The noise of a DP-SGD step covers every trainable parameter (the embedding tables whole), so on
models with large tables drawing it is about half of a step, and it does not depend on the data.
:class:`NoisePrefetcher` keeps two buffer sets: while a step uses one as its gradients, a
background thread fills the other from the trainer's own noise source. The draw happens in a
C/numpy/torch region that releases the GIL, so the two threads use two cores.

Privacy is unchanged: every step still gets fresh, independent noise of the same std from the
same kind of source; a set is refilled only after the step that used it has finished, and
prefetched noise a run never uses is discarded. The source must not be shared with anything
else (e.g. the batch sampler): a keystream read from two threads at once is a bug.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .randomness import RandomSource, normal_

__all__ = ["NoisePrefetcher", "PREFETCH_MIN_PARAMS"]

# Below this many noised values per step the hand-off between threads costs more than the
# overlap saves.
PREFETCH_MIN_PARAMS = 1 << 18


class NoisePrefetcher:
    """Two sets of noise buffers shaped like ``params``, one always being filled in the background."""

    def __init__(self, params: list[torch.Tensor], generator: RandomSource, std: float) -> None:
        self._sets = [[torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
                      for _ in range(2)]
        self._generator, self._std = generator, float(std)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dp-noise")
        self._next: Future = self._pool.submit(self._fill, 0)

    def _fill(self, i: int) -> int:
        for buf in self._sets[i]:
            normal_(self._generator, buf, self._std)
        return i

    def take(self) -> list[torch.Tensor]:
        """This step's noise (one buffer per parameter, in order). Call once per step, after
        the previous step's update is done: that step's buffers are refilled from now on."""
        if self._pool is None:
            raise RuntimeError("the noise prefetcher is closed")
        i = self._next.result()
        self._next = self._pool.submit(self._fill, 1 - i)
        return self._sets[i]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
