"""The library's layers: no module of ``pipeline/`` imports from a layer above its own.

From the bottom:

1. ``pipeline.atomic``, ``config``, ``progress``, ``runtime``: file writing, typed params, progress, devices. They
   import no other part of the library.
2. ``pipeline.data`` and ``pipeline.models``: the datasets (shards, decompositions, tokens) and the networks with
   their file formats. They may use each other (extracting tokens runs the tokenizer), never what is above.
3. ``pipeline.evaluation``: measuring models and drawing figures. It may use data and models, not training.
4. ``pipeline.training``: the shared loop and each model's task and stage. It may use everything below, evaluation
   included (a task measures itself on val with evaluation's metrics, a stage draws evaluation's figures).

The modules at the top of the package (``pipeline.params``, ``params_doc``, ``plan``, ``tables``) gather the
sections of every stage or run whole stages, and may import any layer; no layer imports them. Every import
counts, also those inside functions: a late import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
BASE = ("pipeline.atomic", "pipeline.config", "pipeline.progress", "pipeline.runtime")
TOP = ("pipeline.params", "pipeline.params_doc", "pipeline.plan", "pipeline.tables")
# What each layer must not import (prefixes of module names).
FORBIDDEN = {
    "base": ("pipeline.data", "pipeline.models", "pipeline.evaluation", "pipeline.training", *TOP),
    "data": ("pipeline.evaluation", "pipeline.training", *TOP),
    "models": ("pipeline.evaluation", "pipeline.training", *TOP),
    "evaluation": ("pipeline.training", *TOP),
    "training": TOP,
}


def layer(module: str) -> str | None:
    if module in BASE:
        return "base"
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in ("data", "models", "evaluation", "training"):
        return parts[1]
    return None  # pipeline/__init__.py and the top modules


def imported(source: str) -> set[str]:
    """Every ``pipeline`` module that ``source`` imports, at the top or inside a function (absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if (PIPELINE.parent / node.module.replace(".", "/") / "__init__.py").is_file():
                # `from pipeline.data import shards` imports the module pipeline.data.shards
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "pipeline" or m.startswith("pipeline.")}


def violations(module: str, source: str) -> list[str]:
    forbidden = FORBIDDEN.get(layer(module) or "", ())
    return sorted(
        f"{module} imports {name}"
        for name in imported(source)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def modules() -> dict[str, str]:
    return {
        ".".join(path.relative_to(PIPELINE.parent).with_suffix("").parts): path.read_text()
        for path in sorted(PIPELINE.rglob("*.py"))
        if path.name != "__init__.py"
    }


def test_no_module_imports_from_a_layer_above_its_own():
    found = modules()
    assert len(found) >= 30 and {layer(m) for m in found} >= {"base", "data", "models", "evaluation", "training"}
    problems = [v for module, source in found.items() for v in violations(module, source)]
    assert not problems, "\n".join(problems)


def test_relative_imports_are_not_used_so_the_check_sees_every_import():
    relative = [
        module
        for module, source in modules().items()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert not relative


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("pipeline.models.x", "def f():\n    from pipeline.training.train import train\n", ["pipeline.training.train"]),
        ("pipeline.data.x", "import pipeline.evaluation.metrics\n", ["pipeline.evaluation.metrics"]),
        ("pipeline.evaluation.x", "from pipeline.training import tokenizer_stage\n", ["pipeline.training"]),
        ("pipeline.config", "from pipeline.models.weights import MissingWeights\n", ["pipeline.models.weights"]),
        ("pipeline.training.x", "from pipeline.evaluation.tokenizer import psnr\n", []),
        ("pipeline.data.x", "from pipeline.models.tokenizer import Tokenizer\n", []),
    ],
)
def test_the_check_finds_an_import_from_above_wherever_it_stands(module, source, expected):
    names = {v.split(" imports ")[1] for v in violations(module, source)}
    assert set(expected) <= names and bool(names) == bool(expected)
