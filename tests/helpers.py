"""Small helpers shared by tests that start process groups or score trained runs."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch

from pipelines.build import load_trained
from recsys.batch import BatchConverter
from recsys.logs import read_validated


def free_port() -> int:
    """A loopback port nobody listens on now, for a gloo rendezvous or a Ray head."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trained_probabilities(run: str | Path, data: Path) -> np.ndarray:
    """Click probabilities of a run's newest checkpoint, unsharded, on every row of `data`."""
    cfg, model, _ = load_trained(run)
    convert = BatchConverter(cfg.features)
    with torch.no_grad():
        parts = [
            torch.sigmoid(model(convert(t))).numpy() for t in read_validated(data, cfg.features)
        ]
    return np.concatenate(parts)
