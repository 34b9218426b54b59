"""One interface to every diffusers autoencoder latentdit encodes with and decodes with.

    from foundation.autoencoders.loading import VaeConfig, load_autoencoder, load_decoder
    ae = load_autoencoder(VaeConfig(id="stabilityai/sd-vae-ft-ema"))  # whole model, to encode
    ae.latent_shape(256)                        # (4, 32, 32); one line for a size it cannot take
    mean, logstd = ae.encode(ae.to_input(x))    # float32 latents as stored; logstd None if deterministic
    images = load_decoder("...").decode_to_uint8(mean)   # decoder only: uint8 (B, H, W, 3)

The family is chosen from the model's own config (`_class_name`), whether it comes from a folder, a
pipeline folder's `vae/` or a hub id; each family reads every fact from that config:

- `base`: the interface (`Autoencoder`): image range, spatial factor, latent channels and shape,
  posterior kind, scaling and shift factors, the normalization the model carries, encode, decode.
- `kl`: `AutoencoderKL` (SD f8c4, SD3/FLUX.1 f8c16 with `shift_factor`, f16c32 VA-VAEs).
- `kl_flux2`: `AutoencoderKLFlux2` (32 channels, 2x2 patchify, BatchNorm running statistics).
- `dc`: `AutoencoderDC` (deterministic, f32 and beyond).
- `rae`: `AutoencoderRAE` (a frozen DINOv2 / SigLIP2 / MAE encoder's tokens, images in [0, 1]).
- `families`: the registry of the above, by diffusers class name.
- `loading`: resolving ids, reading configs, loading a whole model or its decoder only.

Import the submodules directly; this package imports nothing at import time.
"""
