"""The bottom layer: crash-safe writes (io), file locations (paths), torchrun helpers (distributed),
autocast (amp)."""
