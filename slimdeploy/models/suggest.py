"""Which registered architecture a state_dict's keys point to, for a checkpoint that does not
name its own ("pass --arch condensenet_converted", not "pass --arch NAME").

Building every architecture to compare keys takes seconds to tens of seconds, too long for an
error message, so the registry's key fingerprints are stored beside it (``key_patterns.json``):
per architecture (at its default arguments), its keys with every number masked
(``layer#.#.conv#.weight``: the same at any depth), how many keys it has, and the shapes of its
2-D ``.weight`` tensors (classifiers: they tell 10 from 100 classes). ``suggest_archs`` ranks the
architectures by how well a state_dict matches. tests/test_models.py checks the stored
fingerprint of every architecture against the built model; after changing one, run
``python -c "from slimdeploy.models.suggest import write_fingerprints; write_fingerprints()"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

FINGERPRINTS = Path(__file__).with_name("key_patterns.json")
# Keys whose names say nothing about the architecture (BatchNorm counters, missing in old files).
_IGNORED_SUFFIX = "num_batches_tracked"
# An architecture is suggested when this share of the two masked key sets is common to both.
MIN_OVERLAP = 0.6
SUGGESTED = 4


def mask(key: str) -> str:
    """A key with every number replaced by ``#``: ``layer2.0.conv1.weight`` -> ``layer#.#.conv#.weight``."""
    return re.sub(r"\d+", "#", key)


def fingerprint(state: Mapping[str, Any]) -> dict[str, Any]:
    """The masked key patterns, key count and 2-D ``.weight`` shapes of a state_dict (values
    need only a ``shape``; tensors on the meta device will do)."""
    keys = [key for key in state if not key.endswith(_IGNORED_SUFFIX)]
    return {
        "patterns": sorted({mask(key) for key in keys}),
        "keys": len(keys),
        "linear_shapes": {key: list(state[key].shape) for key in keys if key.endswith(".weight") and len(state[key].shape) == 2},
    }


def build_fingerprint(name: str) -> dict[str, Any]:
    """The fingerprint of a registered architecture at its default arguments (built on the
    meta device: no memory)."""
    import torch

    from slimdeploy.models.registry import get_arch

    with torch.device("meta"):
        module = get_arch(name).build()
    return fingerprint(module.state_dict())


def write_fingerprints(path: Path = FINGERPRINTS) -> None:
    """Rebuild ``key_patterns.json`` from every registered architecture."""
    from slimdeploy.models.registry import list_models

    data = {name: build_fingerprint(name) for name in list_models()}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@lru_cache(maxsize=1)
def stored_fingerprints() -> dict[str, Any]:
    """The stored fingerprints, by architecture name."""
    return json.loads(FINGERPRINTS.read_text())


def suggest_archs(state: Mapping[str, Any], limit: int = SUGGESTED) -> list[str]:
    """Registered architectures whose keys match ``state``'s, best first: the most masked key
    patterns in common (at least ``MIN_OVERLAP`` of both sets), then the same number of keys
    (depth), then the same classifier shapes; every name that ties with the best. Empty when
    nothing matches well enough.

    Args:
        state: the checkpoint's state_dict (prefix already stripped).
        limit: how many names at most. Defaults to 4.
    """
    ours = fingerprint(state)
    patterns = set(ours["patterns"])
    if not patterns:
        return []
    scored = []
    for name, theirs in stored_fingerprints().items():
        known = set(theirs["patterns"])
        overlap = len(patterns & known) / len(patterns | known)
        if overlap < MIN_OVERLAP:
            continue
        shapes = theirs["linear_shapes"]
        same_shapes = sum(shapes.get(key) == shape for key, shape in ours["linear_shapes"].items())
        scored.append((-overlap, abs(theirs["keys"] - ours["keys"]), -same_shapes, name))
    scored.sort()
    if not scored:
        return []
    # Every name as good as the best (the same keys at the same depth fit several factories:
    # a CIFAR-10 and a CIFAR-100 one, SP and RL training of one network).
    return [entry[3] for entry in scored if entry[:3] == scored[0][:3]][:limit]
