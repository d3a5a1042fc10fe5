"""Faults injected into Ray workers (imported by each worker through Ray's worker_process_setup_hook): the edit
of an image whose path contains ONCE raises the first time any worker runs it; one containing ALWAYS raises every
time, until the file OFF exists. Configured by the environment variable DRAGONDIFF_TEST_FAULTS (JSON)."""

import json
import os


def install():
    config = json.loads(os.environ["DRAGONDIFF_TEST_FAULTS"])
    from dragondiff.pipeline import DragonPipeline

    edit = DragonPipeline.edit

    def faulty(self, spec, **kwargs):
        image = str(getattr(spec, "image", ""))
        if not os.path.exists(config["off"]):
            if config.get("die") and config["die"] in image:  # the worker process dies (once, or always)
                try:
                    os.close(os.open(config["marker"] + "-died", os.O_CREAT | os.O_EXCL))
                    os._exit(1)
                except FileExistsError:
                    if config.get("die_always"):
                        os._exit(1)
            if config["always"] in image:
                raise RuntimeError("injected fault: this worker always fails here")
            if config["once"] in image:
                try:  # the first worker to get here creates the marker and fails; every later try succeeds
                    os.close(os.open(config["marker"], os.O_CREAT | os.O_EXCL))
                    raise RuntimeError("injected fault: this worker fails once")
                except FileExistsError:
                    pass
        return edit(self, spec, **kwargs)

    DragonPipeline.edit = faulty
