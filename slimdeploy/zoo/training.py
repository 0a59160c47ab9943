"""The training machinery every zoo recipe shares: the digits set-up, the optimizer and its
schedule, seeded shifts, evaluation, atomic checkpoint writes, the zoo entry of a finished run
and the trainers' common command line.

The family recipes (``train`` for static models, ``train_gated``, ``train_condensenet``,
``train_s2d``) import from here and from nowhere else in the zoo's training code; this module
imports none of them, so the recipes form no import cycle.

Runs are deterministic for a given seed, torch build and thread count: the weights are
initialised after ``torch.manual_seed(seed)``, shuffles and shifts come from one seeded
generator, and training runs on ``threads`` threads (defaults to 1) restored afterwards.
One thread, because on a shared 2-core machine two OpenMP threads that wait for each other ran
an epoch of ResNet-20 in 117 s instead of 5 s (measured here); idle, two threads are only ~1.5x
faster.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
    """How a shipped zoo checkpoint is trained. The recipes of the other trainers (gated,
    CondenseNet, S2D) extend it with their own keyword-only fields.

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


@dataclass
class DigitsTraining:
    """What every zoo trainer sets up before its first epoch (``start_training``).

    Attributes:
        arch: the architecture's registered name.
        module: the model, built right after seeding.
        input_size: (C, H, W) it trains at.
        preprocessing: the digits normalisation at that size (stored in the checkpoint).
        x_train: training images, a [N, C, H, W] tensor.
        y_train: their labels, a [N] tensor.
        x_held: held-out images, a numpy array (``evaluate`` takes numpy).
        y_held: their labels, a numpy array.
        settings: the optimisation settings.
        optimizer: the optimizer (``_optimizer``).
        scheduler: its per-step schedule.
        steps_per_epoch: optimizer steps in one epoch.
        background: per channel, the normalised value of a black pixel (what shifts fill in).
        generator: the seeded generator every shuffle and shift draws from.
    """

    arch: str
    module: Any
    input_size: tuple[int, int, int]
    preprocessing: Preprocessing
    x_train: Any
    y_train: Any
    x_held: Any
    y_held: Any
    settings: TrainSettings
    optimizer: Any
    scheduler: Any
    steps_per_epoch: int
    background: Any
    generator: Any

    @property
    def train_size(self) -> int:
        return len(self.y_train)

    def epoch_batches(self) -> Iterator[tuple[Any, Any]]:
        """One epoch: every training image, randomly shifted, in a fresh random order, as
        (inputs, labels) batches of ``settings.batch_size``."""
        import torch

        shifted = _random_shifts(torch, self.x_train, self.settings.max_shift, self.background, self.generator)
        order = torch.randperm(len(shifted), generator=self.generator)
        for start in range(0, len(order), self.settings.batch_size):
            index = order[start:start + self.settings.batch_size]
            yield shifted[index], self.y_train[index]


def start_training(
    arch: str,
    arch_args: Mapping[str, Any],
    *,
    epochs: int,
    seed: int,
    settings: TrainSettings,
    train_count: int | None = None,
) -> DigitsTraining:
    """Seed, build ``arch``, load the digits splits at its input size, make the shift generator,
    the optimizer and its schedule, in this order: a run is reproducible bit for bit only if
    every trainer draws its random numbers in the same sequence.

    Args:
        arch: registered architecture name.
        arch_args: its constructor arguments.
        epochs: epochs the schedule spans.
        seed: seed of the weights' initialisation and of the generator.
        settings: optimisation settings.
        train_count: train on the first ``train_count`` training images only (quick tests).
            Defaults to all 1,197.
    """
    torch = optional_import("torch", "train a demo model")
    from slimdeploy.data import digits_inputs, digits_statistics
    from slimdeploy.models.registry import get_arch

    info = get_arch(arch)
    torch.manual_seed(seed)
    module = info.build(**dict(arch_args))
    input_size = tuple(int(v) for v in getattr(module, "input_size", info.input_size))
    mean, std = digits_statistics()
    x_train, y_train = digits_inputs("train", input_size, mean, std, count=train_count)
    x_held, y_held = digits_inputs("heldout", input_size, mean, std)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x_train) / settings.batch_size)
    optimizer, scheduler = _optimizer(torch, module, settings, epochs, steps_per_epoch)
    return DigitsTraining(
        arch=info.name, module=module, input_size=input_size,  # type: ignore[arg-type]
        preprocessing=Preprocessing(input_size, mean, std),  # type: ignore[arg-type]
        x_train=torch.from_numpy(x_train), y_train=torch.from_numpy(y_train), x_held=x_held, y_held=y_held,
        settings=settings, optimizer=optimizer, scheduler=scheduler, steps_per_epoch=steps_per_epoch,
        background=torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32),
        generator=generator,
    )


@contextmanager
def torch_threads(torch: Any, threads: int) -> Iterator[None]:
    """Run the block on ``threads`` torch CPU threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def save_zoo_checkpoint(
    out_path: Path, module: Any, arch: str, arch_args: dict[str, Any], preprocessing: Preprocessing, meta: dict[str, Any]
) -> None:
    """Write a trained checkpoint atomically: under its final name in a temporary sibling
    folder, then renamed (torch.save names the archive after the file, so the bytes do not
    depend on a temporary name and a retrain reproduces the shipped file bit for bit). A write
    error (full disk, read-only folder) is a ``BadInputError`` naming the path."""
    from slimdeploy.files import output_error

    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    except OSError as exc:
        raise output_error(out_path, exc) from None
    try:
        save_checkpoint(tmp_dir / out_path.name, module, arch, arch_args, preprocessing, meta)
        os.replace(tmp_dir / out_path.name, out_path)
    except OSError as exc:
        raise output_error(out_path, exc) from None
    except RuntimeError as exc:  # torch's file writer reports a failed write (a full disk) so
        raise output_error(out_path, OSError(errno.EIO, str(exc).strip())) from None
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
            predicted = model_logits(module(batch)).argmax(1).numpy()
            correct += int((predicted == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def model_logits(output: Any) -> Any:
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


def recipe_command(name: str, epochs: int | None = None, trainer: str = "train") -> str:
    """The command that retrains zoo entry ``name`` (as recorded in ``zoo.json``).

    Args:
        name: zoo name.
        epochs: the ``--epochs`` override, if any. Defaults to None.
        trainer: the trainer module in ``slimdeploy.zoo`` (``train``, ``train_gated``,
            ``train_condensenet``, ``train_s2d``). Defaults to "train".
    """
    suffix = f" --epochs {epochs}" if epochs is not None else ""
    return f"python -m slimdeploy.zoo.{trainer} {name}{suffix}"


def plan_entry(
    name: str,
    recipes: Mapping[str, Any],
    trainer: str,
    out_dir: Path | None,
    epochs: int | None,
    train_count: int | None = None,
    scale: Callable[[Any, int], Any] | None = None,
) -> tuple[Any, Path, str]:
    """What retraining zoo entry ``name`` means, for any trainer: (recipe with the ``epochs``
    override applied, folder of the checkpoint, command recorded in ``zoo.json``).

    Args:
        name: zoo name, a key of ``recipes``.
        recipes: the trainer's recipe table.
        trainer: the trainer module's name (for ``recipe_command``).
        out_dir: folder for the checkpoint; None writes over the shipped one.
        epochs: override of the recipe's epochs. Defaults to the recipe's.
        train_count: training images used (quick tests); refused over the shipped checkpoint.
        scale: how the recipe takes other epochs. Defaults to replacing ``epochs``.
    """
    if name not in recipes:
        raise unknown_recipe(name, list(recipes))
    if out_dir is None and train_count is not None:
        raise ValueError("a run on part of the training data must go to an out_dir, not over "
                         "the shipped checkpoint")
    recipe = recipes[name]
    if epochs is not None:
        recipe = scale(recipe, epochs) if scale else replace(recipe, epochs=epochs)
    directory = Path(out_dir) if out_dir is not None else CHECKPOINT_DIR
    return recipe, directory, recipe_command(name, epochs, trainer)


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


def recipe_main(
    argv: Sequence[str] | None,
    *,
    trainer: str,
    recipes: Mapping[str, Any],
    train_entry: Callable[..., ZooEntry],
    description: str,
    summary: Callable[[ZooEntry], str] = lambda _entry: "",
) -> int:
    """The command line of every trainer: ``python -m slimdeploy.zoo.TRAINER NAME [--out-dir
    DIR] [--epochs N]``; prints the held-out top-1 (and ``summary``'s figures) of the result.

    Args:
        argv: the arguments (None: ``sys.argv``).
        trainer: the trainer module's name.
        recipes: its recipe table (the names it accepts).
        train_entry: its ``train_*_zoo_entry(name, out_dir, epochs=...)``.
        description: the help text.
        summary: extra figures after the accuracy, e.g. `` (no gates 0.9960)``. Defaults to none.
    """
    parser = argparse.ArgumentParser(prog=f"python -m slimdeploy.zoo.{trainer}", description=description)
    parser.add_argument("name", choices=sorted(recipes), help="zoo entry to retrain")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write the checkpoint here instead (zoo.json is then left alone)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    args = parser.parse_args(argv)
    entry = train_entry(args.name, args.out_dir, epochs=args.epochs)
    print(f"{entry.name}: heldout top-1 {entry.accuracy:.4f}{summary(entry)} -> {entry.path}")
    return 0
