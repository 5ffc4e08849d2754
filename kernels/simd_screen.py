"""The vocabulary head's screen for several positions at once, sixteen rows to a vector (a numba
intrinsic in explicit LLVM vector code, as :mod:`.simd`).

:mod:`.simd`'s row products put one row's weights across a vector's lanes: every group of 32
weights then costs each position a conversion, a scale shuffle and a multiply-add, and every row a
horizontal sum. For the screen of a verification (8 positions over the 270M's 262,144 rows of 640)
that work, not the bytes, set the time: each position after the first added 70-90% of a plain
step's head. Here the lanes hold sixteen rows instead. A block of sixteen rows of the high nibble
plane is transposed once (stage 1: each 32-bit lane ``j`` of a vector holds four weights of row
``j``; the nibbles unpacked to ``U = 16 * high``; the rows' scales and exact-column errors laid out
the same way) into a scratch buffer that stays in L1. Then each position (stage 2) costs per group
eight ``vpdpbusd`` with its activations broadcast (the four bytes every lane multiplies), one
conversion and two multiply-adds for all sixteen rows, and the estimates come out as one vector
store per position: no horizontal sums. The transposition is paid once per block for all positions.

The estimate is the same quantity as :func:`.simd.dot_screen`'s (the high plane times one-part
activations, each low nibble taken as 7.5, plus the exact columns' share), summed in another
order: it differs from it by fp32 rounding only, which the head's threshold slack covers
(:func:`.cpu_numba._screened_topk`). Used for two positions or more (one position's screen reads
its bytes at the memory's rate with the row kernel already); 512-bit VNNI only (:data:`.simd.WIDE`),
other machines keep the row kernels.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .layout import GROUP
from .simd import (SCREEN_CORRECTION, _F32, _FAST, _I8, _I32, _I64, _SCREEN_SCALES, _V16F, _V16I, _V64B, _WEIGHT, _bytes, _check,
                   _check_activations, _dot512, _prefetch, _row_ptr, _scale_at, _splat, _vload)

ROWS = 16  # rows per block: one per 32-bit lane of a 512-bit vector
COLUMNS = 8  # the exact columns' errors per row (cpu_numba.EXACT_COLUMNS)
STEPS = GROUP // 4  # vpdpbusd steps per group: 4 weights per lane each
TILE = 4  # positions whose products interleave (independent dependency chains)
AHEAD = 2  # blocks ahead whose bytes are asked for (prefetched) before a block's products


@njit(inline="always")
def scratch_bytes(groups):
    """Bytes of the scratch buffer :func:`screen_block` needs for rows of ``groups`` groups: per
    group the unpacked weights (``STEPS`` vectors of 64 bytes) and the sixteen rows' scales, then
    the exact columns' errors."""
    return groups * (STEPS * 64 + ROWS * 4) + COLUMNS * ROWS * 4


def _lanes(builder, vec, pattern):
    return builder.shuffle_vector(vec[0], vec[1], ir.Constant(ir.VectorType(_I32, len(pattern)), pattern))


def _transpose_group(builder, rows, offset):
    """The sixteen rows' 16 bytes at ``offset`` (a group of the high plane: byte ``i`` holds
    weights ``i`` and ``16 + i``) as four ``<16 x i32>``: vector ``s``, lane ``j`` = row ``j``'s
    bytes ``4s .. 4s + 3``."""
    xmm = [_vload(builder, rows[j], offset, ir.VectorType(_I8, 16)) for j in range(ROWS)]
    two = lambda a, b: _lanes(builder, (a, b), list(range(32)))
    # B[r]: 128-bit lane L holds row 4L + r
    b = [builder.bitcast(_lanes(builder, (two(xmm[r], xmm[4 + r]), two(xmm[8 + r], xmm[12 + r])), list(range(64))),
                         _V16I) for r in range(4)]
    # a 4 x 4 transpose of 32-bit elements within each 128-bit lane, across the four vectors
    unpack = lambda a, c, lo: _lanes(builder, (a, c), [x for lane in range(4) for x in
                                                      ((4 * lane + i // 2 + (0 if lo else 2)) + 16 * (i % 2)
                                                       for i in range(4))])
    t0, t1 = unpack(b[0], b[1], True), unpack(b[0], b[1], False)
    t2, t3 = unpack(b[2], b[3], True), unpack(b[2], b[3], False)
    unpack64 = lambda a, c, lo: _lanes(builder, (a, c), [x for lane in range(4) for x in
                                                        (4 * lane + (0 if lo else 2) + i % 2 + 16 * (i // 2)
                                                         for i in range(4))])
    return [unpack64(t0, t2, True), unpack64(t0, t2, False), unpack64(t1, t3, True), unpack64(t1, t3, False)]


def group_total(builder, xq, x0, u):
    """One group's products for sixteen rows, ``U . xq`` over its 32 weights as ``<16 x float>``:
    ``u`` the group's eight vectors of unsigned weights (vector ``q``, lane ``j``: row ``j``'s
    weights ``4q .. 4q + 3``, then ``16 + 4(q - 4) ..``), ``xq`` a position's activation bytes
    from ``x0``, broadcast four at a time. Two chains of four ``vpdpbusd`` (weights 0-15 and
    16-31), the same operations in the same order wherever it is used."""
    sums = []
    for half in range(2):
        acc = None
        for s in range(4):
            word = builder.load(builder.bitcast(builder.gep(xq, [builder.add(x0, ir.Constant(_I64, 16 * half + 4 * s))]),
                                                _I32.as_pointer()), align=1)
            acc = _dot512(builder, acc, u[4 * half + s], builder.bitcast(_splat(builder, word, _V16I), _V64B))
        sums.append(acc)
    return builder.sitofp(builder.add(sums[0], sums[1]), _V16F)


@intrinsic
def screen_block(typingctx, xa, high, scales, n0, scratch, use_cols, col_err, x_col, estimates):
    """``estimates[t, n0 + j]`` for the sixteen rows ``n0 .. n0 + 15`` of the high nibble plane
    ``high`` ``[N, K / 2]`` and every position ``t`` of the one-part activations ``xa`` ``(xq, xd,
    xs)``: ``sum_g scale[n, g] * (xd[t, g] * (U . xq) - 120.5 * xs[t, g])``, plus ``col_err[n] .
    x_col[t]`` when ``use_cols``. ``scales`` fp32 or fp16 bits ``[N, K / 32]``; ``scratch`` uint8 of
    at least :func:`scratch_bytes` (one per thread); ``col_err`` ``[N, 8]``, ``x_col`` ``[T, 8]``;
    ``estimates`` fp32 ``[T, N]``. All C-contiguous."""
    _check_activations(xa)
    if len(xa) != 3:
        raise TypeError("screen_block takes one-part activations (xq, xd, xs)")
    _check((high, _WEIGHT), (scales, _SCREEN_SCALES), (scratch, (types.uint8,)), (col_err, (types.float32,)),
           (x_col, (types.float32,)), (estimates, (types.float32,)))
    sig = types.void(xa, high, scales, n0, scratch, use_cols, col_err, x_col, estimates)

    def codegen(context, builder, signature, args):
        xa_v, high_v, scales_v, n0_v, scratch_v, use_v, col_v, xcol_v, est_v = args
        ty = signature.args
        arr = lambda i, v: context.make_array(ty[i])(context, builder, v)
        hi_a, sc_a, scr_a, col_a, xc_a, est_a = (arr(1, high_v), arr(2, scales_v), arr(4, scratch_v), arr(6, col_v),
                                                 arr(7, xcol_v), arr(8, est_v))
        parts = [context.make_array(ty[0].types[i])(context, builder, builder.extract_value(xa_v, i)) for i in range(3)]
        n0_v = builder.sext(n0_v, _I64) if n0_v.type.width < 64 else n0_v
        width = builder.extract_value(hi_a.shape, 1)
        g_n = builder.udiv(width, ir.Constant(_I64, GROUP // 2))
        s_width = builder.extract_value(sc_a.shape, 1)
        t_n = builder.extract_value(est_a.shape, 0)
        n_rows = builder.extract_value(est_a.shape, 1)
        rows = [_row_ptr(builder, hi_a, builder.add(n0_v, ir.Constant(_I64, j)), width) for j in range(ROWS)]
        srows = [_row_ptr(builder, sc_a, builder.add(n0_v, ir.Constant(_I64, j)), s_width) for j in range(ROWS)]
        base = scr_a.data  # i8*
        unit = STEPS * 64 + ROWS * 4  # a group's bytes in the scratch
        f32p = _F32.as_pointer()

        def group_at(g):
            return builder.mul(g, ir.Constant(_I64, unit))

        def scale_ptr(g):
            return builder.bitcast(builder.gep(base, [builder.add(group_at(g), ir.Constant(_I64, STEPS * 64))]), f32p)

        cols_ptr = builder.bitcast(builder.gep(base, [builder.mul(g_n, ir.Constant(_I64, unit))]), f32p)

        # the bytes of the block AHEAD blocks on (its rows, scales and exact columns' errors are
        # contiguous): fetched while this block computes; past the arrays' end a prefetch is a
        # no-op hint
        nxt = builder.add(n0_v, ir.Constant(_I64, AHEAD * ROWS))
        for ptr, nbytes in ((_row_ptr(builder, hi_a, nxt, width), builder.mul(width, ir.Constant(_I64, ROWS))),
                            (_row_ptr(builder, sc_a, nxt, s_width),
                             builder.mul(s_width, ir.Constant(_I64, ROWS * context.get_abi_sizeof(sc_a.data.type.pointee)))),
                            (_row_ptr(builder, col_a, nxt, ir.Constant(_I64, COLUMNS)), ir.Constant(_I64, ROWS * COLUMNS * 4))):
            byte_ptr = builder.bitcast(ptr, _I8.as_pointer())
            lines = builder.udiv(builder.add(nbytes, ir.Constant(_I64, 63)), ir.Constant(_I64, 64))
            with cgutils.for_range(builder, lines) as loop:
                _prefetch(builder, byte_ptr, builder.mul(loop.index, ir.Constant(_I64, 64)))

        # stage 1: the block transposed and unpacked into the scratch
        with cgutils.for_range(builder, g_n) as loop:
            g = loop.index
            words = _transpose_group(builder, rows, builder.mul(g, ir.Constant(_I64, GROUP // 2)))
            at = group_at(g)
            for s, word in enumerate(words):
                b = builder.bitcast(word, _V64B)
                low = builder.shl(b, _bytes(4, 64))  # weights 4s .. 4s + 3: 16 * low nibble
                high_n = builder.and_(b, _bytes(-16, 64))  # weights 16 + 4s ..: 16 * high nibble
                for q, u in ((s, low), (4 + s, high_n)):
                    ptr = builder.gep(base, [builder.add(at, ir.Constant(_I64, 64 * q))])
                    builder.store(u, builder.bitcast(ptr, _V64B.as_pointer()), align=1)
            sp = scale_ptr(g)
            for j in range(ROWS):
                builder.store(_scale_at(builder, srows[j], g), builder.gep(sp, [ir.Constant(_I64, j)]))
        with builder.if_then(use_v):
            for j in range(ROWS):
                crow = _row_ptr(builder, col_a, builder.add(n0_v, ir.Constant(_I64, j)), ir.Constant(_I64, COLUMNS))
                for i in range(COLUMNS):
                    value = builder.load(builder.gep(crow, [ir.Constant(_I64, i)]))
                    builder.store(value, builder.gep(cols_ptr, [ir.Constant(_I64, i * ROWS + j)]))

        # stage 2: per position, every group's eight products of sixteen rows
        def tile(t0, count):
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16)) for _ in range(count)]
            xrows = []
            for p in range(count):
                t = builder.add(t0, ir.Constant(_I64, p))
                xrows.append([_row_ptr(builder, a, t, builder.extract_value(a.shape, 1)) for a in parts])
            with cgutils.for_range(builder, g_n) as loop:
                g = loop.index
                at = group_at(g)
                u = [builder.load(builder.bitcast(builder.gep(base, [builder.add(at, ir.Constant(_I64, 64 * q))]),
                                                  _V64B.as_pointer()), align=1) for q in range(2 * 4)]
                sc = builder.load(builder.bitcast(scale_ptr(g), _V16F.as_pointer()), align=4)
                x0 = builder.mul(g, ir.Constant(_I64, GROUP))
                for p in range(count):
                    xq, xd, xs = xrows[p]
                    total = group_total(builder, xq, x0, u)
                    d = _splat(builder, builder.load(builder.gep(xd, [g])), _V16F)
                    c = _splat(builder, builder.fmul(builder.load(builder.gep(xs, [g])), ir.Constant(_F32, SCREEN_CORRECTION),
                                                     flags=_FAST), _V16F)
                    fac = builder.fadd(builder.fmul(total, d, flags=_FAST), c, flags=_FAST)
                    builder.store(builder.fadd(builder.load(accs[p]), builder.fmul(sc, fac, flags=_FAST), flags=_FAST),
                                  accs[p])
            for p in range(count):
                t = builder.add(t0, ir.Constant(_I64, p))
                with builder.if_then(use_v):
                    xc = _row_ptr(builder, xc_a, t, ir.Constant(_I64, COLUMNS))
                    vec = builder.load(accs[p])
                    for i in range(COLUMNS):
                        col = builder.load(builder.bitcast(builder.gep(cols_ptr, [ir.Constant(_I64, i * ROWS)]),
                                                           _V16F.as_pointer()), align=4)
                        vec = builder.fadd(vec, builder.fmul(col, _splat(builder, builder.load(builder.gep(xc, [
                            ir.Constant(_I64, i)])), _V16F), flags=_FAST), flags=_FAST)
                    builder.store(vec, accs[p])
                dst = builder.gep(est_a.data, [builder.add(builder.mul(t, n_rows), n0_v)])
                builder.store(builder.load(accs[p]), builder.bitcast(dst, _V16F.as_pointer()), align=4)

        tiles = builder.udiv(t_n, ir.Constant(_I64, TILE))
        with cgutils.for_range(builder, tiles) as loop:
            tile(builder.mul(loop.index, ir.Constant(_I64, TILE)), TILE)
        done = builder.mul(tiles, ir.Constant(_I64, TILE))
        with cgutils.for_range(builder, builder.sub(t_n, done)) as loop:
            tile(builder.add(done, loop.index), 1)
        return context.get_dummy_value()

    return sig, codegen
