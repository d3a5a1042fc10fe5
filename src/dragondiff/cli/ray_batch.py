"""`dragondiff batch DIR -o OUT --ray [ADDRESS]`: the batch's pending edits as a Ray Data pipeline.

The driver (this process) reads and checks every sample and output exactly as the local batch does; only the
edits move. Edits are grouped by their image file; each group is one row of a Ray dataset, mapped by a pool of
actors (`EditWorker`) that each load the model once. A group runs on one actor, which inverts the image once for
all of the group's one-image edits that share prompt, steps and resolution, as the local batch does
(`runner.shared_inversions`: the same result as inverting per edit). Each edit
is written by the actor with the local batch's own `execute` (atomic files, sidecar last), so outputs, sidecars and
resume are the local batch's; the nodes must therefore see DIR, OUT and the model at the same paths (one machine,
or a shared file system). An edit that raises is retried on its worker `--ray-retries` times, then listed as
failed. A worker that dies (killed, out of memory) is restarted by Ray and given its group again, whose finished
edits are kept; after --ray-retries such deaths the group's unfinished edits are listed as failed, whatever they
had written is removed, and the same command finishes them.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import click

from . import signals
from .runner import (InputError, Job, execute, groups, leftover_temps, open_model, quiet_third_party,
                     shared_inversions)

LOCAL = "local"
LOCAL_OBJECT_STORE = 256 * 1024 * 1024  # the rows are job descriptions and statuses: a small store is plenty


@dataclass(frozen=True)
class RayOptions:
    address: str  # "local" or a Ray address
    workers: int | None
    gpus_per_worker: float
    cpus_per_worker: float
    retries: int

    @classmethod
    def checked(cls, address, workers, gpus, cpus, retries, root: Path, opts: dict) -> "RayOptions":
        """The --ray options, checked before anything is read: Ray installed, no option without --ray, GPUs
        asked for where the edit runs on a GPU."""
        if address is None:
            given = [name for name, v in (("--ray-workers", workers), ("--ray-gpus-per-worker", gpus),
                                          ("--ray-cpus-per-worker", cpus)) if v is not None]
            raise InputError(f"{given[0]}: given without --ray")
        if Path(address).exists() and address != LOCAL:
            raise InputError(f"--ray {address}: a path, not a Ray address; put --ray after DIR (dragondiff batch "
                             f"DIR -o OUT --ray [ADDRESS])")
        try:
            import ray.data  # noqa: F401
        except ImportError as e:
            raise InputError(f"--ray needs Ray Data: pip install 'dragondiff[ray]' ({e})") from e
        device = (opts.get("device") or "").lower()
        if gpus is None:
            gpus = 1.0 if device.startswith("cuda") else 0.0
        if device.startswith("cuda") and gpus == 0:
            raise InputError("--ray-gpus-per-worker 0 with --device cuda: a Ray worker sees no GPU unless it is given "
                             "one; give --ray-gpus-per-worker 1 (or a fraction to share one)")
        if cpus is None:
            cpus = float(opts.get("threads") or 1)
        return cls(address, workers, float(gpus), float(cpus), retries)


class AttemptCounter:
    """A Ray actor counting how often each group was started: Ray restarts a worker that died and gives it the same
    group again, without limit; a group whose worker died more than --ray-retries times is listed as failed."""

    def __init__(self):
        self.counts: dict[int, int] = {}

    def start(self, group: int) -> int:
        self.counts[group] = self.counts.get(group, 0) + 1
        return self.counts[group]


class EditWorker:
    """A Ray actor: loads the model once, then runs groups of edits (one dataset row = one group)."""

    def __init__(self, opts: dict, threads: int, retries: int, extra: dict, counter=None):
        quiet_third_party()
        self.opts, self.retries, self.extra, self.counter = opts, retries, extra, counter
        self.loaded = open_model({**opts, "threads": threads})

    def _run(self, job: Job, inversion) -> str | None:
        """None when written, else why not (after the retries)."""
        reason = None
        for _ in range(self.retries + 1):
            try:
                execute(self.loaded.pipe, job, working_size=self.opts["working_size"], preview=self.opts["preview"],
                        quiet=True, threads=self.loaded.threads, load_seconds=self.loaded.seconds,
                        inversion=inversion, extra=self.extra)
                return None
            except Exception as e:  # noqa: BLE001 (retried, then listed: one edit must not stop the batch)
                if self.opts.get("debug"):
                    traceback.print_exc()
                reason = e.format_message() if isinstance(e, click.ClickException) else f"{type(e).__name__}: {e}"
        return reason

    def __call__(self, batch: dict) -> dict:
        import ray

        out: dict[str, list] = {"index": [], "reason": []}
        for group, payload in zip(batch["group"], batch["jobs"]):
            items: list[tuple[int, Job]] = pickle.loads(payload)
            attempt = 1 if self.counter is None else ray.get(self.counter.start.remote(int(group)))
            if attempt > self.retries + 1:  # its workers died on it every time: give up on the rest of the group
                reason = f"its Ray worker died {attempt - 1} times while editing this image"
                for index, job in items:
                    out["index"].append(index)
                    out["reason"].append("" if job.written_by_us() and job.output.exists() else reason)
                continue
            # a retry after a worker died: the group's finished edits are kept (resume), the rest run
            todo = [(k, index, job) for k, (index, job) in enumerate(items)
                    if attempt == 1 or not (job.written_by_us() and job.output.exists())]
            try:
                inversions = shared_inversions(self.loaded.pipe, [job for _, _, job in todo])
            except Exception:  # noqa: BLE001 (each edit then inverts on its own, and reports its own error)
                inversions = {}
            done = {index for index, _ in items} - {index for _, index, _ in todo}
            for index in done:
                out["index"].append(index)
                out["reason"].append("")
            for position, (_, index, job) in enumerate(todo):
                out["index"].append(index)
                out["reason"].append(self._run(job, inversions.get(position)) or "")
        return out


def remove_unfinished(job: Job, preview: bool, existed: set[Path]) -> None:
    """What a worker that died mid-edit left of a job without its sidecar: its temporary files, and the files of
    it that were not there before the run (`existed`: a file the user had is never removed; a worker replaces it
    only once the whole edit is written)."""
    if job.written_by_us():
        return
    for path in job.outputs(preview):
        if path not in existed:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        for tmp in leftover_temps(path):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _worker_count(ray, options: RayOptions, n_groups: int) -> int:
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if options.gpus_per_worker > gpus:
        raise InputError(f"--ray-gpus-per-worker {options.gpus_per_worker:g}: the Ray cluster has {gpus:g} GPUs")
    if options.cpus_per_worker > cpus:
        raise InputError(f"--ray-cpus-per-worker {options.cpus_per_worker:g}: the Ray cluster has {cpus:g} CPUs")
    if options.workers is not None:  # no more than there are groups: an idle worker would load the model for nothing
        return min(options.workers, n_groups)
    fit = gpus // options.gpus_per_worker if options.gpus_per_worker else cpus // options.cpus_per_worker
    return int(max(1, min(fit, n_groups)))


def run_on_ray(pending: list[Job], opts: dict, options: RayOptions) -> tuple[int, list[tuple[str, str]]]:
    """Run the pending jobs on Ray; returns (edited, [(label, reason)] of those that failed)."""
    import logging

    import ray
    from tqdm.auto import tqdm

    level = logging.INFO if opts.get("debug") else logging.ERROR  # Ray's start-up and progress notes are noise
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    started = not ray.is_initialized()
    if started:
        kwargs = dict(include_dashboard=False, log_to_driver=bool(opts.get("debug")), logging_level=level)
        if options.address == LOCAL:
            kwargs["object_store_memory"] = LOCAL_OBJECT_STORE
        try:
            ray.init(address=None if options.address == LOCAL else options.address, **kwargs)
        except Exception as e:  # noqa: BLE001 (no cluster there, a version mismatch, ...)
            raise InputError(f"--ray {options.address}: cannot connect ({type(e).__name__}: {e})") from e
    status: dict[int, str] = {}
    error = None
    existed = {path for job in pending for path in job.outputs(opts["preview"]) if path.exists()}
    try:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        parts = groups(pending)
        workers = _worker_count(ray, options, len(parts))
        rows = [{"group": g, "jobs": pickle.dumps([(k, pending[k]) for k in part])} for g, part in enumerate(parts)]
        counter = ray.remote(num_cpus=0)(AttemptCounter).remote()
        device = opts.get("device") or ("cuda" if options.gpus_per_worker > 0 else "cpu")
        threads = max(1, int(opts.get("threads") or options.cpus_per_worker))
        extra = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                 "ray": {"address": options.address, "workers": workers}}
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            EditWorker, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
            fn_constructor_kwargs={"opts": {**opts, "device": device}, "threads": threads,
                                   "retries": options.retries, "extra": extra, "counter": counter})
        with tqdm(total=len(pending), desc=f"dragondiff batch (ray, {workers} workers)", unit="edit",
                  disable=opts.get("quiet")) as bar:
            for row in ds.iter_rows():
                signals.check()  # a signal whose exception was dropped (in a finalizer) stops the run here
                status[int(row["index"])] = str(row["reason"])
                bar.update(1)
    except KeyboardInterrupt:  # stop our runtime's workers first, then remove what they left unfinished
        if started:
            ray.shutdown()
        for job in pending:
            remove_unfinished(job, opts["preview"], existed)
        finished = sum(job.written_by_us() for job in pending)
        click.echo(f"batch interrupted: {finished} edited, {len(pending) - finished} left; the same command "
                   "resumes", err=True)
        raise
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 (a worker died, the cluster went away: the rest is listed as failed)
        error = f"Ray: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if opts.get("debug"):
            traceback.print_exc()
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    failures = []
    for k, job in enumerate(pending):
        reason = status.get(k, error or "no result from its Ray worker")
        if reason:
            remove_unfinished(job, opts["preview"], existed)
            failures.append((job.label, reason))
    return len(pending) - len(failures), failures

