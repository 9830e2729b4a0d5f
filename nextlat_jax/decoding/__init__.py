"""Generation: KV-cached autoregressive decoding (generate), self-speculative decoding with the latent
dynamics model (speculative), draft-length policies, and the `nextlat generate` command (cli)."""
