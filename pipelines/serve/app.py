"""The Ray Serve deployment behind `recsys serve`: HTTP in, probabilities out.

`POST /predict` takes JSON rows, an Arrow IPC stream or a Parquet file (by Content-Type)
and answers `{"probs": [...], "version": {...}}` (or an Arrow IPC stream of `prob` when
the request accepts one); `GET /version` says what the replica serves and the last load
error. Requests are batched on the server (`serve.batch`): each batch reads the served
model once (`pipelines.serve.follow.LiveModel`), checks each request on its own (a bad
one gets its own 400, never the batch's), scores the good ones as one table in a worker
thread, so the event loop keeps taking requests meanwhile, and splits the result.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipelines.serve.follow import LiveModel, Loaded
from pipelines.serve.request import (
    ARROW_STREAM,
    JSON,
    RequestError,
    arrow_body,
    json_body,
    parse_body,
    prepare,
)
from recsys.contract import traffic_optional
from recsys.serving.model import ServingModel

Scored = tuple[np.ndarray, dict[str, Any]] | RequestError


@dataclass(frozen=True)
class ServeSettings:
    """What every replica is built with: one export or a folder to follow, and batching."""

    export: str | None = None
    follow: str | None = None
    poll_s: float = 5.0
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0


def _short(loaded: Loaded) -> dict[str, Any]:
    v = loaded.version
    return {"export": v.export, "step": v.step, "manifest_sha256": v.manifest_sha256}


def score_tables(loaded: Loaded, tables: list[pa.Table]) -> list[Scored]:
    """Each request's probabilities (or why it cannot be scored), all by `loaded`: the
    requests that pass the contract are scored as one concatenated table."""
    model = loaded.model
    optional = traffic_optional(model.features)

    def check(table: pa.Table) -> pa.Table:
        return prepare(table, model.features, model.manifest.input, optional)

    results: list[Scored | None] = [None] * len(tables)
    good = list(range(len(tables)))
    try:  # the whole batch checked at once, when its requests concatenate and all pass
        if not all(t.num_rows for t in tables):
            raise RequestError(400, "a request without rows")
        batch = check(pa.concat_tables(tables))
    except (RequestError, pa.ArrowException):  # then each on its own, naming its own rows
        good, checked = [], []
        for i, table in enumerate(tables):
            try:
                checked.append(check(table))
                good.append(i)
            except RequestError as err:
                results[i] = err
        batch = pa.concat_tables(checked) if checked else None
    if batch is not None:
        version = _short(loaded)
        try:
            probs = model.predict_table(batch)
            ends = np.cumsum([tables[i].num_rows for i in good])
            for i, part in zip(good, np.split(probs, ends[:-1]), strict=True):
                results[i] = (part, version)
        except Exception:  # find the request that broke the batch; the others are scored
            for i in good:
                results[i] = _score_alone(model, check(tables[i]), version)
    return [r for r in results if r is not None]


def _score_alone(model: ServingModel, table: pa.Table, version: dict[str, Any]) -> Scored:
    try:
        return model.predict_table(table), version
    except ValueError as err:
        return RequestError(400, f"request: {err}")
    except Exception as err:
        return RequestError(500, f"scoring failed: {type(err).__name__}: {err}")


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status)


@serve.deployment
class Scorer:
    """One replica: its served model (fixed or followed), batching and the HTTP routes."""

    def __init__(self, settings: ServeSettings) -> None:
        export = Path(settings.export) if settings.export else None
        follow = Path(settings.follow) if settings.follow else None
        self.live = LiveModel(export, follow, settings.poll_s)
        self.live.start()
        self.score.set_max_batch_size(settings.max_batch_size)
        self.score.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        self.replica = serve.get_replica_context().replica_id.unique_id
        # as many torch threads as CPUs Ray gave the replica: more only spin against the
        # proxy and the other replicas on the same cores
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))

    def version(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            **self.live.current.version.as_dict(),
            "following": str(self.live.follow) if self.live.follow else None,
            "last_error": self.live.last_error,
            "torch_threads": torch.get_num_threads(),
        }

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path == "/version":
            return JSONResponse(self.version())
        if path != "/predict":
            return _error(RequestError(404, f"no route {path!r}; POST /predict or GET /version"))
        if request.method != "POST":
            return _error(RequestError(405, "POST rows to /predict"))
        body = await request.body()
        try:
            features = self.live.current.model.features
            table = parse_body(body, request.headers.get("content-type"), features)
        except RequestError as err:
            return _error(err)
        result = await self.score(table)
        if isinstance(result, RequestError):
            return _error(result)
        probs, version = result
        if ARROW_STREAM in request.headers.get("accept", ""):
            headers = {"x-recsys-export": version["export"], "x-recsys-step": str(version["step"])}
            return Response(arrow_body(probs), media_type=ARROW_STREAM, headers=headers)
        return Response(json_body(probs, version), media_type=JSON)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def score(self, tables: list[pa.Table]) -> list[Scored]:
        loaded = self.live.current  # one model for the whole batch, whatever swaps meanwhile
        return await asyncio.to_thread(score_tables, loaded, tables)

    def __del__(self) -> None:
        self.live.stop()
