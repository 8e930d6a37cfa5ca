"""Each stage's wall time: run_main writes it (`--timing`), the report stage sums it into data/timing.json."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline.lib.common import run_main
from pipeline.report import write_timing_summary


def test_run_main_takes_the_timing_option_and_writes_the_wall_time(tmp_path, monkeypatch):
    out = tmp_path / "timing" / "prepare.json"
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--raw", "r", "--timing", str(out), "--out", "o"])
    seen = []
    run_main(lambda: (seen.append(list(sys.argv)), time.sleep(0.2)))
    assert seen == [["prepare.py", "--raw", "r", "--out", "o"]]  # the stage's own parser never sees it
    t = json.loads(out.read_text())
    assert 0.2 <= t["seconds"] < 5 and abs(t["minutes"] - t["seconds"] / 60) < 1e-2


def test_a_failed_stage_writes_no_timing(tmp_path, monkeypatch):
    out = tmp_path / "t.json"
    monkeypatch.setattr(sys, "argv", ["x.py", "--timing", str(out)])
    try:
        run_main(lambda: 1 / 0)
    except ZeroDivisionError:
        pass
    assert not out.exists()


def test_summary_sums_the_stages_and_the_report(tmp_path):
    for name, minutes in (("prepare", 0.25), ("train-resnet10t", 1.5)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"seconds": minutes * 60, "minutes": minutes}))
    s = write_timing_summary(tmp_path, tmp_path / "out" / "timing.json", report_seconds=30)
    assert s == {"minutes": {"prepare": 0.25, "train-resnet10t": 1.5, "report": 0.5}, "total_minutes": 2.25}
    assert json.loads((tmp_path / "out" / "timing.json").read_text()) == s


def test_a_stage_freezes_the_garbage_collector_at_exit(tmp_path):
    """The interpreter's last collections over torch's objects cost seconds per stage: run_main freezes them at exit
    (an atexit handler registered earlier runs later, and sees the frozen objects)."""
    script = ("import atexit, gc\n"
              "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
              "from pipeline.lib.common import run_main\n"
              "run_main(lambda: print('frozen during the stage:', gc.get_freeze_count() > 0))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["frozen during the stage: False", "frozen at exit: True"]
