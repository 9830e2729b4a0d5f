"""Task data generators: each yields rows in the batch contract of nextlat_jax.data.packing."""
