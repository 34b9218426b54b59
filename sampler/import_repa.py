"""What importing REPA's SiT adds to the DiT/SiT import: its projectors, its time, its old layout.

    latentdit import last.pt --run runs/repa-xl2 --format repa

REPA's SiT (sihyun-yu/REPA `models/sit.py`) is SiT without learned sigma plus `projectors`: one
3-layer SiLU MLP per encoder (hidden -> projector_dim -> projector_dim -> z_dim) that reads the
output of block `encoder_depth` for the alignment loss. Sampling never uses them: the import drops
them from the model and records what they were (`source.projectors` in meta.json). A single
projector (one encoder, as REPA's released model) is kept beside the weights in the checkpoint
folder's `projector.safetensors`, in latentdit's names, so that `train --init` with --repa-coeff
fine-tunes with it where its widths fit (`trainer.repa.init_state`). Its time is t in [0, 1] with
t = 1 noise and the model predicts the velocity eps - x0 (`FlowMatching(time_scale=1)`); its
train.py draws t uniformly (`--weighting uniform`) or as sigma / (1 + sigma) with log sigma
~ N(0, 1) (`lognormal`), which is the logit-normal density with m = 0, s = 1 (SD3's).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from sampler.errors import CheckpointImportError
from trainer.objective import FlowMatching
from trainer.repa import PROJECTOR, PROJECTOR_FILE

log = logging.getLogger(__name__)

PROJECTORS = "projectors."
LEGACY_BLOCKS = "decoder_blocks."  # generate.py --legacy: blocks after encoder_depth lived here
REPA_TIME_SCALE = 1.0  # REPA's SiT embeds t in [0, 1] as it is
WEIGHTINGS = {"uniform": "uniform", "lognormal": "logit_normal"}  # REPA --weighting -> ours


def split_projectors(
    state: dict[str, Tensor], fmt: str, path: Path
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the state without REPA's projectors, the projectors); refuses a format they contradict."""
    projectors = {k: v for k, v in state.items() if k.startswith(PROJECTORS)}
    if fmt != "repa" and projectors:
        raise CheckpointImportError(
            f"{path}: holds REPA projectors ({next(iter(projectors))}, ...): a REPA SiT; use "
            "--format repa"
        )
    if fmt == "repa" and not projectors:
        raise CheckpointImportError(
            f"{path}: no {PROJECTORS}* tensors, so not a REPA SiT (REPA's train.py and released "
            "last.pt have them); use --format sit or dit"
        )
    return {k: v for k, v in state.items() if k not in projectors}, projectors


def unlegacy(state: dict[str, Tensor], args: dict, path: Path) -> dict[str, Tensor]:
    """REPA's legacy layout (`decoder_blocks.i` = `blocks.{encoder_depth + i}`) in today's names.

    As generate.py's `load_legacy_checkpoints`; the blocks before them number encoder_depth.
    """
    if not any(k.startswith(LEGACY_BLOCKS) for k in state):
        return state
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if args.get("encoder_depth", depth) != depth:
        raise CheckpointImportError(
            f"{path}: legacy layout with {depth} blocks before decoder_blocks, but its args say "
            f"encoder_depth {args['encoder_depth']}; the file is inconsistent"
        )

    def rename(key: str) -> str:
        found = re.match(r"decoder_blocks\.(\d+)\.(.*)", key)
        return f"blocks.{depth + int(found.group(1))}.{found.group(2)}" if found else key

    log.info("%s: legacy decoder_blocks renamed to blocks %d..", path, depth)
    return {rename(k): v for k, v in state.items()}


def kept_projector(projectors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{PROJECTOR_FILE: REPA's one projector in our names (`projector.{0,2,4}.*`)}, or {} when
    it has several (one per encoder): latentdit aligns with one encoder's features."""
    if len({k.split(".")[1] for k in projectors}) != 1:
        return {}
    first = f"{PROJECTORS}0."
    kept = {PROJECTOR + k.removeprefix(first): v for k, v in projectors.items()}
    return {PROJECTOR_FILE: kept} if len(kept) == len(projectors) else {}


def projector_record(projectors: dict[str, Tensor], args: dict) -> dict[str, Any]:
    """What the dropped projectors were, for meta.json (`source.projectors`).

    The widths come from the weights; `encoder_depth` (the block they read), the encoder and the
    loss weight only from train.py args: a bare file (the released last.pt) cannot tell them.
    """
    count = len({k.split(".")[1] for k in projectors})
    last = [projectors.get(f"{PROJECTORS}{i}.4.weight") for i in range(count)]
    first = projectors.get(f"{PROJECTORS}0.0.weight")
    return {
        "dropped_tensors": len(projectors),
        "z_dims": [int(w.shape[0]) for w in last if w is not None],
        "projector_dim": int(first.shape[0]) if first is not None else None,
        "encoder_depth": args.get("encoder_depth"),
        "enc_type": args.get("enc_type"),
        "proj_coeff": args.get("proj_coeff"),
        "kept": next(iter(kept_projector(projectors)), None),
    }


def repa_objective(args: dict, path: Path) -> FlowMatching:
    """REPA's linear flow in its own time (t = 1 noise, velocity eps - x0, model time t)."""
    weighting = args.get("weighting", "uniform")
    if weighting not in WEIGHTINGS:
        raise CheckpointImportError(
            f"{path}: REPA weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}"
        )
    return FlowMatching(timesteps=WEIGHTINGS[weighting], time_scale=REPA_TIME_SCALE)
