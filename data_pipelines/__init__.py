"""Dataset builders: the embedded synthetic world and shard writers."""
