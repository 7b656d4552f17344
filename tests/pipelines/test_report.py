"""`recsys report RUN`: one HTML page per run that embeds every plot the run folder holds
(so it reads offline) beside the config, the validations, the newest evaluation and the
tables' bytes."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from pipelines.build import build_model, load_vocabularies
from pipelines.evaluate import evaluate
from pipelines.report import write_report
from tests.pipelines.runs import HELD_OUT_DAY, REPO, SMALL_CTR, module_run, run_config

RECSYS = Path(sys.executable).with_name("recsys")


def _config(tmp: Path):
    return run_config("demo.yaml", tmp, *SMALL_CTR, "train.log_every=2")


trained = module_run(_config, rows=6_000)


def test_the_page_embeds_every_plot_and_the_newest_evaluation(trained) -> None:
    _, tmp, result = trained
    run = Path(result["run_dir"])
    evaluate(run, tmp / "log" / HELD_OUT_DAY)
    newest = evaluate(run, tmp / "log" / HELD_OUT_DAY)  # two evaluations: the page shows this
    command = [str(RECSYS), "report", str(run), "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # library chatter in the run's logs/report.log
    page_path = Path(json.loads(done.stdout)["page"])
    assert page_path == run / "report.html"
    page = page_path.read_text()

    plots = sorted(run.rglob("*.png"))
    assert {p.name for p in plots} >= {"learning_curve.png", "report.png"}
    embedded = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert {name for name, _ in embedded} == {str(p.relative_to(run)) for p in plots}
    for name, data in embedded:  # the bytes themselves, not a link: the page reads offline
        assert base64.b64decode(data) == (run / name).read_bytes()
    assert "<img" not in re.sub(r'<img alt="[^"]+" src="data:image/png;base64,[^"]+">', "", page)

    newest_folder = Path(newest["report_dir"]).relative_to(run)
    assert f"{newest_folder}: newest of 2 evaluation(s)" in page
    assert f'<td class="n">{newest["auc"]:.4f}</td>' in page
    best = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    for record in (r for r in best if "valid_auc" in r and not r.get("final")):
        assert f'<td class="n">{record["valid_auc"]:.4f}</td>' in page
    assert (run / "config.yaml").read_text().splitlines()[0] in page


def test_the_tables_section_gives_each_tables_bytes(trained) -> None:
    """Rows x (dim + 1 row-wise Adagrad accumulator) x 4 bytes, per table of the model."""
    cfg, tmp, result = trained
    run = Path(result["run_dir"])
    assert cfg.train.sparse_optimizer == "rowwise_adagrad"
    page = write_report(run, tmp / "elsewhere" / "page.html").read_text()
    model = build_model(cfg, load_vocabularies(run), table_device=torch.device("meta"))
    configs = [c for m in model.modules() if isinstance(m, EmbeddingBagCollection)
               for c in m.embedding_bag_configs()]  # fmt: skip
    assert len(configs) == len(cfg.tables[0].features)  # one table per feature
    total = 0
    for c in configs:
        n = c.num_embeddings * (c.embedding_dim + 1) * 4
        total += n
        assert f'<tr><td>{c.name}</td><td class="n">{n:,}</td></tr>' in page
    assert f'<tr><td>total</td><td class="n">{total:,}</td></tr>' in page
