"""Train and test one FuxiCTR 2.3 model on the engine's Parquet splits, as FuxiCTR users do.

Run with the peer venv's python (see fuxictr_venv.py), never the engine's: this file imports
only the stdlib, fuxictr and what fuxictr brings (torch, polars, pyarrow, numpy, ray).

    PY=$(python bench/peers/fuxictr_venv.py)
    $PY bench/peers/fuxictr_run.py JOB.json          # writes JOB's output_dir/result.json
    $PY bench/peers/fuxictr_run.py --synthetic DIR   # a small split + job_<Model>.json in DIR

The steps follow the model's own run_expid.py: `FeatureProcessor` + `build_dataset` (which
reads the Parquet files with polars, fits vocabularies on train and writes transformed
Parquet through Ray Data), `FeatureMap.load`, the model class from the model zoo's `src/`,
`RankDataLoader` (Ray Data batches, reshuffled every epoch), `fit`, `evaluate`.

Job keys (JSON): train, valid, test (Parquet paths); label (default "label"); features: a list
of {"name", "type": categorical | numeric | sequence} plus optional FuxiCTR column keys
(max_len, feature_encoder, normalizer, embedding_dim, share_embedding, min_categr_count);
model: DeepFM | DCNv2 | DLRM; params: FuxiCTR model/fit keyword arguments (embedding_dim,
hidden_units, net_dropout, batch_norm, embedding_regularizer, net_regularizer, learning_rate,
batch_size, epochs, early_stop_patience, monitor, seed, model_structure, num_cross_layers, ...);
output_dir; optional loader ("ray", FuxiCTR's own, default, or "memory": the same transformed
data held as tensors, to separate loader cost from model cost), torch_threads, model_zoo.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fuxictr_dlrm import column_numeric_inputs  # beside this file: run as a script

SCRIPT_START = time.perf_counter()

DEFAULT_ZOO = Path(__file__).resolve().parents[3] / "shared" / "peers" / "fuxictr" / "model_zoo"

# The `Base` block of every model_config.yaml in the zoo, plus the task settings each
# experiment block repeats; job params override any of them.
BASE_PARAMS: dict[str, Any] = {
    "verbose": 1,
    "early_stop_patience": 2,
    "pickle_feature_encoder": True,
    "save_best_only": True,
    "eval_steps": None,
    "debug_mode": False,
    "group_id": None,
    "use_features": None,
    "feature_specs": None,
    "feature_config": None,
    "loss": "binary_crossentropy",
    "metrics": ["logloss", "AUC"],
    "task": "binary_classification",
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "batch_size": 4096,
    "embedding_dim": 10,
    "epochs": 100,
    "shuffle": True,
    "seed": 2019,
    "monitor": "AUC",
    "monitor_mode": "max",
    "min_categr_count": 1,
    "num_workers": 1,
}

# Generic recipe names -> each model's own keyword, filled only where the job leaves the
# model's keyword unset, so one recipe dict can drive all three models.
ALIASES: dict[str, dict[str, list[str]]] = {
    "DeepFM": {},
    "DCNv2": {
        "hidden_units": ["parallel_dnn_hidden_units", "stacked_dnn_hidden_units"],
        "hidden_activations": ["dnn_activations"],
    },
    "DLRM": {
        "hidden_units": ["top_mlp_units"],
        "hidden_activations": ["top_mlp_activations"],
        "net_dropout": ["top_mlp_dropout"],
    },
}

DTYPES = {"categorical": "int", "numeric": "float", "sequence": "list"}
COLUMN_KEYS = (
    "max_len",
    "padding",
    "feature_encoder",
    "normalizer",
    "embedding_dim",
    "share_embedding",
    "min_categr_count",
    "fill_na",
)


def load_model_class(zoo: Path, model: str) -> type:
    """Import the zoo's `src` package for `model` under a unique name (as `import src` would)."""
    inits = sorted(zoo.glob(f"{model}/**/src/{model}.py"))
    if not inits:
        raise FileNotFoundError(f"no {model}/**/src/{model}.py under {zoo}")
    src = inits[0].parent
    name = f"fuxictr_zoo_{model}"
    spec = importlib.util.spec_from_file_location(
        name, src / "__init__.py", submodule_search_locations=[str(src)]
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return getattr(module, model)


def feature_cols(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's feature list as FuxiCTR `feature_cols`.

    Categorical int64 IDs keep their integer values (FuxiCTR's vocabulary accepts any
    hashable token); list<int64> columns become FuxiCTR 'sequence' features, which its
    preprocess joins with '^' and pools with MaskedAveragePooling unless told otherwise.
    """
    cols = []
    for f in features:
        kind = f["type"]
        if kind not in DTYPES:
            raise ValueError(f"feature {f['name']!r}: type {kind!r} not in {sorted(DTYPES)}")
        col = {"name": f["name"], "active": True, "dtype": DTYPES[kind], "type": kind}
        col.update({k: f[k] for k in COLUMN_KEYS if k in f})
        cols.append(col)
    return cols


def prepare_split(path: str, seq_cols: list[str], out: Path) -> str:
    """The split itself, or a copy with null lists as [] where it has any.

    FuxiCTR cannot fill nulls in a list column (its fill_na casts to str and polars refuses),
    and a null list reaches its tokenizer as None and fails; the engine's contract allows
    null lists where a feature says allow_null.
    """
    import polars as pl

    if not seq_cols:
        return path
    nulls = pl.scan_parquet(path).select(pl.col(seq_cols).null_count()).collect().row(0)
    if not any(nulls):
        return path
    out.parent.mkdir(parents=True, exist_ok=True)
    fill = [pl.col(c).fill_null(pl.lit([], dtype=pl.List(pl.Int64))) for c in seq_cols]
    pl.scan_parquet(path).with_columns(fill).sink_parquet(out)
    return str(out)


class MemoryLoader:
    """FuxiCTR's transformed Parquet held as tensors, shuffled per epoch with torch.randperm.

    Not how FuxiCTR runs: used only when a job asks for loader "memory", to tell the model's
    cost from the Ray Data loader's.
    """

    def __init__(
        self,
        feature_map: Any,
        data_path: str,
        split: str = "train",
        batch_size: int = 32,
        shuffle: bool = False,
        **_: Any,
    ) -> None:
        import numpy as np
        import pyarrow.parquet as pq
        import torch

        columns = [*feature_map.features, *feature_map.labels]
        table = pq.read_table(data_path, columns=columns)
        self.tensors: dict[str, torch.Tensor] = {}
        for name in columns:
            col = table.column(name).combine_chunks()
            if hasattr(col, "to_numpy_ndarray"):  # Ray's tensor extension type
                array = col.to_numpy_ndarray()
            elif col.type.num_fields:  # (fixed size) list
                array = np.stack(col.to_numpy(zero_copy_only=False))
            else:
                array = col.to_numpy(zero_copy_only=False)
            self.tensors[name] = torch.from_numpy(np.array(array))  # a writable copy
        self.batch_size = batch_size
        self.shuffle = shuffle and split != "test"
        self.num_samples = table.num_rows
        self.num_blocks = 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        n = self.num_samples
        order = torch.randperm(n) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield {k: v[start : start + self.batch_size] for k, v in self.tensors.items()}
            else:
                idx = order[start : start + self.batch_size]
                yield {k: v[idx] for k, v in self.tensors.items()}

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)


def model_params(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """BASE_PARAMS overridden by the job, recipe aliases resolved, regularizers as floats.

    FuxiCTR reads a float regularizer as L2 but silently ignores an int (1 would mean none),
    so numbers are cast to float here.
    """
    merged = {**BASE_PARAMS, **params}
    for generic, targets in ALIASES[model].items():
        if generic in params:
            for target in targets:
                merged.setdefault(target, params[generic])
    for key in ("embedding_regularizer", "net_regularizer"):
        if isinstance(merged.get(key), int):
            merged[key] = float(merged[key])
    return merged


def iterators(loaders: Any) -> Any:
    """RankDataLoader's generators: 2.3.10 returns them, the zoo's newer run_expid.py calls
    `.make_iterator()` on what an older/newer RankDataLoader returns; accept both."""
    return loaders.make_iterator() if hasattr(loaders, "make_iterator") else loaders


def peak_rss_mib() -> dict[str, float]:
    """Peak RSS of this process and of its reaped children (Ray's workers are not reaped
    children of the driver, so their memory is not in either figure)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own, 1), "peak_rss_children_mib": round(children, 1)}


def run(job: dict[str, Any]) -> dict[str, Any]:
    """The run_expid.py sequence on the job's splits; returns the result dict."""
    # A bare ray.init() joins the latest `ray start` cluster on the machine (the engine's
    # tests start some); the peer gets a local one of its own unless the job names one.
    os.environ["RAY_ADDRESS"] = job.get("ray_address", "local")
    import fuxictr
    import ray
    import torch
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import FeatureProcessor, build_dataset
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything

    out = Path(job["output_dir"]).resolve()
    data_root = out / "data"
    model_name = job["model"]
    dataset_id = job.get("dataset_id", "bench")
    shutil.rmtree(data_root / dataset_id, ignore_errors=True)  # build_dataset skips if built
    if job.get("torch_threads"):
        torch.set_num_threads(int(job["torch_threads"]))

    label = job.get("label", "label")
    cols = feature_cols(job["features"])
    params = model_params(model_name, job.get("params", {}))
    params.update(
        model=model_name,
        model_id=f"{model_name}_{dataset_id}",
        dataset_id=dataset_id,
        data_root=str(data_root),
        model_root=str(out / "checkpoints"),
        data_format="parquet",
        feature_cols=cols,
        label_col={"name": label, "dtype": "float"},
        gpu=-1,
    )
    (out / "checkpoints" / dataset_id).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    logging.info("FuxiCTR version: %s", fuxictr.__version__)
    seed_everything(seed=params["seed"])

    seq_cols = [c["name"] for c in cols if c["type"] == "sequence"]
    splits = {}
    for split in ("train", "valid", "test"):
        splits[f"{split}_data"] = prepare_split(
            job[split], seq_cols, out / "prepared" / f"{split}.parquet"
        )
    params.update(splits)

    t0 = time.perf_counter()
    encoder = FeatureProcessor(**params)
    params["train_data"], params["valid_data"], params["test_data"] = build_dataset(
        encoder, **params
    )
    feature_map = FeatureMap(dataset_id, str(data_root / dataset_id))
    feature_map.load(str(data_root / dataset_id / "feature_map.json"), params)
    build_s = time.perf_counter() - t0

    model = load_model_class(Path(job.get("model_zoo", DEFAULT_ZOO)), model_name)(
        feature_map, **params
    )
    patches: list[str] = []
    if model_name == "DLRM" and column_numeric_inputs(model):
        patches.append("DLRM: numeric inputs reshaped to (batch, 1)")
    history: list[dict[str, float]] = []
    record = model.checkpoint_and_earlystop

    def checkpoint_and_earlystop(logs: dict[str, float], min_delta: float = 1e-6) -> None:
        history.append({"epoch": model._epoch_index + 1, **{k: float(v) for k, v in logs.items()}})
        record(logs, min_delta)

    model.checkpoint_and_earlystop = checkpoint_and_earlystop
    if job.get("loader", "ray") == "memory":
        params["data_loader"] = MemoryLoader
    t0 = time.perf_counter()
    train_gen, valid_gen = iterators(RankDataLoader(feature_map, stage="train", **params))
    loader_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(train_gen, validation_data=valid_gen, **params)
    fit_s = time.perf_counter() - t0
    valid = model.evaluate(valid_gen)
    t0 = time.perf_counter()
    test_gen = iterators(RankDataLoader(feature_map, stage="test", **params))
    test = model.evaluate(test_gen)
    test_s = time.perf_counter() - t0
    ray.shutdown()

    pick = min if params["monitor_mode"] == "min" else max
    best = pick(history, key=model._monitor.get_value) if history else {}
    return {
        "fuxictr_version": fuxictr.__version__,
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "model": model_name,
        "loader": job.get("loader", "ray"),
        "patches": patches,
        "test_auc": float(test["AUC"]),
        "test_logloss": float(test["logloss"]),
        "valid_auc": float(valid["AUC"]),
        "valid_logloss": float(valid["logloss"]),
        "best_epoch": best.get("epoch"),
        "epochs_run": model._epoch_index + 1,
        "history": history,
        "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_rows": train_gen.num_samples,
        "build_dataset_s": round(build_s, 3),
        "loader_setup_s": round(loader_s, 3),
        "fit_s": round(fit_s, 3),
        "test_eval_s": round(test_s, 3),
        "script_s": round(time.perf_counter() - SCRIPT_START, 3),
        "torch_threads": torch.get_num_threads(),
        **peak_rss_mib(),
        "features": {k: dict(v) for k, v in feature_map.features.items()},
    }


def synthetic(folder: Path, rows: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """A small log in the engine's contract with a planted signal, split 80/10/10 by time.

    Five categorical fields (vocab ~100, raw int64 IDs spread over a wide range), one
    list<int64> genre-like field, one float32 numeric; the label's logit sums per-ID
    weights of two fields, a weight per genre and the numeric, so every kind matters.
    Returns a job template (without model/params/output_dir) for the three files.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    columns: dict[str, Any] = {}
    logit = np.zeros(rows)
    for i in range(5):
        ids = rng.zipf(1.3, rows) % 100
        if i < 2:
            logit += rng.normal(0, 1.0, 100)[ids]
        columns[f"c{i}"] = pa.array(ids.astype(np.int64) * 1_000_003 + i, pa.int64())
    lengths = rng.integers(0, 4, rows)
    genres = rng.integers(0, 20, lengths.sum())
    genre_w = rng.normal(0, 0.8, 20)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    logit += np.add.reduceat(np.append(genre_w[genres], 0.0), offsets[:-1]) * (lengths > 0)
    columns["genres"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), genres)
    x = rng.normal(0, 1, rows).astype(np.float32)
    logit += 0.7 * x
    columns["x"] = pa.array(x, pa.float32())
    y = rng.random(rows) < 1 / (1 + np.exp(-(logit - 0.5)))
    table = pa.table(
        {
            "label": pa.array(y.astype(np.int8)),
            "timestamp": pa.array(np.arange(rows, dtype=np.int64)),
            **columns,
        }
    )
    cut = [0, int(rows * 0.8), int(rows * 0.9), rows]
    from sklearn.metrics import roc_auc_score

    job: dict[str, Any] = {
        "label": "label",
        "oracle_test_auc": float(roc_auc_score(y[cut[2] :], logit[cut[2] :])),  # the ceiling
    }
    for name, lo, hi in zip(("train", "valid", "test"), cut[:-1], cut[1:], strict=True):
        pq.write_table(table.slice(lo, hi - lo), folder / f"{name}.parquet")
        job[name] = str(folder / f"{name}.parquet")
    job["features"] = [
        *({"name": f"c{i}", "type": "categorical"} for i in range(5)),
        {"name": "genres", "type": "sequence"},
        {"name": "x", "type": "numeric"},
    ]
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", nargs="?", type=Path, help="job JSON file")
    parser.add_argument("--synthetic", type=Path, help="write a small synthetic split here")
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    if args.synthetic:
        template = synthetic(args.synthetic, args.rows)
        (args.synthetic / "job_template.json").write_text(json.dumps(template, indent=1))
        print(args.synthetic / "job_template.json")
        return
    if args.job is None:
        parser.error("a job file or --synthetic DIR")
    job = json.loads(args.job.read_text())
    result = run(job)
    path = Path(job["output_dir"]) / "result.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"result: {path}")


if __name__ == "__main__":
    main()
