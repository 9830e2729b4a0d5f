"""Text data sources: corpus readers, the streaming packer, FineWeb-Edu, pre-tokenized shards, TFDS,
and the evaluation corpora (WikiText, LAMBADA, FineWeb-Edu validation)."""
