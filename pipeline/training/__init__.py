"""Training: the one shared training loop, and how the tokenizer and the transformer are trained in it."""
