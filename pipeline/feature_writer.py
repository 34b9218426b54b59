"""Write the feature arrays added to a complete store, shard by shard, beside its latents.

    writer = AddedFeatureWriter(store, shards=owned)     # each rank its own shards
    encode_shards(cfg, source, None, pre, writer, info, features=launcher)   # no VAE runs

The encode loop hands it whole shards as it hands a `StoreWriter` the latents; it writes each
feature array through its `AddedArrayWriter` (`latent_store.added`: own records, resumable, a
damaged shard written again) and nothing else. A sample the store holds must decode now as it
did then: one that does not means the source changed, and the run stops naming it. Rows of
samples the store does not hold (recorded failures) are written as zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from latent_store import AddedArrayWriter, LatentditError, LatentStore
from latent_store.schema import LABEL_FILL, Failure
from pipeline.feature_graph import NAMES


class AddedFeatureWriter:
    """The shards a process owns of the feature arrays added to a store (see the module)."""

    def __init__(self, store: LatentStore, shards: Iterable[int], names: Sequence[str] = NAMES):
        owned = list(shards)
        self.writers = {n: AddedArrayWriter(store, n, owned) for n in names}
        first = self.writers[names[0]]
        self.store, self.spec, self.labels = first.store, first.spec, first.labels
        self.arrays = tuple(self.spec.array(n) for n in names)
        self.todo = sorted({s for w in self.writers.values() for s in w.todo})
        self.done = set(owned) - set(self.todo)

    def write_shard(
        self,
        shard: int,
        arrays: Mapping[str, np.ndarray],
        labels: np.ndarray,
        *,
        failures: Sequence[Failure] = (),
        image_modes: Mapping[str, int] | None = None,
        clipped: Mapping[str, int] | None = None,
    ) -> None:
        """Write the shard's rows of each feature array that still needs them (the arguments of
        `StoreWriter.write_shard`; labels: as the source gives them now, LABEL_FILL at failures)."""
        start, stop = self.spec.shard_bounds(shard)
        held = self.labels[start:stop] != LABEL_FILL
        lost = np.flatnonzero(held & (np.asarray(labels) == LABEL_FILL))
        if lost.size:
            index = start + int(lost[0])
            reason = next((f.reason for f in failures if f.index == index), "not decoded")
            raise LatentditError(
                f"{self.store.path}: sample {index} is in the store but its image fails now "
                f"({reason}): the source changed since the store was made; restore it, or "
                "encode a new store"
            )
        for name, writer in self.writers.items():
            if shard in writer.todo and shard not in writer.done:
                values = arrays[name]
                values[~held] = 0
                writer.write_shard(shard, values, clipped=(clipped or {}).get(name))
        self.done.add(shard)
