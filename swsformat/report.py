"""Size accounting of a real ``.sws`` file: where every bit goes and how close it is to the limit."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from .container import AliasTensor, ContextTensor, RawTensor, SparseRawTensor, SwsTensor, codebook_key
from .decoder import symbol_counts, value_counts
from .huffman import entropy_bits
from .reader import PathLike, SwsFile
from .selection import is_weight_name
from .spec import RAW_DTYPES, SWS_DTYPES, matrix_shape

FP32_BITS = 32


def _tensor_report(t: SwsTensor | ContextTensor | RawTensor | SparseRawTensor | AliasTensor, header_bits: int, entropy: bool,
                   target: dict[str, Any] | None = None, codebook_stored: bool = True) -> dict[str, Any]:
    if isinstance(t, AliasTensor):
        assert target is not None
        # A tie costs its index record only; its elements count once, with the tensor it names.
        return {"name": t.name, "kind": "alias", "alias_of": t.target, "dtype": target["dtype"],
                "shape": target["shape"], "numel": 0, "fp32_bits": 0, "dtype_bits": 0,
                "header_bits": header_bits, "total_bits": header_bits}
    numel = math.prod(t.shape)
    r: dict[str, Any] = {"name": t.name, "kind": t.kind, "dtype": t.dtype, "shape": list(t.shape), "numel": numel}
    r["fp32_bits"] = numel * FP32_BITS if t.dtype in SWS_DTYPES else numel * RAW_DTYPES[t.dtype].itemsize * 8
    r["dtype_bits"] = numel * RAW_DTYPES[t.dtype].itemsize * 8
    r["header_bits"] = header_bits
    if isinstance(t, RawTensor):
        r["raw_bits"] = int(t.data.size) * 8
        r["total_bits"] = r["raw_bits"] + header_bits
        if t.dtype in SWS_DTYPES:
            r["nonzero_values"] = _nonzero_values(t.data, t.dtype)
        return r
    if isinstance(t, SparseRawTensor):  # the non-zeros' own bytes, their positions context-coded
        r.update(coder=t.coder, nonzeros=t.nonzeros, position_bits=int(t.positions.size) * 8,
                 raw_bits=int(t.values.size) * 8)
        r["total_bits"] = r["position_bits"] + r["raw_bits"] + header_bits
        if t.dtype in SWS_DTYPES:
            r["nonzero_values"] = _nonzero_values(t.values, t.dtype)
        return r
    rows, cols = matrix_shape(t.shape)
    r["coder"] = t.coder
    negative_zero = np.flatnonzero(t.codebook == (1 << (8 * SWS_DTYPES[t.dtype].itemsize - 1)))
    if negative_zero.size:  # a stored -0.0 is an entry, not a weight
        r["nonzero_values"] = t.nonzeros - int(value_counts(t)[negative_zero[0]])
    if isinstance(t, ContextTensor):
        r.update(rows=rows, cols=cols, nonzeros=t.nonzeros, codebook_size=int(t.codebook.size),
                 coded_bits=t.data.size * 8, codebook_bits=_codebook_bits(t, codebook_stored))
        r["payload_bits"] = r["coded_bits"] + r["codebook_bits"]
        r["total_bits"] = r["payload_bits"] + header_bits
        if entropy:
            r["value_entropy_bits"] = entropy_bits(symbol_counts(t, "values"))
        r["compression_rate"] = r["fp32_bits"] / max(r["total_bits"], 1)
        return r
    r.update(
        rows=rows,
        cols=cols,
        nonzeros=t.nonzeros,
        entries=t.entries,
        fillers=t.entries - t.nonzeros,
        codebook_size=int(t.codebook.size),
        index_bits=t.index_bits,
        row_bits=t.row_counts.size * 8,
        gap_bits=t.gaps.data.size * 8,
        value_bits=t.values.data.size * 8,
        codebook_bits=_codebook_bits(t, codebook_stored),
    )
    r["code_table_bits"] = ((t.gaps.code_lengths.size + 1) // 2 + (t.values.code_lengths.size + 1) // 2) * 8
    r["payload_bits"] = r["row_bits"] + r["gap_bits"] + r["value_bits"] + r["codebook_bits"]
    r["total_bits"] = r["payload_bits"] + header_bits
    if entropy:
        r["gap_entropy_bits"] = entropy_bits(symbol_counts(t, "gaps"))
        r["value_entropy_bits"] = entropy_bits(symbol_counts(t, "values"))
    r["compression_rate"] = r["fp32_bits"] / max(r["total_bits"], 1)
    return r


def _nonzero_values(data: np.ndarray, dtype: str) -> int:
    """Elements of raw floating bytes that are not zero of either sign (a stored -0.0 is a
    non-zero bit pattern but no weight)."""
    bits = data.view(SWS_DTYPES[dtype])
    return int(np.count_nonzero(bits & bits.dtype.type(np.iinfo(bits.dtype).max >> 1)))


def _is_weight(r: dict[str, Any]) -> bool:
    """A coded tensor, or one stored as it is that is shaped and named like a weight matrix
    (the encoder stores a small or kept one that way)."""
    return r["kind"] == "sws" or (r["kind"] != "alias" and r["dtype"] in SWS_DTYPES and len(r["shape"]) >= 2
                                  and is_weight_name(r["name"]))


def _codebook_bits(t: SwsTensor | ContextTensor, stored: bool) -> int:
    """Bits of ``t``'s codebook, 0 where it only refers to an earlier tensor's (format 3)."""
    return int(t.codebook.size) * SWS_DTYPES[t.dtype].itemsize * 8 if stored else 0


def _header_share(raw_header: dict[str, Any], header_bytes: int, header_size: int) -> list[int]:
    """Bits of the file's header attributed to each tensor: its entry's msgpack size, scaled
    by the header's stored/decoded ratio (a deflated header is not split by tensor)."""
    ratio = header_bytes / max(header_size, 1)
    return [round(len(msgpack.packb(e, use_bin_type=True)) * ratio * 8) for e in raw_header["tensors"]]


def size_report(
    path_or_bytes: PathLike | bytes | SwsFile, entropy: bool = True, max_output_bytes: int | None = None
) -> dict[str, Any]:
    """Per-tensor and total bits of every part of the real file, with entropy bounds.

    ``compression_rate`` is fp32 bits of every tensor over the whole file's bits;
    ``dtype_compression_rate`` the bits of every tensor in its own dtype (a float16 model's
    real size) over the file's bits;
    ``paper_compression_rate`` follows the paper (coded weights only: fp32 bits of the
    coded tensors over their row counts, gaps, values and codebooks); it is None for a file
    without coded tensors. ``nonzero_fraction`` counts weights only (coded tensors, and
    those stored as they are that are shaped and named like a weight: a small layer the
    encoder found cheaper raw), ties once; None for a file without weights.
    """
    if isinstance(path_or_bytes, SwsFile):
        c, file_bytes = path_or_bytes.container(), path_or_bytes.header.file_size
    else:
        with SwsFile(path_or_bytes, max_output_bytes=max_output_bytes) as f:
            c, file_bytes = f.container(), f.header.file_size
    hlen = c.header_bytes
    ratio = hlen / max(c.header_size, 1)
    if c.version == 3:  # each tensor's index record, scaled as the header was deflated
        shares = [8 * e for e in c.index_bytes]
    else:
        shares = _header_share(c.raw_header, hlen, c.header_size)
    tensors: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    owners: set[tuple[str, bytes]] = set()
    for t, s in zip(c.tensors, shares):
        stored = True
        if c.version == 3 and isinstance(t, SwsTensor | ContextTensor):
            # Format 3 stores a codebook once, in the index record of the first tensor that has
            # it; the later ones refer to it. Its bits count there, as codebook, not as index.
            key = codebook_key(t)
            stored = key not in owners
            owners.add(key)
            if stored:
                s -= _codebook_bits(t, True)
        if c.version == 3:
            # The index is deflated: a record's bits count as stored, but a codebook at its own
            # size (the paper's accounting), so the tensors' sums may pass the file by the
            # little deflate saves on codebooks.
            s = round(s * ratio)
        r = _tensor_report(t, s, entropy, by_name.get(t.target) if isinstance(t, AliasTensor) else None, stored)
        by_name[t.name] = r
        tensors.append(r)
    sws = [r for r in tensors if r["kind"] == "sws"]
    total_bits = file_bytes * 8
    fp32_bits = sum(r["fp32_bits"] for r in tensors)
    coded_fp32 = sum(r["fp32_bits"] for r in sws)
    coded_bits = sum(r["payload_bits"] for r in sws)
    sections = sum(r.get("raw_bits", 0) + r.get("position_bits", 0) + r.get("payload_bits", 0) for r in tensors) // 8
    out = {
        "file_bytes": file_bytes,
        "header_bytes": hlen,
        # Prelude, header (less the codebooks, counted with their tensors), CRC and padding.
        "overhead_bytes": file_bytes - sections,
        "fp32_bytes": fp32_bits // 8,
        "compression_rate": fp32_bits / total_bits,
        "dtype_bytes": sum(r["dtype_bits"] for r in tensors) // 8,
        "dtype_compression_rate": sum(r["dtype_bits"] for r in tensors) / total_bits,
        "paper_compression_rate": coded_fp32 / coded_bits if coded_bits else None,
        "coded_weights": sum(r["numel"] for r in sws),
        "nonzeros": sum(r["nonzeros"] for r in sws),
        "raw_bits": sum(r.get("raw_bits", 0) for r in tensors),
        "tensors": tensors,
    }
    weights = [r for r in tensors if _is_weight(r)]
    out["weights"] = sum(r["numel"] for r in weights)
    out["weight_nonzeros"] = sum(r.get("nonzero_values", r.get("nonzeros", 0)) for r in weights)
    out["nonzero_fraction"] = out["weight_nonzeros"] / out["weights"] if out["weights"] else None
    out["aliases"] = sum(r["kind"] == "alias" for r in tensors)
    if entropy:
        huff = [r for r in sws if r["coder"] == "huffman"]
        out["gap_bits"] = sum(r["gap_bits"] for r in huff)
        out["gap_entropy_bits"] = sum(r["gap_entropy_bits"] for r in huff)
        out["value_bits"] = sum(r["value_bits"] for r in huff)
        out["value_entropy_bits"] = sum(r["value_entropy_bits"] for r in sws)
        out["context_bits"] = sum(r["coded_bits"] for r in sws if r["coder"] == "context")
    return out


def inspect(path: PathLike) -> list[dict[str, Any]]:
    """Per-tensor facts from the validated header alone (nothing past the header is read).

    Example:
        >>> for t in swsformat.inspect("model.sws"): print(t["name"], t["bytes"])  # doctest: +SKIP
    """
    with SwsFile(path) as f:
        entries = f.header.entries
    out = []
    for e in entries:
        info: dict[str, Any] = {"name": e.name, "kind": e.kind, "dtype": e.dtype, "shape": list(e.shape)}
        if e.kind == "alias":
            info["alias_of"] = e.alias_of
        if e.kind == "sws":
            info.update(coder=e.coder, nonzeros=e.nonzeros, codebook_size=int(e.codebook.size))
            if e.coder == "huffman":
                info.update(entries=e.entries, index_bits=e.index_bits)
            info["bytes"] = e.stored_bytes + e.codebook.nbytes
        else:
            info["bytes"] = e.stored_bytes
        out.append(info)
    return out
