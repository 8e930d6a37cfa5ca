"""The exported student's model card (markdown) and the exports table, written by the report stage from a run's outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def fmt(v, spec: str = ".4f") -> str:
    """A number for a table; a dash for a missing one."""
    return "–" if v is None or pd.isna(v) else format(v, spec)


def md_table(df: pd.DataFrame) -> str:
    """A frame as a markdown table (pipes in cells escaped)."""
    rows = [list(df.columns), ["---"] * df.shape[1], *df.astype(str).to_numpy().tolist()]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows)


def export_table(scores: dict) -> pd.DataFrame:
    """The export stage's formats side by side: scores on the labelled set, drift from torch, speed, size."""
    n = scores["threads_all"]
    timing = {"batch1_threads1": "ms/image batch 1, 1 thread", "batch1_threads_all": f"batch 1, {n} threads",
              "batch64_threads1": "batch 64, 1 thread", "batch64_threads_all": f"batch 64, {n} threads"}
    return pd.DataFrame([{"format": name, "accuracy": fmt(f["accuracy"]), "ROC AUC": fmt(f["roc_auc"]),
                          "max |Δprob| vs torch": fmt(f["max_abs_dprob"], ".2g"),
                          **{col: fmt(f["ms_per_image"][k], ".2f") for k, col in timing.items()},
                          "size (MB)": fmt(f["size_mb"], ".1f")} for name, f in scores["formats"].items()])


def teacher_epochs(train: dict) -> str:
    """The teachers' epochs in words: train.epochs, or each backbone's where train.epochs_by_backbone differs."""
    by = {b: train.get("epochs_by_backbone", {}).get(b, train["epochs"]) for b in train["backbones"]}
    if len(set(by.values())) == 1:
        n = next(iter(by.values()))
        return f"{n} epoch{'s' * (n != 1)}"
    return ", ".join(f"{n} ({b})" for b, n in by.items()) + " epochs"


def no_cv_line(n_train: int, train: dict) -> str:
    """The sentence that says what a run without folds (folds.n 0) shows instead of cross-validation."""
    return (f"No cross-validation (folds.n 0): each backbone trained once on all {n_train} training cells for "
            f"{teacher_epochs(train)}, the last epoch kept; scores are on the labelled test set only.")


def int8_line(scores: dict) -> str:
    """One line: whether the export stage kept the int8 model, and why."""
    i8 = scores["int8"]
    return f"The int8 model is {'kept' if i8['kept'] else 'not kept'}: {i8['reason'].rstrip('.')}."


# The model card; model_card() fills it in from the run's outputs.
NIH = (" The NIH/NLM malaria cell images: single red-blood-cell crops segmented from Giemsa-stained thin blood smears, "
       "photographed at one hospital, Chittagong Medical College Hospital, Bangladesh (*P. falciparum* patients and "
       "healthy controls), labelled by an expert reader. A slide is one patient.")
CARD = """# Model card: malaria cell classifier (`{arch}` student)
{banner}
## Model details

- Architecture: `{arch}` (timm), {n_params:.2f} M parameters, two-class head. Output `{out[name]}`: the
  {out[meaning]}; label 1 at probability >= {threshold}.
- Input: `{inp[name]}`, {inp[dtype]} {inp[layout]} {shape}, {inp[channel_order]}; {inp[resize]}; scaled as
  {inp[scale]}, then mean {inp[mean]} and std {inp[std]}.
- Files: `{export}/model.json` (this description), {files}.
- Code: git commit `{commit}`.

## Data

Source: {source}.{nih}

{splits}

## Method

{method}

## Scores

{scored} scores from `{submissions}/leaderboard.csv`; the best file is
`{best}`, test accuracy {best_acc}.

{leaderboard}

The exported student on the labelled {labelled[split]} set ({labelled[n_images]} images); milliseconds per image on
this machine's CPU:

{exports}

{int8}

## Intended use and limits

- A screening aid that flags parasitized cells for a microscopist to check; not a diagnosis.
- Input: one segmented single-cell crop of a Giemsa-stained thin blood smear, not a whole field or a thick smear;
  segmenting the cells is not part of this model.
- Trained on one hospital's slides. Not validated on other stains, microscopes, cameras, *Plasmodium* species or
  patient populations: check it on local labelled cells before relying on it.

## Known failure modes

- In this run {n_wrong} of {n_oof} {held_out} predictions of `{col}` (threshold {thr:.3f}) are wrong; the slides
  with the most of them:

{slides}

- Staining artefacts and debris that look like parasites; platelets lying over a cell; faint early ring stages.
- Label noise: some cells of the public set are labelled wrongly, which caps and blurs the scores.
- Cells of one slide look alike, so a slide unlike the training slides may be scored worse.

## How to use

```bash
python -m pipeline.predict cells/ --model student -o out.csv
```

The CSV has `img_name,prob,label` for every image; `--tta` averages the run's TTA views{int8_use}.

Without this repository: ONNX Runtime on `{export}/{student_file}`, with the preprocessing `model.json` describes.
"""
# The card's Method paragraph: k-fold cross-validation, or one all-cells model per backbone (folds.n 0).
METHOD_CV = """\
{f[n]}-fold cross-validation grouped by slide (`folds.group_by: {f[group_by]}`). Teachers: {teachers}, one model
per fold, at most {t[epochs]} epochs at {img_size} px. Ensemble: the backbones blended in logit space; its threshold
0.5, or tuned on out-of-fold predictions where that won clearly on folds it was not tuned on. Student:
`{ds[student]}` distilled on all training images from the labels and the ensemble's out-of-fold probabilities
({ds[epochs]} epochs, alpha {ds[alpha]}, temperature {ds[temperature]}), then exported to ONNX."""
METHOD_NO_CV = """\
{no_cv} Teachers: {teachers} at {img_size} px. Ensemble: the backbones blended in logit space with equal
weights, threshold 0.5 (no out-of-fold predictions to fit either on). Student: `{ds[student]}` trained on all
training images from their labels alone ({ds[epochs]} epochs, alpha {ds[alpha]}, temperature {ds[temperature]}; no
out-of-fold probabilities to distil), then exported to ONNX."""


def held_out_errors(pred_csv: Path, slide: pd.Series, ensemble_scores: Path
                    ) -> tuple[str, float, int, int, pd.DataFrame]:
    """The ensemble's mistakes on cells it did not train on: column, threshold, errors, cells, the slides with most."""
    pred = pd.read_csv(pred_csv, dtype={"img_name": str})
    col = "ensemble_tta" if "ensemble_tta" in pred else "ensemble"
    thr = json.loads(ensemble_scores.read_text())["blend"][col]["threshold"]
    pred = pred.assign(slide=pred["img_name"].map(slide), wrong=(pred[col] >= thr) != (pred["label"] == 1))
    per = pred.groupby("slide").agg(errors=("wrong", "sum"), cells=("wrong", "size"))
    per = per[per["errors"] > 0].sort_values(["errors", "cells"], ascending=[False, True]).head(5)
    per = per.assign(error_rate=lambda t: (t["errors"] / t["cells"]).map(lambda v: f"{v:.0%}")).reset_index()
    return col, thr, int(pred["wrong"].sum()), len(pred), per


def model_card(*, prepared: str, folds: str, ensemble: str, submissions: str, export: str, params: dict) -> str:
    """The exported student's model card, in markdown, from this run's outputs."""
    manifest = json.loads(Path(export, "model.json").read_text())
    scores = json.loads(Path(export, "scores.json").read_text())
    index = pd.read_csv(Path(prepared, "index.csv"), dtype={"img_name": str})
    board = pd.read_csv(Path(submissions, "leaderboard.csv"))
    d, arch, cv = params["data"], manifest["arch"], params["folds"]["n"] > 0
    if cv:
        pred_csv, slide = "oof.csv", pd.read_csv(folds, dtype={"img_name": str}).set_index("img_name")["group"]
    else:  # no out-of-fold predictions: the labelled test set's
        pred_csv, slide = "test.csv", index[index["split"] == "test"].set_index("img_name")["group"]
    col, thr, n_wrong, n_oof, slides = held_out_errors(Path(ensemble, pred_csv), slide, Path(ensemble, "scores.json"))
    split = index.groupby("split", sort=False).agg(images=("img_name", "size"), slides=("group", "nunique"),
                                                   parasitized=("label", lambda y: fmt(y.sum(min_count=1), ".0f")))
    split = split.reindex([s for s in ("train", "test", "hidden") if s in split.index]).reset_index()
    cols = {"cv_accuracy": "CV accuracy", "cv_roc_auc": "CV ROC AUC"} if cv else {}  # no CV column without folds
    cols |= {"test_accuracy": "test accuracy", "test_roc_auc": "test ROC AUC"}
    shown = board[(board.index == 0) | board["model"].isin(["student", "ensemble"])]
    shown = pd.concat([shown["file"], shown[list(cols)].apply(lambda c: c.map(fmt)).rename(columns=cols)], axis=1)
    n_cells = int(index["label"].notna().sum())  # labelled: the demo's hidden split repeats its test cells
    banner = {"demo": f"\n> **This is a demo run on {n_cells:,} labelled cells** (`data.source: demo`), not the full "
                      "dataset: its scores come from a few hundred cells and say little about real use.\n",
              "synthetic": "\n> **These scores are from generated cells** (`data.source: synthetic`) and say "
                           "nothing about real smears.\n"}.get(d["source"], "")
    source = {"demo": "`data/demo.zip`, a sample of the public NIH set",
              "local": f"a local copy of the competition or NIH data (`{d['path']}`)",
              "kaggle": f"Kaggle, `{d['dataset'] or d['competition']}`",
              "synthetic": "cells generated by `pipeline/lib/synthetic.py`, not photographed"}[d["source"]]
    files = ", ".join(f"`{export}/{m['file']}` ({name}{'' if m.get('kept', True) else ', not kept'})"
                      for name, m in manifest["models"].items())
    method = (METHOD_CV if cv else METHOD_NO_CV).format(
        f=params["folds"], t=params["train"], ds=params["distill"], img_size=d["img_size"],
        teachers=", ".join(params["train"]["backbones"]),
        no_cv=no_cv_line(int((index["split"] == "train").sum()), params["train"]))
    return CARD.format(
        arch=arch, banner=banner, out=manifest["output"], threshold=manifest["threshold"], inp=manifest["input"],
        method=method, held_out="out-of-fold" if cv else "labelled-test",
        scored="Cross-validation (out-of-fold) and labelled-test" if cv else "Labelled-test (no cross-validation)",
        n_params=manifest["parameters"] / 1e6,
        shape=" × ".join(map(str, manifest["input"]["shape"])), files=files, export=export,
        commit=manifest.get("git_commit", "unknown"), source=source, nih=NIH if d["source"] != "synthetic" else "",
        splits=md_table(split), submissions=submissions, best=board["file"].iat[0],
        best_acc=fmt(board["test_accuracy"].iat[0]), leaderboard=md_table(shown), labelled=scores["labelled"],
        exports=md_table(export_table(scores)), int8=int8_line(scores), col=col, thr=thr, n_wrong=n_wrong,
        n_oof=n_oof, slides=md_table(slides.rename(columns={"error_rate": "error rate"})) if len(slides) else "(none)",
        student_file=manifest["models"]["student"]["file"],
        int8_use="; `--model student-int8` runs the int8 copy" if scores["int8"]["kept"] else "")
