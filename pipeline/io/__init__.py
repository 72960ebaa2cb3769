"""Durability: the manifest read in shards, the journal, part files, storage and the checkpoint."""
