"""Products of sixteen rows at a time, the rows in the vector lanes (numba intrinsics in explicit
LLVM vector code, as :mod:`.simd`): the small model's matrices and the vocabulary head's screen,
for one position or several.

:mod:`.simd`'s row products put one row's weights across a vector's lanes: every group of 32
weights then costs each position a conversion, a scale shuffle and a multiply-add, and every row a
horizontal sum. Where the weights sit in the cache (the 270M's layers, 55 MB of int4) or where a
verification multiplies them by 8 positions (the head's screen: 262,144 rows of 640), that work,
not the bytes, sets the time: each position after the first added 70-90% of a plain step's head,
and a layer's products cost 5x at 8 positions what they cost at 1. Here the lanes hold sixteen
rows instead. Each group of a block of sixteen rows is transposed once, in registers (each 32-bit
lane ``j`` of a vector holds four weights of row ``j``; nibbles unpacked; the rows' scales, int4's
minimums from its super-blocks, laid out the same way), and then each position costs per group
eight ``vpdpbusd`` per activation part with its activations broadcast (the four bytes every lane
multiplies), one conversion and two or three multiply-adds for all sixteen rows. A position's sums
wait in a small scratch buffer between groups; the results come out as one vector store per
position: no horizontal sums. The transposition is paid once per group for all positions.

A position's operations are the same, in the same order, whatever the number of positions
beside it, so a verification's positions get the bits a decode step gets
(``test_products_of_several_positions_are_each_alone_bit_for_bit``). The sums differ from the row
kernels' by fp32 rounding only (another order). The screen's estimate is
:func:`.simd.dot_screen`'s quantity (the high plane times one-part activations, each low nibble
taken as 7.5, plus the exact columns' share), within the head's threshold slack
(:func:`.cpu_numba._screened_topk`). 512-bit VNNI only (:data:`.simd.WIDE`); other machines keep
the row kernels.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .layout import GROUP, META, SUPER, SUPER_SCALE
from .simd import (_F32, _FAST, _I8, _I32, _I64, _SCREEN_SCALES, _V16F, _V16I, _V64B, _WEIGHT, _bytes, _check,
                   _check_activations, _dot512, _prefetch, _row_ptr, _scale_at, _splat, _vload)

ROWS = 16  # rows per block: one per 32-bit lane of a 512-bit vector
COLUMNS = 8  # the exact columns' errors per row (cpu_numba.EXACT_COLUMNS)
STEPS = GROUP // 4  # vpdpbusd steps per group: 4 weights per lane each
TILE = 4  # positions whose products interleave (independent dependency chains)
AHEAD = 2  # blocks ahead whose bytes are asked for (prefetched) before a block's products


SIDE = SUPER * 2 * ROWS * 4  # scratch bytes of an octet's scales and minimums


@njit(inline="always")
def scratch_bytes(positions):
    """Bytes of the scratch buffer a block needs for ``positions`` activation rows: an octet's
    scales and minimums, the exact columns' errors (the screen), and a running sum per position."""
    return SIDE + COLUMNS * ROWS * 4 + positions * ROWS * 4


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


def _block_codegen(mode: str, n_parts: int, screen: bool):
    """The code of a sixteen-row block (see the module docstring) for ``mode`` ``int8``, ``int4``
    or ``screen`` (the high plane of the nibble-plane layout), activations of ``n_parts`` parts.
    Arguments ``(xa, codes, scales, n0, scratch, out, col0)``, and for the screen also ``(use_cols,
    col_err, x_col)``: ``out[t, col0 + j]`` for row ``n0 + j``."""
    tile_n = TILE if n_parts == 1 else TILE // 2  # two parts: twice the chains per position

    def codegen(context, builder, signature, args):
        ty = signature.args
        xa_v, codes_v, scales_v, n0_v, scratch_v, out_v, col0_v = args[:7]
        arr = lambda i, v: context.make_array(ty[i])(context, builder, v)
        cd_a, sc_a, scr_a, out_a = arr(1, codes_v), arr(2, scales_v), arr(4, scratch_v), arr(5, out_v)
        parts = [context.make_array(ty[0].types[i])(context, builder, builder.extract_value(xa_v, i))
                 for i in range(len(ty[0]))]
        # per part (xq, xd); then the group sums the correction multiplies (xs; xs1 of one part of two)
        if n_parts == 1:
            act, sums_a = [(parts[0], parts[1])], parts[2] if len(parts) == 3 else parts[5]
        else:
            act, sums_a = [(parts[0], parts[2]), (parts[1], parts[3])], parts[4]
        if screen:
            use_v, col_v, xcol_v = args[7:10]
            col_a, xc_a = arr(8, col_v), arr(9, xcol_v)
        n0_v = builder.sext(n0_v, _I64) if n0_v.type.width < 64 else n0_v
        col0_v = builder.sext(col0_v, _I64) if col0_v.type.width < 64 else col0_v
        width = builder.extract_value(cd_a.shape, 1)
        step = GROUP if mode == "int8" else GROUP // 2  # code bytes per group
        g_n = builder.udiv(width, ir.Constant(_I64, step))
        s_width = builder.extract_value(sc_a.shape, 1)
        t_n = builder.extract_value(out_a.shape, 0)
        out_width = builder.extract_value(out_a.shape, 1)
        rows = [_row_ptr(builder, cd_a, builder.add(n0_v, ir.Constant(_I64, j)), width) for j in range(ROWS)]
        srows = [_row_ptr(builder, sc_a, builder.add(n0_v, ir.Constant(_I64, j)), s_width) for j in range(ROWS)]
        f32p, v16p = _F32.as_pointer(), _V16F.as_pointer()
        # the scratch: the octet's scales and minimums, the exact columns' errors, a sum per position
        side_p = builder.bitcast(scr_a.data, f32p)
        cols_ptr = builder.gep(side_p, [ir.Constant(_I64, SIDE // 4)])
        acc_base = builder.bitcast(builder.gep(cols_ptr, [ir.Constant(_I64, COLUMNS * ROWS)]), v16p)

        def side(i, which):  # group i of the octet: its sixteen scales (0) or minimums (1)
            return builder.gep(side_p, [ir.Constant(_I64, (2 * i + which) * ROWS)]) if isinstance(i, int) else \
                builder.gep(side_p, [builder.mul(builder.add(builder.mul(i, ir.Constant(_I64, 2)),
                                                             ir.Constant(_I64, which)), ir.Constant(_I64, ROWS))])

        def acc_at(t):
            return builder.gep(acc_base, [t])

        # the bytes of the block AHEAD blocks on (its rows and side data are contiguous): fetched
        # while this block computes; past the arrays' end a prefetch is a no-op hint
        nxt = builder.add(n0_v, ir.Constant(_I64, AHEAD * ROWS))
        ahead = [(_row_ptr(builder, cd_a, nxt, width), builder.mul(width, ir.Constant(_I64, ROWS))),
                 (_row_ptr(builder, sc_a, nxt, s_width),
                  builder.mul(s_width, ir.Constant(_I64, ROWS * context.get_abi_sizeof(sc_a.data.type.pointee))))]
        if screen:
            ahead.append((_row_ptr(builder, col_a, nxt, ir.Constant(_I64, COLUMNS)), ir.Constant(_I64, ROWS * COLUMNS * 4)))
        for ptr, nbytes in ahead:
            byte_ptr = builder.bitcast(ptr, _I8.as_pointer())
            lines = builder.udiv(builder.add(nbytes, ir.Constant(_I64, 63)), ir.Constant(_I64, 64))
            with cgutils.for_range(builder, lines) as loop:
                _prefetch(builder, byte_ptr, builder.mul(loop.index, ir.Constant(_I64, 64)))

        zero16 = ir.Constant(_V16F, [0.0] * 16)
        with cgutils.for_range(builder, t_n) as loop:
            builder.store(zero16, acc_at(loop.index), align=4)
        if screen:
            with builder.if_then(use_v):
                for j in range(ROWS):
                    crow = _row_ptr(builder, col_a, builder.add(n0_v, ir.Constant(_I64, j)), ir.Constant(_I64, COLUMNS))
                    for i in range(COLUMNS):
                        value = builder.load(builder.gep(crow, [ir.Constant(_I64, i)]))
                        builder.store(value, builder.gep(cols_ptr, [ir.Constant(_I64, i * ROWS + j)]))
        k_corr = {"int8": -128.0, "screen": -120.5}.get(mode)
        octets = builder.udiv(builder.add(g_n, ir.Constant(_I64, SUPER - 1)), ir.Constant(_I64, SUPER))
        with cgutils.for_range(builder, octets) as octet_loop:
            o = octet_loop.index
            g0 = builder.mul(o, ir.Constant(_I64, SUPER))
            count = builder.sub(g_n, g0)
            count = builder.select(builder.icmp_unsigned("<", count, ir.Constant(_I64, SUPER)), count,
                                   ir.Constant(_I64, SUPER))
            if mode == "int4":
                _super_block_side(builder, srows, o, side)
            else:
                with cgutils.for_range(builder, count) as loop:
                    sp = side(loop.index, 0)
                    for j in range(ROWS):
                        builder.store(_scale_at(builder, srows[j], builder.add(g0, loop.index)),
                                      builder.gep(sp, [ir.Constant(_I64, j)]))
            with cgutils.for_range(builder, count) as group_loop:
                i = group_loop.index
                g = builder.add(g0, i)
                u = _unpacked_group(builder, rows, g, mode)
                sc = builder.load(builder.bitcast(side(i, 0), v16p), align=4)
                mn = builder.load(builder.bitcast(side(i, 1), v16p), align=4) if mode == "int4" else None
                x0 = builder.mul(g, ir.Constant(_I64, GROUP))

                def position(t):
                    """Position ``t``'s products of the group: the same operations in the same order
                    in every tile (so the same bits alone or beside other positions)."""
                    fac = None
                    for xq_a, xd_a in act:
                        xq = _row_ptr(builder, xq_a, t, builder.extract_value(xq_a.shape, 1))
                        chains = []
                        for half in range(2):  # two chains per part: weights 0-15 and 16-31
                            acc = None
                            for s_ in range(4):
                                word = builder.load(builder.bitcast(
                                    builder.gep(xq, [builder.add(x0, ir.Constant(_I64, 16 * half + 4 * s_))]),
                                    _I32.as_pointer()), align=1)
                                acc = _dot512(builder, acc, u[4 * half + s_],
                                              builder.bitcast(_splat(builder, word, _V16I), _V64B))
                            chains.append(acc)
                        total = builder.sitofp(builder.add(chains[0], chains[1]), _V16F)
                        xd = builder.load(builder.gep(_row_ptr(builder, xd_a, t, builder.extract_value(xd_a.shape, 1)), [g]))
                        term = builder.fmul(total, _splat(builder, xd, _V16F), flags=_FAST)
                        fac = term if fac is None else builder.fadd(fac, term, flags=_FAST)
                    xsum = builder.load(builder.gep(_row_ptr(builder, sums_a, t, builder.extract_value(sums_a.shape, 1)), [g]))
                    if k_corr is not None:
                        c = builder.fmul(xsum, ir.Constant(_F32, k_corr), flags=_FAST)
                        fac = builder.fadd(fac, _splat(builder, c, _V16F), flags=_FAST)
                    acc = builder.fadd(builder.load(acc_at(t), align=4), builder.fmul(sc, fac, flags=_FAST), flags=_FAST)
                    if mode == "int4":
                        acc = builder.fadd(acc, builder.fmul(mn, _splat(builder, xsum, _V16F), flags=_FAST), flags=_FAST)
                    builder.store(acc, acc_at(t), align=4)

                tiles = builder.udiv(t_n, ir.Constant(_I64, tile_n))
                with cgutils.for_range(builder, tiles) as loop:
                    t0 = builder.mul(loop.index, ir.Constant(_I64, tile_n))
                    for p in range(tile_n):
                        position(builder.add(t0, ir.Constant(_I64, p)))
                done = builder.mul(tiles, ir.Constant(_I64, tile_n))
                with cgutils.for_range(builder, builder.sub(t_n, done)) as loop:
                    position(builder.add(done, loop.index))

        with cgutils.for_range(builder, t_n) as loop:
            t = loop.index
            if screen:
                with builder.if_then(use_v):
                    xc = _row_ptr(builder, xc_a, t, ir.Constant(_I64, COLUMNS))
                    vec = builder.load(acc_at(t), align=4)
                    for i in range(COLUMNS):
                        col = builder.load(builder.bitcast(builder.gep(cols_ptr, [ir.Constant(_I64, i * ROWS)]), v16p),
                                           align=4)
                        x_i = _splat(builder, builder.load(builder.gep(xc, [ir.Constant(_I64, i)])), _V16F)
                        vec = builder.fadd(vec, builder.fmul(col, x_i, flags=_FAST), flags=_FAST)
                    builder.store(vec, acc_at(t), align=4)
            dst = builder.gep(out_a.data, [builder.add(builder.mul(t, out_width), col0_v)])
            builder.store(builder.load(acc_at(t), align=4), builder.bitcast(dst, v16p), align=4)
        return context.get_dummy_value()

    return codegen


def _unpacked_group(builder, rows, g, mode):
    """Group ``g`` of the sixteen rows as eight ``<64 x i8>`` of unsigned weights ``U``: vector
    ``q``, lane ``j`` = row ``j``'s weights ``4q .. 4q + 3`` (``q < 4``) or ``16 + 4(q - 4) ..``."""
    vectors = [None] * STEPS
    if mode == "int8":
        for half in range(2):
            words = _transpose_group(builder, rows, builder.add(builder.mul(g, ir.Constant(_I64, GROUP)),
                                                                ir.Constant(_I64, 16 * half)))
            for s_, word in enumerate(words):  # U = code + 128: the sign bit flipped
                vectors[4 * half + s_] = builder.xor(builder.bitcast(word, _V64B), _bytes(-128, 64))
        return vectors
    words = _transpose_group(builder, rows, builder.mul(g, ir.Constant(_I64, GROUP // 2)))
    for s_, word in enumerate(words):
        b = builder.bitcast(word, _V64B)
        if mode == "int4":  # U = q
            vectors[s_], vectors[4 + s_] = builder.and_(b, _bytes(15, 64)), builder.lshr(b, _bytes(4, 64))
        else:  # the screen: U = 16 * high
            vectors[s_], vectors[4 + s_] = builder.shl(b, _bytes(4, 64)), builder.and_(b, _bytes(-16, 64))
    return vectors


def _super_block_side(builder, srows, o, side):
    """The scales ``d * sc`` and minimums ``-dmin * mn`` of super-block ``o``'s 8 groups for the
    sixteen rows (``srows``: the rows' super-block bytes), into ``side(i, 0)`` / ``side(i, 1)``:
    the row kernels' arithmetic (:func:`.simd._super_block_scales`), sixteen rows at once."""
    meta_rows = [builder.bitcast(r, _I8.as_pointer()) for r in srows]
    at = builder.mul(o, ir.Constant(_I64, META))
    head = _transpose_group(builder, meta_rows, at)[0]  # lane j: row j's d and dmin (fp16 bits)
    subs = _transpose_group(builder, meta_rows, builder.add(at, ir.Constant(_I64, 4)))  # 8 sc, then 8 mn
    inv = _splat(builder, ir.Constant(_F32, 1.0 / SUPER_SCALE), _V16F)

    def half(shift):
        bits = builder.trunc(builder.lshr(head, _splat(builder, ir.Constant(_I32, shift), _V16I)),
                             ir.VectorType(ir.IntType(16), 16))
        return builder.fmul(builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 16)), _V16F), inv,
                            flags=_FAST)

    def byte(vec, i):
        shifted = builder.lshr(vec, _splat(builder, ir.Constant(_I32, 8 * (i % 4)), _V16I))
        return builder.uitofp(builder.and_(shifted, _splat(builder, ir.Constant(_I32, 255), _V16I)), _V16F)

    d, dmin = half(0), half(16)
    for i in range(SUPER):
        scale = builder.fmul(d, byte(subs[i // 4], i), flags=_FAST)
        minimum = builder.fsub(ir.Constant(_V16F, [0.0] * 16), builder.fmul(dmin, byte(subs[2 + i // 4], i), flags=_FAST),
                               flags=_FAST)
        for which, value in ((0, scale), (1, minimum)):
            builder.store(value, builder.bitcast(side(i, which), _V16F.as_pointer()), align=4)


@intrinsic
def screen_block(typingctx, xa, high, scales, n0, scratch, estimates, col0, use_cols, col_err, x_col):
    """``estimates[t, col0 + j]`` for the sixteen rows ``n0 .. n0 + 15`` of the high nibble plane
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
    sig = types.void(xa, high, scales, n0, scratch, estimates, col0, use_cols, col_err, x_col)
    return sig, _block_codegen("screen", 1, screen=True)


def _product_block(mode: str):
    def typer(typingctx, xa, codes, scales, n0, scratch, out, col0):
        _check_activations(xa)
        _check((codes, _WEIGHT), (scales, (types.float32,)), (scratch, (types.uint8,)), (out, (types.float32,)))
        n_parts = 1 if mode == "int4" or len(xa) == 3 else 2
        return types.void(xa, codes, scales, n0, scratch, out, col0), _block_codegen(mode, n_parts, screen=False)

    typer.__name__ = f"block_{mode}"
    typer.__doc__ = (f"``out[t, col0 + j]`` = row ``n0 + j`` of the {mode} matrix ``(codes, scales)`` (as "
                     ":func:`.simd.dot_" + mode + "` takes them) times activation row ``t``, for the "
                     "sixteen rows ``n0 .. n0 + 15`` and every position; ``scratch`` uint8 of at least "
                     ":func:`scratch_bytes`. " + ("One-part activations (the first part of two)."
                                                   if mode == "int4" else "One- or two-part activations."))
    return intrinsic(typer)


block_int8 = _product_block("int8")
block_int4 = _product_block("int4")
