"""Reference shards: PyTorch's outputs for a dataset, written once where torch is, read anywhere.

    slimdeploy reference BUNDLE --data SOURCE --out REFS      # on a machine with torch
    slimdeploy check BUNDLE --data SOURCE --references REFS   # anywhere, no torch

``REFS/references.json`` records the bundle's weights digest, its outputs, the shard size and
the number of shards; ``REFS/shard-NNNNNN.npz`` holds, per shard of the source, the global
indices of the samples it covers (bad inputs left out), the SHA-256 of those samples'
preprocessed inputs, and ``ref_<output>`` for every output of the bundle. A check reads them
as untrusted input: the weights digest must be the bundle's, and each shard's indices and input
digest must be those of the samples the check reads, so references never meet other inputs
(the same image decoded by another JPEG library is another input).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.dataset.arrays import ArrayFile
from slimdeploy.dataset.sources import REFERENCE_PREFIX, Batch, BundleFacts, Shard
from slimdeploy.errors import BadInputError
from slimdeploy.files import atomic_output

INDEX = "references.json"
FORMAT = "slimdeploy.references"
VERSION = 1
_REWRITE = "Fix: write them again for this bundle and data: slimdeploy reference BUNDLE --data SOURCE --out DIR"


def shard_file(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:06d}.npz"


def weights_digest(bundle: Any) -> str:
    """The digest tying references to a bundle's weights (``model.weights_sha256``; bundles
    without it: the digest of their reference weights file)."""
    model = bundle.manifest.get("model") or {}
    digest = model.get("weights_sha256") if isinstance(model, dict) else None
    if digest:
        return str(digest)
    relative = bundle.manifest.get("reference_weights")
    return str(bundle.spec.files.get(relative, "")) if relative else ""


def index_record(bundle: Any, shard_size: int, shards: int, source: str) -> dict[str, Any]:
    """What ``references.json`` holds for references of ``bundle`` on a source."""
    return {"format": FORMAT, "version": VERSION, "weights_sha256": weights_digest(bundle),
            "outputs": list(bundle.output_names), "shard_size": shard_size, "shards": shards, "source": source}


def read_index(folder: Path, bundle: Any) -> dict[str, Any]:
    """``references.json`` of ``folder``, checked against ``bundle``; ``BadInputError`` otherwise."""
    path = folder / INDEX
    if not folder.is_dir() or not path.is_file():
        raise BadInputError(f"--references '{folder}' holds no {INDEX}: not a folder of reference shards | {_REWRITE}")
    try:
        data = json.loads(path.read_text()[:1 << 20])
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read '{path}' ({exc}) | {_REWRITE}") from None
    valid = (isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION
             and isinstance(data.get("shard_size"), int) and data["shard_size"] >= 1
             and isinstance(data.get("shards"), int) and isinstance(data.get("outputs"), list))
    if not valid:
        raise BadInputError(f"'{path}' is not a slimdeploy reference index (format {FORMAT} version {VERSION}) | {_REWRITE}")
    if data.get("weights_sha256") != weights_digest(bundle) or data["outputs"] != list(bundle.output_names):
        raise BadInputError(f"the references in '{folder}' were written for another model than '{bundle.path}' (weights "
                            f"{str(data.get('weights_sha256'))[:12]} vs {weights_digest(bundle)[:12]}) | {_REWRITE}")
    return data


class ReferenceWriter:
    """Collects one shard's references batch by batch; ``write`` saves them atomically."""

    def __init__(self, folder: Path, shard: Shard) -> None:
        self.path = shard_file(folder, shard.index)
        self.indices: list[np.ndarray] = []
        self.outputs: dict[str, list[np.ndarray]] = {}
        self.digest = hashlib.sha256()

    def add(self, batch: Batch, outputs: dict[str, np.ndarray]) -> None:
        self.indices.append(batch.indices)
        self.digest.update(np.ascontiguousarray(batch.inputs).tobytes())
        for name, value in outputs.items():
            self.outputs.setdefault(name, []).append(np.asarray(value))

    def write(self) -> int:
        """Save the shard; returns the samples it holds."""
        indices = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        arrays = {f"{REFERENCE_PREFIX}{name}": np.concatenate(parts) for name, parts in self.outputs.items()}
        with atomic_output(self.path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, indices=indices.astype(np.int64),
                     input_sha256=np.frombuffer(self.digest.digest(), dtype=np.uint8), **arrays)
        return len(indices)


class StoredReferences:
    """One shard's stored references, handed out batch by batch as the check reads its samples
    (``take``), with the indices and the input digest checked (``finish``)."""

    def __init__(self, folder: Path, shard: Shard, facts: BundleFacts) -> None:
        self.path = shard_file(folder, shard.index)
        if not self.path.is_file():
            raise BadInputError(f"no reference shard '{self.path}' for shard {shard.index} of the data | {_REWRITE}")
        self.arrays = ArrayFile(self.path)
        members = self.arrays.members
        names = [f"{REFERENCE_PREFIX}{name}" for name in facts.outputs]
        rows = members["indices"].rows if "indices" in members else -1
        digest = members.get("input_sha256")
        if (rows < 0 or members["indices"].dtype != np.int64 or digest is None or digest.shape != (32,)
                or digest.dtype != np.uint8 or any(n not in members or members[n].rows != rows for n in names)):
            self.arrays.close()
            raise BadInputError(f"'{self.path}' is not a reference shard of this bundle (expected indices, input_sha256 and "
                                f"{names}, one row per sample) | {_REWRITE}")
        self.names, self.rows, self.cursor = names, rows, 0
        self.expected = bytes(self.arrays.read("input_sha256", 0, 32))
        self.digest = hashlib.sha256()

    def take(self, batch: Batch) -> dict[str, np.ndarray]:
        """The references of the batch's samples, which must be the next ones of the shard."""
        stop = self.cursor + len(batch)
        indices = self.arrays.read("indices", self.cursor, stop)
        if len(indices) != len(batch) or not np.array_equal(indices, batch.indices):
            raise BadInputError(f"'{self.path}' holds references for other samples than the data's (from sample "
                                f"{int(batch.indices[0]) if len(batch) else '-'}) | {_REWRITE}")
        outputs = {name[len(REFERENCE_PREFIX):]: self.arrays.read(name, self.cursor, stop) for name in self.names}
        for name, value in outputs.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise BadInputError(f"'{self.path}': reference '{name}' holds NaN or inf | {_REWRITE}")
        self.digest.update(np.ascontiguousarray(batch.inputs).tobytes())
        self.cursor = stop
        return outputs

    def finish(self) -> None:
        """``BadInputError`` unless every stored sample was taken and the inputs were the ones
        the references were computed on."""
        self.arrays.close()
        if self.cursor != self.rows or self.digest.digest() != self.expected:
            raise BadInputError(f"'{self.path}' was written for other inputs than the data's shard (input digest or sample "
                                f"count differs: {self.cursor} read, {self.rows} stored) | {_REWRITE}")
