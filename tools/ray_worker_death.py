"""A Ray worker process that dies mid-edit (os._exit in DragonPipeline.edit, through tests/ray_faults.py), once or
every time: `batch --ray` should finish everything (once: Ray restarts the worker and the group runs again), or
list that one sample as failed with none of its files left (always: after --ray-retries deaths). Too slow for CI
(each death costs a worker restart); run it by hand after changing cli/ray_batch.py:

    HF_HUB_OFFLINE=1 python tools/ray_worker_death.py [--always]
"""

import json
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))


def main() -> int:
    import ray

    from test_ray import FAST, _inputs
    from dragondiff.cli import main as cli

    always = "--always" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _inputs(tmp / "in", samples=("cat/a", "cat/dies/b", "dog/c"))
        (tmp / "in/two.json").unlink()
        faults = {"once": "/never/", "always": "/never/", "die": "/dies/", "die_always": always,
                  "marker": str(tmp / "marker"), "off": str(tmp / "off")}
        env = {"DRAGONDIFF_TEST_FAULTS": json.dumps(faults),
               "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "ray_faults.install", "env_vars": env})
        try:
            code = cli(["batch", str(tmp / "in"), "-o", str(tmp / "out"), *map(str, FAST), "--ray",
                        "--ray-workers", "1"])
        finally:
            ray.shutdown()
        files = sorted(str(p.relative_to(tmp / "out")) for p in (tmp / "out").rglob("*") if p.is_file())
        died = (tmp / "marker-died").exists()
        ok = died and (code == 1 and not any("dies" in f for f in files) if always else code == 0 and len(files) == 9)
        print(json.dumps({"always": always, "exit": code, "worker_died": died, "files": files, "as_expected": ok},
                         indent=1))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
