"""torch adapter that reads ``.sws`` bytes back into tensors, dense or sparse CSR.

All validation happens in :func:`swsformat.container.parse` and :func:`_prepare` before a
numba kernel runs; the kernels then check only what depends on the coded bits.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import kernels
from .container import Container, RawTensor, SwsTensor, decode_header, parse, read_prelude
from .errors import SwsDecodeError, SwsFormatError, where
from .huffman import decode_table, validate_lengths
from .spec import MAX_PRELUDE, RAW_DTYPES, SWS_DTYPES, matrix_shape

PathLike = str | os.PathLike

TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_PATTERN_TORCH = {"float64": torch.int64, "float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}

# Decoded output may exceed the file by this factor (or MIN_OUTPUT_LIMIT) unless the caller
# raises the limit: a tiny hostile file cannot make the reader allocate gigabytes.
MAX_EXPANSION = 4096
MIN_OUTPUT_LIMIT = 64 * 1024 * 1024


def _nbytes(t: SwsTensor | RawTensor) -> int:
    size = SWS_DTYPES[t.dtype].itemsize if isinstance(t, SwsTensor) else RAW_DTYPES[t.dtype].itemsize
    return math.prod(t.shape) * size


def check_output_size(c: Container, file_size: int, max_output_bytes: int | None) -> None:
    """Refuse files whose decoded size is out of proportion to their size on disk."""
    limit = max_output_bytes if max_output_bytes is not None else max(MIN_OUTPUT_LIMIT, MAX_EXPANSION * file_size)
    total = sum(_nbytes(t) for t in c.tensors)
    if total > limit:
        raise SwsFormatError(
            f"tensors declare {total} decoded bytes, over the limit of {limit} for a {file_size}-byte file; "
            "pass max_output_bytes= to allow it if you trust the file"
        )


@dataclass
class _Prepared:
    row_counts: np.ndarray
    gtable: np.ndarray
    gmax: int
    vtable: np.ndarray
    vmax: int
    codebook: np.ndarray


def _prepare(t: SwsTensor) -> _Prepared:
    rows, cols = matrix_shape(t.shape)
    counts = kernels.unpack_fixed(t.row_counts, rows, t.row_bits) if t.row_bits else np.zeros(rows, np.int64)
    if rows and int(counts.max()) > cols:
        raise SwsDecodeError(f"{where(t.name, 'row_counts')}a row holds more entries than its {cols} columns")
    if int(counts.sum()) != t.entries:
        raise SwsDecodeError(f"{where(t.name, 'row_counts')}counts sum to {int(counts.sum())}, header says {t.entries} entries")
    validate_lengths(t.gaps.code_lengths, t.entries, t.name, "gaps")
    validate_lengths(t.values.code_lengths, t.entries, t.name, "values")
    gtable, gmax = decode_table(t.gaps.code_lengths)
    vtable, vmax = decode_table(t.values.code_lengths)
    codebook = np.concatenate([np.zeros(1, dtype=t.codebook.dtype), t.codebook])
    return _Prepared(counts, gtable, gmax, vtable, vmax, codebook)


def _fail(t: SwsTensor, status: int, row: int) -> None:
    if status != kernels.OK:
        at = f" (row {row})" if row >= 0 else ""
        raise SwsDecodeError(f"{where(t.name, 'payload')}{kernels.STATUS[status]}{at}")


def decode_dense_array(t: SwsTensor) -> np.ndarray:
    """Bit patterns of the dense tensor, shaped like the original."""
    rows, cols = matrix_shape(t.shape)
    p = _prepare(t)
    out = np.zeros(rows * cols, dtype=t.codebook.dtype)
    status, row = kernels.decode_dense(
        p.row_counts, cols, t.gaps.data, t.gaps.bits, p.gtable, p.gmax,
        t.values.data, t.values.bits, p.vtable, p.vmax, p.codebook, t.nonzeros, out,
    )
    _fail(t, status, row)
    return out.reshape(t.shape)


def decode_csr_arrays(t: SwsTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(crow_indices, col_indices, value patterns)`` of the tensor's 2-D view."""
    rows, cols = matrix_shape(t.shape)
    p = _prepare(t)
    crow = np.zeros(rows + 1, dtype=np.int64)
    col = np.zeros(t.nonzeros, dtype=np.int64)
    vals = np.zeros(t.nonzeros, dtype=t.codebook.dtype)
    status, row = kernels.decode_csr(
        p.row_counts, cols, t.gaps.data, t.gaps.bits, p.gtable, p.gmax,
        t.values.data, t.values.bits, p.vtable, p.vmax, p.codebook, crow, col, vals,
    )
    _fail(t, status, row)
    return crow, col, vals


def _patterns_to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(arr.view(arr.dtype.str.replace("u", "i"))).view(TORCH_DTYPES[dtype])


def tensor_from_entry(t: SwsTensor | RawTensor, device: torch.device | str = "cpu", sparse: bool = False) -> torch.Tensor:
    """Decode one container entry to a torch tensor on ``device``."""
    if isinstance(t, RawTensor):
        arr = np.frombuffer(t.data, dtype=RAW_DTYPES[t.dtype]).copy()
        out = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if t.dtype == "bfloat16" else torch.from_numpy(arr)
        return out.reshape(t.shape).to(device)
    if sparse and len(t.shape) >= 2:
        crow, col, vals = decode_csr_arrays(t)
        size = matrix_shape(t.shape)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            # The kernel has already validated the structure, so torch need not check it again.
            out = torch.sparse_csr_tensor(
                torch.from_numpy(crow), torch.from_numpy(col), _patterns_to_torch(vals, t.dtype),
                size=size, check_invariants=False,
            )
        return out.to(device)
    return _patterns_to_torch(decode_dense_array(t), t.dtype).to(device)


def _read(path: PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise SwsFormatError(f"{path}: is a directory, not a .sws file") from None


def load(
    data: bytes, device: torch.device | str = "cpu", sparse: bool = False, max_output_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Decode ``.sws`` bytes into a state_dict (see :func:`load_state_dict`)."""
    c = parse(data)
    check_output_size(c, len(data), max_output_bytes)
    return {t.name: tensor_from_entry(t, device, sparse) for t in c.tensors}


def load_state_dict(
    path: PathLike, device: torch.device | str = "cpu", sparse: bool = False, max_output_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Load a ``.sws`` file into a state_dict of tensors on ``device``.

    Args:
        path: the file.
        device: torch device for every tensor.
        sparse: return coded tensors of 2+ dimensions as ``torch.sparse_csr_tensor`` of
            their 2-D view ``(shape[0], prod(shape[1:]))``.
        max_output_bytes: refuse files that decode to more bytes (default: the larger of
            64 MiB and 4096 times the file size).

    Example:
        >>> import swsformat
        >>> sd = swsformat.load_state_dict("/tmp/tiny.sws")  # doctest: +SKIP
    """
    return load(_read(path), device, sparse, max_output_bytes)


def read_container(path: PathLike) -> Container:
    """Parse and validate a whole file without decoding its payload streams."""
    return parse(_read(path))


def read_header(path: PathLike) -> dict[str, Any]:
    """Read only the prelude and header (no payload), checking the header CRC."""
    with open(path, "rb") as f:
        head = f.read(MAX_PRELUDE)
        prelude = read_prelude(head)
        head += f.read(prelude.length + prelude.stored + 4 - len(head))
    return decode_header(head, prelude)


def build_architecture(arch: Mapping[str, Any] | None) -> nn.Module:
    """Instantiate the architecture a file names (one of the built-in registry)."""
    from .retrain.models import build_model

    if arch is None:
        raise SwsFormatError("the file names no architecture: pass the module to load_model(path, module)")
    return build_model(arch["name"], **arch["kwargs"])


def load_model(
    path: PathLike,
    module: nn.Module | None = None,
    device: torch.device | str = "cpu",
    sparse: bool = False,
    strict: bool = True,
) -> nn.Module:
    """Load a ``.sws`` file into ``module`` (or the file's built-in architecture) in eval mode.

    With ``sparse=True`` linear and conv layers run on CSR weights (see
    :mod:`swsformat.sparse`). ``strict`` is passed to ``load_state_dict``; missing or
    unexpected keys raise.
    """
    raw = _read(path)
    c = parse(raw)
    check_output_size(c, len(raw), None)
    sd = {t.name: tensor_from_entry(t, "cpu", False) for t in c.tensors}
    if module is None:
        # Built on the meta device: no random initialisation of weights that are replaced at once
        # (a third of the load time of LeNet-5-Caffe); the decoded tensors become the parameters,
        # in the architecture's own dtypes (a float16 file still gives a float32 model).
        with torch.device("meta"):
            module = build_architecture(c.architecture)
        ref = module.state_dict()
        sd = {k: v.to(ref[k].dtype) if k in ref else v for k, v in sd.items()}
        try:
            module.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            name = c.architecture["name"] if c.architecture else "?"
            detail = " ".join(str(e).split())
            raise SwsFormatError(f"the file's tensors do not fit its architecture {name!r}: {detail}") from None
    else:
        module.load_state_dict(sd, strict=strict)
    module = module.to(device).eval()
    if sparse:
        from .sparse import sparsify_

        sparsify_(module)
    return module
