"""The stages write where dvc.yaml says they do: stages/paths.py against dvc.yaml, both ways."""

from __future__ import annotations

from pathlib import Path

import yaml

from stages import paths

DVC_YAML = Path(__file__).resolve().parent.parent / "dvc.yaml"
KINDS = ("outs", "metrics", "plots")


def declared(entries: list) -> list[str]:
    """The paths of a dvc.yaml list: each entry a path, or a one-key mapping of a path to its options."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def test_every_stage_writes_the_paths_dvc_yaml_declares_and_no_others():
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    assert set(paths.OUTPUTS) == set(stages)
    for name, stage in stages.items():
        in_dvc = {kind: sorted(declared(stage.get(kind, []))) for kind in KINDS}
        in_code = {kind: sorted(str(p) for p in paths.OUTPUTS[name].get(kind, [])) for kind in KINDS}
        assert in_code == in_dvc, f"stage {name}: stages/paths.py {in_code} but dvc.yaml {in_dvc}"


def test_the_figures_dvc_yaml_plots_lie_in_a_stages_outputs():
    outputs = [p for stage in paths.OUTPUTS.values() for kind in stage.values() for p in kind]
    figures = []
    for entry in yaml.safe_load(DVC_YAML.read_text())["plots"]:
        name, spec = (entry, None) if isinstance(entry, str) else next(iter(entry.items()))
        figures += list(spec["y"]) if isinstance(spec, dict) and "y" in spec else [name]
    assert figures, "dvc.yaml declares no top-level plots"
    for figure in figures:
        assert any(Path(figure).is_relative_to(p) for p in outputs), f"{figure} is written by no stage"


def test_a_renamed_output_is_caught(monkeypatch):
    # The check above can fail: a path changed in stages/paths.py alone no longer matches dvc.yaml.
    monkeypatch.setitem(paths.OUTPUTS, "evaluate", {"outs": [Path("reports/eval")], "metrics": [paths.EVAL_METRICS]})
    try:
        test_every_stage_writes_the_paths_dvc_yaml_declares_and_no_others()
    except AssertionError as err:
        assert "stage evaluate" in str(err)
    else:
        raise AssertionError("a path dvc.yaml does not declare went unnoticed")
