"""Train the zoo's demo CondenseNet on digits with the condensation schedule and group lasso.

As the official training code (ShichenLiu/CondenseNet ``main.py``): the training progress
``(epoch * steps + step) / (epochs * steps)`` is advanced per step, and every
``LearnedGroupConv`` runs its condensation schedule through the explicit
``condense_step(progress)`` before each step (``advance_schedule``: one stage per call, so that a
short run that skips a stage still drops in/C inputs per stage): with condense factor C, stage s (s = 1 .. C-1)
begins at progress s / (2 (C - 1)), each group then dropping in/C more of its 1x1 inputs, so the
condensation happens in the first half of training and the second half trains the final masks
(1/C of the inputs kept per group). While condensing, the loss adds ``lasso`` times the sum of
the layers' ``lasso_loss()`` (group lasso; the official ``--group-lasso-lambda``), which pushes
whole input columns of a group towards zero before they are dropped; it is off once the last
stage is reached (as upstream, where the penalty of a fully condensed layer is 0).

The rest follows ``slimdeploy.zoo.training``: the digits ``train`` split at the model's input
size, random shifts, SGD with Nesterov momentum, linear warm-up and per-step cosine decay, one
CPU thread, deterministic for a seed. The shipped checkpoint is the training form
(``condensenet``, dense weights and masks); its zoo entry's ``metrics`` record the held-out
accuracy of ``condense(model)`` (the deploy form with the exact classifier, which must equal the
learned model's), the kept fraction of the 1x1 weights and the parameters of both forms.

``train_condensenet_zoo_entry(name)`` (or ``python -m slimdeploy.zoo.train_condensenet NAME``)
retrains an entry of ``CONDENSE_RECIPES`` and rewrites its checkpoint and ``zoo.json`` entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.zoo import ZooEntry
from slimdeploy.zoo.training import (
    DATASET,
    Recipe,
    TrainSettings,
    evaluate,
    plan_entry,
    recipe_main,
    record_trained,
    save_zoo_checkpoint,
    start_training,
    torch_threads,
)

TRAINER = "train_condensenet"


@dataclass(frozen=True, kw_only=True)
class CondenseRecipe(Recipe):
    """How a shipped CondenseNet zoo checkpoint is trained: a ``Recipe`` (``arch`` is the
    training form, ``condensenet``; the condensation stages fill the first half of ``epochs``)
    and the weight of the group-lasso penalty while condensing, ``lasso``."""

    lasso: float


CONDENSE_RECIPES: dict[str, CondenseRecipe] = {
    "condensenet_digits": CondenseRecipe(
        arch="condensenet",
        arch_args={"stages": [4, 4, 4], "growth": [8, 16, 32], "bottleneck": 4,
                   "group_1x1": 4, "group_3x3": 4, "condense_factor": 4,
                   "data": "cifar10", "num_classes": 10},
        epochs=20,
        lasso=1e-4,
        description=(
            "CondenseNet (CIFAR layout, stages 4-4-4, growth 8-16-32, 32x32) trained on sklearn "
            "digits with the condensation schedule and group lasso"
        ),
        settings=TrainSettings(optimizer="sgd", lr=0.1, weight_decay=1e-4, batch_size=64),
    ),
}


@dataclass
class CondenseTrainResult:
    """What a CondenseNet training run produced.

    Attributes:
        path: the checkpoint written.
        arch: architecture name.
        arch_args: its constructor arguments.
        accuracy: held-out top-1 of the learned (training-form) model.
        condensed_accuracy: held-out top-1 of ``condense(model)``.
        same_predictions: whether both forms predict the same class for every held-out image.
        kept_fraction: kept fraction of the 1x1 (``LearnedGroupConv``) weights.
        params: parameters of the learned model (dense 1x1 weights included).
        condensed_params: parameters of the condensed model.
        input_size: (C, H, W).
        epochs: epochs trained.
        lasso: group-lasso weight.
        seed: random seed.
        seconds: wall-clock time of training, evaluation and save.
        size_bytes: size of the checkpoint file.
    """

    path: Path
    arch: str
    arch_args: dict[str, Any]
    accuracy: float
    condensed_accuracy: float
    same_predictions: bool
    kept_fraction: float
    params: int
    condensed_params: int
    input_size: tuple[int, int, int]
    epochs: int
    lasso: float
    seed: int
    seconds: float
    size_bytes: int


def learned_layers(model: Any) -> list[Any]:
    """The model's ``LearnedGroupConv`` layers, in module order."""
    from slimdeploy.nn.learned_group_conv import LearnedGroupConv

    return [m for m in model.modules() if isinstance(m, LearnedGroupConv)]


def kept_fraction(model: Any) -> float:
    """Fraction of the 1x1 (``LearnedGroupConv``) weights the masks keep."""
    layers = learned_layers(model)
    kept = sum(int(layer._mask.sum()) for layer in layers)
    total = sum(layer._mask.numel() for layer in layers)
    return kept / total if total else 1.0


def advance_schedule(layer: Any, progress: float) -> None:
    """Bring ``layer``'s condensation schedule to the stage of ``progress``, one stage at a time.

    ``condense_step`` (as upstream's ``_check_drop``) drops in/C inputs once per call however
    many stages it skips; a short run (few steps per stage) would skip one and end with more
    than 1/C kept. Stepping through each stage's midpoint drops in/C per stage.
    """
    factor = layer.condense_factor
    target = layer.stage_for(progress, factor)
    while int(layer._stage[0]) < target:
        following = int(layer._stage[0]) + 1
        point = min(progress, (following + 0.5) / (2 * (factor - 1)))
        layer.condense_step(point)
        if int(layer._stage[0]) != following:
            raise RuntimeError(f"condensation schedule did not reach stage {following}")


def _predictions(torch: Any, module: Any, inputs: Any, batch_size: int = 500) -> Any:
    module.eval()
    with torch.no_grad():
        return torch.cat([module(torch.from_numpy(inputs[s:s + batch_size])).argmax(1)
                          for s in range(0, len(inputs), batch_size)])


def train_condensenet_demo(
    arch: str,
    arch_args: Mapping[str, Any],
    out_path: str | Path,
    *,
    epochs: int,
    lasso: float,
    seed: int = 0,
    settings: TrainSettings | None = None,
    train_count: int | None = None,
    train_command: str = "",
    progress: Callable[[str], None] | None = print,
) -> CondenseTrainResult:
    """Train a CondenseNet on the digits ``train`` split with the condensation schedule and
    group lasso, save it (training form) at ``out_path``.

    Args:
        arch: registered architecture name (``condensenet``).
        arch_args: its constructor arguments.
        out_path: checkpoint file to write (parents are created; written atomically).
        epochs: training epochs.
        lasso: group-lasso weight while condensing.
        seed: random seed. Defaults to 0.
        settings: optimisation settings. Defaults to ``TrainSettings()``.
        train_count: train on the first ``train_count`` images only (quick tests).
        train_command: the command recorded in the checkpoint's meta. Defaults to "".
        progress: called with one line per epoch and a summary. Defaults to ``print``.
    """
    torch = optional_import("torch", "train a demo CondenseNet")
    from slimdeploy.transforms.condense import condense

    settings = settings or TrainSettings()
    say = progress or (lambda _line: None)
    out_path = Path(out_path)
    started = time.perf_counter()
    with torch_threads(torch, settings.threads):
        run = start_training(arch, arch_args, epochs=epochs, seed=seed, settings=settings, train_count=train_count)
        model, optimizer, scheduler = run.module, run.optimizer, run.scheduler
        layers = learned_layers(model)
        if not layers:
            raise ValueError(f"'{arch}' has no learned group convolutions (not a CondenseNet)")
        final_stage = max(layer.condense_factor - 1 for layer in layers)
        total_steps = epochs * run.steps_per_epoch
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

        step = 0
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            total_loss, correct = 0.0, 0
            for inputs, labels in run.epoch_batches():
                progress_now = step / total_steps
                for layer in layers:
                    advance_schedule(layer, progress_now)
                logits = model(inputs)
                loss = loss_fn(logits, labels)
                if lasso > 0 and any(int(layer._stage[0]) < final_stage for layer in layers):
                    loss = loss + lasso * sum(layer.lasso_loss() for layer in layers)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                total_loss += loss.item() * len(labels)
                correct += int((logits.detach().argmax(1) == labels).sum())
            stages = sorted({int(layer._stage[0]) for layer in layers})
            say(
                f"epoch {epoch:>3}/{epochs}  loss {total_loss / run.train_size:.4f}  "
                f"train-acc {correct / run.train_size:.4f}  stage {stages}  "
                f"kept {kept_fraction(model):.3f}  lr {optimizer.param_groups[0]['lr']:.5f}  "
                f"{time.perf_counter() - epoch_start:.1f}s"
            )
        # The schedule at the end of training (progress 1): every layer at its final stage.
        for layer in layers:
            advance_schedule(layer, 1.0)

        x_held, y_held = run.x_held, run.y_held
        accuracy = evaluate(model, x_held, y_held)
        deploy = condense(model)
        condensed_accuracy = evaluate(deploy, x_held, y_held)
        same = bool(torch.equal(_predictions(torch, model, x_held),
                                _predictions(torch, deploy, x_held)))
        kept = kept_fraction(model)
        params = sum(p.numel() for p in model.parameters())
        condensed_params = sum(p.numel() for p in deploy.parameters())
        meta = {
            "dataset": DATASET,
            "split": "heldout",
            "accuracy": accuracy,
            "condensed_accuracy": condensed_accuracy,
            "same_predictions": same,
            "kept_fraction_1x1": kept,
            "heldout_images": len(y_held),
            "train_images": run.train_size,
            "epochs": epochs,
            "lasso": lasso,
            "seed": seed,
            "settings": settings.to_dict(),
            "params": params,
            "condensed_params": condensed_params,
            "train_command": train_command,
            "torch_version": str(torch.__version__),
        }
        save_zoo_checkpoint(out_path, model, run.arch, dict(arch_args), run.preprocessing, meta)

    seconds = time.perf_counter() - started
    size = out_path.stat().st_size
    say(
        f"heldout top-1 {accuracy:.4f} (condensed {condensed_accuracy:.4f}, same predictions "
        f"{same}), 1x1 kept {kept:.4f}, {params:,} params learned / {condensed_params:,} "
        f"condensed, {size / 1e6:.2f} MB, {seconds:.1f}s -> {out_path}"
    )
    return CondenseTrainResult(
        out_path, run.arch, dict(arch_args), accuracy, condensed_accuracy, same, kept, params,
        condensed_params, run.input_size, epochs, lasso, seed, seconds, size,
    )


def train_condensenet_zoo_entry(
    name: str,
    out_dir: Path | None = None,
    *,
    epochs: int | None = None,
    train_count: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> ZooEntry:
    """Retrain the CondenseNet zoo entry ``name`` from its recipe in ``CONDENSE_RECIPES``.

    With ``out_dir`` None the shipped checkpoint and its ``zoo.json`` entry are rewritten; with
    an ``out_dir`` the checkpoint goes there and ``zoo.json`` is left alone.

    Args:
        name: zoo name, a key of ``CONDENSE_RECIPES``.
        out_dir: folder for the checkpoint. Defaults to the package's ``checkpoints/``.
        epochs: override the recipe's epochs (quick trials). Defaults to the recipe's.
        train_count: train on the first ``train_count`` images only (quick tests).
        progress: called with progress lines. Defaults to ``print``.
    """
    recipe, directory, command = plan_entry(name, CONDENSE_RECIPES, TRAINER, out_dir, epochs, train_count)
    result = train_condensenet_demo(
        recipe.arch, recipe.arch_args, directory / f"{name}.pt", epochs=recipe.epochs,
        lasso=recipe.lasso, seed=recipe.seed, settings=recipe.settings,
        train_count=train_count, train_command=command, progress=progress,
    )
    metrics = {
        "condensed_accuracy": result.condensed_accuracy,
        "same_predictions": result.same_predictions,
        "kept_fraction_1x1": result.kept_fraction,
        "params_learned": result.params,
        "params_condensed": result.condensed_params,
        "lasso": recipe.lasso,
        "epochs": recipe.epochs,
        "split": "heldout",
        "train_seconds": round(result.seconds, 1),
    }
    return record_trained(name, recipe, result, result.accuracy, command, directory, shipped=out_dir is None, metrics=metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slimdeploy.zoo.train_condensenet NAME [--out-dir DIR] [--epochs N]``."""
    return recipe_main(
        argv, trainer=TRAINER, recipes=CONDENSE_RECIPES, train_entry=train_condensenet_zoo_entry,
        description="Retrain a shipped CondenseNet zoo checkpoint on digits (condensation "
                    "schedule and group lasso) and rewrite it and its zoo.json entry.",
        summary=lambda entry: (
            f" (condensed {entry.metrics['condensed_accuracy']:.4f}), 1x1 kept "
            f"{entry.metrics['kept_fraction_1x1']:.4f}"
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
