"""Benchmark: reading OME-Zarr fields of view, by reader, in fields per second on one core.

Ingest reads every field of view once, whole, at multiscale level 0. This writes
``--fields`` OME-Zarr images with ome-zarr-py's writer (NGFF 0.5, its default pyramid),
then reads each one's level 0 as a (C, H, W) numpy array with

- zarr-python following the NGFF metadata (``scbd_cells.data.ome_zarr.read_ome_zarr``,
  what ingest uses),
- ome-zarr-py's reader (``Reader(parse_url(path))``, the node's dask array computed),
- tensorstore (the level's array opened with the ``zarr3`` driver),

rounds alternating, and checks that all three return the same pixels. The same fields as
OME-TIFF through tifffile are the reference of the format ingest read before.

Usage::

    python benchmarks/ingest_ome.py --record
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_fields(work_dir: Path, *, n_fields: int, channels: int, size: int) -> list[Path]:
    """``n_fields`` fields of smooth noise as OME-Zarr (and OME-TIFF beside them)."""
    import tifffile
    import zarr
    from ome_zarr.writer import write_image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(n_fields):
        pixels = rng.integers(0, 4000, (channels, size, size), dtype=np.uint16)
        path = work_dir / f"field{index:03d}.ome.zarr"
        write_image(pixels, zarr.open_group(str(path), mode="w"), axes="cyx")
        tifffile.imwrite(work_dir / f"field{index:03d}.ome.tif", pixels, ome=True)
        paths.append(path)
    return paths


def read_ome_zarr_py(path: Path) -> np.ndarray:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(path)))()))
    return np.asarray(node.data[0].compute(scheduler="synchronous"))  # one core, as a worker


_TENSORSTORE_CONTEXT = None


def read_tensorstore(path: Path) -> np.ndarray:
    import tensorstore

    from scbd_cells.data.ome_zarr import describe_ome_zarr

    global _TENSORSTORE_CONTEXT
    if _TENSORSTORE_CONTEXT is None:  # one context (thread pools, cache) for every read
        _TENSORSTORE_CONTEXT = tensorstore.Context()
    image = describe_ome_zarr(path)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": image.array_path}}
    array = tensorstore.open(spec, read=True, context=_TENSORSTORE_CONTEXT).result()
    return array.read().result()


def read_zarr_python(path: Path) -> np.ndarray:
    from scbd_cells.data.ome_zarr import read_ome_zarr

    return read_ome_zarr(path)


def read_ome_tiff(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path.with_name(path.name.replace(".ome.zarr", ".ome.tif")))


def main() -> None:
    from common import markdown_table, record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/scbd-bench-ome"))
    parser.add_argument("--fields", type=int, default=24)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="field side in px")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append to docs/performance-log.md")
    args = parser.parse_args()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    paths = write_fields(
        args.work_dir, n_fields=args.fields, channels=args.channels, size=args.size
    )
    readers = {
        "zarr-python + NGFF metadata (ingest)": read_zarr_python,
        "ome-zarr-py Reader (dask)": read_ome_zarr_py,
        "tensorstore zarr3": read_tensorstore,
        "OME-TIFF, tifffile (reference)": read_ome_tiff,
    }
    expected = [read_ome_tiff(path) for path in paths]
    for reader in readers.values():  # untimed: imports and first-use set-up (tensorstore: ~3 s)
        reader(paths[0])
    seconds: dict[str, list[float]] = {name: [] for name in readers}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.rounds):
        for name, reader in readers.items():
            started, cpu_started, checking = time.perf_counter(), time.process_time(), 0.0
            for path, pixels in zip(paths, expected, strict=True):
                pixels_read = reader(path)
                check_started = time.perf_counter()
                if not np.array_equal(pixels_read, pixels):
                    raise SystemExit(f"{name} read other pixels from {path}")
                checking += time.perf_counter() - check_started
            seconds[name].append(time.perf_counter() - started - checking)
            cpu_seconds[name].append(time.process_time() - cpu_started - checking)
    field_mb = args.channels * args.size * args.size * 2 / 1e6
    rows = []
    for name, times in seconds.items():
        wall, cpu = statistics.median(times), statistics.median(cpu_seconds[name])
        rows.append(
            [name, args.fields / wall, args.fields * field_mb / wall, 1000 * wall / args.fields,
             1000 * cpu / args.fields]
        )  # fmt: skip
    header = ["reader", "fields/s", "MB/s", "ms per field", "CPU ms per field"]
    body = (
        markdown_table(header, rows)
        + f"\n\n{args.fields} fields of {args.channels} × {args.size} × {args.size} uint16 "
        f"({field_mb:.1f} MB each), written by ome-zarr-py (NGFF 0.5, default pyramid and "
        f"compression), read whole at level 0 (dask's synchronous scheduler; tensorstore with "
        "its default thread pools, one context shared by all reads); medians of "
        f"{args.rounds} rounds in which the readers take turns, after one untimed read each "
        "(imports, set-up), warm page cache; the pixel check is not timed (CPU: this "
        "process's time, all threads). All readers return the same pixels."
    )
    record("Ingest: OME-Zarr readers", body, enabled=args.record)


if __name__ == "__main__":
    main()
