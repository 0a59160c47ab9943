"""Train an example network briefly on the digits data and save it for ``slimdeploy export``.

    python examples/train.py gated_mobilenet_v2 --out gated.pt
    python examples/train.py early_exit_resnet --out exits.pt

The example module (``examples/NAME.py``) gives the model factory (``NAME``), the input size and
the training loss; this script runs Adam with a cosine schedule over the digits training split
(1,197 images, random shifts of up to 2 pixels), prints held-out accuracy and what the model
decided, and saves a slimdeploy-format checkpoint (state_dict, arguments, preprocessing) that
records the factory. slimdeploy never imports that factory on its own: the export names it,
``--arch examples/NAME.py:NAME``.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch

from slimdeploy.data import digits_inputs, digits_statistics
from slimdeploy.loading import Preprocessing, save_checkpoint
from slimdeploy.nn import Exit, record_decisions
from slimdeploy.nn.exit_stage import exits as leaves

EXAMPLES = ("gated_mobilenet_v2", "early_exit_resnet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", choices=EXAMPLES)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--epochs", type=int, default=6, help="epochs over the training split (default 6)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    example = importlib.import_module(args.example)  # this folder is on sys.path when run as a script
    started = time.perf_counter()
    torch.manual_seed(0)
    model = getattr(example, args.example)()
    mean, std = digits_statistics()
    images, labels = (torch.from_numpy(a) for a in digits_inputs("train", example.INPUT_SIZE, mean, std))
    batches_per_epoch = (len(images) + 63) // 64
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 4e-3, total_steps=args.epochs * batches_per_epoch)
    for epoch in range(args.epochs):
        model.train()
        for rows in torch.randperm(len(images)).split(64):
            loss = example.training_loss(model, shifted(images[rows]), labels[rows], epoch, args.epochs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)")
    model.eval()
    calib_images, calib_labels = (torch.from_numpy(a) for a in digits_inputs("calib", example.INPUT_SIZE, mean, std))
    if hasattr(example, "choose_thresholds"):
        print(f"exit thresholds chosen on the calibration split: {example.choose_thresholds(model, calib_images, calib_labels)}")
    report(model, *(torch.from_numpy(a) for a in digits_inputs("heldout", example.INPUT_SIZE, mean, std)))
    spec = f"examples/{args.example}.py:{args.example}"
    save_checkpoint(args.out, model, spec, {}, Preprocessing(example.INPUT_SIZE, mean, std),
                    {"dataset": "digits", "trained_by": f"python examples/train.py {args.example} --epochs {args.epochs}"})
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f}s); export it with --arch {spec}")


def shifted(images: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels (one random shift per batch)."""
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,)))
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def report(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Held-out accuracy, and how often each gate ran or each exit answered."""
    with torch.no_grad(), record_decisions() as record:
        out = model(images)
    if record.executed:
        accuracy = float((out.argmax(dim=1) == labels).float().mean())
        rates = " ".join(f"{rate:.0%}" for rate in record.gates().float().mean(dim=0).tolist())
        print(f"held-out accuracy {accuracy:.1%}; gated blocks executed: {rates}")
        return
    exits = [m for m in model.modules() if isinstance(m, Exit)]
    confidence = torch.stack([e.confidence(logits) for e, logits in zip(exits, record.exit_logits)], dim=1)
    thresholds = torch.tensor([float(e.threshold) for e in exits])
    leave = leaves(confidence, thresholds, exits[0].rule)
    leave[:, -1] = True  # the last exit always answers
    stage = leave.int().argmax(dim=1)
    answers = torch.stack(record.exit_logits, dim=1)[torch.arange(len(images)), stage].argmax(dim=1)
    shares = " ".join(f"{float((stage == j).float().mean()):.0%}" for j in range(len(exits)))
    print(f"held-out accuracy {float((answers == labels).float().mean()):.1%} with early exits "
          f"(last exit alone {float((record.exit_logits[-1].argmax(dim=1) == labels).float().mean()):.1%}); "
          f"answered per exit: {shares}")


if __name__ == "__main__":
    main()
