"""Coloured MNIST (paper appendix A.2.1) on scikit-learn's real handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 handwritten digits (8 x 8 px, 16 grey
levels) with the package, so this needs no download. Each digit is upscaled to
24 px (bilinear) and padded to 32 px, as MNIST's 20 px digits sit in 28 px; its
grey level g in [0, 1] is the foreground. Every digit is placed in one
environment:

- ``red`` (the paper's e = 0): red channel g, green and blue g * y / 10, so a 0 is
  pure red and the colour pales as the digit y grows;
- ``green`` (e = 1): green channel g, red and blue g * (1 - y / 10), so the colour
  darkens from light to dark green as y grows;
- ``white`` (test): all three channels g.

In the two training environments the colour alone tells the digit (with a
different code in each); in the white test environment it tells nothing. The
digit is the perturbation and the environment the batch label, so
``scbd-cells train --batch-target perturbation+batch`` is the paper's
domain-generalisation setting.

Usage::

    python examples/coloured_digits.py OUT_DIR          # tables + images + two stores
    scbd-cells train OUT_DIR/train.zarr --out run --batch-target perturbation+batch ...

Writes ``OUT_DIR/digits/{train,test}.csv`` (columns ``cell_id, digit, environment,
image_path``; images are (3, 32, 32) uint8 ``.npy`` files) and, with
:func:`ingest_coloured_digits`, the stores ``train.zarr`` (red and green digits,
split train/val/test by ingest) and ``test.zarr`` (the white digits).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

N_DIGITS = 10
ENVIRONMENTS = ("red", "green")
# train / val / test of the red and green digits: 144 cells per digit leave 14 val cells
# per digit, so that val batches of 10 digits x 8 cells draw distinct cells
SPLIT_FRACTIONS = (0.75, 0.1, 0.15)


def colour(grey: np.ndarray, digit: int, environment: str) -> np.ndarray:
    """(3, H, W) float image in [0, 1]: the grey digit coloured as appendix A.2.1.

    Parameters
    ----------
    grey
        (H, W) foreground intensity in [0, 1].
    digit
        The digit y (0-9).
    environment
        ``red``, ``green`` or ``white``.
    """
    shade = digit / N_DIGITS
    if environment == "red":
        weights = (1.0, shade, shade)
    elif environment == "green":
        weights = (1.0 - shade, 1.0, 1.0 - shade)
    elif environment == "white":
        weights = (1.0, 1.0, 1.0)
    else:
        raise ValueError(f"environment must be red, green or white, not {environment!r}")
    return np.stack([w * grey for w in weights])


def digit_images(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as (N, image_size, image_size) grey levels in [0, 1], and y."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    inner = image_size * 3 // 4  # the digit's box, as MNIST's 20 of 28 px
    grey = F.interpolate(grey, size=(inner, inner), mode="bilinear", align_corners=False)
    pad = (image_size - inner) // 2
    grey = F.pad(grey, (pad, image_size - inner - pad, pad, image_size - inner - pad))
    return grey[:, 0].clamp(0, 1).numpy(), digits.target.astype(np.int64)


def coloured_digits(
    *, seed: int = 0, test_fraction: float = 0.2, image_size: int = 32
) -> tuple[np.ndarray, pd.DataFrame]:
    """All 1,797 digits coloured: (N, 3, S, S) uint8 images and their table.

    A seeded ``test_fraction`` of each digit is white (``environment`` ``white``,
    ``test`` True); every other digit is ``red`` or ``green`` with probability 1/2,
    independently of the digit.

    Returns
    -------
    tuple
        ``(images, table)``; the table has ``cell_id, digit, environment, test``.
    """
    grey, target = digit_images(image_size)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(target), dtype=bool)
    for digit in range(N_DIGITS):
        members = np.flatnonzero(target == digit)
        n_test = round(test_fraction * len(members))
        is_test[rng.choice(members, size=n_test, replace=False)] = True
    environment = np.where(rng.random(len(target)) < 0.5, ENVIRONMENTS[0], ENVIRONMENTS[1])
    environment[is_test] = "white"
    images = np.stack(
        [
            np.rint(255 * colour(image, int(digit), str(env))).astype(np.uint8)
            for image, digit, env in zip(grey, target, environment, strict=True)
        ]
    )
    table = pd.DataFrame(
        {
            "cell_id": [f"digit{i:04d}" for i in range(len(target))],
            "digit": target.astype(str),
            "environment": environment,
            "test": is_test,
        }
    )
    return images, table


def write_coloured_digits(
    out_dir: str | Path, *, seed: int = 0, test_fraction: float = 0.2, image_size: int = 32
) -> tuple[Path, Path]:
    """Write the training (red, green) and test (white) cells tables with their images.

    The digits of :func:`coloured_digits`, one ``.npy`` file each under ``images/``.

    Returns
    -------
    tuple of Path
        ``(train.csv, test.csv)`` in ``out_dir``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, table = coloured_digits(seed=seed, test_fraction=test_fraction, image_size=image_size)
    table["image_path"] = [str(Path("images") / f"{cell}.npy") for cell in table["cell_id"]]
    for pixels, path in zip(images, table["image_path"], strict=True):
        np.save(out_dir / path, pixels)
    columns = ["cell_id", "digit", "environment", "image_path"]
    train_path, test_path = out_dir / "train.csv", out_dir / "test.csv"
    table.loc[~table["test"], columns].to_csv(train_path, index=False)
    table.loc[table["test"], columns].to_csv(test_path, index=False)
    return train_path, test_path


def ingest_coloured_digits(
    out_dir: str | Path, *, seed: int = 0, split_fractions: tuple[float, ...] = SPLIT_FRACTIONS
) -> tuple[Path, Path]:
    """Write the tables (:func:`write_coloured_digits`) and ingest them into two stores.

    Returns
    -------
    tuple of Path
        ``(OUT_DIR/train.zarr, OUT_DIR/test.zarr)``; existing stores are reused.
    """
    import scbd_cells

    out_dir = Path(out_dir)
    stores = out_dir / "train.zarr", out_dir / "test.zarr"
    if all(path.exists() for path in stores):
        return stores
    tables = write_coloured_digits(out_dir / "digits", seed=seed)
    for table, store in zip(tables, stores, strict=True):
        if not store.exists():
            scbd_cells.ingest(
                table,
                out=store,
                perturbation_column="digit",
                batch_columns=["environment"],
                image_column="image_path",
                channel_names=["red", "green", "blue"],
                split_fractions=split_fractions,
                seed=seed,
            )
    return stores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for store in ingest_coloured_digits(args.out_dir, seed=args.seed):
        print(store)


if __name__ == "__main__":
    main()
