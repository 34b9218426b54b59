"""sampler stage of latentdit: checkpoint -> images, with only the VAE decoder in memory.

solvers (pure ODE/SDE solvers), guidance (classifier-free guidance wrapper), latents (noise ->
latents for a checkpoint's objective), config (SampleConfig, SolveConfig), decoder (the
checkpoint's check of its VAE decoder, chunked decoding), plan (classes and per-image noise),
outputs (PNG, grid, resumable ADM .npz), manifest (sample.json: the settings a resume must match),
sample (the run), ranks (torchrun shares), batch_size (--auto-batch: the largest batch that
fits), inference (compiled / cast model function), writer (background writes), training (the
trainer's grid hook).
"""
