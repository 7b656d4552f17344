"""A plain TorchRec training loop, the way torchrec's DLRM example (`dlrm_main.py`) trains.

    python bench/peers/torchrec_dlrm.py JOB.json     # writes JOB's output/result.json

No Ray and none of the engine's pipeline: one process, a gloo group of one rank, the log read
once into memory and cut into batches (as the example's in-memory Criteo dataset does, batch
order shuffled each epoch, rows kept in place), IDs taken modulo each table's rows (the
example's preprocessing), an `EmbeddingBagCollection` sharded by the planner under
`DistributedModelParallel`, the table optimizer fused into backward with
`apply_optimizer_in_backward`, the dense optimizer through `KeyedOptimizerWrapper`, both in
a `CombinedOptimizer`, and `TrainPipelineSparseDist` stepping the model, as the example does.

DLRM is torchrec's own `torchrec.models.dlrm.DLRM`. torchrec has no DCN-v2 of the cross-net
+ deep-MLP shape (its `DLRM_DCN` is DLRM with a low-rank cross interaction), so DCN-v2 reads
the same `EmbeddingBagCollection` into the engine's `models.ctr.DCNv2` module: the model is
then the engine's and only the loop is torchrec's.

Job keys (JSON): train, test (Parquet), label, dense (names), sparse (names), multi_valued
(names; mean-pooled), num_embeddings ({feature: rows}), embedding_dim, model (DLRM | DCNv2),
dense_arch, over_arch, cross_layers, cross_structure, batch_size, epochs, dense_lr, sparse_lr,
threads, seed, output (folder).
Result: startup_s (process start to the first step: imports, reading and preprocessing the
log, building and sharding the model), train_s and examples_per_s of the training loop,
eval_s, test_auc, test_logloss, dense_parameters, table_rows, sharding, threads.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from models.ctr import DCNv2
from recsys.config import ModelConfig
from recsys.metrics import auc, logloss


class InMemoryLog:
    """A Parquet split as tensors: dense [N, D], labels [N], per feature IDs modulo its rows
    and bag offsets; `batch(start, stop)` slices rows into a torchrec `Batch`."""

    def __init__(self, path: str, job: dict[str, Any]) -> None:
        table = pq.read_table(path, columns=[job["label"], *job["dense"], *job["sparse"]])
        self.rows = table.num_rows
        self.keys: list[str] = list(job["sparse"])
        dense = np.stack([table.column(c).to_numpy() for c in job["dense"]], axis=1)
        self.dense = torch.from_numpy(dense.astype(np.float32))
        self.labels = torch.from_numpy(table.column(job["label"]).to_numpy().astype(np.float32))
        self.values: list[torch.Tensor] = []
        self.offsets: list[torch.Tensor] = []
        for name in self.keys:
            col = table.column(name).combine_chunks()
            rows = job["num_embeddings"][name]
            if name in job["multi_valued"]:
                offsets = col.offsets.to_numpy().astype(np.int64)
                ids = col.values.to_numpy()
            else:
                offsets = np.arange(self.rows + 1, dtype=np.int64)
                ids = col.to_numpy()
            self.values.append(torch.from_numpy(ids % rows))
            self.offsets.append(torch.from_numpy(offsets))

    def batch(self, start: int, stop: int) -> Batch:
        values = [v[o[start] : o[stop]] for v, o in zip(self.values, self.offsets, strict=True)]
        lengths = [o[start + 1 : stop + 1] - o[start:stop] for o in self.offsets]
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths).int()
        )
        return Batch(self.dense[start:stop], sparse, self.labels[start:stop])

    def batches(self, size: int, order: torch.Tensor | None = None) -> Iterator[Batch]:
        starts = torch.arange(0, self.rows, size)
        for start in starts if order is None else starts[order]:
            yield self.batch(int(start), min(int(start) + size, self.rows))


class DCNv2Train(nn.Module):
    """The engine's DCN-v2 over an `EmbeddingBagCollection`, with `DLRMTrain`'s interface."""

    def __init__(self, ebc: EmbeddingBagCollection, job: dict[str, Any]) -> None:
        super().__init__()
        self.ebc = ebc
        self.keys = list(job["sparse"])
        cfg = ModelConfig(
            name="dcnv2",
            over_arch=job["over_arch"],
            cross_layers=job["cross_layers"],
            cross_structure=job["cross_structure"],
            batch_norm=False,
            dropout=0.0,
        )
        dims = [job["embedding_dim"]] * len(self.keys)
        self.dense = DCNv2(cfg, len(job["dense"]), dims)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        pooled = self.ebc(batch.sparse_features).to_dict()  # by key: sharding reorders
        logits = self.dense(batch.dense_features, torch.cat([pooled[k] for k in self.keys], 1))
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def build(job: dict[str, Any]) -> nn.Module:
    """The training module (loss, (loss, logits, labels)) = module(batch), tables on meta."""
    tables = [
        EmbeddingBagConfig(
            name=f"t_{name}",
            embedding_dim=job["embedding_dim"],
            num_embeddings=job["num_embeddings"][name],
            feature_names=[name],
            pooling=PoolingType.MEAN if name in job["multi_valued"] else PoolingType.SUM,
            init_fn=lambda w: nn.init.normal_(w, std=1e-4),
        )
        for name in job["sparse"]
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    if job["model"] == "DLRM":
        dlrm = DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=len(job["dense"]),
            dense_arch_layer_sizes=job["dense_arch"],
            over_arch_layer_sizes=[*job["over_arch"], 1],
        )
        return DLRMTrain(dlrm)
    return DCNv2Train(ebc, job)


def sparse_module(model: nn.Module) -> nn.Module:
    return model.model.sparse_arch if isinstance(model, DLRMTrain) else model.ebc


def init_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def run(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(job["seed"])
    init_group()
    device = torch.device("cpu")
    train = InMemoryLog(job["train"], job)
    model = build(job)
    apply_optimizer_in_backward(
        RowWiseAdagrad, sparse_module(model).parameters(), {"lr": job["sparse_lr"]}
    )
    planner = EmbeddingShardingPlanner(
        topology=Topology(local_world_size=1, world_size=1, compute_device="cpu"),
        batch_size=job["batch_size"],
        # every table whole and fused (the planner would make small ones data-parallel,
        # which the dense optimizer then steps): the engine's tables in this bench
        constraints={
            f"t_{name}": ParameterConstraints(sharding_types=["table_wise"])
            for name in job["sparse"]
        },
    )
    plan = planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=job["dense_lr"]),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    sharding = sorted({s.sharding_type for p in plan.plan.values() for s in p.values()})
    dense_parameters = sum(
        p.numel() for _, p in in_backward_optimizer_filter(dmp.named_parameters())
    )

    startup_s = time.time() - psutil.Process().create_time()
    start, examples = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(job["seed"])
    steps = -(-train.rows // job["batch_size"])
    dmp.train()
    for _ in range(job["epochs"]):
        batches = train.batches(job["batch_size"], torch.randperm(steps, generator=generator))
        while True:
            try:
                pipeline.progress(batches)
            except StopIteration:
                break
        examples += train.rows
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    test = InMemoryLog(job["test"], job)
    dmp.eval()  # the pipeline then runs forward only, as the example's evaluation does
    scores = []
    batches = test.batches(job["batch_size"])
    with torch.no_grad():
        while True:
            try:
                scores.append(pipeline.progress(batches)[1])  # (loss, logits, labels)
            except StopIteration:
                break
    logits = torch.cat(scores).double()
    labels = test.labels.double().numpy()
    probs = torch.sigmoid(logits).numpy()
    result = {
        "model": job["model"],
        "startup_s": round(startup_s, 3),
        "train_s": round(train_s, 3),
        "examples": examples,
        "examples_per_s": examples / train_s,
        "eval_s": round(time.perf_counter() - start, 3),
        "test_auc": auc(labels, probs),
        "test_logloss": logloss(labels, probs),
        "dense_parameters": dense_parameters,
        "table_rows": sum(job["num_embeddings"].values()),
        "sharding": sharding,
        "threads": torch.get_num_threads(),
    }
    dist.destroy_process_group()
    return result


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["output"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(run(job), indent=1))


if __name__ == "__main__":
    main()
