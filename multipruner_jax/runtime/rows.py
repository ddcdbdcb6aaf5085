"""Token rows in fixed-size batches on a mesh: what the scorer runs and the search step schedules.

``tokens: int32[rows, seq]`` are padded with zero rows to a multiple of ``batch_size``, so that no
batch ever has another shape (one compiled program for all of them); padding rows are computed
and dropped (``spans`` names the real rows of each batch). Batches are placed once, sharded over
the mesh's "data" axis. ``counts`` holds each row's counted targets, the denominators of the
reference protocol (targets ``1..T-1``, those equal to ``ignore_id`` not counted).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from multipruner_jax.base import mesh as mesh_lib


class Rows:
    """``tokens: int32[count, seq_len]`` in batches of ``batch_size`` rows on ``mesh``.

    ``batches[b]``: the device array of batch ``b``; ``spans[b]``: its real rows (a range of
    row indices); ``counts: float64[count]``: counted targets per row; ``ignore_id`` is ``-1``
    when every target counts.
    """

    def __init__(self, tokens: np.ndarray, *, ignore_id: int | None, batch_size: int, mesh: Mesh):
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be int32[rows>0, seq>1], got shape {tokens.shape}")
        mesh_lib.check_batch_size("batch size", batch_size, mesh.shape["data"])
        self.count, self.seq_len = tokens.shape
        self.batch_size = batch_size
        self.ignore_id = -1 if ignore_id is None else int(ignore_id)
        self.counts = (tokens[:, 1:] != self.ignore_id).sum(axis=1).astype(np.float64)
        padded = math.ceil(self.count / batch_size) * batch_size
        self._host = np.zeros((padded, self.seq_len), np.int32)
        self._host[: self.count] = tokens
        sharding = mesh_lib.rows_sharding(mesh, 2)
        starts = range(0, padded, batch_size)
        self.batches: list[jax.Array] = [
            mesh_lib.global_array(self.host(b), sharding) for b in range(len(starts))
        ]
        self.spans = [range(i, min(i + batch_size, self.count)) for i in starts]

    def __len__(self) -> int:
        """The number of batches."""
        return len(self.batches)

    def host(self, batch: int) -> np.ndarray:
        """Batch ``batch`` on the host, padding rows included: ``int32[batch_size, seq_len]``."""
        return self._host[batch * self.batch_size : (batch + 1) * self.batch_size]

    def check_counted(self) -> None:
        """Refuse rows without a counted target: their mean NLL would be 0 / 0."""
        if np.any(self.counts == 0):
            raise ValueError("a scoring row has no counted target token (all ignored)")
