"""The quickstart's held-out targets table: each figure against its issue-16 target."""

from __future__ import annotations

from qformer_lightning import quickstart


def test_targets_table_marks_met_missing_and_missed() -> None:
    table = quickstart.targets_table({
        "stage 1": {"val/itm_auc": 0.97},
        "vqa": {"probe/vqa/acc": 80.0},
    }).splitlines()
    rows = {line.split(":")[0]: line for line in table[2:]}
    assert set(rows) == {"stage 1", "vqa"}  # steps that did not run are left out
    assert rows["stage 1"].endswith("met") and "0.970" in rows["stage 1"]
    assert rows["vqa"].endswith("NOT met") and "80.000" in rows["vqa"]
    missing = quickstart.targets_table({"caption": {}}).splitlines()[2:]
    assert len(missing) == 8 and all("missing" in line for line in missing)


def test_every_probed_step_and_target_names_a_step() -> None:
    names = {step.name for step in quickstart.STEPS}
    assert set(quickstart.PROBED) <= names
    assert {target.step for target in quickstart.TARGETS} <= names


def test_unknown_step_name_is_refused(capsys) -> None:
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--only", "stage one"])
    assert exit_info.value.code == 2
    assert "--only: unknown step(s) ['stage one']" in capsys.readouterr().err
