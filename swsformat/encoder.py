"""torch adapter that turns a quantized model or state_dict into ``.sws`` bytes.

Compressible tensors (by default a module's weights by layer type, see
:mod:`swsformat.selection`; for a bare state_dict, floating tensors of two or more dimensions
named like a weight) must take at most 255 distinct non-zero values; they are coded
as codebook + relative-index CSR + canonical Huffman streams. Everything else is stored
raw. The same input always gives the same bytes.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
from torch import nn

from . import __version__, ctxcoder, kernels
from .container import (
    AliasTensor,
    Container,
    ContextTensor,
    RawTensor,
    SparseRawTensor,
    Stream,
    SwsTensor,
    output_bytes,
    serialize,
)
from .errors import SwsEncodeError, where
from .files import atomic_write, check_output
from .huffman import canonical_codes, code_lengths
from .selection import Compress, selector
from .spec import (
    FORMAT_VERSION,
    MAX_CODEBOOK,
    MAX_EXPANSION,
    MAX_INDEX_BITS,
    MAX_NAME,
    MIN_OUTPUT_LIMIT,
    RAW_DTYPES,
    SWS_DTYPES,
    VERSIONS,
    default_index_bits,
    matrix_shape,
)

IndexBits = int | str | None | Mapping[str, int | str]
AUTO_RANGE = range(1, 13)
CODERS = ("auto", "context", "huffman")
# "auto" and the context coder: it decodes every position of a live row (8 ns each on one core
# for a 10%-dense layer) where Huffman decodes only stored entries (0.8 ns per position there;
# benchmarks/coders.json), so "auto" takes it only where every byte it saves pays for
# CONTEXT_AUTO_POSITIONS positions of decode (~35 us per byte saved), never above
# CONTEXT_AUTO_MAX elements, and above CONTEXT_AUTO_SMALL elements only where it saves
# CONTEXT_AUTO_SHARE of the bytes. On the paper's nets it saves 3-20% per layer and is kept;
# on a random 1024x1024 layer pruned to 10% it saves 1.7% and would decode ~10x slower.
CONTEXT_AUTO_MAX = 1 << 22
CONTEXT_AUTO_POSITIONS = 4096
CONTEXT_AUTO_SMALL = 1 << 16
CONTEXT_AUTO_SHARE = 0.03
# On tensors of CONTEXT_SAMPLE_FROM elements or more, "auto" first codes CONTEXT_SAMPLE_SHARE
# of the rows (CONTEXT_SAMPLE_BLOCKS blocks spread over the tensor) and codes the whole only
# where that sample says the rule above would keep it: on GPT-2 pruned and clustered the
# context coder saves 1-2.5% on every layer, is never kept, and was most of encode's time.
CONTEXT_SAMPLE_FROM = 1 << 20
CONTEXT_SAMPLE_SHARE = 0.125
CONTEXT_SAMPLE_BLOCKS = 4
# An uncoded expanded view at least this large (and 8x its storage) gets a warning.
EXPANDED_WARN_BYTES = 1 << 20


def _context_pays(saved: int, numel: int, other_bytes: int) -> bool:
    """The "auto" rule above: ``saved`` bytes against the other coding's ``other_bytes``."""
    return (saved > 0 and saved * CONTEXT_AUTO_POSITIONS >= numel
            and (numel <= CONTEXT_AUTO_SMALL or saved >= CONTEXT_AUTO_SHARE * other_bytes))


_TORCH_DTYPES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_PATTERN = {"float64": torch.int64, "float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}


def kept_names(keep: Iterable[str], names: Iterable[str]) -> set[str]:
    """The names ``keep`` picks: exact names, or shell-style patterns (``lm_head.*``,
    ``*.c_fc.weight``; see :mod:`fnmatch`). An entry that picks nothing is an error (a typo
    would otherwise leave the tensor quantized without a word)."""
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
        raise SwsEncodeError(f"keep must be tensor names or patterns (a list of str), got {type(keep).__name__}")
    names = list(names)
    present = set(names)
    picked: set[str] = set()
    for k in keep:
        if not isinstance(k, str):
            raise SwsEncodeError(f"keep must be tensor names or patterns (a list of str), got an item {k!r}")
        hits = {k} & present or set(fnmatch.filter(names, k))
        if not hits:
            raise SwsEncodeError(f"keep: {k!r} matches no tensor of the state_dict")
        picked |= hits
    return picked


def tie_key(t: torch.Tensor) -> tuple:
    """Equal for two state_dict entries that are one tensor under two names (tied weights):
    same storage position, shape, strides, dtype and device, and no lazy negation or
    conjugation on one of them (``x._neg_view()`` shares ``x``'s memory but not its values)."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride(), t.is_neg(), t.is_conj())


def tie_groups(sd: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Each name's tie group: every name of the same tensor, in state_dict order (a name of
    an empty tensor stands alone)."""
    by_key: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        by_key.setdefault(tie_key(t) if t.numel() else ("empty", name), []).append(name)
    return {name: members for members in by_key.values() for name in members}


def group_coded(members: list[str], keep: set[str], selected: Callable[[str, torch.Tensor], bool],
                sd: Mapping[str, torch.Tensor]) -> bool:
    """One decision for a tie group: left as it is if ``keep`` names any of its names, else
    coded (or quantized) if any of them is selected."""
    return not any(n in keep for n in members) and any(selected(n, sd[n]) for n in members)


def _state_dict(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)
    # A model loaded with sparse=True holds conv kernels as CSR matrices (out, in*kh*kw); its
    # layers know the kernel's shape, which the file must keep to load into the original module.
    shapes = {f"{n}.weight" if n else "weight": m.dense_shape for n, m in obj.named_modules()
              if isinstance(getattr(m, "dense_shape", None), tuple)} if isinstance(obj, nn.Module) else {}
    dense: dict[tuple, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise SwsEncodeError(f"state_dict entry {k!r} is not a (str, Tensor) pair")
        if len(k) > MAX_NAME:
            raise SwsEncodeError(f"tensor name {k[:40]!r}... has {len(k)} characters; names are limited to {MAX_NAME}")
        try:
            k.encode("utf-8")
        except UnicodeEncodeError:
            raise SwsEncodeError(f"tensor name {k!r} is not valid text (a lone surrogate): rename it") from None
        if v.is_meta:
            raise SwsEncodeError(f"{where(k)}is on the meta device (it has a shape but no data): load or "
                                 "materialize the weights (e.g. model.to_empty(device='cpu') and load them) first")
        if type(v).__name__ == "DTensor":
            raise SwsEncodeError(
                f"{k!r} is sharded (a DTensor, e.g. from FSDP's fully_shard): gather the whole model first, e.g. "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                "full_state_dict=True, cpu_offload=True)) on every rank, then encode that on rank 0"
            )
        if v.layout != torch.strided:  # e.g. a model or state_dict loaded with sparse=True
            # One dense tensor per stored CSR tensor: a layer under two names stays tied.
            csr = v.layout == torch.sparse_csr and v.values().numel()
            key = (v.values().data_ptr(), tuple(v.shape)) if csr else (id(v),)
            if key not in dense:
                shape = shapes.get(k, getattr(v, "sws_shape", None))
                if shape is not None and (not isinstance(shape, tuple) or math.prod(shape) != v.numel()):
                    raise SwsEncodeError(f"{where(k)}is a {tuple(v.shape)} sparse tensor whose recorded kernel shape "
                                         f"{shape!r} does not hold as many elements")
                dense[key] = v.to_dense() if shape is None else v.to_dense().reshape(shape)
            sd[k] = dense[key]
    return sd


def _patterns(t: torch.Tensor, dtype: str) -> np.ndarray:
    """The tensor's bit patterns as unsigned integers (bit-exact, sign of zero kept)."""
    t = t.detach().cpu().resolve_neg().resolve_conj().contiguous()
    return t.view(_PATTERN[dtype]).numpy().view(SWS_DTYPES[dtype]).reshape(-1)


def _raw(name: str, t: torch.Tensor) -> RawTensor:
    dtype = _TORCH_DTYPES.get(t.dtype)
    if dtype is None:
        raise SwsEncodeError(f"{where(name, 'dtype')}{t.dtype} cannot be stored; supported: {sorted(RAW_DTYPES)}")
    t = t.detach().cpu().resolve_neg().resolve_conj().contiguous()
    if dtype == "bool":  # a bool tensor viewed from other bytes may hold 2..255: store 0/1
        t = t.view(torch.uint8).ne(0)
    arr = t.view(torch.int16).numpy() if dtype == "bfloat16" else t.numpy()
    data = np.ascontiguousarray(arr).astype(RAW_DTYPES[dtype], copy=False).reshape(-1).view(np.uint8)
    return RawTensor(name, dtype, tuple(t.shape), data)


# A NaN is never a value a model means to store; an infinity can be (a -inf attention mask
# buffer), but not in a parameter, which these names are. Checked CHECK_CHUNK values at a time.
_PARAMETER_NAME = re.compile(r".*(weight|bias)(_\w+)?")
CHECK_CHUNK = 1 << 20


def _check_values(name: str, t: torch.Tensor) -> None:
    """Refuse a NaN in any floating tensor and an infinity in a weight or bias, by name."""
    if not t.is_floating_point() or not t.numel():
        return
    flat = t.detach().reshape(-1)
    infinite_ok = not _PARAMETER_NAME.fullmatch(name.rsplit(".", 1)[-1])
    for start in range(0, flat.numel(), CHECK_CHUNK):
        c = flat[start:start + CHECK_CHUNK]
        if bool(torch.isnan(c).any()) or (not infinite_ok and bool(torch.isinf(c).any())):
            what = "NaN" if bool(torch.isnan(flat).any()) else "infinite"
            raise SwsEncodeError(f"{where(name)}holds {what} values; fix the checkpoint before encoding it")


RAW_DTYPE_CHOICES = (torch.float32, torch.float16, torch.bfloat16)


def _lowered(name: str, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, str | None]:
    """``t`` in the narrower ``dtype`` for ``raw_dtype=``, and a warning when non-zero values
    became zero; a finite value it cannot hold (float16 tops out at 65504) is an error, not a
    silent infinity."""
    _check_values(name, t)
    src = t.detach()
    low = src.to(dtype)
    keep_it = f"keep it at full precision with keep=[{name!r}] (--keep {name})"
    if bool((torch.isinf(low) & torch.isfinite(src)).any()):
        biggest = float(src.abs().max())
        wider = "use raw_dtype=torch.bfloat16 (--raw-dtype bfloat16), or " if dtype == torch.float16 else ""
        raise SwsEncodeError(f"{where(name)}holds values up to {biggest:.6g}, beyond {dtype}'s largest finite value "
                             f"{torch.finfo(dtype).max:.6g}: {wider}{keep_it}")
    lost = int(((low == 0) & (src != 0)).sum())
    warning = (f"{where(name)}{lost} non-zero values are too small for {dtype} and are stored as 0; {keep_it} if "
               "they matter") if lost else None
    return low, warning


def _expanded_warning(name: str, t: torch.Tensor) -> str | None:
    """A warning for a large non-zero expanded view (a stride-0 dimension), which the file stores
    at its logical size while ``torch.save`` stores only the storage behind it."""
    logical = t.numel() * t.element_size()
    if logical < EXPANDED_WARN_BYTES or not any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return None
    held = t.untyped_storage().nbytes()
    if held * 8 > logical or not bool(t.any()):  # an all-zero tensor costs its row mask only
        return None
    return (f"{where(name)}an expanded view (a stride-0 dimension) of {held} bytes of storage is stored at its "
            f"full {logical} bytes; store the tensor before .expand() and expand it after loading to keep the file small")


def _stored(name: str, t: torch.Tensor, coder: str, version: int) -> RawTensor | SparseRawTensor:
    """``t`` uncoded: its raw bytes, or (version 3) only its non-zero elements' bytes with their
    positions context-coded (kind 5) where that is smaller by the rule :func:`_sws` uses for
    the context coder (``coder="context"``: wherever it is smaller; "huffman": never)."""
    _check_values(name, t)
    raw = _raw(name, t)
    numel = t.numel()
    if version < 3 or coder == "huffman" or not numel:
        return raw
    item = RAW_DTYPES[raw.dtype].itemsize
    elements = raw.data.view(f"<u{item}" if item > 1 else np.uint8)
    if coder == "auto" and numel > CONTEXT_AUTO_MAX:
        # Too large to context-code the positions of, unless there are none: an all-zero
        # tensor (a buffer, an expanded zero) costs its row mask, whatever its size.
        if elements.any():
            return raw
        return SparseRawTensor(name, raw.dtype, raw.shape, 0, ctxcoder.encode_tensor(
            np.zeros(numel, np.uint8), raw.shape, ctxcoder.POSITIONS_ONLY, ctxcoder.COUNTING), np.zeros(0, np.uint8))
    present = elements != 0
    nonzeros = int(np.count_nonzero(present))
    most = raw.data.size - nonzeros * item - 4  # what it could save at best (positions cost >= 4 bytes)
    if most <= 0 or (coder == "auto" and not _context_pays(most, numel, raw.data.size)):
        return raw
    positions = ctxcoder.encode_tensor(present.view(np.uint8), raw.shape, ctxcoder.POSITIONS_ONLY, ctxcoder.COUNTING)
    sparse = SparseRawTensor(name, raw.dtype, raw.shape, nonzeros, positions, elements[present].view(np.uint8))
    raw_bytes = _entry_bytes(raw, version)
    saved = raw_bytes - _entry_bytes(sparse, version)
    return sparse if (saved > 0 if coder == "context" else _context_pays(saved, numel, raw_bytes)) else raw


def _huffman(symbols: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> Stream:
    """The stream of ``symbols``, whose histogram and code lengths the plan already holds."""
    data, bits = kernels.pack_codes(symbols, canonical_codes(lengths).astype(np.int64), lengths.astype(np.int64))
    if bits != int((counts * lengths).sum()):
        raise AssertionError(f"the planned histogram disagrees with the {symbols.size} symbols coded")
    return Stream(lengths, int(bits), data)


def _stream_bits(counts: np.ndarray) -> int:
    """Huffman bits of a stream with these symbol counts (the 15-bit depth limit ignored: it
    binds only for extremely skewed counts, and this only ranks index widths)."""
    return int(kernels.huffman_cost(np.asarray(counts, dtype=np.int64)))


def best_index_bits(symbols: np.ndarray, rows: int, cols: int, candidates: Iterable[int] = AUTO_RANGE) -> int:
    """The gap width that gives the smallest coded size (gaps + values + row counts).

    Computed from the distances between consecutive non-zeros, so each candidate costs
    a few histograms, not another pass over the tensor.
    """
    return _width_plan(symbols, rows, cols, candidates).bits


@dataclass
class _Plan:
    """A tensor's relative-index CSR at one gap width, before any stream is built: enough to
    size the Huffman-coded tensor exactly."""

    bits: int
    entries: int
    nonzeros: int
    row_most: int  # the most entries of any row
    gap_counts: np.ndarray
    value_counts: np.ndarray

    @functools.cached_property
    def gap_lengths(self) -> np.ndarray:
        return code_lengths(self.gap_counts)

    @functools.cached_property
    def value_lengths(self) -> np.ndarray:
        return code_lengths(self.value_counts)


def _width_plan(symbols: np.ndarray, rows: int, cols: int, candidates: Iterable[int] = AUTO_RANGE,
                values: int = 256) -> _Plan:
    """:func:`best_index_bits`'s width with its entry count, non-zeros and stream histograms
    (the value histogram over ``values`` symbols: zero and the codebook)."""
    candidates = list(candidates)
    hist, val_base, row_most = kernels.index_width_stats(symbols, rows, cols, max(candidates))
    nonzeros = int(val_base.sum())
    if not nonzeros:  # nothing to store: the narrowest width will do
        candidates = [min(candidates)]
    # Per candidate only histograms (at most ``cols`` long) are touched, not the non-zeros.
    ks = np.arange(hist.size, dtype=np.int64)
    best: _Plan | None = None
    best_bits = 0
    for b in candidates:
        span = 1 << b
        nfill = int((hist * (ks >> b)).sum())
        gap_counts = np.bincount(ks & (span - 1), weights=hist, minlength=span).astype(np.int64)
        gap_counts[span - 1] += nfill
        val_counts = val_base[:values].copy()
        val_counts[0] += nfill
        table_bits = 4 * span
        total = (_stream_bits(gap_counts) + _stream_bits(val_counts) + rows * int(row_most[b]).bit_length()
                 + table_bits)
        if best is None or total < best_bits:
            best, best_bits = _Plan(int(b), nonzeros + nfill, nonzeros, int(row_most[b]), gap_counts, val_counts), total
    assert best is not None
    return best


def _symbols(name: str, t: torch.Tensor) -> tuple[str, np.ndarray, np.ndarray]:
    """(dtype, codebook patterns sorted, one uint8 symbol per element: 0 = zero, s = codebook[s-1])."""
    dtype = _TORCH_DTYPES[t.dtype]
    pats = _patterns(t, dtype)
    # One pass with a small hash table (no sort of the whole tensor): at most 255 non-zero
    # values plus zero can be coded, so the table stops as soon as there are more.
    count, distinct, index = kernels.symbolize(pats, MAX_CODEBOOK + 1)
    if count > MAX_CODEBOOK + 1 or (count == MAX_CODEBOOK + 1 and not np.any(distinct == 0)):
        _check_values(name, t)  # a NaN is the problem to name first, not the count of values
        nonzero_values = int(np.unique(pats).size) - int(np.any(pats == 0))
        raise SwsEncodeError(
            f"{where(name)}has {nonzero_values} distinct non-zero values; a .sws tensor may hold at most "
            f"{MAX_CODEBOOK}. Quantize it first (swsformat.compress for soft weight-sharing, or "
            "swsformat.quantize.prune_and_cluster for post-training k-means), or keep it raw via keep=[...]"
        )
    finite = (distinct & 0x7F80) != 0x7F80 if dtype == "bfloat16" else np.isfinite(distinct.view(dtype))
    if not np.all(finite):
        raise SwsEncodeError(f"{where(name)}holds NaN or infinite values, which cannot be coded")
    # Symbol 0 is zero; 1..K-1 index the codebook (sorted by bit pattern, deterministic).
    codebook = np.sort(distinct[distinct != 0])
    sym_of_index = np.where(distinct == 0, 0, np.searchsorted(codebook, distinct) + 1).astype(np.uint8)
    kernels.remap(index, sym_of_index)
    return dtype, codebook, index


def _negative_zeros_warning(name: str, codebook: np.ndarray, symbols: np.ndarray) -> str | None:
    """-0.0 is a value of its own (the file keeps every bit), so each one is a stored entry.
    Pruning by ``w * mask`` makes one of every pruned negative weight: say so when they are many."""
    negative_zero = 1 << (8 * codebook.dtype.itemsize - 1)
    at = np.flatnonzero(codebook == negative_zero)
    if not at.size:
        return None
    count = int(np.count_nonzero(symbols == at[0] + 1))
    if count <= max(16, symbols.size // 100):
        return None
    return (f"{where(name)}holds {count} negative zeros (-0.0), stored bit-exactly as non-zero entries (pruning by "
            "w * mask makes one of every pruned negative weight): add 0.0 to the tensor (w.add_(0.0)) to store them "
            "as zeros")


def _plan(name: str, shape: tuple[int, ...], symbols: np.ndarray, index_bits: int | str | None,
          values: int) -> _Plan:
    """The plan at the width ``index_bits`` asks for, for ``values`` symbols (zero and the codebook)."""
    rows, cols = matrix_shape(shape)
    if index_bits == "auto":
        return _width_plan(symbols, rows, cols, values=values)
    bits = default_index_bits(len(shape)) if index_bits is None else int(index_bits)
    if not 1 <= bits <= MAX_INDEX_BITS:
        raise SwsEncodeError(f"{where(name, 'index_bits')}{bits} is outside [1, {MAX_INDEX_BITS}]")
    return _width_plan(symbols, rows, cols, [bits], values)


def _huffman_tensor(name: str, dtype: str, shape: tuple[int, ...], codebook: np.ndarray, symbols: np.ndarray,
                    plan: _Plan) -> SwsTensor:
    rows, cols = matrix_shape(shape)
    counts, gaps, vals = kernels.build_entries(symbols, rows, cols, plan.bits, plan.entries)
    entries = int(gaps.size)
    if entries != int(counts.sum()) or entries != plan.entries:
        raise AssertionError(f"{where(name)}the entry count ({plan.entries}) disagrees with the tensor's entries")
    row_bits = int(counts.max()).bit_length() if entries else 0
    row_data = kernels.pack_bits(counts, np.full(rows, row_bits, dtype=np.int64), rows * row_bits)
    return SwsTensor(
        name=name,
        dtype=dtype,
        shape=shape,
        index_bits=plan.bits,
        codebook=codebook,
        nonzeros=plan.nonzeros,
        entries=entries,
        row_bits=row_bits,
        row_counts=row_data,
        gaps=_huffman(gaps, plan.gap_counts, plan.gap_lengths),
        values=_huffman(vals, plan.value_counts, plan.value_lengths),
    )


def _huffman_bytes(name: str, dtype: str, shape: tuple[int, ...], codebook: np.ndarray, plan: _Plan) -> int:
    """``_entry_bytes`` of the Huffman-coded tensor, from its plan, without building the
    streams (a tensor the context coder takes is then never Huffman coded): the same
    sections and index; only the deflated index may differ by a byte, which the CRCs of the
    real sections move, and so the file by its alignment (8 bytes)."""
    rows, _ = matrix_shape(shape)

    def stream(counts: np.ndarray, lengths: np.ndarray) -> Stream:
        bits = int((counts * lengths).sum())
        return Stream(lengths, bits, np.zeros((bits + 7) // 8, np.uint8))

    row_bits = plan.row_most.bit_length() if plan.entries else 0
    skeleton = SwsTensor(name=name, dtype=dtype, shape=shape, index_bits=plan.bits, codebook=codebook,
                         nonzeros=plan.nonzeros, entries=plan.entries, row_bits=row_bits,
                         row_counts=np.zeros((rows * row_bits + 7) // 8, np.uint8),
                         gaps=stream(plan.gap_counts, plan.gap_lengths),
                         values=stream(plan.value_counts, plan.value_lengths))
    return _entry_bytes(skeleton, 3)


def _context_tensor(name: str, dtype: str, shape: tuple[int, ...], codebook: np.ndarray,
                    symbols: np.ndarray) -> ContextTensor:
    data = ctxcoder.encode_tensor(symbols, shape, ctxcoder.negative_symbols(codebook), ctxcoder.COUNTING)
    return ContextTensor(name, dtype, shape, codebook, int(np.count_nonzero(symbols)), data)


def _sws(name: str, t: torch.Tensor, index_bits: int | str | None,
         coder: str = "huffman") -> tuple[SwsTensor | ContextTensor, str | None]:
    """The tensor coded by ``coder`` ("huffman", "context", or "auto": the context coder where
    :func:`_context_pays`, up to CONTEXT_AUTO_MAX elements; else Huffman), and a warning about
    its negative zeros, if any."""
    dtype, codebook, symbols = _symbols(name, t)
    warning = _negative_zeros_warning(name, codebook, symbols)
    shape = tuple(int(s) for s in t.shape)
    if coder == "context":
        return _context_tensor(name, dtype, shape, codebook, symbols), warning
    plan = _plan(name, shape, symbols, index_bits, codebook.size + 1)
    if coder == "huffman" or symbols.size > CONTEXT_AUTO_MAX:
        return _huffman_tensor(name, dtype, shape, codebook, symbols, plan), warning
    huff_bytes = _huffman_bytes(name, dtype, shape, codebook, plan)
    if _context_may_pay(shape, codebook, symbols, huff_bytes):
        ctx = _context_tensor(name, dtype, shape, codebook, symbols)
        if _context_pays(huff_bytes - _entry_bytes(ctx, 3), symbols.size, huff_bytes):
            return ctx, warning
    return _huffman_tensor(name, dtype, shape, codebook, symbols, plan), warning


def _context_may_pay(shape: tuple[int, ...], codebook: np.ndarray, symbols: np.ndarray, huff_bytes: int) -> bool:
    """False where a sample says the context coder would not pay (:func:`_context_pays`): on
    tensors of CONTEXT_SAMPLE_FROM elements or more, blocks of rows spread over the tensor
    (CONTEXT_SAMPLE_SHARE of it) are context-coded and scaled up to the whole, so that the
    whole is coded twice only where the context coder may be kept."""
    rows, cols = matrix_shape(shape)
    blocks = CONTEXT_SAMPLE_BLOCKS
    height = int(rows * CONTEXT_SAMPLE_SHARE) // blocks
    if symbols.size < CONTEXT_SAMPLE_FROM or height < 1:
        return True
    grid = symbols.reshape(rows, cols)
    sample = np.concatenate([grid[i * rows // blocks:][:height] for i in range(blocks)]).reshape(-1)
    coded = ctxcoder.encode_tensor(sample, (height * blocks, *shape[1:]), ctxcoder.negative_symbols(codebook),
                                   ctxcoder.COUNTING)
    # A sample understates the saving (the adaptive models learn per row and column on fewer
    # rows: 2.2% where the whole saves 4.2%), so half of what the rule asks is enough here.
    estimate = coded.size * rows / (height * blocks)
    return _context_pays(2 * int(huff_bytes - estimate), symbols.size, huff_bytes)


def _architecture(obj: Any, architecture: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if architecture is None:
        found = getattr(obj, "sws_architecture", None)
        if found is None:
            return None
        architecture = found
    if isinstance(architecture, str):
        return {"name": architecture, "kwargs": {}}
    return {"name": str(architecture["name"]), "kwargs": dict(architecture.get("kwargs", {}))}


# Coding a tensor costs about 300 bytes of header and code tables; above this raw size it
# always pays, below it ``smallest=True`` compares the two forms byte for byte.
SMALLEST_CHECK_BYTES = 1 << 20


def _entry_bytes(t: RawTensor | SparseRawTensor | SwsTensor | ContextTensor, version: int) -> int:
    """Size of a file that holds ``t`` alone: its header entry (deflated with the rest of the
    header in version 2), code tables and sections."""
    return len(serialize(Container([t], {}, None, "", version)))


def _coded(name: str, t: torch.Tensor, index_bits: int | str | None, how: str, version: int,
           smallest: bool) -> tuple[RawTensor | SparseRawTensor | SwsTensor | ContextTensor, str | None]:
    """A selected tensor coded (or stored, where ``smallest`` finds that smaller), and the
    warning to give about it, if any (given by the caller: warnings belong on its thread)."""
    coded, warning = _sws(name, t, index_bits, how if version >= 3 else "huffman")
    if smallest and t.numel() * t.element_size() <= SMALLEST_CHECK_BYTES:
        raw = _stored(name, t, how, version)
        if _entry_bytes(raw, version) <= _entry_bytes(coded, version):
            coded = raw
    return coded, warning


def in_order(plan: list) -> Iterator[Any]:
    """The results of the plan's callables (None for its other entries), in order. The first
    error in order is raised and the work not yet started is dropped."""
    threads = min(numba.get_num_threads(), sum(callable(p) for p in plan))
    if threads <= 1:
        for p in plan:
            yield p() if callable(p) else None
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="sws-encode")
    try:
        futures = [pool.submit(p) if callable(p) else None for p in plan]
        for f in futures:
            yield None if f is None else f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def to_container(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    compress: Compress = None,
    keep: Iterable[str] = (),
    index_bits: IndexBits = "auto",
    metadata: Mapping[str, str] | None = None,
    architecture: str | Mapping[str, Any] | None = None,
    smallest: bool = True,
    coder: str | Mapping[str, str] = "auto",
    version: int = FORMAT_VERSION,
    raw_dtype: torch.dtype | None = None,
) -> Container:
    """Build the in-memory :class:`Container` (see :func:`encode` for the arguments)."""
    if version not in VERSIONS:
        raise SwsEncodeError(f"cannot write format version {version!r} (versions {list(VERSIONS)})")
    if raw_dtype is not None and raw_dtype not in RAW_DTYPE_CHOICES:
        raise SwsEncodeError(f"raw_dtype must be None or one of {list(RAW_DTYPE_CHOICES)}, got {raw_dtype!r}")
    chosen_coders = dict(coder) if isinstance(coder, Mapping) else {}
    for c in [coder] if isinstance(coder, str) else list(chosen_coders.values()):
        if c not in CODERS:
            raise SwsEncodeError(f"coder must be one of {list(CODERS)} (or a mapping of names to them), got {c!r}")
        if version < 3 and c == "context":
            raise SwsEncodeError(f"format version {version} has no context coder; write version 3 or use coder='huffman'")
    sd = _state_dict(model_or_state_dict)
    keep = kept_names(keep, sd)
    selected = selector(model_or_state_dict, compress, sd)
    # Per tensor, either the name it aliases or the work that codes it; the work runs on numba's
    # thread count (the kernels release the GIL), results keep the state_dict's order.
    plan: list[str | Callable[[], Any]] = []
    stored: dict[tuple, str] = {}
    # Tied weights (one tensor under several names) are stored once (version 3) and are one
    # decision (group_coded).
    group = tie_groups(sd)
    for name, t in sd.items():
        if version >= 3 and t.numel():
            key = tie_key(t)
            if key in stored:
                plan.append(stored[key])
                continue
            stored[key] = name
        how = chosen_coders.get(name, "auto") if isinstance(coder, Mapping) else coder
        kept = any(n in keep for n in group[name])
        if group_coded(group[name], keep, selected, sd):
            if _TORCH_DTYPES.get(t.dtype) not in _PATTERN:
                raise SwsEncodeError(f"{where(name, 'dtype')}{t.dtype} cannot be coded (coded tensors are float16, "
                                     "bfloat16, float32 or float64): convert it, or leave it out with keep=")
            ib = index_bits.get(name) if isinstance(index_bits, Mapping) else index_bits
            plan.append(functools.partial(_coded, name, t, ib, how, version, smallest))
        else:
            if raw_dtype is not None and not kept and t.is_floating_point() and t.element_size() > raw_dtype.itemsize:
                t, lost = _lowered(name, t, raw_dtype)
                if lost:
                    warnings.warn(lost, stacklevel=3)
            expanded = _expanded_warning(name, t)
            if expanded:
                warnings.warn(expanded, stacklevel=3)
            plan.append(functools.partial(_stored, name, t, how, version))
    tensors: list[RawTensor | SparseRawTensor | SwsTensor | ContextTensor | AliasTensor] = []
    for (name, _), step, done in zip(sd.items(), plan, in_order(plan)):
        if isinstance(step, str):
            tensors.append(AliasTensor(name, step))
            continue
        coded, warning = done if isinstance(done, tuple) else (done, None)
        if warning:
            warnings.warn(warning, stacklevel=3)
        tensors.append(coded)
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SwsEncodeError(f"metadata must map strings to strings, got {k!r}: {v!r}")
    return Container(tensors, meta, _architecture(model_or_state_dict, architecture), f"swsformat {__version__}", version)


def encode_bytes(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    compress: Compress = None,
    keep: Iterable[str] = (),
    index_bits: IndexBits = "auto",
    metadata: Mapping[str, str] | None = None,
    architecture: str | Mapping[str, Any] | None = None,
    smallest: bool = True,
    coder: str | Mapping[str, str] = "auto",
    version: int = FORMAT_VERSION,
    raw_dtype: torch.dtype | None = None,
) -> bytes:
    """Like :func:`encode` but return the file's bytes."""
    c = to_container(
        model_or_state_dict, compress=compress, keep=keep, index_bits=index_bits, metadata=metadata,
        architecture=architecture, smallest=smallest, coder=coder, version=version, raw_dtype=raw_dtype,
    )
    data = serialize(c)
    needed = sum(output_bytes(t.kind, t.dtype, t.shape, getattr(t, "nonzeros", 0), getattr(t, "coder", "huffman"))
                 for t in c.tensors if not isinstance(t, AliasTensor))
    if needed > max(MIN_OUTPUT_LIMIT, MAX_EXPANSION * len(data)):
        warnings.warn(
            f"the file decodes to {needed} bytes, more than readers allow by default for a {len(data)}-byte file: "
            f"read it with max_output_bytes={needed} (CLI: --max-output-bytes {needed})",
            stacklevel=2,
        )
    return data


def encode(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    compress: Compress = None,
    keep: Iterable[str] = (),
    index_bits: IndexBits = "auto",
    metadata: Mapping[str, str] | None = None,
    architecture: str | Mapping[str, Any] | None = None,
    smallest: bool = True,
    coder: str | Mapping[str, str] = "auto",
    version: int = FORMAT_VERSION,
    raw_dtype: torch.dtype | None = None,
) -> int:
    """Write a quantized model to a ``.sws`` file atomically; return the file size in bytes.

    Args:
        model_or_state_dict: an ``nn.Module`` or a state_dict of tensors.
        path: target file; replaced atomically (a temp file in its folder, fsynced, then
            renamed over it: readers never see a partial file). A symlink at ``path`` is
            replaced by the file, as ``mv`` does; its old target is left untouched.
        compress: names (or a ``(name, tensor) -> bool`` predicate) of the tensors to code;
            default: for a module, the weights of its Linear, ConvNd, ConvTranspose, Embedding,
            Bilinear, RNN/LSTM/GRU and MultiheadAttention layers and transformers' Conv1D
            (:func:`swsformat.selection.default_filter`: not norms, biases or a custom
            module's own parameters); for a bare state_dict, floating tensors of 2+ dimensions
            named like those weights (``*.weight``, ``*.weight_ih_l0``, ``*.in_proj_weight``).
        keep: names or shell-style patterns (``"lm_head.*"``) of tensors to store raw even
            if selected; each must match a tensor.
        index_bits: gap width in bits: ``"auto"`` (default: the width that gives the
            smallest tensor), ``None`` (Deep Compression's 5 for linear, 8 for conv), an int,
            or a per-name mapping of those.
        metadata: free-form ``str -> str`` user metadata.
        architecture: registered architecture name or ``{"name", "kwargs"}``; taken from the
            module's ``sws_architecture`` attribute when not given.
        smallest: store a selected tensor raw when a file holding that tensor alone is not
            larger that way (default; small tensors such as biases: a codebook and code
            tables cost ~150-300 bytes). Both forms decode to the same bit patterns.
        coder: how coded tensors are entropy coded (version 3): ``"auto"`` (default: per
            tensor the context coder where it saves at least a byte per 4096 elements, up to
            4M elements; Huffman otherwise, whose decode can be ~10x faster per position), ``"context"`` (context-modelled range coder:
            smallest files, decode touches every position) or ``"huffman"`` (relative-index
            CSR with Huffman codes: decode work per stored entry), or a mapping of tensor
            names to those (others: ``"auto"``).
        version: format version to write: 3 (default), 2 (for readers older than swsformat
            0.3) or 1 (older than 0.2). Versions 1 and 2 store tied tensors once per name.
        raw_dtype: ``torch.float16`` or ``torch.bfloat16`` to store the wider floating tensors
            that are not coded (biases, norms, embeddings of positions, BatchNorm statistics)
            in that dtype, halving them; lossy, so the default None keeps every bit. Tensors
            named in ``keep`` stay as they are; a value float16 cannot hold is an error. They
            load in the narrower dtype; ``load_model`` copies them into the module's own.

    Example:
        >>> import torch, swsformat
        >>> w = torch.tensor([[0.0, 0.5], [0.5, 0.0]])
        >>> swsformat.encode({"fc.weight": w}, "/tmp/tiny.sws") > 0
        True
    """
    check_output(path)
    data = encode_bytes(
        model_or_state_dict, compress=compress, keep=keep, index_bits=index_bits, metadata=metadata,
        architecture=architecture, smallest=smallest, coder=coder, version=version, raw_dtype=raw_dtype,
    )
    atomic_write(path, data)
    return len(data)
