"""The encode job: an image source through a VAE encoder into a latent store, resumable.

    latentdit encode imagenet/train --out train.zarr --vae stabilityai/sd-vae-ft-ema
    torchrun --nproc_per_node=8 -m cli encode imagenet/train --out train.zarr ...

Rank 0 lists the source, calibrates the quantization and creates the store (or checks that an
existing one was made with the same configuration); every rank then encodes the shards it owns
(shard i belongs to rank i % world_size) and writes nothing else; rank 0 finalizes. Re-running
the same command skips complete shards and yields a bit-identical store.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from foundation.compile import compile_cache, uses_cuda_graphs
from foundation.distributed import DistInfo, barrier, setup_distributed, teardown_distributed
from foundation.faults import doing, resource_faults
from foundation.locks import Lock
from foundation.preemption import StopSignals, stopped
from latent_store import (
    LABEL_FILL,
    ArraySpec,
    Failure,
    LatentditError,
    SchemaMismatchError,
    StoreReadError,
    StoreSpec,
    StoreWriter,
    finalize_store,
    open_store,
)
from pipeline.encode_config import FAILURE_RULE, EncodeConfig, parse_max_failures
from pipeline.encode_graph import BatchLauncher, EncodeGraph
from pipeline.feature_graph import NAMES as FEATURE_NAMES
from pipeline.feature_graph import FeatureGraph, FeatureLauncher
from pipeline.feature_setup import read_projection
from pipeline.feature_writer import AddedFeatureWriter
from pipeline.features import load_feature_encoder
from pipeline.features_config import FEATURES
from pipeline.loader import Batch, crop_loader, shard_batches
from pipeline.source import open_source
from pipeline.store_create import store_lock
from pipeline.store_setup import prepare_store
from pipeline.vae import encodable_shape, load_vae

__all__ = ["EncodeConfig", "TooManyFailuresError", "encode", "parse_max_failures"]

log = logging.getLogger(__name__)


class TooManyFailuresError(LatentditError):
    """More source images failed to decode than --max-failures allows."""


def encode(cfg: EncodeConfig) -> dict | None:
    """Run the encode job on this rank; returns the store summary on rank 0, None elsewhere.

    Under torchrun: NCCL on GPUs (each rank on the GPU of its LOCAL_RANK) or gloo on the CPU. A
    single process runs the same code path in a group of one (the trainer's distributed setup).
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LatentditError("--device cuda: no CUDA device is visible; use --device cpu")
    info = setup_distributed(cfg.device)
    lock = store_lock(cfg.out, cfg.store_options)  # rank 0 takes it: one lock per job
    faults = resource_faults(
        f"encoding into {cfg.out}",
        intact="complete shards are kept (a shard counts once its record is written)",
        resume=f"re-run the same command to resume: {cfg.command or 'latentdit encode ...'}",
        also=(StoreReadError,),
        remedies={"memory": "free memory, or use a smaller --batch-size and fewer --workers"},
    )
    try:
        with faults:
            return _encode(cfg, info, lock)
    finally:
        lock.release()
        teardown_distributed()


def _broadcast_error(error: LatentditError | None) -> None:
    """Raise on every rank the error rank 0 met while preparing the store, if any."""
    message = [str(error) if error is not None else None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise LatentditError(message[0])


def _encode(cfg: EncodeConfig, info: DistInfo, lock: Lock) -> dict | None:
    cfg = cfg.for_device(info.device.type)  # the speed options left unset, at the device's default
    source = open_source(
        cfg.source,
        val_labels=cfg.val_labels,
        classes=cfg.classes,
        devkit_synsets=cfg.devkit_synsets,
        label_key=cfg.label_key,
        include_unfinished=cfg.include_unfinished,
        max_file_mb=cfg.max_file_mb,
    )
    vae, vae_info = load_vae(cfg.vae_config(str(info.device)))
    encoder = _feature_encoder(cfg, vae, str(info.device))
    pre = cfg.preprocess_config()
    error = None
    if info.is_main:
        try:
            lock.acquire()
            prepare_store(cfg, source, vae, vae_info, pre, encoder)
        except LatentditError as e:
            error = e
    _broadcast_error(error)
    store = open_store(cfg.out, storage_options=cfg.store_options)
    if (listed := source.describe()) != dict(store.spec.source):  # every rank listed the source
        raise SchemaMismatchError(
            f"rank {info.rank} lists {cfg.source} differently from the store "
            f"({listed['fingerprint']} vs {store.spec.source.get('fingerprint')}): did the "
            "folder change during the run, or do the nodes see different copies?"
        )
    owned = range(info.rank, store.spec.num_shards, info.world_size)
    features = None if encoder is None else feature_launcher(cfg, encoder, store)
    if features is not None and store.spec.array(FEATURES).added:  # the latents are kept
        writer, vae = AddedFeatureWriter(store, owned), None
    else:
        writer = StoreWriter(store, owned)
    log.info(
        "rank %d/%d: %d of its %d shards to encode",
        info.rank,
        info.world_size,
        len(writer.todo),
        len(owned),
    )
    with (
        compile_cache(cfg.compile_cache if cfg.compile else None, save=info.is_main),
        cudnn_benchmark(cfg.cudnn_benchmark),
        StopSignals() as stop,  # a signal: the shard write in flight ends, then the job exits
    ):
        encode_shards(cfg, source, vae, pre, writer, info, stop, features=features)
    if signum := stop.agreed():  # every rank, once its loop ended (a collective, like a barrier)
        added = isinstance(writer, AddedFeatureWriter)  # then the features' shards are counted
        done = sum(r is not None for r in store.records(FEATURES if added else None))
        what = f"stopped with {done} of {store.spec.num_shards} shards of {cfg.out} complete; "
        raise stopped(
            signum, what + "re-run the same command to encode the rest", main=info.is_main
        )
    barrier()
    if not info.is_main:
        return None
    summary = finalize_store(store)
    log.info(
        "%s: %d samples written, %d failed (%s)",
        cfg.out,
        summary["samples_written"],
        summary["samples_failed"],
        summary["failure_reasons"] or "no failures",
    )
    if skipped := listed.get("skipped"):  # never samples: left out when SOURCE was listed
        summary["source_skipped"] = skipped
        summary["source_skipped_kinds"] = listed.get("skipped_kinds", {})
        log.warning(
            "%s: %d paths skipped when listing it (%s): see the store's source attribute",
            cfg.source,
            skipped,
            summary["source_skipped_kinds"] or "see the warnings above",
        )
    return summary


def _feature_encoder(cfg: EncodeConfig, vae, device: str):
    """The --features encoder on `device` (None without --features); its token grid follows
    the latents' (`FeaturesConfig.grid_for`)."""
    fcfg = cfg.features_config(device)
    if fcfg is None:
        return None
    side = encodable_shape(vae, image_size=cfg.image_size, posterior=cfg.posterior)[1]
    return load_feature_encoder(fcfg, latent_side=side)


def feature_launcher(cfg: EncodeConfig, encoder, store) -> FeatureLauncher:
    """The feature graph of the store's declarations (and projection) and its launcher."""
    arrays = [store.spec.array(n) for n in FEATURE_NAMES]
    graph = FeatureGraph(encoder, arrays=arrays, projection=read_projection(store), flip=cfg.flip)
    return FeatureLauncher(graph)


class ShardBuffer:
    """The arrays, labels, failures and modes of one shard while it is being encoded."""

    def __init__(self, spec: StoreSpec, shard: int, arrays: Sequence[ArraySpec]) -> None:
        self.shard = shard
        self.start, self.stop = spec.shard_bounds(shard)
        self.arrays = {
            a.name: np.zeros((self.stop - self.start, *spec.row_shape(a.name)), a.dtype)
            for a in arrays
        }
        self.labels = np.full(self.stop - self.start, LABEL_FILL, np.int16)
        self.failures: list[Failure] = []
        self.modes: Counter[str] = Counter()
        self.clipped: Counter[str] = Counter()  # per array, as the quantizer counted
        self.seen = 0

    @property
    def full(self) -> bool:
        return self.seen == self.stop - self.start

    def write(self, writer: StoreWriter):
        with doing(f"writing shard {self.shard} of {writer.store.path}"):
            return self._write(writer)

    def _write(self, writer: StoreWriter):
        return writer.write_shard(
            self.shard,
            self.arrays,
            self.labels,
            failures=self.failures,
            image_modes=self.modes,
            clipped=dict(self.clipped),
        )


def encode_shards(
    cfg: EncodeConfig,
    source,
    vae,
    pre,
    writer: StoreWriter | AddedFeatureWriter,
    info,
    stop: StopSignals | None = None,
    *,
    features: FeatureLauncher | None = None,
) -> None:
    """Encode and write the shards in `writer.todo`: the latents with `vae` (None: none, for
    features added to a complete store) and the feature arrays with `features`. On a stop signal
    (`stop`) no further batch is launched: the launched one is finished and the shard writes in
    flight end; a shard left partial has no record, and a resume encodes it again.

    Nothing on the main thread waits for the device between batches: batch k+1 is launched before
    batch k's uint8 codes (copied to pinned memory without blocking) are read back, and a full
    shard is written by a thread while the next one is computed.
    """
    spec = writer.spec
    limit = cfg.failure_limit(spec.num_samples)
    failed = sum(
        len(r.failures) for i, r in enumerate(writer.store.records()) if r and i in writer.done
    )
    bounds = [spec.shard_bounds(s) for s in writer.todo]
    loader = crop_loader(
        source,
        pre,
        shard_batches(bounds, cfg.batch_size),
        workers=cfg.decode_workers(info.device.type),
        pin_memory=info.device.type == "cuda",
        prefetch=cfg.prefetch,
    )
    launchers = [make_launcher(cfg, vae, spec)] if vae is not None else []
    launchers += [features] if features is not None else []
    total = sum(b - a for a, b in bounds)
    bar = tqdm(total=total, unit="img", disable=not info.is_main, desc="encode", smoothing=0.05)
    arrays = writer.arrays if isinstance(writer, AddedFeatureWriter) else spec.base_arrays
    buffers = {s: ShardBuffer(spec, s, arrays) for s in writer.todo}
    writes = _ShardWrites(writer)
    started, previous, seen = time.perf_counter(), None, 0
    with ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as pool:
        for batch in loader:
            if stop is not None and stop.requested:
                break  # the launched batch is finished below; a shard left partial is redone
            buf = buffers[batch.indices[0] // spec.shard_size]
            failed += _record_failures(source, buf, batch)
            if failed > limit:
                raise TooManyFailuresError(_too_many(cfg, source, failed, limit, buf))
            keys = [source.key(i) for i in batch.ok]
            launched = [ln.launch(batch.crops, keys) for ln in launchers] if batch.ok else []
            current = (batch, buf, launched)
            if previous is not None:
                _finish(source, *previous, bar, buffers, writes, pool)
            previous, seen = current, seen + len(batch.indices)
            bar.set_postfix(failed=failed, refresh=False)
        if previous is not None:
            _finish(source, *previous, bar, buffers, writes, pool)
        writes.wait()
    bar.close()
    seconds = time.perf_counter() - started
    log.info(
        "rank %d: encoded %d images in %.1f s (%.1f images/s), %d failed",
        info.rank,
        seen,
        seconds,
        seen / max(seconds, 1e-9),
        failed,
    )


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """torch.backends.cudnn.benchmark set to `enabled` inside, restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def make_launcher(cfg: EncodeConfig, vae, spec: StoreSpec) -> BatchLauncher:
    """This job's encode graph (compiled with --compile in --compile-mode) and its launcher, which
    pads every batch to one shape when the graph is compiled or cuDNN autotunes. `cfg` has its
    speed options resolved (`EncodeConfig.for_device`)."""
    assert cfg.compile is not None, "resolve the speed options first: cfg.for_device(...)"
    graph = EncodeGraph(
        vae,
        quant=spec.quant,
        posterior=cfg.posterior,
        flip=cfg.flip,
        logstd_quant=spec.logstd_quant,
    )
    if cfg.compile:
        graph = torch.compile(graph, mode=cfg.compile_mode, dynamic=False)
    return BatchLauncher(
        graph,
        device=vae.device,
        latent_shape=spec.latent_shape,
        variants=len(spec.variants),
        posterior=cfg.posterior,
        # one shape for a compiled graph, and for cuDNN's autotuning (which times every new shape)
        static_batch=cfg.batch_size if cfg.compile or cfg.cudnn_benchmark else None,
        cuda_graphs=cfg.compile and uses_cuda_graphs(cfg.compile_mode),
    )


class _ShardWrites:
    """At most one shard write in flight on the writer thread."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer, self.pending = writer, None

    def submit(self, pool: ThreadPoolExecutor, buf: ShardBuffer) -> None:
        self.wait()
        self.pending = pool.submit(buf.write, self.writer)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None


def _record_failures(source, buf: ShardBuffer, batch: Batch) -> int:
    for index, reason in batch.failures:
        buf.failures.append(Failure(index=index, key=source.key(index), reason=reason))
        log.warning("skipping %s: %s", source.key(index), reason)
    return len(batch.failures)


def _finish(source, batch: Batch, buf: ShardBuffer, launched, bar, buffers, writes, pool) -> None:
    """Wait for one launched batch, put its codes in its shard buffer, write the shard when full."""
    if batch.ok:
        rows = np.asarray(batch.ok) - buf.start
        for one in launched:
            arrays, clipped = one.wait().named()
            for name, values in arrays.items():
                buf.arrays[name][rows] = values.numpy()
            buf.clipped.update({name: int(count.sum()) for name, count in clipped.items()})
        buf.labels[rows] = [source.label(i) for i in batch.ok]
        buf.modes.update(batch.modes)
    buf.seen += len(batch.indices)
    bar.update(len(batch.indices))
    if buf.full:
        writes.submit(pool, buffers.pop(buf.shard))


def _too_many(cfg: EncodeConfig, source, failed: int, limit: int, buf: ShardBuffer) -> str:
    example = f"latest: {buf.failures[-1].key}: {buf.failures[-1].reason}" if buf.failures else ""
    rule = cfg.max_failures if cfg.max_failures is not None else f"(default: {FAILURE_RULE})"
    return (
        f"{failed} images failed to decode, more than --max-failures {rule} allows "
        f"({limit} of {len(source)}; {example}). Complete shards are kept: fix or remove the "
        "bad files and re-run, or raise --max-failures"
    )
