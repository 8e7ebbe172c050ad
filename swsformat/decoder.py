"""Container tensors -> torch tensors, dense or sparse CSR (no file access: see :mod:`.reader`).

Every header fact (code tables included) is validated by :mod:`swsformat.container` before
a tensor gets here; :func:`_prepare` checks the row counts, and the kernels check only what
depends on the coded bits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import ctxcoder, kernels
from .container import ContextTensor, RawTensor, SparseRawTensor, SwsTensor
from .errors import SwsDecodeError, where
from .huffman import decode_table
from .spec import RAW_DTYPES, matrix_shape

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
    gtable, gmax = decode_table(t.gaps.code_lengths)
    vtable, vmax = decode_table(t.values.code_lengths)
    codebook = np.concatenate([np.zeros(1, dtype=t.codebook.dtype), t.codebook])
    return _Prepared(counts, gtable, gmax, vtable, vmax, codebook)


def _fail(t: SwsTensor, status: int, row: int) -> None:
    if status != kernels.OK:
        at = f" (row {row})" if row >= 0 else ""
        raise SwsDecodeError(f"{where(t.name, 'payload')}{kernels.STATUS[status]}{at}")


def _context_symbols(t: ContextTensor | SparseRawTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR ``(crow, columns, symbols 1..K-1)`` of a context-coded tensor (kind 5: symbols all 1)."""
    if isinstance(t, SparseRawTensor):
        data, negative, estimator, field = t.positions, ctxcoder.POSITIONS_ONLY, ctxcoder.COUNTING, "positions"
    else:
        data, negative, field = t.data, ctxcoder.negative_symbols(t.codebook), "payload"
        estimator = ctxcoder.COUNTING if t.counting else ctxcoder.TWO_RATE
    status, row, crow, col, syms = ctxcoder.decode_tensor(data, t.shape, negative, t.nonzeros, estimator)
    if status != kernels.OK:
        at = f" (row {row})" if row >= 0 else ""
        raise SwsDecodeError(f"{where(t.name, field)}{ctxcoder.STATUS[status]}{at}")
    return crow, col, syms


def _sparse_raw_into(t: SparseRawTensor, out: np.ndarray) -> None:
    """Scatter a kind 5 tensor's values into ``out`` (1-D, zeroed, an integer dtype of the item size)."""
    crow, col, _ = _context_symbols(t)
    ctxcoder.scatter_values(crow, col, np.frombuffer(t.values, dtype=out.dtype), matrix_shape(t.shape)[1], out)


def decode_dense_array(t: SwsTensor | ContextTensor, out: np.ndarray | None = None) -> np.ndarray:
    """Bit patterns of the dense tensor, shaped like the original; into ``out`` (1-D, the
    codebook's dtype, zeroed here) when given."""
    rows, cols = matrix_shape(t.shape)
    if out is None:
        out = np.zeros(rows * cols, dtype=t.codebook.dtype)
    else:
        out.fill(0)
    if isinstance(t, ContextTensor):
        crow, col, syms = _context_symbols(t)
        ctxcoder.scatter(crow, col, syms, t.codebook, cols, out)
        return out.reshape(t.shape)
    if t.entries == 0:  # nothing coded: no per-row work, whatever the row count
        return out.reshape(t.shape)
    p = _prepare(t)
    status, row = kernels.decode_dense(
        p.row_counts, cols, t.gaps.data, t.gaps.bits, p.gtable, p.gmax,
        t.values.data, t.values.bits, p.vtable, p.vmax, p.codebook, t.nonzeros, out,
    )
    _fail(t, status, row)
    return out.reshape(t.shape)


def decode_csr_arrays(t: SwsTensor | ContextTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(crow_indices, col_indices, value patterns)`` of the tensor's 2-D view."""
    rows, cols = matrix_shape(t.shape)
    if isinstance(t, ContextTensor):
        crow, col, syms = _context_symbols(t)
        return crow, col, t.codebook[syms - 1]
    crow = np.zeros(rows + 1, dtype=np.int64)
    col = np.zeros(t.nonzeros, dtype=np.int64)
    vals = np.zeros(t.nonzeros, dtype=t.codebook.dtype)
    if t.entries == 0:
        return crow, col, vals
    p = _prepare(t)
    status, row = kernels.decode_csr(
        p.row_counts, cols, t.gaps.data, t.gaps.bits, p.gtable, p.gmax,
        t.values.data, t.values.bits, p.vtable, p.vmax, p.codebook, crow, col, vals,
    )
    _fail(t, status, row)
    return crow, col, vals


def _patterns_to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(arr.view(arr.dtype.str.replace("u", "i"))).view(TORCH_DTYPES[dtype])


def tensor_from_entry(t: SwsTensor | ContextTensor | RawTensor | SparseRawTensor, device: torch.device | str = "cpu",
                      sparse: bool = False) -> torch.Tensor:
    """Decode one container entry to a torch tensor on ``device``."""
    if isinstance(t, SparseRawTensor):
        out = torch.zeros(t.shape, dtype=TORCH_DTYPES[t.dtype])
        decode_into(t, out)
        return out.to(device)
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
            ).to(device)
        if len(t.shape) > 2:  # the kernel's own shape, for encode() of this state_dict
            out.sws_shape = tuple(t.shape)
        return out
    return _patterns_to_torch(decode_dense_array(t), t.dtype).to(device)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def decode_into(t: SwsTensor | ContextTensor | RawTensor | SparseRawTensor, target: torch.Tensor) -> bool:
    """Decode ``t`` straight into ``target``'s memory (no second copy) when it is a contiguous
    CPU tensor of the same dtype and shape; False (nothing written) otherwise."""
    if (target.device.type != "cpu" or target.layout != torch.strided or not target.is_contiguous()
            or target.dtype != TORCH_DTYPES[t.dtype] or tuple(target.shape) != tuple(t.shape)):
        return False
    flat = target.detach().reshape(-1).view(_SAME_SIZE_INT[target.element_size()]).numpy()
    if isinstance(t, RawTensor):
        flat[:] = np.frombuffer(t.data, dtype=flat.dtype)
    elif isinstance(t, SparseRawTensor):
        flat.fill(0)
        _sparse_raw_into(t, flat)
    else:
        decode_dense_array(t, flat.view(t.codebook.dtype))
    return True


def codebook_values(t: SwsTensor | ContextTensor) -> np.ndarray:
    """The tensor's shared non-zero values as float64 (bfloat16 patterns included)."""
    torch_dtype = TORCH_DTYPES[t.dtype]
    bits = torch.from_numpy(t.codebook.view(t.codebook.dtype.str.replace("u", "i")).copy())
    return bits.view(torch_dtype).to(torch.float64).numpy()


def symbol_counts(t: SwsTensor | ContextTensor, which: str) -> np.ndarray:
    """How often each symbol of the ``gaps`` or ``values`` stream occurs (nothing dense);
    a context-coded tensor has values only (symbol 0 counts nothing)."""
    if isinstance(t, ContextTensor):
        if which != "values":
            raise ValueError(f"a context-coded tensor has no {which!r} stream")
        syms = _context_symbols(t)[2]
        return np.bincount(syms, minlength=t.codebook.size + 1)
    s = getattr(t, which)
    if t.entries == 0:
        return np.zeros(s.code_lengths.size, dtype=np.int64)
    table, maxlen = decode_table(s.code_lengths)
    symbols, status = kernels.decode_symbols(s.data, s.bits, table, maxlen, t.entries)
    if status != kernels.OK:
        raise SwsDecodeError(f"{where(t.name, which)}{kernels.STATUS[status]}")
    return np.bincount(symbols, minlength=s.code_lengths.size)


def value_counts(t: SwsTensor | ContextTensor) -> np.ndarray:
    """How many weights take each codebook value."""
    return symbol_counts(t, "values")[1:]
