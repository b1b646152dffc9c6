"""Where the stages read and write, in one place: the stage commands take their paths from here, and
``tests/test_paths.py`` holds ``OUTPUTS`` against what ``dvc.yaml`` declares, so that a path renamed in one and not
the other fails a test.

Weights are named by stem: ``<stem>.safetensors`` + ``<stem>.json``; DVC tracks the directory that holds them.
"""

from __future__ import annotations

from pathlib import Path

# Data, each written by one stage and read by the ones after it.
SHARDS = Path("data/shards")  # shard
DECOMPOSED = Path("data/decomposed")  # decompose
TOKENS = Path("data/tokens")  # extract_tokens

# Weights (stems).
TOKENIZER = Path("models/tokenizer/tokenizer")  # train_tokenizer (its variants beside it, under variants/)
TRANSFORMER = Path("models/transformer/transformer")  # train_transformer
EVALUATOR = Path("models/evaluator/evaluator")  # train_evaluator
EVALUATOR_2X = Path("models/evaluator/evaluator_2x")  # train_evaluator, when the shards hold 2× references

# Checkpoints (DVC `persist`: a killed run resumes from them) and dvclive logs of the training stages.
CHECKPOINTS = Path("models/checkpoints")
TOKENIZER_CHECKPOINTS, TOKENIZER_LIVE = CHECKPOINTS / "tokenizer", Path("metrics/train_tokenizer")
TRANSFORMER_CHECKPOINTS, TRANSFORMER_LIVE = CHECKPOINTS / "transformer", Path("metrics/train_transformer")
EVALUATOR_CHECKPOINTS, EVALUATOR_LIVE = CHECKPOINTS / "evaluator", Path("metrics/train_evaluator")
# The 2× network's runs: checkpoints and logs apart from the 1× network's.
EVALUATOR_2X_CHECKPOINTS, EVALUATOR_2X_LIVE = CHECKPOINTS / "evaluator_2x", Path("metrics/train_evaluator_2x")

# Metrics and figures.
TOKENIZER_METRICS = Path("metrics/tokenizer.json")
TRANSFORMER_METRICS = Path("metrics/transformer.json")
EVALUATOR_METRICS = Path("metrics/evaluator.json")
EVAL_METRICS = Path("metrics/eval.json")
SAMPLING_SPEED = Path("metrics/sampling_speed.json")  # wall clock: changes from run to run, unlike eval.json
FID_METRICS = Path("metrics/fid.json")
DECOMPOSE_REPORTS = Path("reports/decompose")
TOKENIZER_REPORTS = Path("reports/tokenizer")
EVALUATE_REPORTS = Path("reports/evaluate")

FID_SAMPLES = Path("samples/fid")  # sample_fid's PNGs, samples.npz and recipe

# What each stage of dvc.yaml writes, by the kind dvc.yaml declares it as.
OUTPUTS: dict[str, dict[str, list[Path]]] = {
    "shard": {"outs": [SHARDS]},
    "decompose": {"outs": [DECOMPOSED, DECOMPOSE_REPORTS]},
    "train_tokenizer": {
        "outs": [TOKENIZER.parent, TOKENIZER_REPORTS, TOKENIZER_CHECKPOINTS],
        "metrics": [TOKENIZER_METRICS],
        "plots": [TOKENIZER_LIVE],
    },
    "extract_tokens": {"outs": [TOKENS]},
    "train_transformer": {
        "outs": [TRANSFORMER.parent, TRANSFORMER_CHECKPOINTS],
        "metrics": [TRANSFORMER_METRICS],
        "plots": [TRANSFORMER_LIVE],
    },
    "train_evaluator": {
        "outs": [EVALUATOR.parent, EVALUATOR_CHECKPOINTS, EVALUATOR_2X_CHECKPOINTS],
        "metrics": [EVALUATOR_METRICS],
        "plots": [EVALUATOR_LIVE, EVALUATOR_2X_LIVE],
    },
    "evaluate": {"outs": [EVALUATE_REPORTS], "metrics": [EVAL_METRICS, SAMPLING_SPEED]},
    "sample_fid": {"outs": [FID_SAMPLES], "metrics": [FID_METRICS]},
}
