"""Deploy recipes and the export pipeline's stages.

The pipeline names no family: what a family contributes is its recipe. These tests pin the
recipes' choices (forms, defaults, decisions, sample cover), show that a new family is one
recipe and exports end to end without touching the pipeline, run the stages one at a time, and
check that no stage module names a family or an architecture.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from slimdeploy.errors import BadInputError, DuplicateRegistrationError
from slimdeploy.export import ExportOptions, export
from slimdeploy.models import list_models
from slimdeploy.models import registry as model_registry
from slimdeploy.recipes import (
    Deployment,
    DeployRecipe,
    pick_rows,
    recipe_for,
    register_recipe,
    registered_recipes,
)
from slimdeploy.recipes import registry as recipe_registry

REPO = Path(__file__).resolve().parents[1]
# The pipeline's stage modules: none may name a family or an architecture.
PIPELINE_STAGES = (
    "slimdeploy/export/__init__.py",
    "slimdeploy/export/options.py",
    "slimdeploy/export/manifest.py",
    "slimdeploy/transforms/deploy.py",
    "slimdeploy/held_out.py",
    "slimdeploy/exporters/forms.py",
    "slimdeploy/exporters/checked.py",
    "slimdeploy/calibration/stage.py",
)


def test_pipeline_stages_name_no_family_or_architecture() -> None:
    families = {model_registry.get_arch(name).family for name in list_models()}
    names = families | set(list_models()) | set(registered_recipes())
    # Word boundaries, so that "skip" in "skip path" does not count, but "skipnet" does.
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")
    found = {stage: sorted(set(pattern.findall((REPO / stage).read_text()))) for stage in PIPELINE_STAGES}
    assert {stage: hits for stage, hits in found.items() if hits} == {}


def test_every_family_with_a_recipe_is_registered() -> None:
    families = {model_registry.get_arch(name).family for name in list_models()}
    assert set(registered_recipes()) <= families
    # Static families without their own recipe get the plain one.
    assert type(recipe_for("mobilenet")) is DeployRecipe
    assert type(recipe_for(None)) is DeployRecipe


def test_a_recipe_is_registered_once() -> None:
    with pytest.raises(DuplicateRegistrationError, match="skipnet"):
        register_recipe("skipnet")(DeployRecipe)
    assert recipe_for("skipnet").decision_kind == "gated"


@pytest.mark.parametrize(("family", "target", "default"), [
    ("skipnet", "ort", "compact"), ("skipnet", "trt", "staged"),
    ("early_exit", "ort", "staged"), ("early_exit", "trt", "staged"),
    ("spconv", "ort", None), ("condensenet", "trt", None),
])
def test_default_form_per_family_and_target(family: str, target: str, default: str | None) -> None:
    assert recipe_for(family).choose_form(None, target) == default


def test_forms_a_family_refuses() -> None:
    with pytest.raises(BadInputError, match="unknown dynamic form 'compact' for an early-exit model"):
        recipe_for("early_exit").choose_form("compact", "ort")
    with pytest.raises(BadInputError, match="unknown dynamic form 'scan' for a gated model"):
        recipe_for("skipnet").choose_form("scan", "ort")
    with pytest.raises(BadInputError, match="unknown dynamic form 'loop' for an early-exit model"):
        recipe_for("early_exit").choose_form("loop", "ort")
    assert recipe_for("skipnet").choose_form("loop", "ort") == recipe_for("skipnet").choose_form("loop", "trt") == "loop"
    with pytest.raises(BadInputError, match="compact"):
        recipe_for("skipnet").choose_form("compact", "trt")
    with pytest.raises(BadInputError, match="this architecture is static"):
        recipe_for("spconv").choose_form("staged", "ort")


def test_condense_classifier_applies_to_the_learned_condensenet_only() -> None:
    options = ExportOptions(condense_classifier=True)
    recipe_for("condensenet").check_options("condensenet", options)
    with pytest.raises(BadInputError, match="CondenseNetV2 converter keeps the classifier"):
        recipe_for("condensenet").check_options("condensenetv2", options)
    for family, arch in (("condensenet", "condensenet_converted"), ("spconv", "spconv_resnet20_cifar"), (None, "custom")):
        with pytest.raises(BadInputError, match="applies to the 'condensenet'"):
            recipe_for(family).check_options(arch, options)


def test_pick_rows_covers_every_state_first() -> None:
    # Greedy: row 0 shows two of the four (column, state) pairs (the first of the rows that
    # show two), row 4 the other two; rows 1-3 would add less.
    bits = np.array([[1, 1], [1, 1], [0, 1], [1, 1], [0, 0]], dtype=np.uint8)
    assert pick_rows(bits, 2).tolist() == [0, 4]
    # More rows than the cover needs: the cover, then the first other rows in order.
    assert pick_rows(bits, 4).tolist() == [0, 1, 2, 4]
    # A state no row shows cannot be covered; the rest is still taken in order.
    assert pick_rows(np.ones((3, 1), dtype=np.uint8), 2).tolist() == [0, 1]


def test_export_options_are_validated_when_made() -> None:
    with pytest.raises(BadInputError, match="unknown target 'tpu'"):
        ExportOptions(target="tpu")
    with pytest.raises(BadInputError, match="--calib and --calib-size apply to --precision int8"):
        ExportOptions(calib="digits")
    with pytest.raises(BadInputError, match="--batch-sizes 0 is out of range"):
        ExportOptions(batch_sizes=(1, 0))
    with pytest.raises(BadInputError, match="--threads"):
        ExportOptions(threads=100000)
    with pytest.raises(BadInputError, match="unknown export option"):
        ExportOptions.of(None, precison="int8")
    options = ExportOptions.of(ExportOptions(precision="int8"), samples=7)
    assert (options.precision, options.samples, options.parity_samples) == ("int8", 7, 7)
    assert ExportOptions(precision="fp16").parity_samples == 100 and ExportOptions().parity_samples == 32
    with pytest.raises(AttributeError):
        options.precision = "fp32"  # type: ignore[misc]


class _ToyNet(nn.Module):
    """A convolution, a BatchNorm, a ReLU, a pool and a classifier: the smallest model whose
    deploy transform (the BN folded into the convolution) changes the graph."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


class _ToyRecipe(DeployRecipe):
    """The toy family's recipe: fold the BatchNorm into the convolution before export."""

    name = "toy"

    def deploy(self, loaded: Any, options: ExportOptions, say: Any) -> Deployment:
        import copy

        deployment = Deployment.as_loaded(loaded)
        if options.fold:
            folded = copy.deepcopy(loaded.module)
            folded.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(folded.conv, folded.bn)
            folded.bn = nn.Identity()
            deployment.module, deployment.folds = folded, {"bn_into_conv": 1}
            deployment.transforms.append("fold")
        return deployment


def test_a_new_family_is_one_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A family the pipeline has never heard of exports end to end once its architecture and
    its recipe are registered (the README's "Add a family" walks through the same steps)."""
    from slimdeploy.loading import Preprocessing, save_checkpoint
    from slimdeploy.models import register_model

    monkeypatch.setattr(model_registry, "_REGISTRY", dict(model_registry._REGISTRY))
    monkeypatch.setattr(recipe_registry, "_RECIPES", dict(recipe_registry._RECIPES))
    register_model("toy_net", family="toy", input_size=(3, 32, 32))(_ToyNet)
    register_recipe("toy")(_ToyRecipe)

    torch.manual_seed(0)
    model = _ToyNet().eval()
    with torch.no_grad():  # BN statistics that are not the identity, so the fold matters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    checkpoint = tmp_path / "toy.pt"
    save_checkpoint(checkpoint, model, "toy_net", {}, Preprocessing((3, 32, 32), (0.5,) * 3, (0.25,) * 3))
    result = export(checkpoint, tmp_path / "bundle", samples=8, batch_sizes=(1, 4))
    assert result.passed, result.report.failures
    model_entry = result.manifest["model"]
    assert (model_entry["family"], model_entry["transforms"], model_entry["folds"]) == ("toy", ["fold"], {"bn_into_conv": 1})
    import onnx

    graph = onnx.load(tmp_path / "bundle" / "model.onnx")
    assert "BatchNormalization" not in {node.op_type for node in graph.graph.node}
    # Parity is against the unfolded model: the reference outputs are the original module's.
    with np.load(tmp_path / "bundle" / "golden.npz") as golden:
        expected = model(torch.from_numpy(golden["input"])).detach().numpy()
        np.testing.assert_allclose(golden["ref_logits"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_stages_one_at_a_time(zoo_skipnet: Path) -> None:
    """Each stage alone, on the shipped SkipNet: the deployable model, held-out samples that
    see every gate both ways, the compact graph, and its parity."""
    from slimdeploy.exporters.checked import check_and_simplify
    from slimdeploy.exporters.forms import export_graphs
    from slimdeploy.held_out import held_out_samples
    from slimdeploy.loading import load_checkpoint
    from slimdeploy.transforms.deploy import deploy_model

    options = ExportOptions(samples=12, batch_sizes=(1, 5))
    say = lambda _message: None  # noqa: E731
    loaded = load_checkpoint(zoo_skipnet)
    recipe = recipe_for("skipnet")
    deployed = deploy_model(loaded, recipe, recipe.choose_form(None, "ort"), options, say)
    assert deployed.form == "compact" and deployed.output_names == ["logits", "gates", "gate_probs"]
    assert deployed.thresholds == {"gate_threshold": 0.5} and deployed.deployment.module is loaded.module

    held_out = held_out_samples(deployed, options, say)
    gates = held_out.reference["gates"]
    assert len(held_out.inputs) == 12 and gates.shape == (12, loaded.module.n_blocks - 1)
    # The pool's every (block, state) pair that exists is among the chosen samples.
    with torch.no_grad():
        _, pool_gates, _ = loaded.module(torch.from_numpy(_digits_pool(loaded)))
    pool_pairs = {(b, int(s)) for b in range(gates.shape[1]) for s in np.unique(pool_gates.numpy()[:, b])}
    chosen_pairs = {(b, int(s)) for b in range(gates.shape[1]) for s in np.unique(gates[:, b])}
    assert pool_pairs == chosen_pairs

    exported = export_graphs(deployed, options, say)
    assert list(exported.graphs) == ["model"] and exported.plan["kind"] == "gated"
    checked = check_and_simplify(exported, held_out, options, say)
    assert checked.report.passed and checked.simplify["applied"] is True
    assert all(result.agreement == 1.0 for result in checked.report.decisions["gates"])


def _digits_pool(loaded: Any) -> np.ndarray:
    from slimdeploy.data import digits_inputs

    prep = loaded.preprocessing
    return digits_inputs("heldout", prep.input_size, prep.mean, prep.std)[0]


@pytest.fixture(scope="module")
def zoo_skipnet() -> Path:
    from slimdeploy.zoo import zoo_checkpoint_path

    return zoo_checkpoint_path("skipnet38_digits")
