"""Hostile DragBench `meta_data.pkl` files (issue 28, probe 4 finding 3): every array the restricted unpickler would
make is bounded by its bytes, whatever the constructor and dtype, before anything is allocated."""

from __future__ import annotations

import os
import pickle
import subprocess
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from dragondiff import dragbench

MB = 2**20


class SubArrayBomb:
    """Probe 4 §3: a 40000-long array whose dtype is itself 40000 bytes (np.dtype(("u1", (40000,)))): 1.6 GB from a
    file of about 250 bytes. The shape alone (40000) passed the old bound."""

    def __reduce__(self):
        return np.ndarray, ((40000,), np.dtype(("u1", (40000,))))


class ReconstructBomb:
    """The same through numpy's own `_reconstruct(ndarray, shape, dtype)`."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (40000,), np.dtype(("u1", (40000,))))


class StructuredBomb:
    """A structured dtype of 100,000 bytes per element."""

    def __reduce__(self):
        return np.ndarray, ((20000,), np.dtype([("a", "u1"), ("b", "V99999")]))


class VoidBomb:
    def __reduce__(self):
        return np.ndarray, ((1,), np.dtype("V1600000000"))


class StringShapeBomb:
    """A sub-array dtype written as a string."""

    def __reduce__(self):
        return np.ndarray, ((40000,), "(40000,)u1")


def probe_meta(mask) -> bytes:
    """A DragBench sample's dict as the probe made it, with `mask` replaced."""
    meta = {"prompt": "a photo of a cat", "points": [[100, 100], [120, 110], [300, 200], [310, 220]], "mask": mask}
    return pickle.dumps(meta, protocol=2)


def peak_of(call) -> int:
    """Peak bytes Python and numpy allocated while `call` ran (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(call, match: str):
    def run():
        with pytest.raises(dragbench.UnsafePickleError, match=match):
            call()

    return run


@pytest.mark.parametrize("bomb", [SubArrayBomb, ReconstructBomb, StructuredBomb, VoidBomb, StringShapeBomb])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_array_bombs_are_refused_by_their_bytes_before_allocating(tmp_path, bomb, protocol):
    data = pickle.dumps({"prompt": "x", "points": [(1, 1), (2, 2)], "mask": bomb()}, protocol=protocol)
    assert len(data) < 400
    path = tmp_path / "meta_data.pkl"
    path.write_bytes(data)
    peak = peak_of(refused(lambda: dragbench.read_meta(path, image_hw=(512, 512)),
                           r"asks for an array of 1,600,000,000 bytes|2,000,000,000 bytes"))
    assert peak < 10 * MB


def sample_folder(root, name: str, meta: bytes, size: int = 512):
    folder = root / "cat" / name
    folder.mkdir(parents=True)
    Image.new("RGB", (size, size), (90, 120, 150)).save(folder / dragbench.IMAGE_NAME)
    (folder / dragbench.META_NAME).write_bytes(meta)
    return folder


def test_the_probes_246_byte_bomb_is_refused_by_read_sample_and_batch_dry_run(tmp_path):
    """Probe 4 §3: read_sample returned a 40000x40000 mask (1.8 GB) and `batch --dry-run` peaked at 4.94 GB."""
    from test_cli import EXE

    data = probe_meta(SubArrayBomb())
    assert len(data) < 300
    folder = sample_folder(tmp_path / "db", "s", data)
    peak = peak_of(refused(lambda: dragbench.read_sample(folder), r"1,600,000,000 bytes .*nothing was allocated"))
    assert peak < 10 * MB
    # the CLI, measured as the probe did: the peak resident memory of the whole command (ru_maxrss, kilobytes)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([str(EXE), "batch", str(tmp_path / "db"), "-o", str(tmp_path / "out"), "--dry-run",
                                 "--threads", "1"], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert os.waitstatus_to_exitcode(status) == 1 and "cat/s" in stderr and "1,600,000,000 bytes" in stderr, stderr
    assert usage.ru_maxrss * 1024 < 1000 * MB  # about 300 MB: Python, torch and the CLI; the bomb alone is 1.6 GB


def test_several_arrays_share_one_bound(tmp_path):
    """Many arrays each under the bound cannot add up past it (one file, many constructor calls)."""
    each = np.zeros((256, 256), np.uint8)  # 64 KiB each; 64x64 image: 131,072 bytes in all
    meta = {"prompt": "p", "points": [(1, 1), (2, 2)], "mask": each, "more": [each.copy() for _ in range(3)]}
    data = pickle.dumps(meta)
    with pytest.raises(dragbench.UnsafePickleError, match="at most 131,072 bytes in all"):
        dragbench.load_restricted(data, "x", max_bytes=131_072)
    assert dragbench.load_restricted(pickle.dumps(each), "x", max_bytes=131_072).shape == (256, 256)


def test_object_arrays_are_refused():
    with pytest.raises(dragbench.UnsafePickleError, match="object arrays are not allowed"):
        dragbench.load_restricted(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(dragbench.UnsafePickleError, match="object arrays are not allowed"):
        dragbench.load_restricted(pickle.dumps(np.zeros(2, [("a", "f8"), ("b", "O")])))


# Hand-written protocol-0 pickles: the opcodes numpy's own pickles never use, but a hostile file can.
def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def test_inst_and_obj_opcodes_are_bounded_too():
    """INST/OBJ (protocols 0 and 1) call the class with its arguments: numpy.ndarray(4_000_000_000, 'u1')."""
    inst = b"(I4000000000\nS'u1'\ninumpy\nndarray\n."
    obj = b"(" + _global("numpy", "ndarray") + b"I4000000000\nS'u1'\no."
    for data in (inst, obj):
        peak = peak_of(refused(lambda: dragbench.load_restricted(data, "x", max_bytes=10**6),
                               r"4,000,000,000 bytes \(4000000000 of uint8\)"))
        assert peak < 10 * MB


def test_array_setstate_is_bounded_before_numpy_reads_it():
    """BUILD on an array: __setstate__((version, shape, dtype, fortran, data)) with a huge shape."""
    start = _global("numpy._core.multiarray", "_reconstruct") + b"(" + _global("numpy", "ndarray") + \
        b"(I0\ntS'b'\ntR"
    state = b"(I1\n(I40000\nI40000\nt" + _global("numpy", "dtype") + b"(S'u1'\nI00\nI01\ntRI00\nS''\ntb."
    with pytest.raises(dragbench.UnsafePickleError, match=r"1,600,000,000 bytes \(40000 x 40000 of uint8\)"):
        dragbench.load_restricted(start + state, "x", max_bytes=10**6)


def test_a_dtype_cannot_change_once_an_array_uses_it():
    """A void dtype whose state is set again after an array was made with it would make that array claim far
    more memory than it holds (numpy lets dtype.__setstate__ change the itemsize of a dtype in use)."""
    dtype = _global("numpy", "dtype") + b"(S'V4'\nI00\nI01\ntRp0\n(I3\nS'|'\nNNNI4\nI1\nI0\ntb"
    array = _global("numpy", "ndarray") + b"((I3\ntg0\ntRp1\n0"
    again = b"g0\n(I3\nS'|'\nNNNI1000000\nI1\nI0\ntb0g1\n."
    assert dragbench.load_restricted(dtype + array + b"g1\n.").nbytes == 12
    with pytest.raises(dragbench.UnsafePickleError, match="an array already uses"):
        dragbench.load_restricted(dtype + array + again)
    # nor the state of a shared dtype (np.dtype('u1') without a copy is numpy's own, used everywhere)
    shared = _global("numpy", "dtype") + b"(S'u1'\nI00\nI00\ntR(I3\nS'|'\nNNNI-1\nI-1\nI0\ntb."
    with pytest.raises(dragbench.UnsafePickleError, match="did not just make"):
        dragbench.load_restricted(shared)


def test_state_of_other_objects_is_refused():
    data = b"(dp0\n(dp1\nS'a'\nI1\nsb."
    with pytest.raises(dragbench.UnsafePickleError, match="sets the state of a dict"):
        dragbench.load_restricted(data)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_ordinary_samples_still_load(protocol):
    """What real DragBench files hold (uint8 masks, maybe HxWx3, point lists, numpy scalars) loads as before."""
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[10:20, 10:30] = 255
    meta = {"prompt": "p", "points": [np.array([1.0, 2.0]), [3, 4]], "mask": mask, "n": np.float32(2)}
    out = dragbench.load_restricted(pickle.dumps(meta, protocol=protocol), "x", max_bytes=64 * 64 * 32)
    assert np.array_equal(out["mask"], mask) and out["n"] == 2 and np.array_equal(out["points"][0], [1.0, 2.0])
