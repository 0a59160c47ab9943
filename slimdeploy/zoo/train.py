"""Train the zoo's static demo checkpoints on scikit-learn's digits, on a CPU, in minutes, and
send every other zoo entry to its family's recipe.

``train_demo`` trains any registered architecture on the digits ``train`` split (1,197 images,
resized to the architecture's input size and normalised with ``digits_statistics()``), with
random shifts of up to ``max_shift`` pixels as augmentation, SGD with Nesterov momentum (or
AdamW) and a per-step cosine schedule after a linear warm-up (``slimdeploy.zoo.training``). It
evaluates top-1 on the 500 ``heldout`` images and writes a slimdeploy checkpoint
(``save_checkpoint``) whose ``meta`` records the data set, accuracy, epochs, seed, recipe,
training command and torch version.

``RECIPES`` holds how each shipped static checkpoint was made; ``train_zoo_entry(name)`` (CLI
``slimdeploy zoo train NAME``, or ``python -m slimdeploy.zoo.train NAME``) retrains one and
rewrites its file in ``checkpoints/`` and its entry in ``zoo.json``; gated, CondenseNet and S2D
entries go to ``train_gated``, ``train_condensenet`` and ``train_s2d``. This module sits above
them: they import only ``slimdeploy.zoo.training``, never this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.zoo import ZooEntry, unknown_recipe
from slimdeploy.zoo.train_condensenet import CONDENSE_RECIPES, train_condensenet_zoo_entry
from slimdeploy.zoo.train_gated import GATED_RECIPES, train_gated_zoo_entry
from slimdeploy.zoo.train_s2d import S2D_RECIPES, train_s2d_zoo_entry
from slimdeploy.zoo.training import (
    DATASET,
    Recipe,
    TrainSettings,
    evaluate,
    model_logits,
    plan_entry,
    recipe_main,
    record_trained,
    save_zoo_checkpoint,
    start_training,
    torch_threads,
)

RECIPES: dict[str, Recipe] = {
    "spconv_resnet20_digits": Recipe(
        arch="spconv_resnet20_cifar",
        arch_args={"num_classes": 10},
        epochs=12,
        description="SPConv ResNet-20 (CIFAR layout, 32x32) trained on sklearn digits",
        # SGD (lr 0.02 to 0.1) trains SPConv's softmax-fused blocks slowly on digits (28-53 %
        # after 8 epochs); AdamW reaches ~98 % in 12 epochs (99 % in 20, at 1.7x the time:
        # 12 keeps the run well under 3 minutes on a busy CPU).
        settings=TrainSettings(optimizer="adamw", lr=3e-3, weight_decay=0.05, batch_size=64),
    ),
    "mobilenet_v1_digits": Recipe(
        arch="mobilenet_v1",
        arch_args={"num_classes": 10, "width_mult": 0.25, "resolution": 32},
        epochs=30,
        description="MobileNet v1 0.25x at 32x32 trained on sklearn digits",
        settings=TrainSettings(optimizer="sgd", lr=0.1, weight_decay=5e-4, batch_size=64),
    ),
}


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        path: the checkpoint written.
        arch: architecture name.
        arch_args: its constructor arguments.
        accuracy: top-1 on the ``heldout`` split, in [0, 1].
        params: number of parameters.
        input_size: (C, H, W) the model was trained at.
        epochs: epochs trained.
        seed: random seed.
        seconds: wall-clock time of training and evaluation.
        size_bytes: size of the checkpoint file.
    """

    path: Path
    arch: str
    arch_args: dict[str, Any]
    accuracy: float
    params: int
    input_size: tuple[int, int, int]
    epochs: int
    seed: int
    seconds: float
    size_bytes: int


def train_demo(
    arch: str,
    arch_args: Mapping[str, Any],
    out_path: str | Path,
    epochs: int = 15,
    seed: int = 0,
    *,
    settings: TrainSettings | None = None,
    train_count: int | None = None,
    train_command: str = "",
    progress: Callable[[str], None] | None = print,
) -> TrainResult:
    """Train ``arch`` on the digits ``train`` split and save a checkpoint at ``out_path``.

    Args:
        arch: registered architecture name.
        arch_args: its constructor arguments.
        out_path: checkpoint file to write (parents are created; written atomically).
        epochs: training epochs. Defaults to 15.
        seed: random seed for initialisation, shuffling and shifts. Defaults to 0.
        settings: optimisation settings. Defaults to ``TrainSettings()``.
        train_count: train on the first ``train_count`` training images only (for quick
            tests). Defaults to all 1,197.
        train_command: the command recorded in the checkpoint's meta. Defaults to "".
        progress: called with one line per epoch and a summary. Defaults to ``print``; pass
            None for silence.
    """
    torch = optional_import("torch", "train a demo model")

    settings = settings or TrainSettings()
    say = progress or (lambda _line: None)
    out_path = Path(out_path)
    started = time.perf_counter()
    with torch_threads(torch, settings.threads):
        run = start_training(arch, arch_args, epochs=epochs, seed=seed, settings=settings, train_count=train_count)
        module, optimizer, scheduler = run.module, run.optimizer, run.scheduler
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            module.train()
            total_loss, correct = 0.0, 0
            for inputs, labels in run.epoch_batches():
                logits = model_logits(module(inputs))
                loss = loss_fn(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(labels)
                correct += int((logits.detach().argmax(1) == labels).sum())
            say(
                f"epoch {epoch:>3}/{epochs}  loss {total_loss / run.train_size:.4f}  "
                f"train-acc {correct / run.train_size:.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.5f}  "
                f"{time.perf_counter() - epoch_start:.1f}s"
            )

        accuracy = evaluate(module, run.x_held, run.y_held)
        params = sum(p.numel() for p in module.parameters())
        meta = {
            "dataset": DATASET,
            "split": "heldout",
            "accuracy": accuracy,
            "heldout_images": len(run.y_held),
            "train_images": run.train_size,
            "epochs": epochs,
            "seed": seed,
            "settings": settings.to_dict(),
            "params": params,
            "train_command": train_command,
            "torch_version": str(torch.__version__),  # TorchVersion would pickle as a global
        }
        save_zoo_checkpoint(out_path, module, run.arch, dict(arch_args), run.preprocessing, meta)

    seconds = time.perf_counter() - started
    size = out_path.stat().st_size
    held = len(run.y_held)
    say(
        f"heldout top-1 {accuracy:.4f} ({round(accuracy * held)}/{held}), "
        f"{params:,} params, {size / 1e6:.2f} MB, {seconds:.1f}s -> {out_path}"
    )
    return TrainResult(
        out_path, run.arch, dict(arch_args), accuracy, params,
        run.input_size, epochs, seed, seconds, size,
    )


def train_zoo_entry(
    name: str,
    out_dir: Path | None = None,
    *,
    epochs: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> ZooEntry:
    """Retrain the zoo entry ``name`` from its recipe (``RECIPES`` here; gated, CondenseNet and
    S2D entries go to their own trainers).

    With ``out_dir`` None the shipped checkpoint in ``slimdeploy/zoo/checkpoints/`` and its
    entry in ``zoo.json`` are rewritten. With an ``out_dir`` the checkpoint is written there and
    the package's ``zoo.json`` is left alone; the returned entry points at the new file.

    Args:
        name: zoo name, a key of ``RECIPES``.
        out_dir: folder for the checkpoint. Defaults to the package's ``checkpoints/``.
        epochs: override the recipe's epochs (for quick trials). Defaults to the recipe's.
        progress: called with progress lines. Defaults to ``print``.
    """
    if name in GATED_RECIPES:  # SkipNets train with straight-through gates and a penalty
        return train_gated_zoo_entry(name, out_dir, epochs=epochs, progress=progress)
    if name in CONDENSE_RECIPES:  # CondenseNets train with the condensation schedule and lasso
        return train_condensenet_zoo_entry(name, out_dir, epochs=epochs, progress=progress)
    if name in S2D_RECIPES:  # S2D networks train with the multi-exit loss, then pick thresholds
        return train_s2d_zoo_entry(name, out_dir, epochs=epochs, progress=progress)
    if name not in RECIPES:
        raise unknown_recipe(name, [*RECIPES, *GATED_RECIPES, *CONDENSE_RECIPES, *S2D_RECIPES])
    recipe, directory, command = plan_entry(name, RECIPES, "train", out_dir, epochs)
    result = train_demo(
        recipe.arch, recipe.arch_args, directory / f"{name}.pt", recipe.epochs, recipe.seed,
        settings=recipe.settings, train_command=command, progress=progress,
    )
    return record_trained(name, recipe, result, result.accuracy, command, directory, shipped=out_dir is None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slimdeploy.zoo.train NAME [--out-dir DIR] [--epochs N]``."""
    return recipe_main(
        argv, trainer="train", recipes=RECIPES, train_entry=train_zoo_entry,
        description="Retrain a shipped zoo checkpoint on digits and rewrite it and its zoo.json entry.",
    )


if __name__ == "__main__":
    raise SystemExit(main())
