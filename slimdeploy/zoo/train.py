"""Train the zoo's demo checkpoints on scikit-learn's digits, on a CPU, in minutes.

``train_demo`` trains any registered architecture on the digits ``train`` split (1,197 images,
resized to the architecture's input size and normalised with ``digits_statistics()``), with
random shifts of up to ``max_shift`` pixels as augmentation, SGD with Nesterov momentum (or
AdamW) and a per-step cosine schedule after a linear warm-up. It evaluates top-1 on the 500
``heldout`` images and writes a slimdeploy checkpoint (``save_checkpoint``) whose ``meta``
records the data set, accuracy, epochs, seed, recipe, training command and torch version.

Runs are deterministic for a given seed, torch build and thread count: the weights are
initialised after ``torch.manual_seed(seed)``, shuffles and shifts come from one seeded
generator, and training runs on ``threads`` threads (defaults to 1) restored afterwards.
One thread, because on a shared 2-core machine two OpenMP threads that wait for each other ran
an epoch of ResNet-20 in 117 s instead of 5 s (measured here); idle, two threads are only ~1.5x
faster.

``RECIPES`` holds how each shipped checkpoint was made; ``train_zoo_entry(name)`` (CLI
``slimdeploy zoo train NAME``, or ``python -m slimdeploy.zoo.train NAME``) retrains one and
rewrites its file in ``checkpoints/`` and its entry in ``zoo.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.loading import Preprocessing, save_checkpoint
from slimdeploy.zoo import CHECKPOINT_DIR, ZooEntry, record_entry, unknown_recipe

DATASET = "digits"


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of a demo training run.

    Attributes:
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``. Defaults to "sgd".
        lr: peak learning rate, reached after the warm-up. Defaults to 0.1.
        momentum: SGD momentum (unused by AdamW). Defaults to 0.9.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay. Defaults to 5e-4.
        batch_size: training batch size. Defaults to 64.
        warmup_epochs: epochs of linear warm-up before the cosine decay. Defaults to 1.
        label_smoothing: cross-entropy label smoothing. Defaults to 0.0.
        max_shift: largest random shift in pixels (of the model input), each axis. Defaults to 2.
        threads: torch CPU threads while training. Defaults to 1 (see the module docstring).
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    max_shift: int = 2
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer, "lr": self.lr, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "batch_size": self.batch_size,
            "warmup_epochs": self.warmup_epochs, "label_smoothing": self.label_smoothing,
            "max_shift": self.max_shift, "threads": self.threads,
        }


@dataclass(frozen=True)
class Recipe:
    """How a shipped zoo checkpoint is trained.

    Attributes:
        arch: registered architecture name.
        arch_args: its constructor arguments.
        epochs: training epochs.
        description: one line for ``zoo list``.
        settings: optimisation settings. Defaults to ``TrainSettings()``.
        seed: random seed. Defaults to 0.
    """

    arch: str
    arch_args: Mapping[str, Any]
    epochs: int
    description: str
    settings: TrainSettings = field(default_factory=TrainSettings)
    seed: int = 0


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
    from slimdeploy.data import digits_inputs, digits_statistics
    from slimdeploy.models.registry import get_arch

    settings = settings or TrainSettings()
    say = progress or (lambda _line: None)
    out_path = Path(out_path)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        info = get_arch(arch)
        torch.manual_seed(seed)
        module = info.build(**dict(arch_args))
        input_size = tuple(int(v) for v in getattr(module, "input_size", info.input_size))
        mean, std = digits_statistics()
        preprocessing = Preprocessing(input_size, mean, std)  # type: ignore[arg-type]

        x_train, y_train = digits_inputs("train", input_size, mean, std, count=train_count)
        x_held, y_held = digits_inputs("heldout", input_size, mean, std)
        x_train_t, y_train_t = torch.from_numpy(x_train), torch.from_numpy(y_train)
        # The normalised value of a black pixel: what the shifted-in border is filled with.
        background = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)

        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = math.ceil(len(x_train_t) / settings.batch_size)
        optimizer, scheduler = _optimizer(torch, module, settings, epochs, steps_per_epoch)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            module.train()
            shifted = _random_shifts(torch, x_train_t, settings.max_shift, background, generator)
            order = torch.randperm(len(shifted), generator=generator)
            total_loss, correct = 0.0, 0
            for start in range(0, len(order), settings.batch_size):
                index = order[start:start + settings.batch_size]
                inputs, labels = shifted[index], y_train_t[index]
                logits = _logits(module(inputs))
                loss = loss_fn(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(index)
                correct += int((logits.detach().argmax(1) == labels).sum())
            say(
                f"epoch {epoch:>3}/{epochs}  loss {total_loss / len(order):.4f}  "
                f"train-acc {correct / len(order):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.5f}  "
                f"{time.perf_counter() - epoch_start:.1f}s"
            )

        accuracy = evaluate(module, x_held, y_held)
        params = sum(p.numel() for p in module.parameters())
        meta = {
            "dataset": DATASET,
            "split": "heldout",
            "accuracy": accuracy,
            "heldout_images": len(y_held),
            "train_images": len(y_train),
            "epochs": epochs,
            "seed": seed,
            "settings": settings.to_dict(),
            "params": params,
            "train_command": train_command,
            "torch_version": str(torch.__version__),  # TorchVersion would pickle as a global
        }
        save_zoo_checkpoint(out_path, module, info.name, dict(arch_args), preprocessing, meta)
    finally:
        torch.set_num_threads(previous_threads)

    seconds = time.perf_counter() - started
    size = out_path.stat().st_size
    say(
        f"heldout top-1 {accuracy:.4f} ({round(accuracy * len(y_held))}/{len(y_held)}), "
        f"{params:,} params, {size / 1e6:.2f} MB, {seconds:.1f}s -> {out_path}"
    )
    return TrainResult(
        out_path, info.name, dict(arch_args), accuracy, params,
        input_size, epochs, seed, seconds, size,  # type: ignore[arg-type]
    )


def save_zoo_checkpoint(
    out_path: Path, module: Any, arch: str, arch_args: dict[str, Any], preprocessing: Preprocessing, meta: dict[str, Any]
) -> None:
    """Write a trained checkpoint atomically: under its final name in a temporary sibling
    folder, then renamed (torch.save names the archive after the file, so the bytes do not
    depend on a temporary name and a retrain reproduces the shipped file bit for bit)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        save_checkpoint(tmp_dir / out_path.name, module, arch, arch_args, preprocessing, meta)
        os.replace(tmp_dir / out_path.name, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def evaluate(module: Any, inputs: Any, labels: Any, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``module`` (put in eval mode) on numpy ``inputs`` and ``labels``.

    Args:
        module: the ``nn.Module``.
        inputs: [N, C, H, W] float32 array.
        labels: [N] int array.
        batch_size: images per forward pass. Defaults to 500.
    """
    torch = optional_import("torch", "evaluate a model")
    module.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(inputs[start:start + batch_size])
            predicted = _logits(module(batch)).argmax(1).numpy()
            correct += int((predicted == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def _logits(output: Any) -> Any:
    """The logits tensor of a model output (a tensor, or a tuple/dict holding ``logits``)."""
    if isinstance(output, Mapping):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _optimizer(torch: Any, module: Any, settings: TrainSettings, epochs: int,
               steps_per_epoch: int) -> tuple[Any, Any]:
    """Optimizer and a per-step schedule: linear warm-up, then cosine decay to zero."""
    # No weight decay on BatchNorm parameters and biases (1-D tensors), as usual for CNNs.
    decay = [p for p in module.parameters() if p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=settings.lr, momentum=settings.momentum, nesterov=True
        )
    elif settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=settings.lr)
    else:
        raise ValueError(f"unknown optimizer '{settings.optimizer}', expected 'sgd' or 'adamw'")
    total = max(1, epochs * steps_per_epoch)
    warmup = min(settings.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _random_shifts(torch: Any, images: Any, max_shift: int, background: Any, generator: Any) -> Any:
    """Each image moved by a random (dy, dx) in [-max_shift, max_shift], border filled with
    ``background`` (per channel)."""
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    pad = max_shift
    canvas = background.view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    canvas[:, :, pad:pad + h, pad:pad + w] = images
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    return torch.stack([canvas[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def recipe_command(name: str, epochs: int | None = None) -> str:
    """The command that retrains zoo entry ``name`` (as recorded in ``zoo.json``)."""
    suffix = f" --epochs {epochs}" if epochs is not None else ""
    return f"python -m slimdeploy.zoo.train {name}{suffix}"


def train_zoo_entry(
    name: str,
    out_dir: Path | None = None,
    *,
    epochs: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> ZooEntry:
    """Retrain the zoo entry ``name`` from its recipe in ``RECIPES``.

    With ``out_dir`` None the shipped checkpoint in ``slimdeploy/zoo/checkpoints/`` and its
    entry in ``zoo.json`` are rewritten. With an ``out_dir`` the checkpoint is written there and
    the package's ``zoo.json`` is left alone; the returned entry points at the new file.

    Args:
        name: zoo name, a key of ``RECIPES``.
        out_dir: folder for the checkpoint. Defaults to the package's ``checkpoints/``.
        epochs: override the recipe's epochs (for quick trials). Defaults to the recipe's.
        progress: called with progress lines. Defaults to ``print``.
    """
    from slimdeploy.zoo.train_condensenet import CONDENSE_RECIPES, train_condensenet_zoo_entry
    from slimdeploy.zoo.train_gated import GATED_RECIPES, train_gated_zoo_entry
    from slimdeploy.zoo.train_s2d import S2D_RECIPES, train_s2d_zoo_entry

    if name in GATED_RECIPES:  # SkipNets train with straight-through gates and a penalty
        return train_gated_zoo_entry(name, out_dir, epochs=epochs, progress=progress)
    if name in CONDENSE_RECIPES:  # CondenseNets train with the condensation schedule and lasso
        return train_condensenet_zoo_entry(name, out_dir, epochs=epochs, progress=progress)
    if name in S2D_RECIPES:  # S2D networks train with the multi-exit loss, then pick thresholds
        return train_s2d_zoo_entry(name, out_dir, epochs=epochs, progress=progress)
    if name not in RECIPES:
        raise unknown_recipe(name, [*RECIPES, *GATED_RECIPES, *CONDENSE_RECIPES, *S2D_RECIPES])
    recipe = RECIPES[name]
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    directory = Path(out_dir) if out_dir is not None else CHECKPOINT_DIR
    filename = f"{name}.pt"
    command = recipe_command(name, epochs)
    result = train_demo(
        recipe.arch, recipe.arch_args, directory / filename, recipe.epochs, recipe.seed,
        settings=recipe.settings, train_command=command, progress=progress,
    )
    return record_trained(name, recipe, result, result.accuracy, command, directory, shipped=out_dir is None)


def record_trained(
    name: str,
    recipe: Any,
    result: Any,
    accuracy: float,
    command: str,
    directory: Path,
    shipped: bool,
    metrics: dict[str, Any] | None = None,
) -> ZooEntry:
    """The zoo entry of a finished training run (any trainer), written to ``zoo.json`` when
    ``shipped``.

    Args:
        name: zoo name; the checkpoint is ``directory / f"{name}.pt"``.
        recipe: the recipe trained (``arch``, ``arch_args``, ``description``).
        result: the run's result (``arch``, ``params``, ``input_size``).
        accuracy: held-out top-1 of the shipped model.
        command: the command that reproduces the run.
        directory: folder of the checkpoint.
        shipped: the checkpoint replaced the package's; record it in ``zoo.json``.
        metrics: extra figures for ``zoo list`` (skip rate, kept fraction...). Defaults to none.
    """
    from slimdeploy.models.registry import get_arch

    entry = ZooEntry(
        name=name,
        arch=result.arch,
        arch_args=dict(recipe.arch_args),
        checkpoint=f"{name}.pt",
        dataset=DATASET,
        accuracy=accuracy,
        params=result.params,
        train_command=command,
        description=recipe.description,
        family=get_arch(recipe.arch).family,
        input_size=list(result.input_size),
        metrics=dict(metrics or {}),
        directory=directory,
    )
    return record_entry(entry, shipped=shipped)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slimdeploy.zoo.train NAME [--out-dir DIR] [--epochs N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m slimdeploy.zoo.train",
        description="Retrain a shipped zoo checkpoint on digits and rewrite it and its "
        "zoo.json entry.",
    )
    parser.add_argument("name", choices=sorted(RECIPES), help="zoo entry to retrain")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write the checkpoint here instead (zoo.json is then left alone)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    args = parser.parse_args(argv)
    entry = train_zoo_entry(args.name, args.out_dir, epochs=args.epochs)
    print(f"{entry.name}: heldout top-1 {entry.accuracy:.4f} -> {entry.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
