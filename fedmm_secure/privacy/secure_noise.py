"""Gaussian noise from a cryptographic generator, for DP-SGD's ``secure_mode``.

torch's default generator (a Mersenne Twister / Philox seeded with 64 bits) is predictable to
anyone who learns its state, and so would its noise be. Opacus's ``secure_mode`` needs the
``torchcsprng`` package, which has no release for current torch; this module draws the noise
from AES-256-CTR keyed from the OS (``primitives.prg``), turned into normals by Box-Muller in
float64. Each draw uses a fresh sub-key, so no keystream is ever reused.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..primitives.keys import SymmetricKey
from ..primitives.prg import expand

__all__ = ["CsprngNormal"]


class CsprngNormal:
    def __init__(self, *, entropy=os.urandom) -> None:
        self._key = SymmetricKey.generate(entropy=entropy)
        self._draws = 0

    def _uniform_pairs(self, pairs: int) -> tuple[np.ndarray, np.ndarray]:
        sub = self._key.derive(context=b"fedmm-secure/dp-noise/" + self._draws.to_bytes(8, "big"))
        self._draws += 1
        words = expand(sub, 4 * pairs).astype(np.uint64).reshape(pairs, 4)
        # 53-bit uniforms in (0, 1]: u1 never 0, so log(u1) is finite.
        a = ((words[:, 0] << np.uint64(21)) | (words[:, 1] >> np.uint64(11))).astype(np.float64)
        b = ((words[:, 2] << np.uint64(21)) | (words[:, 3] >> np.uint64(11))).astype(np.float64)
        scale = 2.0 ** -53
        return (a + 1.0) * scale, b * scale

    def normal(self, shape: torch.Size | tuple[int, ...], std: float, *, dtype: torch.dtype) -> torch.Tensor:
        n = int(math.prod(shape))
        pairs = (n + 1) // 2
        u1, u2 = self._uniform_pairs(max(1, pairs))
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.empty(2 * len(r))
        z[0::2] = r * np.cos(2.0 * math.pi * u2)
        z[1::2] = r * np.sin(2.0 * math.pi * u2)
        return torch.from_numpy(z[:n] * std).reshape(shape).to(dtype)
