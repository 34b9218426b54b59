"""The training loop. Entry points:

    latentdit train --store data/in256.zarr --run runs/b2 --model DiT-B/2          # one device
    torchrun --standalone --nproc_per_node=8 cli.py train --store ... --run ...   # 8 GPUs

Re-running the same command on a run folder resumes from its latest checkpoint, exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundation.compile import compile_cache
from foundation.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    seed_everything,
    setup_distributed,
)
from foundation.distributed import teardown_distributed as teardown
from foundation.preemption import StopSignals
from foundation.urls import parse_storage_options
from latent_store import LatentStore, open_store
from latent_store.verify import verify_store
from trainer import repa
from trainer.checkpoint import (
    CheckpointMismatchError,
    capture_rng_state,
    checkpoint_meta,
    init_weights,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from trainer.config import TrainConfig
from trainer.cost import RunCost
from trainer.data import BatchLayout, build_batches
from trainer.metrics import LOG_FILE, TrainLogger, peak_flops
from trainer.model import MODEL_OVERRIDES, DiT, ModelConfigError, build_model, forward_flops
from trainer.normalization import normalization_from_store
from trainer.objective import DDPM, FlowMatching, Objective
from trainer.preemption import carry_log_interval, gather_log_interval, preempted
from trainer.prefetch import Prefetcher
from trainer.run_dir import CONFIG_FILE, TrainSummary, check_resume
from trainer.step import Trainee, lr_at, make_trainee, train_step

log = logging.getLogger(__name__)

SampleFn = Callable[[DiT, dict[str, Any], int, Path], Path | None]
"""sample_fn(ema_model, meta, step, run_dir) -> image path: called on rank 0 every `sample_every`
steps and at the end, e.g. to write an EMA sample grid under run_dir through the sampler's
decoder-only path (the image it returns also goes to W&B with --wandb)."""
EvalFn = Callable[[DiT, dict[str, Any], int, Path], dict[str, Any]]
"""eval_fn(ema_model, meta, step, run_dir) -> metrics: called on every rank every `eval_every` steps
and at the end, so that the ranks can share the work (e.g. FID of EMA samples,
`evaluation.training.fid_hook`); rank 0's metrics are logged to log.jsonl."""


def build_objective(cfg: TrainConfig) -> Objective:
    if cfg.objective == DDPM.KIND:
        return DDPM(schedule=cfg.ddpm_schedule, learn_sigma=cfg.learn_sigma)
    return FlowMatching(timesteps=cfg.timesteps)


def build_model_for_store(cfg: TrainConfig, store: LatentStore) -> DiT:
    """The configured preset sized to the store's latents (channels, size) and classes."""
    c, h, w = store.spec.latent_shape
    sizes = {k: getattr(cfg, k) for k in MODEL_OVERRIDES}
    if h != w:
        raise ModelConfigError(f"{store.path}: latents are {h}x{w}; the DiT needs square latents")
    try:
        model = build_model(
            cfg.model,
            input_size=h,
            in_channels=c,
            num_classes=store.spec.num_classes,
            qk_norm=cfg.qk_norm,
            pos_embed=cfg.pos_embed,
            grad_checkpointing=cfg.grad_checkpointing,
            learn_sigma=cfg.learn_sigma,
            **{k: v for k, v in sizes.items() if v is not None},
            **repa.model_sizes(cfg, store),
        )
    except ModelConfigError as e:
        raise ModelConfigError(
            f"{store.path} ({c}x{h}x{w} latents) does not fit --model {cfg.model}: {e}"
        ) from None
    blocks = cfg.recomputed_blocks
    model.checkpoint_blocks = model.num_blocks if blocks is None else blocks
    return model


def prepare_run(cfg: TrainConfig, dist: DistInfo) -> Path:
    """Create the run folder and write config.json (rank 0), after `check_resume` passed."""
    run = Path(cfg.run)
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / CONFIG_FILE).write_text(cfg.to_json())
    barrier()
    return run


def resume(run: Path, trainee: Trainee, start: int) -> dict[str, Any] | None:
    """Load the run's latest checkpoint (of step `start`, checked) into `trainee` on every rank;
    returns its open log interval (`trainer.preemption`), if it holds one.

    Every rank must see the same latest checkpoint: a node that does not (a run folder on
    node-local disk) would start over while the others resume, so all ranks stop instead.
    """
    found = latest_checkpoint(run)
    seen = all_gather_objects(found.name if found else None)
    if len(set(seen)) > 1:
        raise CheckpointMismatchError(
            f"{run}: the ranks see different latest checkpoints ({seen}, by rank); the run "
            "folder must be one folder that every node shares (see docs/multinode.md)"
        )
    if start == 0:
        return None
    ckpt = load_checkpoint(run)
    trainee.model.load_state_dict(ckpt.model_state)
    trainee.ema.load_state_dict(ckpt.ema_state)
    trainee.optimizer.load_state_dict(ckpt.train_state["optimizer"])
    trainee.sync_compute()  # --bf16-weights: the forward's copy of the loaded masters
    restore_rng_state(ckpt.train_state["rng"])
    log.info("resuming %s from step %d", run, start)
    return ckpt.train_state.get("log")


def save(
    run: Path,
    trainee: Trainee,
    *,
    step: int,
    lr: float,
    steps_per_epoch: int,
    meta,
    cfg,
    dist,
    logger: TrainLogger,
    files=None,
) -> None:
    """Rank 0 writes the checkpoint of finished step `step`, with every rank's open log interval
    (`trainer.preemption`); every rank calls it and waits for it."""
    interval = gather_log_interval(logger)
    if dist.is_main:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        state = {
            "optimizer": trainee.optimizer.state_dict(),
            "schedule": {"lr": lr, "next_lr": lr_at(step, cfg)},
            "rng": capture_rng_state(),
            "data": {"epoch": epoch, "step_in_epoch": step_in_epoch},
            "log": interval,
        }
        save_checkpoint(
            run,
            step=step,
            model=trainee.model,
            ema=trainee.ema,
            train_state=state,
            meta=meta,
            keep_last=cfg.keep_last,
            files=files,
        )
    barrier()


def train(
    cfg: TrainConfig, *, sample_fn: SampleFn | None = None, eval_fn: EvalFn | None = None
) -> TrainSummary:
    """Train (or resume) the run `cfg.run` on `cfg.store` up to `cfg.steps`; what it did."""
    dist = setup_distributed(cfg.device)
    cache = Path(cfg.compile_cache) if cfg.compile and cfg.compile_cache else None
    try:
        with compile_cache(cache, save=dist.is_main):
            return _train(cfg, dist, sample_fn, eval_fn)
    finally:
        teardown()


def _train(
    cfg: TrainConfig, dist: DistInfo, sample_fn: SampleFn | None, eval_fn: EvalFn | None = None
) -> TrainSummary:
    called = time.perf_counter()  # the run's cost clock (trainer.cost) counts from here
    store = open_store(cfg.store, storage_options=parse_storage_options(cfg.storage_options))
    if cfg.verify:  # before the summary's statistics become the normalization
        verify_store(store)
    seed_everything(cfg.seed, dist.rank)
    model = build_model_for_store(cfg, store).to(dist.device)
    norm, objective = normalization_from_store(store, cfg.normalization), build_objective(cfg)
    if cfg.init and latest_checkpoint(cfg.run) is None:
        objective = init_weights(model, cfg.init, objective=objective, normalization=norm)
    meta = checkpoint_meta(
        preset=cfg.model, model=model, objective=objective, normalization=norm, store=store
    )
    if alignment := repa.alignment_for(cfg, store, objective, model):
        meta["repa"] = repa.alignment_meta(alignment, store)
    start = check_resume(cfg, meta)  # reads only: a refused resume leaves the run as it was
    layout = BatchLayout(
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    data = build_batches(
        store,
        norm,
        layout,
        mode=cfg.data,
        seed=cfg.seed,
        device=dist.device,
        shuffle_shards=cfg.shuffle_shards,
        verify=cfg.verify,
        arrays=alignment.arrays if alignment else (),
    )
    data = Prefetcher(data, dist.device) if cfg.prefetch else data
    run = prepare_run(cfg, dist)
    trainee = make_trainee(model, cfg, dist)
    interval = resume(run, trainee, start)
    began, loss = time.perf_counter(), None
    cost = RunCost.resume(
        run / LOG_FILE,
        start_step=start,
        started=called,
        global_batch=cfg.batch_size,
        steps_per_epoch=data.steps_per_epoch,
        world_size=dist.world_size,
        milestones=cfg.milestones,
    )
    logger = TrainLogger(
        run, dist=dist, start_step=start, total_steps=cfg.steps, log_every=cfg.log_every, global_batch=cfg.batch_size,
        forward_flops=forward_flops(model.config), peak=peak_flops(dist.device, cfg.peak_tflops),
        cost=cost, wandb_cfg=cfg if cfg.wandb else None,
    )  # fmt: skip
    carry_log_interval(logger, interval, dist)
    with StopSignals() as stop:  # SIGTERM, SIGINT, SIGUSR1: checkpoint the step, then exit
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batches = data.get(*divmod(step, data.steps_per_epoch))
            data_s, lr = time.perf_counter() - t0, lr_at(step, cfg)
            result = train_step(
                trainee,
                alignment or objective,
                batches,
                step=step,
                lr=lr,
                cfg=cfg,
                layout=layout,
                device=dist.device,
            )
            done = step + 1
            if cfg.prefetch and done < cfg.steps:  # gathered while this step runs on the device
                data.prefetch(*divmod(done, data.steps_per_epoch))
            record = logger.update(done, result.loss, result.grad_norm, lr, data_s, result.terms)
            loss = record["loss"] if record else loss
            signum = stop.agreed(overlap=True)  # every rank, every step: one CPU all-reduce
            if done % cfg.ckpt_every == 0 or done == cfg.steps or signum:
                save(
                    run,
                    trainee,
                    step=done,
                    lr=lr,
                    steps_per_epoch=data.steps_per_epoch,
                    meta=meta,
                    cfg=cfg,
                    dist=dist,
                    logger=logger,
                    files=norm.files(),
                )
            if signum:
                logger.close()
                raise preempted(signum, run, done, dist)
            loaded = {**meta, "normalization": norm.resolved_meta(), "step": done}  # as if loaded
            if (
                sample_fn
                and dist.is_main
                and (done == cfg.steps or done % (cfg.sample_every or cfg.steps) == 0)
            ):
                grid = sample_fn(trainee.ema, loaded, done, run)
                logger.log_image("samples/ema_grid", grid, done)
            if eval_fn and (done == cfg.steps or done % (cfg.eval_every or cfg.steps) == 0):
                logger.log_eval(done, eval_fn(trainee.ema, loaded, done, run))
    logger.close()
    seconds = time.perf_counter() - began
    return TrainSummary.of(cfg, model, start=start, seconds=seconds, loss=loss, rank=dist.rank)
