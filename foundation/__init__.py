"""The ground floor: what several stages share, importing none of them (and neither zarr nor Typer).

- `foundation.errors`: the root of every user-facing error (`LatentditError`).
- `foundation.distributed`: the process group from torchrun's variables, seeds, reductions.
- `foundation.precision`: the one precision vocabulary and its autocast.
- `foundation.autoencoders`: the one autoencoder interface (KL, FLUX.2, DC-AE, RAE): facts,
  encode, decode; loading a whole model or its decoder only.
- `foundation.config`: reading TOML/YAML option files.

Import the submodules directly; this package imports nothing at import time.
"""
