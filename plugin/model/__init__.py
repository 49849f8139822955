"""The model core: config, the owned layer loop, exit heads, checkpoints, per-sequence KV."""
