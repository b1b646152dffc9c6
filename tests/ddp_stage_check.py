"""Run a data stage as `cart <stage>` would, recording which shards this process works on and, if told to, dying
by SIGKILL at a chosen shard (the rank's own shards before it are then on disk): what a crashed GPU node does.

    python tests/ddp_stage_check.py STAGE RECORD_DIR [KILL_RANK KILL_AT_SHARD]

Run under torchrun; RECORD_DIR/rank<r>.txt gets the first sample key of every shard the rank computes.
"""

import os
import signal
import sys
from pathlib import Path

from pipeline.data import decomposed, tokens
from pipeline.runtime import dist_from_env
from stages.cli import app

PER_SHARD = {"decompose": (decomposed, "decompose_shard"), "extract-tokens": (tokens, "tokenize_shard")}


def main(stage: str, record_dir: str, kill_rank: int = -1, kill_at: int = -1) -> None:
    module, name = PER_SHARD[stage]
    real, rank, calls = getattr(module, name), dist_from_env().rank, []

    def recorded(samples, *args):
        calls.append(samples[0]["__key__"])
        if rank == kill_rank and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(Path(record_dir) / f"rank{rank}.txt", "a") as f:
            f.write(samples[0]["__key__"] + "\n")
        return real(samples, *args)

    setattr(module, name, recorded)
    app([stage])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
