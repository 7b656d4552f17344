"""Synthetic Parquet logs with a planted model, so that table variants can be compared on AUC.

Two families, chosen by `data.synthetic.family`:

- `ctr`: Criteo-shaped impressions (dense counts, single- and multi-valued sparse IDs from
  Zipf-popular, daily drifting vocabularies, a Zipf user population) labelled by a planted
  factorization-machine-like click model.
- `sequence`: Taobao-shaped impressions with long behaviour histories, labelled by a planted
  target-attention model whose attention and representation follow different item factors:
  logit = <r_t, sum_h softmax_h(sharpness * <a_t, a_h> - recency) r_h>. The attention factor
  a is mostly the item's category direction (which behaviours matter: those of the same
  and of similar categories); the representation r (what they contribute) is a category
  direction independent of it (a quarter of r's variance) plus the item's own. So both the
  item and the category table of a coupled model are asked for two unrelated factors, the
  situation DARE addresses: attending with r instead of a costs about two thirds of the
  AUC gap between mean pooling and the oracle (tests/recsys/test_synth.py). The per-category part
  of r also lets a log of a few rows per item teach a model something about r.

Everything random about a CTR ID (its raw 64-bit value, latent vector, drift phase) is a
hash of (feature, vocabulary index), computed on the fly, so vocabularies of 1e8 cost no
memory; the sequence family's item factors are seeded tables (num_items rows). Everything
random about a row comes from a numpy Generator seeded by (seed, day, chunk), so a config
and a row count always give the same data. The "oracle" is the planted noise-free logit: the
click probability given the columns, E[sigmoid(logit + noise)], increases with it, so its
AUC against the sampled labels is the best any model of the columns can reach (up to the
rounding of dense counts).
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from recsys.config import ConfigError, CtrSyntheticConfig, ExperimentConfig
from recsys.synth.common import (
    SUMMARY_FILE,
    AucHistogram,
    day_name,
    prepare_out,
    raw_ids,
    zipf_ranks,
)
from recsys.synth.ctr import ctr_plan, generate_ctr, vocab_sizes
from recsys.synth.sequence import generate_sequence, sequence_plan

__all__ = ["SUMMARY_FILE", "AucHistogram", "generate", "raw_ids", "vocab_sizes", "zipf_ranks"]


def generate(cfg: ExperimentConfig, rows: int, out: Path) -> dict[str, Any]:
    """Write `rows` synthetic impressions under `out` (Hive partitions by day) and return a
    JSON-able summary, also written to `out/_generator.json`."""
    synth = cfg.data.synthetic
    if synth is None:
        raise ConfigError(
            f"{cfg.name}: data.synthetic is missing; gen-data needs a synthetic section "
            "with family 'ctr' or 'sequence'"
        )
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    began = time.perf_counter()
    if isinstance(synth, CtrSyntheticConfig):
        run = partial(generate_ctr, cfg, ctr_plan(cfg, synth))
    else:
        run = partial(generate_sequence, cfg, sequence_plan(cfg, synth))
    out = Path(out)
    prepare_out(out)  # only once the config is known to be usable
    summary = run(rows, out)
    seconds = time.perf_counter() - began
    summary = {
        "family": synth.family,
        "seed": synth.seed,
        "rows": rows,
        "days": synth.days,
        "first_day": day_name(0),
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1),
        **summary,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
