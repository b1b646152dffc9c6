"""The networks: tokenizer, transformer and their heads, the reference classifier, and their weights on disk."""
