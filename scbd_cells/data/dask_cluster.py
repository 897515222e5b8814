"""Ingest's work on a ``dask.distributed`` cluster (``ingest --scheduler``).

``dask.distributed`` is optional (``pip install scbd-cells[dask]``) and imported
only here, when a scheduler is asked for. The cluster's workers run the same
tasks as ingest's local processes (read a run of cells, write whole chunks of
the output store, return their statistics) through a
:class:`concurrent.futures.Executor`, so the store, the bad-row report and
resuming are the single-machine path's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from scbd_cells.core.errors import InputError

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "scbd-cells[dask]"'
_LOCAL = re.compile(r"local:(\d+)")
_CONNECT_TIMEOUT_S = 30
# no dashboard; the scheduler's HTTP server (health checks) on a free local port, not 8787
LOCAL_SCHEDULER_OPTIONS = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise InputError(
            "--scheduler runs ingest on a dask.distributed cluster, which is not installed: "
            f"{INSTALL_HINT} (or run without --scheduler, on this machine's --workers)."
        ) from None
    return distributed


@contextlib.contextmanager
def connect(scheduler: str) -> Iterator[Client]:
    """A client of ``scheduler``: an address (``tcp://host:8786``), or ``local:N``.

    ``local:N`` starts a ``LocalCluster`` of N worker processes of one thread each
    (no dashboard) and shuts it down on leaving, also after an error.
    """
    distributed = _import_distributed()
    local = _LOCAL.fullmatch(scheduler.strip())
    if scheduler.strip().startswith("local") and (local is None or int(local.group(1)) < 1):
        raise InputError(
            f"--scheduler {scheduler!r}: write local:N with N worker processes (N >= 1), "
            "or a scheduler address such as tcp://host:8786."
        )
    with contextlib.ExitStack() as stack:
        # LocalCluster's nanny sets OMP_NUM_THREADS=1 and friends in *this* process's
        # environment for its workers; put them back, or every process started after the
        # ingest (a training, a test's subprocess) would run torch on one thread.
        stack.callback(_restore_environ, dict(os.environ))
        chatty = logging.getLogger("distributed")  # logs every connection at INFO
        stack.callback(chatty.setLevel, chatty.level)
        chatty.setLevel(max(chatty.level, logging.WARNING))
        if local is not None:
            n_workers = int(local.group(1))
            log.info("Starting a local Dask cluster of %d worker processes.", n_workers)
            cluster = stack.enter_context(
                distributed.LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    scheduler_kwargs=LOCAL_SCHEDULER_OPTIONS,
                )
            )
            address = cluster.scheduler_address
        else:
            address = scheduler.strip()
        try:
            client = distributed.Client(address, timeout=_CONNECT_TIMEOUT_S)
        except (OSError, ValueError) as error:  # unreachable (timeouts are OSErrors), malformed
            raise InputError(
                f"Cannot reach the Dask scheduler at {scheduler!r} ({error}). Start one "
                "(`dask scheduler`, then `dask worker ADDRESS` on each node) and pass the "
                "address it prints, or use --scheduler local:N on this machine."
            ) from None
        stack.enter_context(client)
        n_workers = len(client.scheduler_info()["workers"])
        log.info("Ingest on the Dask cluster at %s (%d workers now).", address, n_workers)
        if n_workers == 0:
            log.warning(
                "The Dask scheduler at %s has no workers yet: the ingest waits until some "
                "join (`dask worker %s` on the nodes).",
                address,
                address,
            )
        yield client


def _restore_environ(saved: dict[str, str]) -> None:
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def check_shared(client: Client, paths: Sequence[str]) -> None:
    """Refuse a cluster whose workers do not see ``paths`` (an image, the output folder).

    A worker without the shared file system would otherwise report its cells'
    images as missing (bad rows, left out with ``--skip-bad``): silently wrong.
    Workers that join later are not checked.
    """
    missing: dict[str, list[str]] = {}
    for path in paths:
        for worker, exists in client.run(os.path.exists, path).items():
            if not exists:
                missing.setdefault(worker, []).append(path)
    if missing:
        listed = "; ".join(f"{worker} lacks {', '.join(lost)}" for worker, lost in missing.items())
        raise InputError(
            f"Dask workers do not see the files this ingest needs ({listed}). The images and "
            "--out must be on a file system every worker mounts at the same path "
            "(docs/scaling.md, 'Ingest on a Dask cluster')."
        )


def executor(client: Client) -> Executor:
    """An executor running tasks on ``client``'s cluster (what ingest's local pool does).

    Tasks are submitted as impure (never deduplicated); a task whose worker dies is
    run again on another one by the scheduler, which is safe: ingest's tasks write
    whole chunks, the same bytes each time.
    """
    from distributed.cfexecutor import ClientExecutor

    class _ClusterExecutor(ClientExecutor):
        """Shut down only when no task of this executor runs any more.

        Cancelling a Dask task that already runs does not stop it, and a task left
        writing after an ingest starts over without bad rows would put cells of the
        old plan into the new store. So ``cancel_futures`` is not honoured: every
        submitted task finishes first (ingest keeps at most two blocks in flight).
        """

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            super().shutdown(wait=True)

    return _ClusterExecutor(client, pure=False)
