"""The embedded demo: generated data, a shipped VAE, classifier and image encoder, the orchestrator,
the verdict."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
VAE_DIR = ASSETS_DIR / "vae"  # diffusers AutoencoderKL folder (config.json + safetensors)
CLASSIFIER_DIR = ASSETS_DIR / "classifier"  # classifier weights (safetensors) + config.json
ENCODER_DIR = ASSETS_DIR / "encoder"  # transformers Dinov2Model folder: REPA's features
