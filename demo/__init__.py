"""The embedded demo: generated data, a shipped VAE and classifier, the orchestrator, the verdict."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
VAE_DIR = ASSETS_DIR / "vae"  # diffusers AutoencoderKL folder (config.json + safetensors)
CLASSIFIER_DIR = ASSETS_DIR / "classifier"  # classifier weights (safetensors) + config.json
