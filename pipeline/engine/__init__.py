"""The shard engine and the executors that run it (local, Ray)."""
