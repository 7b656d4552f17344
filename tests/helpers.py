"""Small helpers shared by tests that start process groups, write runs by hand and score
them, or read converted logs."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.distributed._shard.sharded_tensor import ShardedTensor

from pipelines.build import build_model, load_trained, save_vocabularies
from pipelines.train.checkpoint import save_checkpoint
from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig
from recsys.logs import read_validated
from tables.vocab import build_vocabularies


def free_port() -> int:
    """A loopback port nobody listens on now, for a gloo rendezvous or a Ray head."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(worker: Callable[..., None], world: int, *args: object) -> None:
    """Run `worker(rank, port, *args)` in `world` spawned processes on a fresh loopback port.
    A rank that dies or fails an assertion fails the test: a crash is reported, never retried."""
    mp.start_processes(
        _run_rank, args=(worker, free_port(), *args), nprocs=world, start_method="spawn"
    )


def _run_rank(rank: int, worker: Callable[..., None], port: int, *args: object) -> None:
    """One rank's body. A rank whose work returned leaves with `os._exit(0)`: native thread
    pools (gloo, fbgemm) sometimes abort in their static destructors at interpreter exit
    ("terminate called without an active exception", no Python frame), after the test's
    work and assertions are done; that teardown is not what the test checks. An exception
    still propagates and fails the rank with its traceback."""
    worker(rank, port, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def gloo_group(rank: int, world: int, port: int, timeout_s: int = 120) -> Iterator[None]:
    """One test rank's gloo process group on loopback, at one thread. Ranks meet at a barrier
    before tearing it down, so no rank closes its sockets while a peer still works over them;
    a rank that aborts in native code prints its Python stack."""
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def copy_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Give a sharded model an unsharded one's state: each local shard its slice of it."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not isinstance(value, ShardedTensor):
                value.copy_(full[key])
                continue
            for shard in value.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(full[key][r0 : r0 + nr, c0 : c0 + nc])


def hand_written_run(cfg: ExperimentConfig, log: Path, run: Path) -> None:
    """A run folder as training leaves one, written without Ray: `log`'s vocabularies, the
    config and a checkpoint (step 3) of a freshly built, untrained model."""
    run.mkdir()
    vocab = build_vocabularies(cfg, log)
    save_vocabularies(run, vocab)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    model = build_model(cfg, vocab)
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 3})


def trained_probabilities(run: str | Path, data: Path) -> np.ndarray:
    """Click probabilities of a run's newest checkpoint, unsharded, on every row of `data`."""
    cfg, model, _ = load_trained(run)
    convert = BatchConverter(cfg.features)
    with torch.no_grad():
        parts = [
            torch.sigmoid(model(convert(t))).numpy() for t in read_validated(data, cfg.features)
        ]
    return np.concatenate(parts)


def write_text(path: Path, text: str) -> Path:
    """`text` written to `path`, for a converter's input; the path."""
    path.write_text(text)
    return path


def read_log(out: Path) -> pa.Table:
    """All Parquet files of a converted log, in day and part order, as they were written."""
    return pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("day=*/*.parquet")))
