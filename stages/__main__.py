"""`python -m stages` is `cart` (useful under torchrun: `torchrun --nproc_per_node=N -m stages train-tokenizer`)."""

from stages.cli import app

app(prog_name="cart")
