"""Benchmark: reading a store on S3, by library, in cells per second.

Which library reads stores on object storage (issue 26)? This starts a local S3 server
(moto's server mode, in its own process on 127.0.0.1), uploads a synthetic store to it and reads
the same rows with

- zarr-python through its fsspec store (s3fs): ``open_store("s3://...").read(rows)``,
  what ``info``, ``train``, ``embed`` and ``baseline`` use,
- tensorstore's ``s3`` kvstore driver (``zarr3`` driver, the loader's reader on a local
  disk): ``array.oindex[rows].read()``,

rounds alternating (median of ``--rounds``), after one untimed read each; every read is
checked against the local store. Two access patterns: class-balanced batches (``--batch``
rows drawn at random: scattered chunks) and a contiguous run of ``--run`` rows (embed,
baseline). The server is local Python, so the figures compare the clients (requests,
concurrency, decoding), not a real bucket's latency.

Usage::

    python benchmarks/store_s3.py --record
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def start_server() -> subprocess.Popen:
    """A moto S3 server in its own process (not competing with the readers for the GIL) on a
    free port; credentials and endpoint set in the environment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto's server did not start")


def open_tensorstore(bucket: str, key: str) -> object:
    import tensorstore

    spec = {
        "driver": "zarr3",
        # tensorstore does not read AWS_ENDPOINT_URL: the endpoint is passed here
        "kvstore": {
            "driver": "s3",
            "bucket": bucket,
            "path": f"{key}/images/",
            "endpoint": os.environ["AWS_ENDPOINT_URL"],
        },
        "recheck_cached_data": False,
        "fill_missing_data_reads": False,
    }
    return tensorstore.open(spec, open=True, read=True).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=8000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--run", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/scbd-bench"))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    import boto3
    import s3fs
    from common import markdown_table, record, synthetic_store

    from scbd_cells.data.store import open_store

    args.work_dir.mkdir(parents=True, exist_ok=True)
    local_path = args.work_dir / f"s3bench_{args.cells}_{args.image_size}.zarr"
    local = synthetic_store(
        local_path, n_cells=args.cells, n_classes=100, image_size=args.image_size
    )
    server = start_server()
    try:
        boto3.client("s3").create_bucket(Bucket="bench")
        started = time.perf_counter()
        s3fs.S3FileSystem().put(str(local_path), "bench/screen.zarr", recursive=True)
        upload_s = time.perf_counter() - started
        remote = open_store("s3://bench/screen.zarr")
        array = open_tensorstore("bench", "screen.zarr")

        rng = np.random.default_rng(0)
        batches = [
            np.sort(rng.choice(args.cells, args.batch, replace=False)) for _ in range(args.batches)
        ]
        run = np.arange(0, min(args.run, args.cells))

        def read_zarr(rows: np.ndarray) -> np.ndarray:
            return remote.read(rows)

        def read_tensorstore(rows: np.ndarray) -> np.ndarray:
            if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
                return array[int(rows[0]) : int(rows[-1]) + 1].read().result()
            return array.oindex[rows].read().result()

        readers = {
            "zarr-python + s3fs (FsspecStore)": read_zarr,
            "tensorstore s3": read_tensorstore,
        }
        patterns = {"batches": batches, "run": [run]}
        for reader in readers.values():  # untimed: connections, metadata; pixels checked
            for rows_list in patterns.values():
                for rows in rows_list:
                    np.testing.assert_array_equal(reader(rows), local.read(rows))
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, reader in readers.items():
                for pattern, rows_list in patterns.items():
                    started = time.perf_counter()
                    for rows in rows_list:
                        reader(rows)
                    times.setdefault((name, pattern), []).append(time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait()

    rows_out = []
    for name in readers:
        batch_s = statistics.median(times[(name, "batches")])
        run_s = statistics.median(times[(name, "run")])
        rows_out.append(
            [
                name,
                args.batch * args.batches / batch_s,
                1e3 * batch_s / args.batches,
                len(run) / run_s,
            ]
        )
    size_mb = sum(f.stat().st_size for f in local_path.rglob("*") if f.is_file()) / 1e6
    body = (
        markdown_table(["reader", "batch cells/s", "ms per batch", "contiguous cells/s"], rows_out)
        + f"\n\n{args.cells:,} cells of 4 × {args.image_size} px uint16, chunks of "
        f"{local.images.chunks[0]} cells ({size_mb:.0f} MB on disk, uploaded in {upload_s:.1f} s) "
        f"on a moto S3 server in another process; {args.batches} batches of {args.batch} random "
        f"rows, and {len(run):,} contiguous rows; medians of {args.rounds} rounds, readers "
        "alternating, after one untimed read each whose pixels equal the local store's."
    )
    record("Store on S3: zarr-python + s3fs vs tensorstore s3", body, enabled=args.record)


if __name__ == "__main__":
    main()
