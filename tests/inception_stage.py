"""`python -m tests.inception_stage SHA256 <cart arguments>`: a stage as `python -m stages` runs it, with the FID
network's expected hash set to SHA256, so that a stage run as its own process (to be killed) accepts the random
weights file the tests make (``tests.test_inception.random_inception_file`` patches the same constant in-process)."""

import sys

from pipeline.evaluation import inception

inception.WEIGHTS_SHA256 = sys.argv[1]

from stages.cli import app  # noqa: E402  (after the patch, as any stage would read the constant)

app(sys.argv[2:], prog_name="cart")
