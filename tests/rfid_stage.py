"""`python -m tests.rfid_stage <cart arguments>`: a stage as `python -m stages` runs it, with the tokenizer's rFID
measurement replaced by a cheap deterministic function of the weights, for the kill-and-resume test: what it
checks (history and best weights carried through a SIGKILL) does not depend on what is measured, and the FID
network's 299×299 passes would make the three runs minutes long. The real measurement is tested in-process in
tests/test_tokenizer_rfid.py."""

import sys

from pipeline.training import tokenizer_stage


class WeightsMeter:
    """A stand-in for ``RfidMeter``: the "rFID" is the sum of the decoder's last kernel, so it changes as training
    moves the weights, and a resumed run reproduces it only if it resumed the same weights."""

    def __init__(self, cfg, *args):
        self.images, self.reference_name = cfg.images, "the decoder's last kernel (a test stand-in)"

    def measure(self, model):
        return {"fid": float(model.decoder.last_layer.double().sum()), "psnr": 0.0}


tokenizer_stage.RfidMeter = WeightsMeter

from stages.cli import app  # noqa: E402  (after the patch, as the stage looks the meter up when it runs)

app(sys.argv[1:], prog_name="cart")
