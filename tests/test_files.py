"""Files m2iv writes (issue 16): a vectors file's checksum catches a flipped byte anywhere in
its data or metadata (older files load, saying they cannot be verified), and every file written
atomically gets the permissions the umask gives, as any file the user creates would."""
from __future__ import annotations

import json
import os
import stat
import warnings

import numpy as np
import pytest
import torch

from m2iv import M2IV, M2IVWarning, VectorsFormatError
from m2iv._atomic import atomic_path, atomic_write
from m2iv.vectors import CHECKSUM_KEY, METADATA_KEY, TENSOR_NAMES


def make(seed: int = 0, dtype=torch.float32) -> M2IV:
    g = torch.Generator().manual_seed(seed)
    return M2IV(torch.randn(3, 4, 8, generator=g), torch.rand(3, 4, generator=g),
                torch.randn(3, 32, generator=g), torch.rand(3, generator=g), (0, 1, 2),
                {"task": "caption", "model_type": "llama"}).to(dtype)


def _data_offset(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


def test_checksum_stored_and_verified(tmp_path):
    path = tmp_path / "v.safetensors"
    make().save(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert len(f.metadata()[CHECKSUM_KEY]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file with a checksum loads without a word
        M2IV.load(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flipped_byte_in_tensor_data_is_an_error(tmp_path, dtype):
    path = tmp_path / "v.safetensors"
    make(dtype=dtype).save(path)
    raw = path.read_bytes()
    start = _data_offset(raw)
    for pos in (start, start + (len(raw) - start) // 2, len(raw) - 1):  # first, middle, last
        bad = bytearray(raw)
        bad[pos] ^= 0x01  # one bit: a value that still parses, silently different
        path.write_bytes(bytes(bad))
        with pytest.raises(VectorsFormatError, match="checksum mismatch.*corrupt: restore it "
                           "from a copy"):
            M2IV.load(path)
    path.write_bytes(raw)
    assert torch.equal(M2IV.load(path).mlp, make(dtype=dtype).mlp)


def test_edited_metadata_is_an_error(tmp_path):
    """A digit changed in the header (layers [0, 1, 2] -> [0, 1, 6]) would steer another layer."""
    path = tmp_path / "v.safetensors"
    make().save(path)
    raw = path.read_bytes()
    assert raw.count(b"[0, 1, 2]") == 1
    path.write_bytes(raw.replace(b"[0, 1, 2]", b"[0, 1, 6]"))
    with pytest.raises(VectorsFormatError, match="checksum mismatch"):
        M2IV.load(path)


def test_file_without_checksum_loads_with_a_warning(tmp_path):
    """Files saved before the checksum existed still load; the fact is visible."""
    from safetensors.torch import save_file

    v = make()
    path = tmp_path / "old.safetensors"
    save_file({k: t.contiguous() for k, t in v.tensors().items()}, str(path),
              metadata={METADATA_KEY: json.dumps(dict(v.meta, layers=list(v.layers)))})
    with pytest.warns(M2IVWarning, match="no checksum.*cannot be verified.*save\\(path\\) adds"):
        w = M2IV.load(path)
    assert all(torch.equal(getattr(w, n), getattr(v, n)) for n in TENSOR_NAMES)
    w.save(path)  # re-saving adds one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M2IV.load(path)


# ---------------------------------------------------------------------- permissions

@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    atomic_write(tmp_path / "a.bin", b"x")
    with atomic_path(tmp_path / "b.bin") as tmp, open(tmp, "wb") as f:
        f.write(b"y")
    make().save(tmp_path / "v.safetensors")
    assert {_mode(tmp_path / n) for n in ("a.bin", "b.bin", "v.safetensors")} == {want}


def test_exports_and_library_files_honour_the_umask(tmp_path, umask):
    pytest.importorskip("gguf")
    from m2iv import VLibrary
    from m2iv.library import gguf_io

    want = 0o666 & ~umask
    gguf_io.write_control_vector(tmp_path / "cv.gguf", {1: np.ones(32, np.float32)}, "llama")
    with VLibrary(tmp_path / "lib") as lib:
        path = lib.path_of(lib.add(make(), "v").ref)
    assert _mode(tmp_path / "cv.gguf") == want and _mode(path) == want
