"""Starting `recsys serve`: Ray (embedded, or a cluster), Serve's HTTP proxy, the replicas.

The export (or the followed folder's newest one) is checked here before anything is
deployed, so a broken export is one line on the console, not a replica's traceback in a
restart loop. Ray's and Serve's own logs go to Ray's session log folder, not the console.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path

import ray
from ray import serve

from pipelines.serve.app import Scorer, ServeSettings
from pipelines.serve.follow import candidates
from recsys.serving.manifest import ExportError, read_export

APP = "recsys"
QUIET = {"log_level": "WARNING", "enable_access_log": False}


def check_source(settings: ServeSettings) -> Path:
    """The export replicas will load first, checked as they check it (manifest, paths,
    checksums); raises `ExportError` naming what is wrong."""
    if settings.export:
        read_export(settings.export)
        return Path(settings.export)
    assert settings.follow is not None
    root = Path(settings.follow)
    if not root.is_dir():
        raise ExportError(f"--follow {root}: not a folder")
    found, unreadable = candidates(root)
    errors = [error for _, error in unreadable.values()]
    for candidate in found:
        try:
            read_export(candidate.path)
            return candidate.path
        except ExportError as err:
            errors.append(str(err))
    raise ExportError(f"--follow {root}: no export here loads ({'; '.join(errors) or 'empty'})")


def start_ray(address: str | None, replicas: int) -> None:
    """Join a cluster (`address` or RAY_ADDRESS), else an embedded Ray with a CPU per replica."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    options = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **options)
    else:
        cpus = max(os.cpu_count() or 1, replicas)
        ray.init(num_cpus=cpus, include_dashboard=False, **options)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def deploy(
    settings: ServeSettings,
    replicas: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
) -> str:
    """Deploy the scoring app and return its URL once every replica has loaded its model."""
    start_ray(address, replicas)
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    app = Scorer.options(
        num_replicas=replicas,
        # a batch can fill while the previous one is scored
        max_ongoing_requests=2 * settings.max_batch_size,
        ray_actor_options={"num_cpus": 1},
        logging_config=QUIET,
    ).bind(settings)
    serve.run(app, name=APP, route_prefix="/", logging_config=QUIET)
    return f"http://{host}:{port}"


def serve_forever(
    settings: ServeSettings,
    replicas: int,
    host: str,
    port: int,
    address: str | None,
) -> None:
    """`recsys serve`: check, deploy, then block on an embedded Ray until Ctrl-C (a
    cluster keeps the app after this returns; `serve shutdown` removes it)."""
    first = check_source(settings)
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    url = deploy(settings, replicas, host, port, address)
    what = f"following {settings.follow}, " if settings.follow else ""
    print(f"recsys serve: {what}serving {first} on {replicas} replica(s) at {url}")
    print(f"  POST {url}/predict (JSON rows, Arrow IPC stream or Parquet), GET {url}/version")
    if on_cluster:
        print("  deployed to the cluster; `serve shutdown` stops it")
        return
    logs = getattr(getattr(ray._private.worker, "_global_node", None), "get_logs_dir_path", None)
    if logs is not None:
        print(f"  Ray and Serve logs: {logs()}")
    print("  Ctrl-C stops it")
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop shuts down as cleanly
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_command(args: argparse.Namespace) -> None:
    """`recsys serve` from its parsed options; paths made absolute, as replicas need them."""
    settings = ServeSettings(
        export=str(Path(args.export).resolve()) if args.export else None,
        follow=str(Path(args.follow).resolve()) if args.follow else None,
        poll_s=args.poll_s,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
    )
    serve_forever(settings, args.replicas, args.host, args.port, args.address)
