"""The ground floor: what several stages share, importing none of them (and neither zarr nor Typer).

- `foundation.errors`: the root of every user-facing error (`LatentditError`).
- `foundation.distributed`: the process group from torchrun's variables, seeds, reductions.
- `foundation.precision`: the one precision vocabulary and its autocast.
- `foundation.autoencoders`: the one autoencoder interface (KL, FLUX.2, DC-AE, RAE): facts,
  encode, decode; loading a whole model or its decoder only.
- `foundation.config`: reading TOML/YAML option files (with limits).
- `foundation.urls`: paths and fsspec URLs, storage options and their redaction.
- `foundation.atomic`: crash-consistent writes (temp file, fsync, rename).
- `foundation.locks`: exclusive locks on what a command writes (run dir, store, sample folder).
- `foundation.faults`: a full disk, no memory, an object store down: one line, what is intact.

Import the submodules directly; this package imports nothing at import time.
"""
