"""sampler stage of latentdit: checkpoint -> images, with only the VAE decoder in memory.

solvers (pure ODE/SDE solvers), guidance (classifier-free guidance wrapper), latents (noise ->
latents for a checkpoint's objective), config (SampleConfig, SolveConfig), decoder (the
checkpoint's check of its VAE decoder), plan (classes and per-image
noise), outputs (PNG, grid, resumable ADM .npz), sample (the run), ranks (torchrun shares), inference
(compiled / cast model function), writer (background writes), training (the trainer's grid hook).
"""
