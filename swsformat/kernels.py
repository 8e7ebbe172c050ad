"""numba kernels for the bit-level work: packing, relative-index CSR, Huffman decoding.

numba does no bounds checking, so every kernel here trusts only what the caller has
validated (array sizes, table sizes, alphabet sizes) and checks everything that depends
on payload bytes itself before it writes: a decoded column past the row, a stream that
runs out, a codeword with no symbol, more non-zeros than declared. Errors come back as
negative status codes (see :data:`STATUS`), never as an out-of-bounds access.
"""

from __future__ import annotations

import numba
import numpy as np

OK = 0
ERR_CODEWORD = -1
ERR_OVERRUN = -2
ERR_COLUMN = -3
ERR_TRAILING = -4
ERR_NONZEROS = -5

STATUS = {
    ERR_CODEWORD: "a bit pattern that is no codeword of its code table",
    ERR_OVERRUN: "the stream ends before all its symbols are decoded",
    ERR_COLUMN: "a relative column index runs past the end of its row",
    ERR_TRAILING: "the stream holds more bits than its symbols use",
    ERR_NONZEROS: "the number of non-zero entries differs from the header's 'nonzeros'",
}

def njit(**options):
    """``numba.njit`` with an on-disk cache when a cache folder is usable, without one otherwise.

    numba refuses ``cache=True`` (at decoration, i.e. at import) when neither the package's
    ``__pycache__`` nor a user cache folder is writable: a read-only install must still import.
    """

    def wrap(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:
            return numba.njit(cache=False, **options)(fn)

    return wrap


jit = njit(nogil=True)


@jit
def build_entries(symbols: np.ndarray, rows: int, cols: int, index_bits: int, total: int = -1):
    """Relative-index CSR of a (rows*cols) symbol matrix (0 = zero).

    Each stored entry has a gap ``g`` in ``[0, 2**index_bits)``: its column is the previous
    entry's column + 1 + g (the first entry's is g). A longer run of zeros is bridged by
    filler entries with gap ``2**index_bits - 1`` and the zero symbol, as in Deep Compression.
    Returns per-row entry counts, gap symbols and value symbols. ``total``, the number of
    entries when the caller knows it (:func:`index_width_stats` gives it), saves a counting
    pass; -1 counts first.
    """
    maxgap = (1 << index_bits) - 1
    counts = np.zeros(rows, dtype=np.int64)
    if total < 0:
        for r in range(rows):
            p = 0
            n = 0
            base = r * cols
            for c in range(cols):
                if symbols[base + c] != 0:
                    n += (c - p) // (maxgap + 1) + 1
                    p = c + 1
            counts[r] = n
        total = counts.sum()
    gaps = np.empty(total, dtype=np.uint16)  # index_bits <= 12
    vals = np.empty(total, dtype=np.uint8)
    k = 0
    for r in range(rows):
        p = 0
        base = r * cols
        start = k
        for c in range(cols):
            s = symbols[base + c]
            if s != 0:
                while c - p > maxgap:
                    if k == total:
                        return counts, gaps[:0], vals[:0]
                    gaps[k] = maxgap
                    vals[k] = 0
                    k += 1
                    p += maxgap + 1
                if k == total:
                    return counts, gaps[:0], vals[:0]
                gaps[k] = c - p
                vals[k] = s
                k += 1
                p = c + 1
        counts[r] = k - start
    if k != total:
        return counts, gaps[:0], vals[:0]
    return counts, gaps, vals


@jit
def symbolize(patterns: np.ndarray, max_distinct: int):
    """One pass: the distinct bit patterns (in order of first appearance) and, per element,
    the index of its pattern (uint8). Stops with ``count = max_distinct + 1`` as soon as there
    are more distinct patterns than that (a table of 1024 slots, open addressing)."""
    size = 1024
    mask = size - 1
    keys = np.zeros(size, dtype=patterns.dtype)
    used = np.zeros(size, dtype=np.int64)  # 0: empty, else 1 + index into distinct
    distinct = np.zeros(max_distinct + 1, dtype=patterns.dtype)
    index = np.empty(patterns.size, dtype=np.uint8)
    count = 0
    last_key = patterns[0] if patterns.size else patterns.dtype.type(0)
    last_idx = -1
    for i in range(patterns.size):
        v = patterns[i]
        if v == last_key and last_idx >= 0:
            index[i] = last_idx
            continue
        h = (np.uint64(v) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(54)
        slot = np.int64(h) & mask
        while used[slot] != 0 and keys[slot] != v:
            slot = (slot + 1) & mask
        if used[slot] == 0:
            if count == max_distinct:
                return max_distinct + 1, distinct, index
            keys[slot] = v
            distinct[count] = v
            count += 1
            used[slot] = count
        last_key = v
        last_idx = used[slot] - 1
        index[i] = last_idx
    return count, distinct[:count], index


@jit
def huffman_cost(counts: np.ndarray) -> int:
    """Bits of an optimal (unlimited-depth) Huffman code for ``counts``: the sum of the merged
    weights, by the two-queue method over the sorted non-zero counts. Every optimal code has
    this cost; a one-symbol stream costs one bit per symbol, as the format spends."""
    leaves = np.sort(counts[counts > 0].astype(np.int64))
    n = leaves.size
    if n == 0:
        return 0
    if n == 1:
        return leaves[0]
    merged = np.empty(n, dtype=np.int64)
    i = j = m = 0
    total = 0
    for _ in range(n - 1):
        pair = 0
        for _ in range(2):
            if i < n and (j >= m or leaves[i] <= merged[j]):
                pair += leaves[i]
                i += 1
            else:
                pair += merged[j]
                j += 1
        merged[m] = pair
        m += 1
        total += pair
    return total


@jit
def remap(index: np.ndarray, table: np.ndarray) -> None:
    """``index[i] = table[index[i]]`` in place (no second array the size of a tensor)."""
    for i in range(index.size):
        index[i] = table[index[i]]


@jit
def index_width_stats(symbols: np.ndarray, rows: int, cols: int, max_bits: int):
    """What ranking gap widths needs, in one pass: the histogram of the zeros before each
    non-zero (since the previous one in its row), the histogram of the non-zero symbols, and
    for each width b in 0..max_bits the most entries any row takes at that width (its
    non-zeros plus ``gap >> b`` fillers each)."""
    gaps = np.zeros(max(cols, 1), dtype=np.int64)
    values = np.zeros(256, dtype=np.int64)
    most = np.zeros(max_bits + 1, dtype=np.int64)
    entries = np.zeros(max_bits + 1, dtype=np.int64)
    for r in range(rows):
        p = 0
        base = r * cols
        entries[:] = 0
        n = 0
        for c in range(cols):
            s = symbols[base + c]
            if s != 0:
                d = c - p
                gaps[d] += 1
                values[s] += 1
                n += 1
                b = 0
                while d > 0 and b <= max_bits:  # fillers: d >> b for each width b below d's bit length
                    entries[b] += d
                    d >>= 1
                    b += 1
                p = c + 1
        for b in range(max_bits + 1):
            if entries[b] + n > most[b]:
                most[b] = entries[b] + n
    return gaps, values, most


@jit
def pack_codes(symbols: np.ndarray, codes: np.ndarray, lengths: np.ndarray):
    """Concatenate ``codes[s]``'s low ``lengths[s]`` bits for each ``s`` in ``symbols``, MSB
    first, zero-padded; returns (bytes, bits). No per-symbol arrays: a table lookup each."""
    bits = np.int64(0)
    for i in range(symbols.size):
        bits += lengths[symbols[i]]
    out = np.zeros((bits + 7) // 8, dtype=np.uint8)
    acc = np.int64(0)
    nacc = 0
    pos = 0
    for i in range(symbols.size):
        w = np.int64(lengths[symbols[i]])
        v = np.int64(codes[symbols[i]])
        # Feed at most 32 bits at a time so the accumulator never holds more than 39.
        while w > 0:
            take = min(w, 32)
            w -= take
            acc = (acc << take) | ((v >> w) & ((np.int64(1) << take) - 1))
            nacc += take
            while nacc >= 8:
                nacc -= 8
                out[pos] = (acc >> nacc) & 0xFF
                pos += 1
            acc &= (np.int64(1) << nacc) - 1
    if nacc > 0:
        out[pos] = (acc << (8 - nacc)) & 0xFF
    return out, bits


def pack_bits(values: np.ndarray, widths: np.ndarray, total_bits: int) -> np.ndarray:
    """Concatenate the low ``widths[i]`` bits of ``values[i]``, MSB first, zero-padded
    (``total_bits`` is their sum)."""
    out, bits = pack_codes(np.arange(values.shape[0]), np.asarray(values, dtype=np.int64),
                           np.asarray(widths, dtype=np.int64))
    if bits != total_bits:
        raise ValueError(f"widths sum to {bits} bits, not {total_bits}")
    return out


@jit
def unpack_fixed(data: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` with a constant width; caller checks ``len(data)``."""
    out = np.zeros(count, dtype=np.int64)
    acc = np.int64(0)
    nacc = 0
    pos = 0
    for i in range(count):
        v = np.int64(0)
        need = width
        while need > 0:
            if nacc == 0:
                acc = np.int64(data[pos])
                pos += 1
                nacc = 8
            take = min(need, nacc)
            nacc -= take
            v = (v << take) | ((acc >> nacc) & ((np.int64(1) << take) - 1))
            need -= take
        out[i] = v
    return out


@jit
def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Deflate's canonical codes: by increasing length, then symbol index (lengths <= 15)."""
    bl_count = np.zeros(16, dtype=np.int64)
    for x in lengths:
        bl_count[np.int64(x)] += 1
    bl_count[0] = 0
    next_code = np.zeros(16, dtype=np.int64)
    code = 0
    for bits in range(1, 16):
        code = (code + bl_count[bits - 1]) << 1
        next_code[bits] = code
    codes = np.zeros(lengths.shape[0], dtype=np.int64)
    for sym in range(lengths.shape[0]):
        n = np.int64(lengths[sym])
        if n != 0:
            codes[sym] = next_code[n]
            next_code[n] += 1
    return codes


@jit
def kraft_units(lengths: np.ndarray) -> int:
    """``sum 2**(15 - len)`` over used symbols: at most ``2**15`` for a prefix code."""
    total = 0
    for x in lengths:
        if x != 0:
            total += 1 << (15 - np.int64(x))
    return total


@jit
def decode_table(lengths: np.ndarray):
    """Lookup table of ``2**maxlen`` entries ``symbol << 5 | length`` (-1: no codeword).

    The caller has checked Kraft's inequality, so every codeword's range fits the table.
    """
    maxlen = 1
    for x in lengths:
        if np.int64(x) > maxlen:
            maxlen = np.int64(x)
    table = np.full(1 << maxlen, -1, dtype=np.int32)
    codes = canonical_codes(lengths)
    for sym in range(lengths.shape[0]):
        n = np.int64(lengths[sym])
        if n != 0:
            start = codes[sym] << (maxlen - n)
            for k in range(start, start + (1 << (maxlen - n))):
                table[k] = (sym << 5) | n
    return table, maxlen


@njit(nogil=True, inline="always")
def _next_symbol(data, nbytes, table, maxlen, mask, buf, cnt, pos):
    """Decode one symbol from the bit buffer ``buf`` holding ``cnt`` bits, ``pos`` the next byte.

    Returns ``(symbol or negative status, buf, cnt, pos)``: the state stays in the caller's
    locals (registers) rather than an array, about 20% faster. Bits consumed so far are
    ``8 * pos - cnt``.
    """
    if cnt < maxlen:
        while cnt <= 56 and pos < nbytes:
            buf = (buf << 8) | np.int64(data[pos])
            pos += 1
            cnt += 8
    if cnt >= maxlen:
        peek = (buf >> (cnt - maxlen)) & mask
    else:
        peek = (buf << (maxlen - cnt)) & mask
    e = np.int64(table[peek])
    if e < 0:
        return ERR_CODEWORD, buf, cnt, pos
    n = e & 31
    if n > cnt:
        return ERR_OVERRUN, buf, cnt, pos
    return e >> 5, buf, cnt - n, pos


@jit
def decode_symbols(data, nbits, table, maxlen, count):
    """Decode ``count`` symbols of one stream (reports, benchmarks); returns (symbols, status)."""
    out = np.zeros(count, dtype=np.int64)
    mask = (np.int64(1) << maxlen) - 1
    buf = np.int64(0)
    cnt = np.int64(0)
    pos = np.int64(0)
    for i in range(count):
        s, buf, cnt, pos = _next_symbol(data, data.shape[0], table, maxlen, mask, buf, cnt, pos)
        if s < 0:
            return out, s
        if 8 * pos - cnt > nbits:
            return out, ERR_OVERRUN
        out[i] = s
    if 8 * pos - cnt != nbits:
        return out, ERR_TRAILING
    return out, OK


@jit
def _decode_rows(row_counts, cols, gdata, gbits, gtable, gmax, vdata, vbits, vtable, vmax, codebook,
                 dense, out, crow, colidx, vals):
    """The relative-index CSR walk shared by both outputs: into the dense ``out`` when ``dense``,
    else into ``crow``/``colidx``/``vals`` (sized for the declared non-zeros).

    Returns (status, row, non-zeros written).
    """
    nnz = colidx.shape[0]
    k = 0
    gn = gdata.shape[0]
    vn = vdata.shape[0]
    gmask = (np.int64(1) << gmax) - 1
    vmask = (np.int64(1) << vmax) - 1
    gbuf = np.int64(0)
    gcnt = np.int64(0)
    gpos = np.int64(0)
    vbuf = np.int64(0)
    vcnt = np.int64(0)
    vpos = np.int64(0)
    if not dense:
        crow[0] = 0
    for r in range(row_counts.shape[0]):
        p = 0
        base = r * cols
        for _ in range(row_counts[r]):
            g, gbuf, gcnt, gpos = _next_symbol(gdata, gn, gtable, gmax, gmask, gbuf, gcnt, gpos)
            if g < 0:
                return g, r, k
            v, vbuf, vcnt, vpos = _next_symbol(vdata, vn, vtable, vmax, vmask, vbuf, vcnt, vpos)
            if v < 0:
                return v, r, k
            c = p + g
            if c >= cols:
                return ERR_COLUMN, r, k
            if v != 0:
                if dense:
                    out[base + c] = codebook[v]
                else:
                    if k >= nnz:
                        return ERR_NONZEROS, r, k
                    colidx[k] = c
                    vals[k] = codebook[v]
                k += 1
            p = c + 1
        if not dense:
            crow[r + 1] = k
        if 8 * gpos - gcnt > gbits or 8 * vpos - vcnt > vbits:
            return ERR_OVERRUN, r, k
    if 8 * gpos - gcnt != gbits or 8 * vpos - vcnt != vbits:
        return ERR_TRAILING, -1, k
    return OK, -1, k


@jit
def decode_dense(row_counts, cols, gdata, gbits, gtable, gmax, vdata, vbits, vtable, vmax, codebook, nnz, out):
    """Scatter a tensor's entries into the zeroed ``out`` (rows*cols bit patterns).

    Returns (status, row): ``codebook[0]`` is the zero pattern, so value symbols index it directly.
    """
    empty = np.zeros(0, dtype=np.int64)
    status, row, k = _decode_rows(row_counts, cols, gdata, gbits, gtable, gmax, vdata, vbits, vtable, vmax,
                                  codebook, True, out, empty, empty, codebook[:0])
    if status == OK and k != nnz:
        return ERR_NONZEROS, -1
    return status, row


@jit
def decode_csr(row_counts, cols, gdata, gbits, gtable, gmax, vdata, vbits, vtable, vmax, codebook, crow, colidx, vals):
    """Like :func:`decode_dense` but fills CSR arrays sized for the declared non-zeros."""
    status, row, k = _decode_rows(row_counts, cols, gdata, gbits, gtable, gmax, vdata, vbits, vtable, vmax,
                                  codebook, False, codebook[:0], crow, colidx, vals)
    if status == OK and k != colidx.shape[0]:
        return ERR_NONZEROS, -1
    return status, row


MSGPACK_OK = 0
MSGPACK_TRUNCATED = -1
MSGPACK_BAD_TYPE = -2
MSGPACK_EXTENSION = -3
MSGPACK_TOO_DEEP = -4
MSGPACK_TOO_MANY = -5
MSGPACK_TRAILING = -6
MSGPACK_TOO_LONG = -7

MSGPACK_STATUS = {
    MSGPACK_TRUNCATED: "ends inside an object",
    MSGPACK_BAD_TYPE: "holds the reserved type byte 0xc1",
    MSGPACK_EXTENSION: "holds an extension type, which is not allowed",
    MSGPACK_TOO_DEEP: "nests containers too deeply",
    MSGPACK_TOO_MANY: "holds too many maps and arrays",
    MSGPACK_TRAILING: "has bytes after its first object",
    MSGPACK_TOO_LONG: "holds an array or map with too many items",
}


@jit
def _be(data, pos, n):
    v = np.int64(0)
    for i in range(n):
        v = (v << 8) | np.int64(data[pos + i])
    return v


@jit
def msgpack_shape(data: np.ndarray, max_depth: int, max_containers: int, max_items: int):
    """Walk one msgpack object without building it: returns (status, containers, depth).

    The unpacker builds a Python object per map and array, so a 16 MiB header of empty maps
    would cost gigabytes; this pass bounds nesting and container count first, reading only
    inside ``data`` (every length is checked against the bytes left before it is used).
    """
    n = data.shape[0]
    stack = np.zeros(max_depth + 1, dtype=np.int64)  # objects still expected at each level
    depth = 0
    deepest = 0
    containers = 0
    pos = 0
    stack[0] = 1
    while True:
        while depth >= 0 and stack[depth] == 0:
            depth -= 1
        if depth < 0:
            break
        stack[depth] -= 1
        if pos >= n:
            return MSGPACK_TRUNCATED, containers, deepest
        b = np.int64(data[pos])
        pos += 1
        skip = np.int64(0)
        items = np.int64(-1)
        if b <= 0x7F or b >= 0xE0 or b == 0xC0 or b == 0xC2 or b == 0xC3:
            skip = 0
        elif b <= 0x8F:
            items = 2 * (b & 0x0F)
        elif b <= 0x9F:
            items = b & 0x0F
        elif b <= 0xBF:
            skip = b & 0x1F
        elif b == 0xC1:
            return MSGPACK_BAD_TYPE, containers, deepest
        elif b >= 0xC7 and b <= 0xC9 or b >= 0xD4 and b <= 0xD8:
            return MSGPACK_EXTENSION, containers, deepest
        elif b >= 0xC4 and b <= 0xC6 or b >= 0xD9 and b <= 0xDB:
            w = 1 << ((b - 0xC4) if b <= 0xC6 else (b - 0xD9))
            if pos + w > n:
                return MSGPACK_TRUNCATED, containers, deepest
            skip = _be(data, pos, w)
            pos += w
        elif b == 0xCA:
            skip = 4
        elif b == 0xCB:
            skip = 8
        elif b >= 0xCC and b <= 0xCF:
            skip = 1 << (b - 0xCC)
        elif b >= 0xD0 and b <= 0xD3:
            skip = 1 << (b - 0xD0)
        else:  # 0xDC..0xDF: array16/32, map16/32
            w = 2 if b == 0xDC or b == 0xDE else 4
            if pos + w > n:
                return MSGPACK_TRUNCATED, containers, deepest
            items = _be(data, pos, w)
            pos += w
            if items > max_items:  # entries of an array, pairs of a map
                return MSGPACK_TOO_LONG, containers + 1, deepest
            if b >= 0xDE:
                items *= 2
        if items >= 0:
            containers += 1
            if containers > max_containers:
                return MSGPACK_TOO_MANY, containers, deepest
            if items > n - pos:  # every item takes at least one byte
                return MSGPACK_TRUNCATED, containers, deepest
            if items > 0:
                if depth + 1 > max_depth:
                    return MSGPACK_TOO_DEEP, containers, depth + 1
                depth += 1
                stack[depth] = items
                if depth > deepest:
                    deepest = depth
        else:
            if skip > n - pos:
                return MSGPACK_TRUNCATED, containers, deepest
            pos += skip
    if pos != n:
        return MSGPACK_TRAILING, containers, deepest
    return MSGPACK_OK, containers, deepest
