"""The datasets and how they are made and read: image sources, shards, the base–detail decomposition and the tokens."""
