"""Run under torchrun (2 ranks, gloo): train a tiny tokenizer with the shared loop, record each rank's result.

Two micro-batches per step (gradient accumulation): gradients are summed locally and all-reduced once per step,
for the tokenizer and its discriminator alike."""

import json
import sys
from pathlib import Path

import torch

from pipeline.data.decomposed import decode_training_sample, split_shards
from pipeline.data.loader import ShardLoader
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig
from pipeline.training.tokenizer_training import TokenizerLossConfig, TokenizerTask
from pipeline.training.train import RunPaths, TrainConfig, train


def main(data: str, out: str) -> None:
    cfg = TokenizerModelConfig(
        channels=8, channel_multipliers=[1, 2], latent_channels=8, codebook_size=64, scales=[1, 2, 4, 6, 8]
    )
    torch.manual_seed(0)  # the same initial weights on both ranks, as DDP requires
    model = Tokenizer(cfg, order=2)
    loss = TokenizerLossConfig(lambda_gan=0.1, gan_start_step=2, disc_channels=8, disc_layers=1, restart_every=3)
    train_cfg = TrainConfig(
        steps=6, batch_size=4, grad_accumulation=2, warmup_steps=1, checkpoint_every=3, log_every=2, device="cpu"
    )
    loader = ShardLoader(
        split_shards(Path(data) / "train"), decode_training_sample, batch_size=4, resampled=True, batches_per_epoch=3
    )
    val = ShardLoader(split_shards(Path(data) / "val"), decode_training_sample, batch_size=8, shuffle=False)
    task = TokenizerTask(model, loss, lambda: iter(val.epoch(0)), 8)
    seen = []

    def epoch_batches(e):
        for batch in loader.epoch(e):
            seen.append(float(batch[0].sum()))
            yield batch

    run = RunPaths(Path(out) / "checkpoints", Path(out) / "live")
    train(task, train_cfg, epoch_batches, run, "ddp-test", batches_per_epoch=3)
    rank = torch.distributed.get_rank()
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    record = {"checksum": round(checksum, 6), "steps": len(seen), "first_batch": seen[0]}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
