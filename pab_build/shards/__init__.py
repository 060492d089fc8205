"""The shard machinery: the deterministic tar writer, the shard index and verify, packing, hard negatives and pairing rules."""
