"""A console that talks: progress for sample generation, the loss parts on the training bar.

(Log lines above the bars, the evaluation bar and the bar's loss parts in a real run are checked end to end in
tests/test_wandb_logger.py::test_runs_log_training_resume_and_test_results.)
"""

from __future__ import annotations

import json

from gram.data.sample import generate_sample_dataset
from gram.train.trainer import bar_postfix


def test_training_bar_shows_every_loss_part_then_lr_and_speed():
    metrics = {"contrastive": 3.4751, "dam": 0.06775, "loss": 3.54285, "temperature": 0.07, "lr": 5e-05,
               "batch": 32, "samples_per_s": 4.771}
    fields = bar_postfix(metrics)
    assert list(fields) == ["loss", "contrastive", "dam", "temperature", "lr", "sps"]
    assert fields["loss"] == "3.543" and fields["contrastive"] == "3.475" and fields["dam"] == "0.06775"
    assert fields["lr"] == "5.0e-05" and fields["sps"] == "5"


def test_sample_generation_shows_progress(tmp_path, capsys):
    info = generate_sample_dataset(tmp_path, num_train=2, num_test=1, seed=1, workers=2, progress=True)
    err = capsys.readouterr().err
    assert "generate sample clips" in err and "3/3" in err
    manifest = json.loads(info["manifest"].read_text())
    assert len([f for f in manifest["files"] if f.startswith("videos/")]) == 3  # the pool really wrote them
    again = generate_sample_dataset(tmp_path, num_train=2, num_test=1, seed=1, workers=2, progress=True)
    assert not again["generated"] and "generate sample clips" not in capsys.readouterr().err  # cached: silent


def test_dam_rerank_shows_progress_and_gives_the_same_scores(capsys):
    import torch

    from gram.eval.rerank import rerank_topk

    scores = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    table = torch.rand(30, 20, generator=torch.Generator().manual_seed(1))
    quiet = rerank_topk(scores, 5, lambda q, c: table[q, c], batch_size=7)
    assert "re-rank" not in capsys.readouterr().err
    shown = rerank_topk(scores, 5, lambda q, c: table[q, c], batch_size=7, progress="evaluate: DAM re-rank")
    err = capsys.readouterr().err
    assert torch.equal(quiet, shown) and "evaluate: DAM re-rank" in err and "/22 " in err  # 150 pairs / 7 per batch
