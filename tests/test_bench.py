"""`python -m pipeline.bench plain`: one network on all training cells, the pipeline's bar, scored on the labelled test."""
from __future__ import annotations

from pipeline.bench import bench_plain
from pipeline.engine import TrainConfig
from pipeline.transforms import AugParams


def test_plain_network_trains_on_every_training_cell_and_scores_the_test_set(nndl_prepared, tmp_path, capsys):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, ema_decay=0, select_best=False, num_workers=0, device="cpu")
    r = bench_plain(nndl_prepared.out, tmp_path, backbone="resnet10t", cfg=cfg, drop_rate=0.0,
                    aug=AugParams(affine=0, color=0, blur=0, noise=0, dropout=0))
    assert (r["train_images"], r["test_images"]) == (3000, 600)
    assert r["test_roc_auc"] > 0.85 and 0 < r["test_accuracy_se"] < 0.025  # two epochs learn; the SE of 600 cells
    assert "test accuracy" in capsys.readouterr().out
