"""Train the zoo's demo S2D network on digits with the multi-exit loss, then pick its thresholds.

Every stage is trained on every sample with ``slimdeploy.s2d.multi_exit_loss`` (sum of the
stages' cross-entropies, weights ``alphas``), under the schedule and shift augmentation of
``slimdeploy.zoo.train``. Then the exit thresholds are chosen on the *training* split (the
held-out split only measures): stage j's threshold is the confidence quantile at which
``exit_shares[j]`` of the samples reaching stage j leave there. The thresholds become the
checkpoint's ``exit_thresholds`` architecture argument: the defaults of every export.

``train_s2d_zoo_entry(name)`` (or ``python -m slimdeploy.zoo.train_s2d NAME``) retrains an entry
of ``S2D_RECIPES`` and rewrites its checkpoint and its ``zoo.json`` entry, whose ``metrics``
record the held-out exit shares per stage, each stage's own accuracy, and the accuracy of the
final stage alone.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.loading import Preprocessing
from slimdeploy.zoo import CHECKPOINT_DIR, ZooEntry, unknown_recipe
from slimdeploy.zoo.train import (
    DATASET,
    TrainSettings,
    _optimizer,
    _random_shifts,
    record_trained,
    save_zoo_checkpoint,
)


@dataclass(frozen=True)
class S2DRecipe:
    """How a shipped S2D zoo checkpoint is trained.

    Attributes:
        arch: registered S2D architecture.
        arch_args: its constructor arguments (``exit_thresholds`` is set by training).
        epochs: training epochs.
        description: one line for ``zoo list``.
        exit_shares: per stage but the last, the share of the samples reaching it that should
            leave there (on the training split).
        alphas: loss weight per stage. Defaults to 1 each.
        settings: optimisation settings. Defaults to ``TrainSettings()``.
        seed: random seed. Defaults to 0.
    """

    arch: str
    arch_args: Mapping[str, Any]
    epochs: int
    description: str
    exit_shares: tuple[float, ...]
    alphas: tuple[float, ...] | None = None
    settings: TrainSettings = field(default_factory=TrainSettings)
    seed: int = 0


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
    from slimdeploy.data import digits_inputs, digits_statistics
    from slimdeploy.models.registry import get_arch
    from slimdeploy.nn.exit_stage import exit_confidence
    from slimdeploy.s2d import multi_exit_loss

    say = progress or (lambda _line: None)
    settings = recipe.settings
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        info = get_arch(recipe.arch)
        torch.manual_seed(recipe.seed)
        module = info.build(**dict(recipe.arch_args))
        input_size = info.input_size
        mean, std = digits_statistics()
        preprocessing = Preprocessing(input_size, mean, std)
        x_train, y_train = digits_inputs("train", input_size, mean, std)
        x_held, y_held = digits_inputs("heldout", input_size, mean, std)
        x_train_t, y_train_t = torch.from_numpy(x_train), torch.from_numpy(y_train)
        background = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
        generator = torch.Generator().manual_seed(recipe.seed)
        steps = math.ceil(len(x_train_t) / settings.batch_size)
        optimizer, scheduler = _optimizer(torch, module, settings, recipe.epochs, steps)
        for epoch in range(1, recipe.epochs + 1):
            epoch_start = time.perf_counter()
            module.train()
            shifted = _random_shifts(torch, x_train_t, settings.max_shift, background, generator)
            order = torch.randperm(len(shifted), generator=generator)
            total = 0.0
            for start in range(0, len(order), settings.batch_size):
                index = order[start:start + settings.batch_size]
                loss = multi_exit_loss(module.forward_all(shifted[index]), y_train_t[index], recipe.alphas, settings.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(index)
            say(f"epoch {epoch:>3}/{recipe.epochs}  loss {total / len(order):.4f}  {time.perf_counter() - epoch_start:.1f}s")

        module.eval()

        def all_stages(images: Any) -> tuple[Any, Any]:
            with torch.no_grad():
                logits = module.forward_all(torch.from_numpy(images))
            confidence = torch.stack([exit_confidence(out, module.exit_rule) for out in logits], dim=1)
            return torch.stack(logits, dim=1).numpy(), confidence.numpy()

        _, train_conf = all_stages(x_train)
        thresholds = choose_thresholds(train_conf, recipe.exit_shares, module.exit_rule)
        module.exit_thresholds = thresholds
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
        save_zoo_checkpoint(out_path, module, info.name, arch_args, preprocessing, meta)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - started
    metrics["train_seconds"] = round(seconds, 1)
    say(f"heldout top-1 {accuracy:.4f} with exits {metrics['exit_share_per_stage']} "
        f"(final stage alone {metrics['final_stage_accuracy']:.4f}), {seconds:.1f}s -> {out_path}")
    return S2DTrainResult(out_path, info.name, arch_args, accuracy, params, input_size, seconds, metrics)


def s2d_recipe_command(name: str, epochs: int | None = None) -> str:
    suffix = f" --epochs {epochs}" if epochs is not None else ""
    return f"python -m slimdeploy.zoo.train_s2d {name}{suffix}"


def train_s2d_zoo_entry(name: str, out_dir: Path | None = None, *, epochs: int | None = None, progress: Callable[[str], None] | None = print) -> ZooEntry:
    """Retrain the S2D zoo entry ``name`` (see ``slimdeploy.zoo.train.train_zoo_entry``)."""
    if name not in S2D_RECIPES:
        raise unknown_recipe(name, list(S2D_RECIPES))
    recipe = S2D_RECIPES[name]
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    directory = Path(out_dir) if out_dir is not None else CHECKPOINT_DIR
    command = s2d_recipe_command(name, epochs)
    result = train_s2d_demo(recipe, directory / f"{name}.pt", command, progress)
    # The zoo entry records the thresholds training chose, so a retrain reproduces the arch args.
    recorded = replace(recipe, arch_args=result.arch_args)
    return record_trained(name, recorded, result, result.accuracy, command, directory, shipped=out_dir is None, metrics=result.metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slimdeploy.zoo.train_s2d NAME [--out-dir DIR] [--epochs N]``."""
    parser = argparse.ArgumentParser(prog="python -m slimdeploy.zoo.train_s2d", description="Retrain a shipped S2D zoo checkpoint on digits.")
    parser.add_argument("name", choices=sorted(S2D_RECIPES))
    parser.add_argument("--out-dir", type=Path, default=None, help="write the checkpoint here instead (zoo.json is left alone)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    args = parser.parse_args(argv)
    entry = train_s2d_zoo_entry(args.name, args.out_dir, epochs=args.epochs)
    print(f"{entry.name}: heldout top-1 {entry.accuracy:.4f} -> {entry.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
