"""Parity, sweeps and references at dataset scale: any dataset streamed through a bundle, on one
machine or a Ray cluster (README: "Checking a whole dataset").

``sources`` lists a dataset (image folder, array shards, one file) as shards read a chunk at a
time; ``accumulate`` keeps every figure of a parity report as counts that merge exactly;
``job`` is the work on one shard; ``execute`` runs shards in this process, on local processes or
on Ray, resumable from a work folder; ``references`` writes and reads reference shards;
``check`` is the API (``check_dataset``, ``sweep_dataset``, ``write_references``).
"""

from slimdeploy.dataset.check import (
    DatasetOptions,
    DatasetSummary,
    check_dataset,
    comparable_report,
    sweep_dataset,
    write_references,
)
from slimdeploy.dataset.execute import Execution, Progress
from slimdeploy.dataset.sources import is_dataset, open_source

__all__ = [
    "DatasetOptions", "DatasetSummary", "Execution", "Progress", "check_dataset", "comparable_report", "is_dataset",
    "open_source", "sweep_dataset", "write_references",
]
