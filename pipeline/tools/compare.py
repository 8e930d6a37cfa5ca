"""`python -m pipeline.tools.compare A B`: two runs scored on the same labelled test cells, paired (exact McNemar)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pipeline.lib.common import PipelineError, run_main
from pipeline.lib.layout import fold_dirs
from pipeline.lib.metrics import accuracy_se, mcnemar

def labels_by_name(index: pd.DataFrame) -> pd.Series:
    """Each labelled cell's label by img_name, once: the public layout's hidden rows repeat its test rows' names."""
    return index[index["split"] != "hidden"].drop_duplicates("img_name").set_index("img_name")["label"]


def read_index_labels(prepared: Path) -> pd.Series:
    index_csv = prepared / "index.csv"
    if not index_csv.is_file():
        raise PipelineError(f"{index_csv} is missing: give --prepared the run's data/prepared folder.")
    index = pd.read_csv(index_csv, dtype={"img_name": str})
    return labels_by_name(index[index["split"] == "test"]).dropna().astype(int)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"img_name": str}).drop_duplicates("img_name").set_index("img_name")


def test_predictions(spec: Path, prepared: Path | None = None) -> tuple[pd.Series, float, pd.Series]:
    """(probability by cell, threshold, label by cell) on the labelled test cells for one of:
    a run's submission file (<project>/submissions/latest/<model>.csv: that model's test predictions and its
    leaderboard threshold); a predictions CSV (img_name, prob: bench ablate's rows); a folder with test.csv (bench
    plain, data/student: its `prob`, without TTA); an ablation run (fold*/test.csv: the folds' mean prob_tta). Labels
    come from the run's data/prepared, else `prepared`."""
    spec = Path(spec)
    if spec.suffix == ".csv" and spec.parent.name == "latest":
        project, model = spec.parents[2], spec.stem
        board = pd.read_csv(spec.parent / "leaderboard.csv").set_index("file")
        if spec.name not in board.index:
            raise PipelineError(f"{spec.name} is not in {spec.parent / 'leaderboard.csv'}: name one of "
                                f"{', '.join(board.index)}.")
        if model.startswith("student"):
            prob = _read(project / "data/student/test.csv")["prob_tta" if model.endswith("_tta") else "prob"]
            threshold = 0.5
        else:
            prob = _read(project / "data/ensemble/test.csv")[model]
            # The ensemble's own threshold at full precision (the leaderboard rounds it to 4 places), as submit uses.
            metrics = json.loads((project / "data/ensemble/scores.json").read_text())["metrics"]
            threshold = float(metrics[model]["threshold"])
        return prob, threshold, read_index_labels(project / "data/prepared")
    if spec.suffix == ".csv" and spec.is_file():  # a bench row's predictions: img_name, prob
        t = _read(spec)
        if "prob" not in t:
            raise PipelineError(f"{spec} has columns {', '.join(t.columns)}, not img_name and prob: name a run's "
                                "submissions/latest/<model>.csv or a bench row's predictions/<name>.csv.")
        prob = t["prob"]
    elif (spec / "test.csv").is_file():  # the model without TTA, as `bench plain` scores the plain network
        prob = _read(spec / "test.csv")["prob"]
    elif folds := fold_dirs(spec, "test.csv"):
        prob = pd.concat([_read(d / "test.csv")["prob_tta"] for d in folds], axis=1).mean(axis=1)
    else:
        raise PipelineError(f"{spec}: neither a submission file in submissions/latest/, nor a folder with test.csv or "
                            "fold*/test.csv. Name a run's submissions/latest/<model>.csv or a bench run's folder.")
    if prepared is None:
        raise PipelineError(f"{spec} holds no labels: give --prepared the data/prepared folder it was scored on.")
    return prob, 0.5, read_index_labels(prepared)


def paired(a: Path, b: Path, prepared: Path | None = None) -> dict:
    """Accuracy ± SE of a and b on their common labelled test cells (which must be all of both), and McNemar."""
    (pa, ta, la), (pb, tb, lb) = test_predictions(a, prepared), test_predictions(b, prepared)
    la, lb = la[la.index.isin(pa.index)], lb[lb.index.isin(pb.index)]
    if set(la.index) != set(lb.index) or not len(la):
        raise PipelineError(f"{a} and {b} were scored on different test cells ({len(la)} and {len(lb)}, "
                            f"{len(set(la.index) & set(lb.index))} in common): compare runs on the same data.")
    cells = la.index
    if not la.equals(lb[cells]):
        raise PipelineError(f"{a} and {b} label the same cells differently: they were prepared from different data.")
    y = la.to_numpy()
    right_a = (pa[cells].to_numpy() >= ta).astype(int) == y
    right_b = (pb[cells].to_numpy() >= tb).astype(int) == y
    out = {"n": len(y)}
    for key, spec, right in (("a", a, right_a), ("b", b, right_b)):
        acc = float(right.mean())
        out[key] = {"run": str(spec), "accuracy": acc, "accuracy_se": accuracy_se(acc, len(y))}
    t = mcnemar(right_a, right_b)
    out.update(only_a=t["only_a"], only_b=t["only_b"], mcnemar_p=t["p"])
    return out


def summary(r: dict) -> str:
    lines = [f"{k}: {r[k]['run']}: accuracy {r[k]['accuracy']:.4f} ± {r[k]['accuracy_se']:.4f}" for k in ("a", "b")]
    lines.append(f"on {r['n']} labelled test cells: {r['only_a']} right only in a, {r['only_b']} only in b; exact "
                 f"McNemar p = {r['mcnemar_p']:.3g} (a difference at p < 0.05 is {'' if r['mcnemar_p'] < 0.05 else 'not '}"
                 "shown)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("a", type=Path, help="a run's submissions/latest/<model>.csv, or a bench run's folder")
    parser.add_argument("b", type=Path, help="the reference, the same kinds")
    parser.add_argument("--prepared", type=Path, help="labels for bench folders: the data/prepared they were "
                        "scored on (default: data/prepared)", default=Path("data/prepared"))
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    r = paired(args.a, args.b, args.prepared)
    print(summary(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    run_main(main)
