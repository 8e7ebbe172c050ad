"""The context-modelled coder of format 3: positions and values of a quantized tensor
through an adaptive binary range coder, integer arithmetic only (SPEC.md section 9).

Every decision is a binary event coded with an adaptive probability chosen by a context
(what the coder has already seen), so the same bytes decode the same way on every machine.
The model, in coding order, over the tensor's 2-D view ``rows x cols``:

1. *row mask*: is row ``r`` all zero? (context: was the previous row?)
2. *column mask*: is column ``c`` all zero? (context: the previous column and, for
   kernels, the same tap one input channel back): dead units and dead inputs cost ~nothing;
3. *non-zero flags* inside live rows x live columns, context = how dense this column has
   been in earlier rows, how dense this row has been so far, and two neighbours; a flag
   the masks force (the last chance for a live row or column) is not coded;
4. *values*: the codebook symbol of every non-zero through an adaptive binary tree.

Two estimators turn a context's history into a probability: kind 2 averages two fixed-rate
estimates (``TWO_RATE``); kind 4 learns at rate 1/(n + 1.5) after n events, down to 1/256
(``COUNTING``), which pays less for learning each context and is 1-4% smaller on every
committed file. Kind 5 (sparse raw) codes only positions, with the counting estimator, and
stores the non-zeros' bytes as they are.

Kernels trust only validated sizes; everything that depends on payload bytes is checked
(stream overrun, trailing bytes, non-zero count), errors come back as status codes.
"""

from __future__ import annotations

import numpy as np

from .kernels import ERR_NONZEROS, ERR_OVERRUN, ERR_TRAILING, OK, jit, njit
from .kernels import STATUS as _STATUS
from .spec import matrix_shape

# The coders take the estimator as an argument and are inlined (numba IR) into one compiled
# entry point per estimator, where it is a constant: a branch per coded bit made decoding
# 2-6x slower (65 against 10-14 ns per position on a 10%-dense 2304x768 layer).
_inline = njit(nogil=True, inline="always")

PROB_BITS = 16
ONE = 1 << PROB_BITS
P_MIN = 64
P_MAX = ONE - 64
FAST, SLOW = 4, 7  # adaptation shifts of the two estimators averaged per context
TWO_RATE, COUNTING = 0, 1  # estimators of kinds 2 and 4
COUNT_BITS = 22  # precision of a counting context's probability
COUNT_LIMIT = 255  # events after which a counting context's rate stays 1/256.5
# 65536 / (n + 1.5) for n = 0..COUNT_LIMIT, SPEC.md 9.2's 131072 div (2n + 3): a table
# (frozen into the compiled kernels) instead of an integer division per coded bit.
COUNT_RATE = np.array([131072 // (2 * n + 3) for n in range(COUNT_LIMIT + 1)], dtype=np.int64)
TOP = 1 << 24

ROW_CTX = 0  # 2 contexts
COL_CTX = 2  # 4 contexts
FLAG_CTX = 6  # 8 x 8 x 2 x 2 contexts
VALUE_CTX = FLAG_CTX + 256  # per node of the value tree (at most 256) x sign of the row's previous value
N_CTX = VALUE_CTX + 3 * 256
ERR_CAPACITY = -10
ERR_SYMBOL = -11
ERR_MASK = -12
STATUS = {
    **_STATUS,
    ERR_OVERRUN: "the range coder's bytes end before all positions and values are decoded",
    ERR_TRAILING: "the range coder's bytes continue past the last decoded value",
    ERR_SYMBOL: "a value symbol past the end of the codebook",
    ERR_MASK: "live rows but no live column",
}


def value_depth(codebook_size: int) -> int:
    """Bits of the value tree for ``codebook_size`` non-zero values: symbol ``s`` (1-based)
    is coded as ``s - 1`` in that many bits, most significant first."""
    return max(codebook_size - 1, 0).bit_length()


def kernel_size(shape: tuple[int, ...]) -> int:
    """Elements per (output, input) pair of a kernel (1 for a matrix): the distance to a
    position's second neighbour, the same tap one input channel back."""
    k = 1
    for s in shape[2:]:
        k *= s
    return k


def negative_symbols(codebook: np.ndarray) -> np.ndarray:
    """1 for each symbol (0 = zero, then the codebook) whose value is negative (sign bit set)."""
    sign = np.asarray(codebook >> (codebook.dtype.itemsize * 8 - 1), dtype=np.uint8) & 1
    return np.concatenate([np.zeros(1, np.uint8), sign])


def max_coded_bytes(rows: int, cols: int, nonzeros: int, codebook_size: int) -> int:
    """An upper bound on the coded size: every coded bit costs at most ~10 bits (P_MIN)."""
    events = rows + cols + rows * cols + nonzeros * value_depth(codebook_size)
    return (events * 11) // 8 + 16


@jit
def _density(count: int, seen: int) -> int:
    """Bucket 0..7 of ``count`` non-zeros among ``seen`` earlier positions."""
    if seen == 0:
        return 0
    if count == 0:
        return 1 if seen < 8 else 2
    # q = 16 * count // seen compared with 1, 2, 4, 8, without a division
    c16 = count * 16
    if c16 < seen:
        return 3
    if c16 < 2 * seen:
        return 4
    if c16 < 4 * seen:
        return 5
    if c16 < 8 * seen:
        return 6
    return 7


@_inline
def initial_state(estimator):
    """Per-context state: two-rate ``(a, b)`` both at 1/2, or counting ``p << 8 | n`` (p at 1/2,
    n = 0; the second array unused). Allocated inside the coders (the compiler then knows
    they alias nothing)."""
    if estimator == COUNTING:  # p << 8 | n in one word: one load and one store per coded bit
        return np.full(N_CTX, 1 << (COUNT_BITS - 1 + 8), dtype=np.int64), np.zeros(1, dtype=np.int64)
    return np.full(N_CTX, ONE // 2, dtype=np.int64), np.full(N_CTX, ONE // 2, dtype=np.int64)


@_inline
def _p(pa, pb, ctx, estimator):
    if estimator == COUNTING:
        p = pa[ctx] >> (COUNT_BITS - PROB_BITS + 8)
    else:
        p = (pa[ctx] + pb[ctx]) >> 1
    if p < P_MIN:
        return P_MIN
    if p > P_MAX:
        return P_MAX
    return p


@_inline
def _update(pa, pb, ctx, bit, estimator):
    if estimator == COUNTING:
        v = pa[ctx]
        n = v & 255
        p = v >> 8
        if bit:
            p += ((np.int64(1 << COUNT_BITS) - p) * COUNT_RATE[n]) >> 16
        else:
            p -= (p * COUNT_RATE[n]) >> 16
        pa[ctx] = (p << 8) | (n + (n < COUNT_LIMIT))
        return
    if bit:
        pa[ctx] += (ONE - pa[ctx]) >> FAST
        pb[ctx] += (ONE - pb[ctx]) >> SLOW
    else:
        pa[ctx] -= pa[ctx] >> FAST
        pb[ctx] -= pb[ctx] >> SLOW


@jit
def _shift_low(st, out):
    # st: low, range, cache, pending (0xFF bytes held back for a carry), out position
    low = st[0]
    if low < 0xFF000000 or low >= 0x100000000:
        carry = low >> 32
        if st[4] + 1 + st[3] > out.size:
            return ERR_CAPACITY
        if st[5]:  # the very first byte is always 0 and is not written
            out[st[4]] = (st[2] + carry) & 0xFF
            st[4] += 1
        st[5] = 1
        while st[3] > 0:
            out[st[4]] = (0xFF + carry) & 0xFF
            st[4] += 1
            st[3] -= 1
        st[2] = (low >> 24) & 0xFF
    else:
        st[3] += 1
    st[0] = (low & 0x00FFFFFF) << 8
    return OK


@_inline
def _encode_bit(st, out, pa, pb, ctx, bit, estimator):
    p = _p(pa, pb, ctx, estimator)
    bound = (st[1] >> PROB_BITS) * p
    if bit:
        st[1] = bound
    else:
        st[0] += bound
        st[1] -= bound
    _update(pa, pb, ctx, bit, estimator)
    while st[1] < TOP:
        st[1] = (st[1] << 8) & 0xFFFFFFFF
        if _shift_low(st, out) != OK:
            return ERR_CAPACITY
    return OK


@_inline
def _decode_bit(st, data, pa, pb, ctx, estimator):
    # st: code, range, input position, status
    p = _p(pa, pb, ctx, estimator)
    bound = (st[1] >> PROB_BITS) * p
    if st[0] < bound:
        st[1] = bound
        bit = 1
    else:
        st[0] -= bound
        st[1] -= bound
        bit = 0
    _update(pa, pb, ctx, bit, estimator)
    while st[1] < TOP:
        st[1] = (st[1] << 8) & 0xFFFFFFFF
        if st[2] >= data.size:
            st[3] = ERR_OVERRUN
            return 0
        st[0] = ((st[0] << 8) | data[st[2]]) & 0xFFFFFFFF
        st[2] += 1
    return bit


@jit
def _neighbours(bits, c, kernel):
    """(left, back) of column ``c`` in ``bits`` as int64: ``c - 1``, and ``c - kernel`` for a
    kernel (the same tap one input channel back) or ``c - 2`` for a matrix; 0 when missing."""
    left = np.int64(bits[c - 1]) if c >= 1 else np.int64(0)
    if kernel > 1:
        back = np.int64(bits[c - kernel]) if c >= kernel else np.int64(0)
    else:
        back = np.int64(bits[c - 2]) if c >= 2 else np.int64(0)
    return left, back


@jit
def _forced(r, c, last_row, last_col, rowcnt, colcount):
    """A flag the masks decide: the last live column of a row with no non-zero yet, or the
    last live row for a column with none yet, must be 1 (not coded)."""
    return (c == last_col and rowcnt == 0) or (r == last_row and colcount == 0)


@jit
def _flag_ctx(colcnt, alive_seen, rowcnt, j, left, back):
    # int64 throughout: interpreted (NUMBA_DISABLE_JIT) numpy would wrap uint8 sums
    return np.int64(FLAG_CTX) + ((np.int64(_density(colcnt, alive_seen)) * 8 + _density(rowcnt, j)) * 2 + left) * 2 + back


@_inline
def encode(symbols: np.ndarray, rows: int, cols: int, kernel: int, depth: int, negative: np.ndarray, out: np.ndarray,
           estimator: int):
    """Code the (rows*cols) symbol matrix (0 = zero) into ``out``; ``negative[s]`` is 1 when
    symbol ``s`` stands for a negative value; ``estimator`` TWO_RATE (kind 2) or COUNTING.
    Returns (status, bytes written)."""
    pa, pb = initial_state(estimator)
    st = np.zeros(6, dtype=np.int64)
    st[1] = 0xFFFFFFFF
    row_alive = np.zeros(rows, dtype=np.uint8)
    col_alive = np.zeros(cols, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            if symbols[r * cols + c] != 0:
                row_alive[r] = 1
                col_alive[c] = 1
    prev = 0
    last_row = -1
    for r in range(rows):
        if _encode_bit(st, out, pa, pb, ROW_CTX + np.int64(prev), row_alive[r], estimator) != OK:
            return ERR_CAPACITY, 0
        prev = row_alive[r]
        if prev:
            last_row = r
    if last_row < 0:
        return _finish(st, out)
    last_col = -1
    for c in range(cols):
        a, b = _neighbours(col_alive, c, kernel)
        if _encode_bit(st, out, pa, pb, COL_CTX + a * 2 + b, col_alive[c], estimator) != OK:
            return ERR_CAPACITY, 0
        if col_alive[c]:
            last_col = c
    colcnt = np.zeros(cols, dtype=np.int64)
    flags = np.zeros(cols, dtype=np.uint8)  # this row's flags so far
    alive_seen = 0
    for r in range(rows):
        if not row_alive[r]:
            continue
        rowcnt = 0
        j = 0
        sign = 0
        for c in range(cols):
            flags[c] = 0
        for c in range(cols):
            if not col_alive[c]:
                continue
            s = symbols[r * cols + c]
            bit = 1 if s != 0 else 0
            if not _forced(r, c, last_row, last_col, rowcnt, colcnt[c]):
                left, back = _neighbours(flags, c, kernel)
                ctx = _flag_ctx(colcnt[c], alive_seen, rowcnt, j, left, back)
                if _encode_bit(st, out, pa, pb, ctx, bit, estimator) != OK:
                    return ERR_CAPACITY, 0
            if bit:
                flags[c] = 1
                rowcnt += 1
                colcnt[c] += 1
                node = 1
                v = s - 1
                for i in range(depth - 1, -1, -1):
                    b = (v >> i) & 1
                    if _encode_bit(st, out, pa, pb, VALUE_CTX + sign * 256 + node, b, estimator) != OK:
                        return ERR_CAPACITY, 0
                    node = node * 2 + b
                sign = 1 + np.int64(negative[s])
            j += 1
        alive_seen += 1
    return _finish(st, out)


@jit
def _finish(st, out):
    for _ in range(5):
        if _shift_low(st, out) != OK:
            return ERR_CAPACITY, 0
    # The flush writes the whole of ``low``; bytes a decoder never reads are dropped (it
    # reads 4 bytes to start, then one per renormalisation, which is exactly what was shifted).
    return OK, st[4]


@_inline
def decode(data: np.ndarray, rows: int, cols: int, kernel: int, negative: np.ndarray, nonzeros: int,
           crow: np.ndarray, colidx: np.ndarray, syms: np.ndarray, estimator: int):
    """Inverse of :func:`encode` into CSR form: ``crow`` (rows + 1), column index and symbol
    (1..codebook_size) of each of the ``nonzeros`` non-zeros; ``negative`` as in :func:`encode`
    (``codebook_size + 1`` entries). Returns (status, row where it failed or -1)."""
    codebook_size = negative.size - 1
    depth = 0
    while (1 << depth) < codebook_size:
        depth += 1
    pa, pb = initial_state(estimator)
    st = np.zeros(4, dtype=np.int64)
    st[1] = 0xFFFFFFFF
    for i in range(4):
        if i >= data.size:
            return ERR_OVERRUN, -1
        st[0] = (st[0] << 8) | data[i]
    st[2] = 4
    row_alive = np.zeros(rows, dtype=np.uint8)
    prev = 0
    last_row = -1
    for r in range(rows):
        prev = _decode_bit(st, data, pa, pb, ROW_CTX + prev, estimator)
        if st[3] != OK:
            return st[3], r
        row_alive[r] = prev
        if prev:
            last_row = r
    crow[0] = 0
    n = 0
    if last_row >= 0:
        # Allocated only now: a live row means the tensor has elements, so ``cols`` is
        # bounded by the element count the caller has checked.
        col_alive = np.zeros(cols, dtype=np.uint8)
        last_col = -1
        for c in range(cols):
            a, b = _neighbours(col_alive, c, kernel)
            col_alive[c] = _decode_bit(st, data, pa, pb, COL_CTX + a * 2 + b, estimator)
            if st[3] != OK:
                return st[3], -1
            if col_alive[c]:
                last_col = c
        if last_col < 0:
            return ERR_MASK, -1
        colcnt = np.zeros(cols, dtype=np.int64)
        flags = np.zeros(cols, dtype=np.uint8)
        alive_seen = 0
        for r in range(rows):
            if row_alive[r]:
                rowcnt = 0
                j = 0
                sign = 0
                for c in range(cols):
                    flags[c] = 0
                for c in range(cols):
                    if not col_alive[c]:
                        continue
                    if _forced(r, c, last_row, last_col, rowcnt, colcnt[c]):
                        bit = 1
                    else:
                        left, back = _neighbours(flags, c, kernel)
                        bit = _decode_bit(st, data, pa, pb, _flag_ctx(colcnt[c], alive_seen, rowcnt, j, left, back),
                                          estimator)
                        if st[3] != OK:
                            return st[3], r
                    if bit:
                        if n >= nonzeros:
                            return ERR_NONZEROS, r
                        flags[c] = 1
                        rowcnt += 1
                        colcnt[c] += 1
                        node = 1
                        for _ in range(depth):
                            node = node * 2 + _decode_bit(st, data, pa, pb, VALUE_CTX + sign * 256 + node, estimator)
                            if st[3] != OK:
                                return st[3], r
                        sym = node - (1 << depth) + 1
                        if sym > codebook_size:
                            return ERR_SYMBOL, r
                        colidx[n] = c
                        syms[n] = sym
                        sign = 1 + np.int64(negative[sym])
                        n += 1
                    j += 1
                alive_seen += 1
            crow[r + 1] = n
    else:
        for r in range(rows):
            crow[r + 1] = 0
    if n != nonzeros:
        return ERR_NONZEROS, -1
    if st[2] != data.size:
        return ERR_TRAILING, -1
    return OK, -1


@jit
def _encode_two_rate(symbols, rows, cols, kernel, depth, negative, out):
    return encode(symbols, rows, cols, kernel, depth, negative, out, TWO_RATE)


@jit
def _encode_counting(symbols, rows, cols, kernel, depth, negative, out):
    return encode(symbols, rows, cols, kernel, depth, negative, out, COUNTING)


@jit
def _decode_two_rate(data, rows, cols, kernel, negative, nonzeros, crow, colidx, syms):
    return decode(data, rows, cols, kernel, negative, nonzeros, crow, colidx, syms, TWO_RATE)


@jit
def _decode_counting(data, rows, cols, kernel, negative, nonzeros, crow, colidx, syms):
    return decode(data, rows, cols, kernel, negative, nonzeros, crow, colidx, syms, COUNTING)


def encode_tensor(symbols: np.ndarray, shape: tuple[int, ...], negative: np.ndarray, estimator: int) -> np.ndarray:
    """The coded bytes of a tensor's symbols (``negative`` as in :func:`encode`; a single entry
    past zero codes positions only, as kind 5 does)."""
    rows, cols = matrix_shape(shape)
    nonzeros = int(np.count_nonzero(symbols))
    out = np.zeros(max_coded_bytes(rows, cols, nonzeros, negative.size - 1), dtype=np.uint8)
    code = _encode_counting if estimator == COUNTING else _encode_two_rate
    status, n = code(symbols, rows, cols, kernel_size(shape), value_depth(negative.size - 1), negative, out)
    if status != OK:  # the bound is proven; this would be a bug, not bad input
        raise RuntimeError(f"the context coder ran out of room ({status})")
    return out[:n].copy()


def decode_tensor(data: np.ndarray, shape: tuple[int, ...], negative: np.ndarray, nonzeros: int,
                  estimator: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """(status, failing row or -1, crow, columns, symbols 1..K-1) of a coded tensor."""
    rows, cols = matrix_shape(shape)
    crow = np.zeros(rows + 1, dtype=np.int64)
    col = np.zeros(nonzeros, dtype=np.int64)
    syms = np.zeros(nonzeros, dtype=np.int64)
    code = _decode_counting if estimator == COUNTING else _decode_two_rate
    status, row = code(data, rows, cols, kernel_size(shape), negative, nonzeros, crow, col, syms)
    return status, row, crow, col, syms


POSITIONS_ONLY = np.zeros(2, dtype=np.uint8)  # ``negative`` for kind 5: one "value", nothing coded for it


@jit
def scatter(crow, colidx, syms, codebook, cols, out):
    """Dense bit patterns from the CSR symbols of :func:`decode` (``syms`` are 1-based)."""
    for r in range(crow.size - 1):
        base = r * cols
        for k in range(crow[r], crow[r + 1]):
            out[base + colidx[k]] = codebook[syms[k] - 1]


@jit
def scatter_values(crow, colidx, values, cols, out):
    """Dense elements from CSR positions and the non-zeros' own values, in order (kind 5)."""
    for r in range(crow.size - 1):
        base = r * cols
        for k in range(crow[r], crow[r + 1]):
            out[base + colidx[k]] = values[k]

