"""Stage 2: train a class-conditional DiT on latents only (`latentdit train`, docs/train.md).

model.py (DiT, presets) · objective.py (flow matching, DDPM) · normalization.py (latent scaling)
· checkpoint.py (save, resume, load_for_inference) · data.py (memory/gpu/stream batches)
· step.py (one optimizer step) · train.py (the loop) · config.py · presets.py · metrics.py
· repa.py (REPA's projector and alignment loss on stored features) · reg.py (REG's class token)
"""
