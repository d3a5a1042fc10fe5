"""Sidecars and a flat spec file written by the release before the typed task parameters (v0.1.0, db81b78) re-run
to the same image, bit for bit, on the bundled model (tests/data/sidecars: 128 px scenes, 4 steps).

The release wrote them on an AVX2-only CPU running torch's AVX2 kernels (their sidecars predate the `cpu_kernels`
and `cpu_isa` fields). Another CPU rounds differently: on an AVX-512 CPU two of the move's 16,384 pixels and one of
the appearance's came out one grey level off, and even with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 one
of the move's pixels did on one AVX-512 machine (on another all five matched): oneDNN and MKL still choose some code
by the hardware. So every check here is exact only on an AVX2-only CPU running AVX2 kernels (the fixtures' own
kind), and within a grey level, in at most 0.1 % of the pixels, elsewhere."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import cli

SIDECARS = Path(__file__).parent / "data" / "sidecars"
NAMES = ("move", "drag", "appearance", "paste", "move-region")
ADDED_FIELDS = {"image_prompt": False, "ip_scale": 0.1, "ip_routing": "official"}


FIXTURE_KERNELS = "AVX2"  # torch's kernels in force when the fixtures were made
FIXTURE_ISA = "AVX2"  # ... on a CPU whose widest vector ISA was AVX2


def read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def assert_same(image: np.ndarray, want: np.ndarray, name: str, kernels: str | None = None) -> None:
    """Bit for bit on the fixtures' kind of CPU running their kernels (`kernels`: those of a subprocess, when they
    are not this process's); elsewhere at most 1 grey level, in at most 0.1 % of the pixels."""
    from dragondiff.provenance import cpu_isa, cpu_kernels

    kernels = kernels or cpu_kernels()
    if (cpu_isa(), kernels) == (FIXTURE_ISA, FIXTURE_KERNELS):
        assert np.array_equal(image, want), name
        return
    diff = np.abs(image.astype(int) - want).max(-1)
    assert diff.max() <= 1 and (diff > 0).sum() <= diff.size // 1000, (name, cpu_isa(), kernels, diff.max(),
                                                                       int((diff > 0).sum()))


@pytest.fixture(scope="module")
def bundled():
    from dragondiff import DragonPipeline
    from dragondiff.shapes import model

    if not model.is_available():
        pytest.skip("the bundled model's weights are not installed")
    return DragonPipeline.bundled(device="cpu")


def _rerun(pipe, data: dict, base_dir: Path):
    from dragondiff import EditSpec
    from dragondiff.output import full_resolution

    spec = EditSpec.from_dict(data, base_dir=base_dir)
    result = pipe.edit(spec, progress=False)
    return spec, result, np.asarray(full_resolution(result, spec.image))


@pytest.mark.parametrize("name", NAMES)
def test_release_sidecar_reruns_bit_for_bit(bundled, name):
    sidecar = json.loads((SIDECARS / f"{name}.json").read_text())
    spec, result, image = _rerun(bundled, sidecar["spec"], SIDECARS)
    assert_same(image, read(SIDECARS / sidecar["output"]["file"]), name)
    # The resolved spec still serialises to what the release wrote (flat JSON, every default filled), minus the
    # other tasks' fields, which the release wrote as null.
    again = json.loads(result.spec.to_json())
    again["image"], sidecar["spec"]["image"] = Path(again["image"]).name, Path(sidecar["spec"]["image"]).name
    for key in ("mask", "reference", "reference_mask", "reference_region"):
        if isinstance(again.get(key), str):
            again[key] = Path(again[key]).name
    # Fields added after the release (the image prompt) resolve to values that change nothing without an adapter.
    assert {k: again.pop(k) for k in ADDED_FIELDS} == ADDED_FIELDS
    assert again == {k: v for k, v in sidecar["spec"].items() if k in again}
    assert all(sidecar["spec"][k] is None for k in set(sidecar["spec"]) - set(again))


def test_release_flat_spec_file_reruns_bit_for_bit(bundled):
    path = SIDECARS / "specs" / "move-region.json"
    _, _, image = _rerun(bundled, json.loads(path.read_text()), path.parent)
    assert_same(image, read(SIDECARS / "move-region.png"), "move-region")


def test_release_sidecars_through_the_cli(bundled, tmp_path):
    """`dragondiff run` on every sidecar at once (the sidecars name the bundled model), on the fixtures' CPU
    kernels: bit for bit on an AVX2-only CPU, within a grey level on others (where the pin narrows the gap)."""
    from dragondiff.provenance import KERNEL_ENV

    pin = dict(item.split("=") for item in KERNEL_ENV[FIXTURE_KERNELS].split())
    out = cli("run", *[SIDECARS / f"{n}.json" for n in NAMES], "-o", tmp_path, "--threads", "1", "-q", env=pin)
    assert out.returncode == 0, out.stderr
    for name in NAMES:
        assert_same(read(tmp_path / f"{name}.png"), read(SIDECARS / f"{name}.png"), name, kernels=FIXTURE_KERNELS)


def test_a_sidecar_of_other_cpu_kernels_says_so_and_how_to_match_them(tmp_path):
    """A CPU sidecar records torch's CPU kernels; re-run where they differ, it says that pixels may differ and, for
    AVX2, how to run those kernels; where they are the same, nothing."""
    from dragondiff.provenance import cpu_kernels

    sidecar = json.loads((SIDECARS / "move.json").read_text())
    sidecar["spec"] = {k: (str(SIDECARS / v) if k in ("image", "mask") and v else v) for k, v in sidecar["spec"].items()}
    now, other = cpu_kernels(), "AVX2" if cpu_kernels() != "AVX2" else "DEFAULT"
    for recorded, noted in ((now, False), (other, True)):
        (tmp_path / "move.json").write_text(json.dumps({**sidecar, "cpu_kernels": recorded}))
        out = cli("run", tmp_path / "move.json", "-o", tmp_path / "again.png", "--dry-run")
        assert out.returncode == 0, out.stderr
        note = f"made with torch's {recorded} CPU kernels, this CPU runs {now}"
        assert (note in out.stderr) == noted, out.stderr
        if noted:
            assert ("ATEN_CPU_CAPABILITY=" in out.stderr) == (recorded in ("AVX2", "DEFAULT")), out.stderr


def test_what_the_kernels_note_promises_follows_the_recorded_cpu(monkeypatch):
    """Same kernels on the same kind of CPU: no note. Other kernels: a note; the pin is promised to give the same
    pixels only when the sidecar was made on this kind of CPU (on another, or when the kind is not recorded, it
    narrows the gap: an AVX2 sidecar re-ran 1 pixel off on an AVX-512 CPU with the pin). Same kernels on another
    kind of CPU: a note, no pin."""
    from dragondiff import provenance

    monkeypatch.setattr(provenance, "cpu_kernels", lambda: "AVX512")
    monkeypatch.setattr(provenance, "cpu_isa", lambda: "AVX512")
    base = {"device": "cpu"}
    assert provenance.kernels_change({**base, "cpu_kernels": "AVX512", "cpu_isa": "AVX512"}) is None
    assert provenance.kernels_change({**base, "cpu_kernels": "AVX512"}) is None
    assert provenance.kernels_change({"device": "cuda", "cpu_kernels": "AVX2"}) is None

    same_cpu = provenance.kernels_change({**base, "cpu_kernels": "AVX2", "cpu_isa": "AVX512"})
    assert "for the same pixels run it with ATEN_CPU_CAPABILITY=avx2" in same_cpu, same_cpu
    for made_on in ("AVX2", None):
        note = provenance.kernels_change({**base, "cpu_kernels": "AVX2", "cpu_isa": made_on})
        assert "made with torch's AVX2 CPU kernels, this CPU runs AVX512" in note, note
        assert "ATEN_CPU_CAPABILITY=avx2" in note and "closer elsewhere" in note, note
        assert "for the same pixels" not in note, note
    pinned = provenance.kernels_change({**base, "cpu_kernels": "AVX512", "cpu_isa": "AVX2"})
    assert "made on a CPU with AVX2, this one has AVX512" in pinned and "ATEN_CPU" not in pinned, pinned
    assert "closer" not in provenance.kernels_change({**base, "cpu_kernels": "NEON", "cpu_isa": "AVX512"})


def test_sidecars_record_the_cpus_own_isa_apart_from_the_kernels_in_force(tmp_path):
    """A pinned run records the kernels it ran and the CPU's own ISA, which the pin does not change."""
    from dragondiff.provenance import cpu_isa

    sidecar = json.loads((SIDECARS / "move.json").read_text())
    sidecar["spec"] = {k: (str(SIDECARS / v) if k in ("image", "mask") and v else v) for k, v in sidecar["spec"].items()}
    (tmp_path / "move.json").write_text(json.dumps(sidecar))
    out = cli("run", tmp_path / "move.json", "-o", tmp_path / "again.png", "--threads", "1", "-q",
              env={"ATEN_CPU_CAPABILITY": "default"})
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "again.json").read_text())
    assert written["cpu_kernels"] == "DEFAULT" and written["cpu_isa"] == cpu_isa(), written
