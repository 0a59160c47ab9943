"""Predicted compute against figures computed by hand (issue 19 part 4).

The MACs of every piece of a small SkipNet and of a small S2D network are written out here
from the architecture (a convolution costs out x in x k x k x output pixels, a linear layer
in x out), not read from slimdeploy; then ``bench.gated_macs`` / ``bench.exit_macs`` and the
predicted speed-ups of ``bench.decision_stats`` / ``bench.exit_stats`` are checked, form by
form and batch size by batch size, for decisions chosen here, against sums written out by
hand. Batches are consecutive rows, ``batch_size`` per call, the last one shorter (what a
benchmark or ``run --batch`` hands the form).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from slimdeploy.bench import decision_stats, exit_macs, exit_stats, gated_macs
from slimdeploy.engines import OrtRunner, TensorMeta
from slimdeploy.engines.staged import StagedGatedRunner
from slimdeploy.exporters.early_exit import exit_pieces
from slimdeploy.exporters.gated import gated_pieces
from slimdeploy.models.s2d import S2DResNetCifar
from slimdeploy.models.skipnet import SkipNet
from slimdeploy.nn.gated_residual import GatedBasicBlock


def conv(out_channels: int, in_channels: int, kernel: int, side: int) -> int:
    """MACs of a convolution producing a ``side`` x ``side`` map."""
    return out_channels * in_channels * kernel * kernel * side * side


def basic_block(in_channels: int, out_channels: int, stride: int, side_in: int) -> int:
    """Two 3x3 convolutions, and the 1x1 projection when channels or resolution change."""
    side = side_in // stride
    projection = conv(out_channels, in_channels, 1, side) if stride != 1 or in_channels != out_channels else 0
    return conv(out_channels, in_channels, 3, side) + conv(out_channels, out_channels, 3, side) + projection


# -- SkipNet: 6 blocks (4, 1, 1 per group), FFGate-II gates --------------------------------------------
# stem: 3x3 conv 3 -> 16 at 32x32, then block 0 (always runs); blocks 1-3 16 -> 16 at 32x32;
# block 4: 16 -> 32, stride 2 (16x16); block 5: 32 -> 64, stride 2 (8x8). Gate k reads block k's
# output: a stride-2 3x3 conv C -> C and a 1x1 conv C -> 2 on the pooled 1x1 map. Head: 64 -> 10.
STEM = conv(16, 3, 3, 32) + basic_block(16, 16, 1, 32)
EXEC = {1: basic_block(16, 16, 1, 32), 2: basic_block(16, 16, 1, 32), 3: basic_block(16, 16, 1, 32),
        4: basic_block(16, 32, 2, 32), 5: basic_block(32, 64, 2, 16)}
SKIP = {4: conv(32, 16, 1, 16), 5: conv(64, 32, 1, 8)}
GATE = {k: conv(16, 16, 3, 16) + 16 * 2 for k in range(4)} | {4: conv(32, 32, 3, 8) + 32 * 2}
HEAD = 64 * 10

# Decisions of 6 samples (rows) for blocks 1-5 (columns), chosen so that batching matters: block 2
# runs for sample 3 only (in the first batch of 4), block 4 for samples 0, 1 and 5.
GATES = np.array([
    [1, 0, 0, 1, 1],
    [0, 0, 0, 1, 1],
    [0, 0, 0, 0, 1],
    [0, 1, 0, 0, 1],
    [0, 0, 0, 0, 1],
    [0, 0, 0, 1, 1],
], dtype=np.uint8)
FIXED = STEM + HEAD + sum(GATE.values())  # per sample, in every form: every gate is evaluated
E, K = EXEC, SKIP
HAND_GATED = {
    # every block and every skip path on every row
    ("mask", 1): FIXED + E[1] + E[2] + E[3] + E[4] + K[4] + E[5] + K[5],
    # a block on the rows it runs for, its skip path on the others
    ("staged", 1): FIXED + (1 * E[1] + 1 * E[2] + 0 * E[3] + 3 * E[4] + 3 * K[4] + 6 * E[5] + 0 * K[5]) / 6,
    # a block on the rows it runs for, the skip path on every row
    ("compact", 1): FIXED + (E[1] + E[2] + 3 * E[4] + 6 * K[4] + 6 * E[5] + 6 * K[5]) / 6,
    ("compact", 4): FIXED + (E[1] + E[2] + 3 * E[4] + 6 * K[4] + 6 * E[5] + 6 * K[5]) / 6,
    # a block on the whole batch when any row of the batch runs it; the skip path on every row
    ("if", 1): FIXED + (E[1] + E[2] + 3 * E[4] + 6 * K[4] + 6 * E[5] + 6 * K[5]) / 6,
    # batches of 4 then 2 rows: block 1 (sample 0) and 2 (sample 3) cost 4 rows each, block 4
    # (samples 0, 1 | 5) both batches, block 5 both
    ("if", 4): FIXED + (4 * E[1] + 4 * E[2] + 6 * E[4] + 6 * K[4] + 6 * E[5] + 6 * K[5]) / 6,
    # batches of 3 and 3: block 1 costs 3 rows (sample 0), block 2 3 rows (sample 3)
    ("if", 3): FIXED + (3 * E[1] + 3 * E[2] + 6 * E[4] + 6 * K[4] + 6 * E[5] + 6 * K[5]) / 6,
    ("if", 6): FIXED + (6 * E[1] + 6 * E[2] + 6 * E[4] + 6 * K[4] + 6 * E[5] + 6 * K[5]) / 6,
}


@pytest.fixture(scope="module")
def skipnet_plan() -> Any:
    torch.manual_seed(0)
    module = SkipNet(GatedBasicBlock, (4, 1, 1), gate="ffgate2", dataset="cifar").eval()
    graphs, plan = gated_pieces(module, (3, 32, 32))
    return SimpleNamespace(graphs=graphs, plan=plan)


def test_piece_macs_are_the_hand_computed_ones(skipnet_plan: Any) -> None:
    expected = {"stem": STEM, "head": HEAD, **{f"exec{k}": v for k, v in EXEC.items()},
                **{f"skip{k}": v for k, v in SKIP.items()}, **{f"gate{k}": v for k, v in GATE.items()}}
    assert skipnet_plan.plan.macs == expected
    assert STEM == 442_368 + 4_718_592 and EXEC[4] == 1_179_648 + 2_359_296 + 131_072  # the arithmetic, spelt out


@pytest.mark.parametrize(("form", "batch"), sorted(HAND_GATED))
def test_gated_macs_of_each_form_and_batch(skipnet_plan: Any, form: str, batch: int) -> None:
    plan = skipnet_plan.plan.to_dict()
    assert gated_macs(plan, GATES, form, batch) == pytest.approx(HAND_GATED[(form, batch)], rel=1e-12)
    if form == "if":  # ``loop`` routes each block as ``if`` does
        assert gated_macs(plan, GATES, "loop", batch) == pytest.approx(HAND_GATED[(form, batch)], rel=1e-12)
    if form == "staged":
        assert gated_macs(plan, GATES, "ideal", batch) == pytest.approx(HAND_GATED[(form, batch)], rel=1e-12)


@pytest.mark.parametrize("form", ["if", "compact", "staged", "loop"])
def test_predicted_speedups_are_mask_over_form(skipnet_plan: Any, form: str) -> None:
    bundle = SimpleNamespace(manifest={"gating": skipnet_plan.plan.to_dict(), "dynamic": form})
    stats = decision_stats(bundle, GATES, [1, 4])
    mask = HAND_GATED[("mask", 1)]
    hand = {b: HAND_GATED[("if" if form == "loop" else form, 1 if form == "staged" else b)] for b in (1, 4)}
    assert stats.macs_mask == pytest.approx(mask, rel=1e-12)
    assert stats.macs_ideal == pytest.approx(HAND_GATED[("staged", 1)], rel=1e-12)
    assert stats.predicted_speedup == pytest.approx({str(b): mask / hand[b] for b in (1, 4)}, rel=1e-12)
    assert stats.skip_rate_per_block == pytest.approx([5 / 6, 5 / 6, 1.0, 0.5, 0.0])


def run_piece(piece: bytes, x: np.ndarray, output: str = "y") -> np.ndarray:
    """One piece (input ``x``; output ``y``, ``logits`` for the head) on ONNX Runtime."""
    with OrtRunner(piece, threads=1) as runner:
        return runner.infer({"x": x})[output]


def test_staged_rows_match_the_accounting(skipnet_plan: Any) -> None:
    """The staged controller, replaying the decisions above, runs each block on exactly the
    rows ``gated_macs("staged")`` counts, and each row's logits, in the batch and alone, are
    those of its own chain of pieces: a block where it runs, else its skip path (identity where
    the block has none)."""
    pieces = {name: graph.SerializeToString() for name, graph in skipnet_plan.graphs.items()}
    meta = TensorMeta("input", np.dtype(np.float32), ("batch", 3, 32, 32))
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    with StagedGatedRunner(lambda name: OrtRunner(pieces[name], threads=1), skipnet_plan.plan.to_dict(), meta, replay=True) as runner:
        logits = runner.infer({"input": x, "gates": GATES})["logits"]
        rows = runner.executed_rows.copy()
        alone = [runner.infer({"input": x[i:i + 1], "gates": GATES[i:i + 1]})["logits"][0] for i in range(6)]
    np.testing.assert_array_equal(rows, [6, 1, 1, 0, 3, 6])
    by_hand = []
    for row, decisions in zip(x, GATES):
        y = run_piece(pieces["stem"], row[None])
        for k, execute in enumerate(decisions, start=1):
            if execute or f"skip{k}" in pieces:
                y = run_piece(pieces[f"exec{k}" if execute else f"skip{k}"], y)
        by_hand.append(run_piece(pieces["head"], y, "logits")[0])
    np.testing.assert_allclose(logits, np.stack(by_hand), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack(alone), np.stack(by_hand), rtol=1e-5, atol=1e-5)  # batch 1 too
    assert np.abs(np.diff(logits, axis=0)).max() > 1e-3  # rows differ: a wrong row would show
    per_sample = FIXED + sum(E[k] * rows[k] for k in E) / 6 + sum(K[k] * (6 - rows[k]) for k in K) / 6
    assert gated_macs(skipnet_plan.plan.to_dict(), GATES, "staged", 6) == pytest.approx(per_sample, rel=1e-12)


# -- S2D ResNet-8: 3 stages owning 1/4, 1/4, 1/2 of each layer, dense reuse ----------------------------
# Layers: stem (16 channels, 32x32), a block 16 -> 16 (32x32), 16 -> 32 (stride 2), 32 -> 64
# (stride 2). Stage 0 owns 4, 4, 8, 16 channels; stage 1 the same and reads stage 0's previous
# layer; stage 2 owns 8, 8, 16, 32 and reads stages 0 and 1. Each stage's head: its width -> 10.
STAGE_MACS = [
    conv(4, 3, 3, 32) + basic_block(4, 4, 1, 32) + basic_block(4, 8, 2, 32) + basic_block(8, 16, 2, 16) + 16 * 10,
    conv(4, 3, 3, 32) + basic_block(4 + 4, 4, 1, 32) + basic_block(4 + 4, 8, 2, 32) + basic_block(8 + 8, 16, 2, 16) + 16 * 10,
    conv(8, 3, 3, 32) + basic_block(4 + 4 + 8, 8, 1, 32) + basic_block(4 + 4 + 8, 16, 2, 32)
    + basic_block(8 + 8 + 16, 32, 2, 16) + 32 * 10,
]
# Exit stages of 6 samples: with batches of 4 the first batch reaches stage 1, the second stage 2.
EXIT_STAGE = np.array([0, 0, 1, 0, 2, 0])
M0, M1, M2 = STAGE_MACS
HAND_EXIT = {
    ("mask", 1): M0 + M1 + M2,
    ("staged", 1): (4 * M0 + 1 * (M0 + M1) + 1 * (M0 + M1 + M2)) / 6,
    ("if", 1): (4 * M0 + 1 * (M0 + M1) + 1 * (M0 + M1 + M2)) / 6,
    ("if", 4): (4 * (M0 + M1) + 2 * (M0 + M1 + M2)) / 6,
    ("if", 3): (3 * (M0 + M1) + 3 * (M0 + M1 + M2)) / 6,
    ("if", 6): M0 + M1 + M2,
}


@pytest.mark.slow
def test_stage_macs_are_the_hand_computed_ones() -> None:
    torch.manual_seed(0)
    _, plan = exit_pieces(S2DResNetCifar(depth=8).eval(), (3, 32, 32))
    assert [plan.macs[f"stage{j}"] for j in range(3)] == STAGE_MACS
    assert STAGE_MACS == [864_416, 1_208_480, 4_612_416]  # the arithmetic, spelt out


@pytest.mark.parametrize(("form", "batch"), sorted(HAND_EXIT))
def test_exit_macs_of_each_form_and_batch(form: str, batch: int) -> None:
    assert exit_macs(STAGE_MACS, EXIT_STAGE, form, batch) == pytest.approx(HAND_EXIT[(form, batch)], rel=1e-12)


@pytest.mark.parametrize("form", ["if", "staged", "mask"])
def test_exit_predicted_speedups_are_mask_over_form(form: str) -> None:
    manifest = {"exits": {"n_stages": 3, "macs": {f"stage{j}": m for j, m in enumerate(STAGE_MACS)}},
                "dynamic": form, "decisions": {"thresholds": {"exit_thresholds": [0.9, 0.9, 0.9]}}}
    labels = np.array([1, 2, 3, 4, 5, 6])
    logits = np.eye(10, dtype=np.float32)[[1, 2, 3, 0, 5, 0]]  # 4 of 6 right
    stats = exit_stats(SimpleNamespace(manifest=manifest), {"exit_stage": EXIT_STAGE, "logits": logits}, [1, 4], labels)
    hand = {b: HAND_EXIT[(form, 1 if form != "if" else b)] for b in (1, 4)}
    assert stats.macs_mask == pytest.approx(M0 + M1 + M2, rel=1e-12)
    assert stats.macs_ideal == pytest.approx(HAND_EXIT[("staged", 1)], rel=1e-12)
    assert stats.predicted_speedup == pytest.approx({str(b): (M0 + M1 + M2) / hand[b] for b in (1, 4)}, rel=1e-12)
    assert stats.exit_share_per_stage == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    assert stats.accuracy == pytest.approx(4 / 6)
