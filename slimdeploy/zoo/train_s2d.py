"""Train the zoo's demo S2D network on digits with the multi-exit loss, then pick its thresholds.

Every stage is trained on every sample with ``slimdeploy.s2d.multi_exit_loss`` (sum of the
stages' cross-entropies, weights ``alphas``), under the schedule and shift augmentation of
``slimdeploy.zoo.training``. Then the exit thresholds are chosen on the *training* split (the
held-out split only measures): stage j's threshold is the confidence quantile at which
``exit_shares[j]`` of the samples reaching stage j leave there. The thresholds become the
checkpoint's ``exit_thresholds`` architecture argument: the defaults of every export.

``train_s2d_zoo_entry(name)`` (or ``python -m slimdeploy.zoo.train_s2d NAME``) retrains an entry
of ``S2D_RECIPES`` and rewrites its checkpoint and its ``zoo.json`` entry, whose ``metrics``
record the held-out exit shares per stage, each stage's own accuracy, and the accuracy of the
final stage alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.zoo import ZooEntry
from slimdeploy.zoo.training import (
    DATASET,
    Recipe,
    TrainSettings,
    plan_entry,
    recipe_main,
    record_trained,
    save_zoo_checkpoint,
    start_training,
    torch_threads,
)

TRAINER = "train_s2d"


@dataclass(frozen=True, kw_only=True)
class S2DRecipe(Recipe):
    """How a shipped S2D zoo checkpoint is trained: a ``Recipe`` (its ``arch_args`` get the
    ``exit_thresholds`` training chooses) and the exits' training.

    Attributes:
        exit_shares: per stage but the last, the share of the samples reaching it that should
            leave there (on the training split).
        alphas: loss weight per stage. Defaults to 1 each.
    """

    exit_shares: tuple[float, ...]
    alphas: tuple[float, ...] | None = None


S2D_RECIPES: dict[str, S2DRecipe] = {
    "s2d_resnet20_digits": S2DRecipe(
        arch="s2d_resnet20_cifar",
        arch_args={"num_classes": 10},
        epochs=15,
        description="S2D ResNet-20 (3 stages, 1/4-1/4-1/2 channel splits, dense reuse, 32x32) trained on sklearn digits",
        exit_shares=(0.5, 0.5),
        settings=TrainSettings(optimizer="sgd", lr=0.05, weight_decay=5e-4, batch_size=64),
    ),
}


@dataclass
class S2DTrainResult:
    """What a run produced (the fields ``record_trained`` reads, and the exit figures)."""

    path: Path
    arch: str
    arch_args: dict[str, Any]
    accuracy: float
    params: int
    input_size: tuple[int, int, int]
    seconds: float
    metrics: dict[str, Any]


def choose_thresholds(confidences: Any, shares: Sequence[float], rule: str) -> list[float]:
    """Thresholds from per-stage confidences [N, S] (every stage computed on every sample):
    stage j's is the quantile at which ``shares[j]`` of the samples still there leave. The
    last stage's is 0 (ignored)."""
    np = optional_import("numpy")
    remaining = np.ones(len(confidences), dtype=bool)
    thresholds = []
    for stage, share in enumerate(shares):
        values = confidences[remaining, stage]
        # max softmax: leave when high; entropy: leave when low.
        quantile = 1.0 - share if rule == "max_softmax" else share
        threshold = float(np.quantile(values, quantile)) if len(values) else 1.0
        thresholds.append(threshold)
        leave = confidences[:, stage] >= threshold if rule == "max_softmax" else confidences[:, stage] <= threshold
        remaining &= ~leave
    return [*thresholds, 0.0]


def train_s2d_demo(recipe: S2DRecipe, out_path: Path, train_command: str = "", progress: Callable[[str], None] | None = print) -> S2DTrainResult:
    """Train ``recipe`` on the digits ``train`` split, choose thresholds, save the checkpoint."""
    torch = optional_import("torch", "train a demo model")
    from slimdeploy.nn.exit_stage import exit_confidence
    from slimdeploy.s2d import multi_exit_loss

    say = progress or (lambda _line: None)
    settings = recipe.settings
    started = time.perf_counter()
    with torch_threads(torch, settings.threads):
        run = start_training(recipe.arch, recipe.arch_args, epochs=recipe.epochs, seed=recipe.seed, settings=settings)
        module, optimizer, scheduler = run.module, run.optimizer, run.scheduler
        for epoch in range(1, recipe.epochs + 1):
            epoch_start = time.perf_counter()
            module.train()
            total = 0.0
            for inputs, labels in run.epoch_batches():
                loss = multi_exit_loss(module.forward_all(inputs), labels, recipe.alphas, settings.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(labels)
            say(f"epoch {epoch:>3}/{recipe.epochs}  loss {total / run.train_size:.4f}  {time.perf_counter() - epoch_start:.1f}s")

        module.eval()

        def all_stages(images: Any) -> tuple[Any, Any]:
            with torch.no_grad():
                logits = module.forward_all(torch.from_numpy(images))
            confidence = torch.stack([exit_confidence(out, module.exit_rule) for out in logits], dim=1)
            return torch.stack(logits, dim=1).numpy(), confidence.numpy()

        _, train_conf = all_stages(run.x_train.numpy())
        thresholds = choose_thresholds(train_conf, recipe.exit_shares, module.exit_rule)
        module.exit_thresholds = thresholds
        x_held, y_held = run.x_held, run.y_held
        held_logits, _ = all_stages(x_held)
        with torch.no_grad():
            logits, stage, _ = module(torch.from_numpy(x_held))
        accuracy = float((logits.argmax(1).numpy() == y_held).mean())
        stage = stage.numpy()
        metrics = {
            "exit_thresholds": [round(t, 6) for t in thresholds],
            "exit_share_per_stage": [float((stage == j).mean()) for j in range(module.n_stages)],
            "stage_accuracy": [float((held_logits[:, j].argmax(1) == y_held).mean()) for j in range(module.n_stages)],
            "final_stage_accuracy": float((held_logits[:, -1].argmax(1) == y_held).mean()),
            "epochs": recipe.epochs,
            "split": "heldout",
        }
        arch_args = {**dict(recipe.arch_args), "exit_thresholds": thresholds}
        params = sum(p.numel() for p in module.parameters())
        meta = {
            "dataset": DATASET, "split": "heldout", "accuracy": accuracy, "epochs": recipe.epochs,
            "seed": recipe.seed, "settings": settings.to_dict(), "params": params,
            "train_command": train_command, "torch_version": str(torch.__version__), **{"exits": metrics},
        }
        save_zoo_checkpoint(out_path, module, run.arch, arch_args, run.preprocessing, meta)
    seconds = time.perf_counter() - started
    metrics["train_seconds"] = round(seconds, 1)
    say(f"heldout top-1 {accuracy:.4f} with exits {metrics['exit_share_per_stage']} "
        f"(final stage alone {metrics['final_stage_accuracy']:.4f}), {seconds:.1f}s -> {out_path}")
    return S2DTrainResult(out_path, run.arch, arch_args, accuracy, params, run.input_size, seconds, metrics)


def train_s2d_zoo_entry(name: str, out_dir: Path | None = None, *, epochs: int | None = None, progress: Callable[[str], None] | None = print) -> ZooEntry:
    """Retrain the S2D zoo entry ``name`` (see ``slimdeploy.zoo.train.train_zoo_entry``)."""
    recipe, directory, command = plan_entry(name, S2D_RECIPES, TRAINER, out_dir, epochs)
    result = train_s2d_demo(recipe, directory / f"{name}.pt", command, progress)
    # The zoo entry records the thresholds training chose, so a retrain reproduces the arch args.
    recorded = replace(recipe, arch_args=result.arch_args)
    return record_trained(name, recorded, result, result.accuracy, command, directory, shipped=out_dir is None, metrics=result.metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slimdeploy.zoo.train_s2d NAME [--out-dir DIR] [--epochs N]``."""
    return recipe_main(
        argv, trainer=TRAINER, recipes=S2D_RECIPES, train_entry=train_s2d_zoo_entry,
        description="Retrain a shipped S2D zoo checkpoint on digits and rewrite it and its zoo.json entry.",
    )


if __name__ == "__main__":
    raise SystemExit(main())
