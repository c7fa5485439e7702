"""Smoke run of the turn-over experiments (``paper/cleansing.py``) at the tiny size; the
full size is the command ``python -m paper cleansing``."""

import json

import numpy as np

from paper import cleansing
from paper.__main__ import main


def test_tiny_run_of_every_experiment_writes_tables_figures_and_json(tmp_path, capsys):
    report = cleansing.main(["--size", "tiny", "--seeds", "1", "--n-jobs", "1",
                             "--out-dir", str(tmp_path), "--json",
                             str(tmp_path / "numbers.json")])
    out = capsys.readouterr().out
    for heading in ("Faithfulness", "cleansing", "Accuracy cost"):
        assert heading in out
    for name in ("faithfulness", "cleansing", "accuracy"):
        assert (tmp_path / f"turnover_{name}.png").stat().st_size > 0
    assert json.loads((tmp_path / "numbers.json").read_text()).keys() == report.keys()

    rows = report["faithfulness"]["rows"]
    assert [row["method"] for row in rows] == ["multi-stage influence (exact)",
                                                "turn-over dropout"]
    assert all(np.isfinite(row["pearson_all"]) and row["score_s"] >= 0 for row in rows)
    # The multi-stage influence function tracks leave-one-out even at this size.
    assert rows[0]["spearman_all"] > 0.5

    summary = report["cleansing"]["summary"]
    assert set(summary) == {"no removal", "random removal", "multi-stage influence",
                            "turn-over dropout"}
    assert summary["no removal"]["accuracy_change"] == (0.0, 0.0)
    assert report["cleansing"]["n_removed"] == 2  # 1% of 120, rounded up
    assert {row["model"] for row in report["accuracy"]["rows"]} >= {"plain", "turn-over"}


def test_command_line_dispatches_to_cleansing(capsys):
    main(["cleansing", "--size", "tiny", "--seeds", "1", "--n-jobs", "1", "--experiment",
          "accuracy"])
    assert "Accuracy cost" in capsys.readouterr().out


def test_turnover_mlp_starts_from_the_plain_initialisation():
    from paper.models import make_digits_mlp, make_turnover_mlp
    from skmsif.turnover import TurnOverDropout

    embedding, pretrain_model, finetune_model = make_turnover_mlp(8, seed=3)
    _, plain, _ = make_digits_mlp(8, seed=3)
    assert isinstance(embedding, TurnOverDropout) and finetune_model[0] is embedding
    for a, b in zip(pretrain_model.parameters(), plain.parameters()):
        assert a.dtype == b.dtype and bool((a == b).all())
