"""`python -m pipeline.tools.bench`: plain (one network on all training cells, the pipeline's bar), ablate, table, errors, compile."""
from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from pipeline.tools.ablations import bench_plain
from pipeline.lib.models import ModelSpec
from pipeline.lib.teachers import Teacher
from pipeline.lib.transforms import AugParams
from pipeline.lib.tta import TTASpec
from helpers import train_cfg


def plain_teacher(aug: AugParams = AugParams(affine=0, color=0, blur=0, noise=0, dropout=0)) -> Teacher:
    return Teacher(ModelSpec("resnet10t"), aug, TTASpec(("identity", "hflip"), 0.875), {"bench": True},
                   {"img_size": 32})


def test_plain_network_trains_on_every_training_cell_and_scores_the_test_set(nndl_prepared, tmp_path, caplog):
    cfg = train_cfg(epochs=2, batch_size=64, lr=3e-3, ema_decay=0, num_workers=0, device="cpu", seed=7)
    with caplog.at_level(logging.INFO):
        r = bench_plain(nndl_prepared.out, tmp_path, teacher=plain_teacher(), cfg=cfg)
    assert (r["train_images"], r["test_images"]) == (3000, 600)
    assert r["test_roc_auc"] > 0.85 and 0 < r["test_accuracy_se"] < 0.025  # two epochs learn; the SE of 600 cells
    assert "test accuracy" in caplog.text
    per_cell = pd.read_csv(tmp_path / "test.csv")  # for paired tests (pipeline.tools.compare)
    assert len(per_cell) == 600 and per_cell["prob"].between(0, 1).all()
    # The train stage's all-cells model, whole: the kept (last) checkpoint, curves and the hidden predictions.
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["fingerprint"]["params"]["model.fold"] == "all"
    assert len(pd.read_csv(tmp_path / "live/plots/metrics/train_loss.tsv", sep="\t")) == 2
    assert len(pd.read_csv(tmp_path / "hidden.csv")) == 600


def test_plain_train_cells_sets_the_epochs_size_and_always_trains_fresh(nndl_prepared, tmp_path, caplog):
    """--train-cells repeats (or cuts) the training cells to time an epoch of another data set's size; a second run
    sets the finished last.pt aside instead of reusing it, and the same seed trains the same model."""
    cfg = train_cfg(epochs=1, batch_size=64, ema_decay=0, num_workers=0, device="cpu")
    r = bench_plain(nndl_prepared.out, tmp_path, teacher=plain_teacher(), cfg=cfg, train_cells=128)
    assert r["train_images"] == 128 and r["test_images"] == 600
    with caplog.at_level(logging.INFO):
        again = bench_plain(nndl_prepared.out, tmp_path, teacher=plain_teacher(), cfg=cfg, train_cells=128)
    assert "always trains from scratch" in caplog.text and "not retraining" not in caplog.text
    assert again["test_accuracy"] == r["test_accuracy"]


def test_ablate_scores_a_switch_and_a_tta_change_only_re_predicts(nndl_prepared, tmp_path, caplog):
    import json
    from pathlib import Path

    import pandas as pd

    from pipeline.tools.ablations import ablation_table, bench_ablate
    from pipeline.folds import make_folds
    from pipeline.lib.params import load_params, with_overrides

    caplog.set_level(logging.INFO, logger="pipeline")
    index = pd.read_csv(nndl_prepared.out / "index.csv", dtype={"img_name": str})
    make_folds(index[index["split"] == "train"].sample(n=300, random_state=0), n=2, group_by="patient",
               seed=0).to_csv(tmp_path / "folds.csv", index=False)
    base = with_overrides(load_params(Path(__file__).resolve().parents[1] / "params.yaml"), [
        "data.img_size=32", "train.backbones=[resnet10t]", "train.epochs=1", "train.batch_size=64",
        "train.num_workers=0", "train.device=cpu", "tta.views=[identity]"])
    out = tmp_path / "ablate"
    first = bench_ablate(nndl_prepared.out, tmp_path / "folds.csv", out / "base", base, "base", [])
    assert 0 < first["cv_accuracy_se"] < 0.05 and 0 < first["test_accuracy"] <= 1 and first["minutes"] > 0
    kept = {f: f.stat().st_mtime_ns for f in (out / "base").glob("fold*/checkpoint.pt")}
    tta = bench_ablate(nndl_prepared.out, tmp_path / "folds.csv", out / "base",
                       with_overrides(base, ["tta.views=[d4]"]), "tta_d4", ["tta.views=[d4]"],
                       reference=out / "predictions" / "base.csv")
    # Paired against the base row's own predictions, kept apart though both rows share the fold models.
    base_cells = pd.read_csv(out / "predictions" / "base.csv")
    assert len(base_cells) == 600
    assert tta["reference_accuracy"] == first["test_accuracy"] and 0 <= tta["mcnemar_p"] <= 1
    assert tta["test_accuracy"] - first["test_accuracy"] == pytest.approx(
        (tta["only_this"] - tta["only_reference"]) / len(base_cells))
    # The fold models are reused (not rewritten); only the predictions are new.
    assert len(kept) == 2 and all(f.stat().st_mtime_ns == t for f, t in kept.items())
    assert tta["cv_accuracy"] != first["cv_accuracy"] or tta["cv_roc_auc"] != first["cv_roc_auc"]
    table = ablation_table(out / "ablations.jsonl", tmp_path / "ablations.csv", "resnet10t, 2 folds\n2 cores")
    assert table["name"].tolist() == ["base", "tta_d4"] and "| base |" in caplog.text
    text = (tmp_path / "ablations.csv").read_text()
    assert text.startswith("# resnet10t, 2 folds\n# 2 cores\n")
    assert len(pd.read_csv(tmp_path / "ablations.csv", comment="#")) == 2
    assert len((out / "ablations.jsonl").read_text().splitlines()) == 2 and json.loads(
        (out / "ablations.jsonl").read_text().splitlines()[1])["set"] == ["tta.views=[d4]"]


def test_ablate_on_the_public_layout_scores_each_test_cell_once(download_prepare, tmp_path):
    """The public layout's hidden rows repeat its test rows (same names): the test score must still be per cell."""
    from pathlib import Path

    import pandas as pd

    from pipeline.tools.ablations import bench_ablate
    from pipeline.folds import make_folds
    from pipeline.lib.params import load_params, with_overrides

    root = Path(__file__).resolve().parents[1]
    prepared = download_prepare(root / "data" / "demo.zip", tmp_path / "demo", img_size=32)
    index = prepared.index.astype({"img_name": str})
    test_names = index.loc[index["split"] == "test", "img_name"]
    assert set(test_names) == set(index.loc[index["split"] == "hidden", "img_name"])  # the premise
    make_folds(index[index["split"] == "train"], n=2, group_by="patient", seed=0).to_csv(tmp_path / "folds.csv",
                                                                                          index=False)
    params = with_overrides(load_params(root / "params.yaml"), [
        "data.img_size=32", "train.backbones=[resnet10t]", "train.epochs=1", "train.batch_size=64",
        "train.num_workers=0", "train.device=cpu", "tta.views=[identity]"])
    row = bench_ablate(prepared.out, tmp_path / "folds.csv", tmp_path / "ablate" / "base", params, "base", [])
    # The row's test accuracy is the folds' mean call on each test cell against its own label.
    tests = [pd.read_csv(f, dtype={"img_name": str})
             for f in sorted((tmp_path / "ablate" / "base").glob("fold*/test.csv"))]
    prob = sum(t["prob_tta"].to_numpy() for t in tests) / len(tests)
    label = index[index["split"] == "test"].set_index("img_name")["label"][tests[0]["img_name"]].to_numpy()
    assert len(prob) == len(test_names) and row["test_accuracy"] == ((prob >= 0.5) == (label == 1)).mean()


def test_errors_counts_per_cell_how_many_runs_missed_it(nndl_prepared, tmp_path):
    import pandas as pd

    from pipeline.tools.error_analysis import run_errors

    index = pd.read_csv(nndl_prepared.out / "index.csv", dtype={"img_name": str})
    tr, te = (index[index["split"] == s].head(10) for s in ("train", "test"))

    def write(run: str, fold: int, rows: pd.DataFrame, split: str, flip: set[str]) -> None:
        right = rows["label"].to_numpy() * 0.8 + 0.1  # 0.9 for label 1, 0.1 for label 0: right at 0.5
        prob = [1 - p if n in flip else p for n, p in zip(rows["img_name"], right)]
        (tmp_path / run / f"fold{fold}").mkdir(parents=True, exist_ok=True)
        # prob_tta as a TTA-only row left it (every call flipped): errors reads the single-view prob.
        pd.DataFrame({"img_name": rows["img_name"], "prob": prob, "prob_tta": [1 - q for q in prob]}).to_csv(
            tmp_path / run / f"fold{fold}" / f"{split}.csv", index=False)

    a, b = tr["img_name"].iloc[0], tr["img_name"].iloc[1]
    t = te["img_name"].iloc[0]
    for run, wrong in (("r1", {a, b, t}), ("r2", {a, t})):
        for fold, half in enumerate((tr.iloc[:5], tr.iloc[5:])):
            write(run, fold, half, "oof", wrong)
            write(run, fold, te, "test", wrong)
    write("r3", 0, tr.iloc[1:], "oof", {a})  # a run that left cell a out of its folds and missed nothing
    write("r3", 0, te, "test", set())
    out, summary = run_errors(nndl_prepared.out, tmp_path, ["r1", "r2"])
    assert out.loc[("cv", a), "runs_wrong"] == 2 and out.loc[("cv", b), "runs_wrong"] == 1
    assert out.loc[("test", t), "runs_wrong"] == 2 and out["runs_wrong"].sum() == 5
    assert summary[0].startswith("cv: 1 of 10 cells wrong in all 2 runs (2 in at least one)")
    assert summary[0].endswith("at most 0.900 here") and summary[1].startswith("test: 1 of 10 cells wrong in all 2")
    every, _ = run_errors(nndl_prepared.out, tmp_path)  # all three runs: r3 did not score cell a and got t right
    assert every.loc[("cv", a), ["runs_wrong", "runs"]].tolist() == [2, 2]
    assert every.loc[("test", t), ["runs_wrong", "runs"]].tolist() == [2, 3]


def test_compile_bench_without_a_cxx_compiler_says_so_instead_of_timing_eager_twice(monkeypatch):
    from pipeline.lib import engine
    from pipeline.tools.bench import bench_compile
    from pipeline.lib.common import PipelineError

    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    with pytest.raises(PipelineError, match="torch.compile is not available"):
        bench_compile("resnet10t", 32, batch_size=4, device="cpu", precision="fp32", n_batches=1)
