"""An independent judge of generated images: a linear classifier over small grayscale pixels.

``generated-recognised`` is judged by the frozen pretrained CLIP, the model every client adapts
and on which the token defaults were chosen. This judge shares nothing with it: softmax
regression over a ``side`` x ``side`` grayscale copy of each image, trained on public images of
the classes (``python -m cmfl_flower.judge``: the digits' ``public`` split by default), never
by a client. With ``generation.judge`` naming its file, every generating client also reports
``generated-recognised-judge``, the share of its generated images this judge labels as their
class. The file records the judge's accuracy on the source's test split.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

SIDE = 8  # the digits' own resolution: larger images are averaged down to it
L2 = 1e-3  # weight decay of the regression, on standardised pixels
STEPS = 200  # L-BFGS iterations (full batch)
JUDGED = "generated-recognised-judge"  # the client metric this judge reports


@dataclass(frozen=True)
class PixelJudge:
    """Softmax regression over standardised ``side`` x ``side`` grayscale pixels."""

    class_names: tuple[str, ...]
    mean: torch.Tensor  # (P,), P = side * side
    std: torch.Tensor  # (P,)
    weight: torch.Tensor  # (C, P)
    bias: torch.Tensor  # (C,)
    test_accuracy: float  # on the source's test split, when it was trained

    @property
    def side(self) -> int:
        """The side of the grayscale copy each image is judged on."""
        return math.isqrt(self.mean.numel())

    def logits(self, images: npt.NDArray[np.uint8]) -> torch.Tensor:
        """(N, C) class scores of ``images`` (N, H, W, 3) uint8."""
        return pixels(images, self.side).sub(self.mean).div(self.std) @ self.weight.T + self.bias

    def predict(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """(N,) the class each image shows, by this judge."""
        return self.logits(images).argmax(dim=1).numpy().astype(np.int64)

    def recognised(self, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64]) -> float:
        """Share of ``images`` this judge labels as their ``labels``."""
        return float((self.predict(images) == labels).mean())

    def save(self, path: Path) -> None:
        """Write the judge as safetensors, the class names and accuracy in its metadata."""
        from safetensors.torch import save_file

        tensors = {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}
        metadata = {
            "class-names": json.dumps(list(self.class_names)),
            "test-accuracy": repr(self.test_accuracy),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)


def pixels(images: npt.NDArray[np.uint8], side: int) -> torch.Tensor:
    """(N, side * side) grayscale in [0, 1], averaged down from (N, H, W, 3) uint8 images."""
    gray = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=3) / 255.0  # (N, H, W)
    small = F.adaptive_avg_pool2d(gray[:, None], side)  # (N, 1, side, side)
    return small.flatten(1)


def fit(
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    class_names: tuple[str, ...],
    test: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]],
) -> PixelJudge:
    """Train the judge on ``images`` (deterministic: full-batch L-BFGS from zeros)."""
    x = pixels(images, SIDE)  # (N, P)
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-3)
    x = (x - mean) / std
    y = torch.from_numpy(labels)
    weight = torch.zeros(len(class_names), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(class_names), requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=STEPS, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = F.cross_entropy(x @ weight.T + bias, y) + L2 * weight.square().sum()
        value.backward()
        return value

    optimiser.step(loss)
    judge = PixelJudge(class_names, mean, std, weight.detach(), bias.detach(), float("nan"))
    return replace(judge, test_accuracy=judge.recognised(*test))


@cache
def load_judge(path: str) -> PixelJudge:
    """The judge saved at ``path`` (once per process); a ValueError names a bad file."""
    from safetensors import safe_open

    key = "generation.judge"
    if not Path(path).is_file():
        raise ValueError(f"{key}: no judge file {path!r} (python -m cmfl_flower.judge writes one)")
    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in ("mean", "std", "weight", "bias")}
        names = tuple(json.loads(metadata["class-names"]))
        accuracy = float(metadata["test-accuracy"])
    except Exception as err:  # a file not written by this module: say which and why
        raise ValueError(f"{key}: {path!r} is not a judge file ({err})") from err
    return PixelJudge(names, test_accuracy=accuracy, **tensors)


def judge_for(path: str, class_names: tuple[str, ...]) -> PixelJudge:
    """The judge at ``path``, checked to judge exactly ``class_names`` in that order."""
    judge = load_judge(path)
    if judge.class_names != class_names:
        raise ValueError(
            f"generation.judge: {path!r} judges classes {list(judge.class_names)}, the run's "
            f"are {list(class_names)}"
        )
    return judge


def main(argv: list[str] | None = None) -> None:
    """Train a judge on a public split and write it; print its test accuracy."""
    from cmfl_flower.data.sources import DATASETS, load_source

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--path", default="", help="a local source of --dataset")
    parser.add_argument("--split", default="public", help="what the judge learns from")
    parser.add_argument("--test-split", default="test", help="what its accuracy is measured on")
    parser.add_argument("--out", type=Path, required=True, help="the judge file to write")
    args = parser.parse_args(argv)
    train = load_source(args.dataset, args.split, args.path)
    test = load_source(args.dataset, args.test_split, args.path)
    judge = fit(train.images, train.labels, train.class_names, (test.images, test.labels))
    judge.save(args.out)
    print(
        f"judge of {len(judge.class_names)} classes trained on {len(train)} {args.split} images; "
        f"accuracy on {len(test)} {args.test_split} images {judge.test_accuracy:.3f}: {args.out}"
    )


if __name__ == "__main__":
    main()
