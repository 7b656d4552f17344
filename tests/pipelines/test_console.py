"""The console of `recsys train`: the run's own lines once each and a summary table, the
libraries' chatter in the run's log files; `--verbose` brings it back, `--json` prints
the result for machines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.console import _new_lines
from recsys.synth import generate
from tests.pipelines.runs import HELD_OUT_DAY, REPO, SMALL_CTR, run_config

RECSYS = Path(sys.executable).with_name("recsys")
CHATTER = "GreedyPerfPartitioner"  # torchrec's sharding planner, a hundred lines a run


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("console")
    generate(run_config("demo.yaml", tmp, *SMALL_CTR), rows=6_000, out=tmp / "log")
    return tmp


def _recsys(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(RECSYS), *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _train(tmp: Path, name: str, *flags: str) -> subprocess.CompletedProcess[str]:
    overrides = [f"data.train={tmp / 'log'}", f"train.run_dir={tmp / 'runs'}", f"name={name}"]
    return _recsys("train", "conf/demo.yaml", *SMALL_CTR, *overrides, *flags)


@pytest.fixture(scope="module")
def demo(log: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """The commands of `make demo` after gen-data, on the small log: what each printed."""
    run, day = log / "runs" / "plain", str(log / "log" / HELD_OUT_DAY)
    scored = ["--data", day, "--with-metrics", "--out", str(log / "predictions.parquet")]
    return {
        "train": _train(log, "plain", "train.log_every=2"),
        "evaluate": _recsys("evaluate", "--checkpoint", str(run), "--data", day),
        "export": _recsys("export", "--checkpoint", str(run), "--out", str(log / "export")),
        "predict": _recsys("predict", "--export", str(log / "export"), *scored),
    }


def test_the_console_shows_the_runs_lines_once_and_a_summary(log: Path, demo: dict) -> None:
    done = demo["train"]
    lines = done.stdout.splitlines()
    run = log / "runs" / "plain"
    own = (run / "logs" / "console.log").read_text().splitlines()
    assert own and all(lines.count(line) == 1 for line in own)  # each once, none lost
    assert len(lines) + len(done.stderr.splitlines()) <= len(own) + 30
    assert "train plain: done" in lines
    summary = lines[lines.index("train plain: done") :]
    best = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    auc = [r["valid_auc"] for r in best if r.get("best") is True][-1]
    assert any(line.split() == ["valid", "AUC", f"{auc:.4f}"] for line in summary)
    assert CHATTER not in done.stdout + done.stderr
    assert CHATTER in (run / "logs" / "worker-0.log").read_text()
    assert "Started a local Ray instance" in (run / "logs" / "driver.log").read_text()


DEMO_LINE_BUDGET = 60  # issue 17: `make demo` prints at most about 60 lines


def test_the_demo_stays_under_its_line_budget_and_ends_with_the_held_out_auc(
    log: Path, demo: dict
) -> None:
    """train, evaluate, export, predict as `make demo` runs them: every line on the console
    counted (stderr too), the training summary table among them, and the held-out AUC of
    the evaluation in the last command's lines."""
    lines = [line for done in demo.values() for line in (done.stdout + done.stderr).splitlines()]
    assert len(lines) <= DEMO_LINE_BUDGET, "\n".join(lines)
    assert "train plain: done" in lines
    assert not any("(raylet)" in line or "PYTHON worker processes" in line for line in lines)
    report = json.loads(next((log / "runs" / "plain" / "eval").glob("*/report.json")).read_text())
    predicted = demo["predict"].stdout.split()
    assert predicted[predicted.index("auc") + 1] == f"{report['auc']:.4f}"


def test_verbose_shows_the_libraries_and_json_is_for_machines(log: Path) -> None:
    done = _train(log, "loud", "--verbose", "--json")
    assert CHATTER in done.stdout + done.stderr
    start = ("\n" + done.stdout).rindex("\n{\n")  # the result, after the forwarded lines
    result, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
    assert result["run_dir"] == str(log / "runs" / "loud")
    assert result["peak_tree_rss_bytes"] > 0


def test_a_line_being_written_is_left_for_the_next_read(tmp_path: Path) -> None:
    """The driver follows files the workers append to: half a line is never printed or
    parsed, and is read whole once its end is written."""
    path = tmp_path / "console.log"
    path.write_bytes(b'first\n{"step": 1')
    lines, offset = _new_lines(path, 0)
    assert (lines, offset) == (["first"], 6)
    with path.open("ab") as out:
        out.write(b', "loss": 0.5}\n')
    lines, offset = _new_lines(path, offset)
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 0.5}]
    assert offset == path.stat().st_size
