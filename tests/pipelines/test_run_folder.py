"""The run folder's rules (one writer, one config, finished means finished) and complete
checkpoints only, on real folders and real `torch.distributed.checkpoint` files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.build import run_checkpoint
from pipelines.train.checkpoint import incomplete_reason, newest_complete, save_checkpoint
from pipelines.train.run_folder import RunFolder, config_changes
from recsys.config import ConfigError, ExperimentConfig, load_config


def _cfg(repo: Path, *extra: str) -> ExperimentConfig:
    return load_config(repo / "conf" / "demo.yaml", list(extra))


def _finished(path: Path, cfg: ExperimentConfig) -> None:
    with RunFolder(path, cfg, resume=False) as folder:
        folder.write_config()
        (path / "checkpoint_step00000004_ab12cd").mkdir()
        folder.write_result({"metrics": {}})


def test_a_finished_run_is_trained_again_only_with_resume(tmp_path: Path, repo: Path) -> None:
    cfg = _cfg(repo)
    _finished(tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match=r"has finished \(result.json\); pass --resume"):
        RunFolder(tmp_path / "run", cfg, resume=False).__enter__()
    with RunFolder(tmp_path / "run", _cfg(repo, "train.epochs=3"), resume=True):
        pass  # more epochs: a resumable change


def test_resuming_under_another_config_names_the_keys(tmp_path: Path, repo: Path) -> None:
    _finished(tmp_path / "run", _cfg(repo))
    changed = _cfg(repo, "train.seed=7", "tables.0.min_count=3", "train.workers=1")
    with pytest.raises(ConfigError) as err:
        RunFolder(tmp_path / "run", changed, resume=True).__enter__()
    assert "['tables.0.min_count', 'train.seed']" in str(err.value)


def test_config_changes_leave_out_the_resumable_keys(repo: Path) -> None:
    before = _cfg(repo).model_dump(mode="json")
    after = _cfg(repo, "train.max_steps=9", "train.keep_checkpoints=5", "train.dense_lr=0.1")
    assert config_changes(before, after.model_dump(mode="json")) == ["train.dense_lr"]


def test_two_trains_on_one_folder_exclude_each_other(tmp_path: Path, repo: Path) -> None:
    cfg = _cfg(repo)
    busy = pytest.raises(ConfigError, match=r"another `recsys train` is training this run")
    with RunFolder(tmp_path / "run", cfg, resume=False), busy:
        RunFolder(tmp_path / "run", cfg, resume=False).__enter__()
    with RunFolder(tmp_path / "run", cfg, resume=False):  # released on exit
        pass


def _checkpoint(directory: Path, step: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 32)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    directory.mkdir(parents=True)
    save_checkpoint(directory, model, optimizer, {"step": step})


def test_readers_take_the_newest_complete_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    _checkpoint(run / "checkpoint_step00000010_aaaaaa", 10, seed=0)
    _checkpoint(run / "checkpoint_step00000020_bbbbbb", 20, seed=1)
    assert newest_complete(run).name == "checkpoint_step00000020_bbbbbb"
    # Cut the newest one's tensor file short, as a copy killed half way would leave it.
    broken = run / "checkpoint_step00000020_bbbbbb"
    data = max(broken.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:-100])
    reason = incomplete_reason(broken)
    assert reason is not None and f"{data.name} has " in reason
    with caplog.at_level(logging.WARNING):
        assert run_checkpoint(run).name == "checkpoint_step00000010_aaaaaa"
    assert "skipping incomplete checkpoint" in caplog.text and broken.name in caplog.text
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run_checkpoint(broken)
    shutil.rmtree(broken / "manifests")
    assert incomplete_reason(broken) == "no manifests"
    shutil.rmtree(run / "checkpoint_step00000010_aaaaaa" / "manifests")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint_"):
        newest_complete(run)
