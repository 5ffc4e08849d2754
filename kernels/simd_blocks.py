"""Products of sixteen rows at a time, the rows in the vector lanes, with the codes stored in that
order once at load (numba intrinsics in explicit LLVM vector code, as :mod:`.simd`): the small
matrices (rows of at most ``cpu_numba.BLOCK_WIDTH`` weights: the 270M's), for one position or
several.

:mod:`.simd`'s row products put one row's weights across a vector's lanes: each group of 32
weights then costs each position a conversion, a scale shuffle and a multiply-add, and each row a
horizontal sum. Where the weights sit in the cache (the 270M's layers: 55 MB of int4) and a
verification multiplies them by 8 positions, that work, not the bytes, sets the time: a layer's
products cost 4x at 8 positions what they cost at one. Here the lanes hold sixteen rows:
:func:`block_codes` lays each group of a block of sixteen rows out as four (int4) or eight (int8)
64-byte vectors whose 32-bit lane ``j`` holds four codes of row ``j``, so a group is read with
plain vector loads (transposing it per call cost one position 5-25%, which every plain decode step
pays). Each position then costs per group eight ``vpdpbusd`` per activation part with its
activations broadcast (the four bytes every lane multiplies), one conversion and two or three
multiply-adds for all sixteen rows. A position's sums wait in a small scratch buffer between
groups, and leave as one vector store: no horizontal sums.

A position's operations are the same, in the same order, whatever the number of positions beside
it, so a verification's positions get the bits a decode step gets
(``test_block_products_of_several_positions_are_each_alone_bit_for_bit``). The sums differ from
the row kernels' by fp32 rounding only (another order). 512-bit VNNI only (:data:`.simd.WIDE`);
other machines keep the row kernels. int4's super-block scales stay in the row layout, transposed
per super-block (one in eight groups); int8's fp32 scales are stored in the blocks, after each
group's codes.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .layout import GROUP, META, SUPER, SUPER_SCALE
from .simd import (_F32, _FAST, _I32, _I64, _V16F, _V16I, _V64B, _bytes, _check, _check_activations, _dot512,
                   _prefetch, _row_ptr, _splat, _vload)
from .simd_screen import _transpose_group, group_total

ROWS = 16  # rows per block: one per 32-bit lane of a 512-bit vector
TILE = 4  # positions whose products interleave (independent dependency chains)
AHEAD = 2  # blocks ahead whose int4 scales are asked for (prefetched) before a block's products
# bytes ahead in the codes' stream prefetched with each group: a block's 16 rows are contiguous,
# so the stream runs on into the next blocks. Asked for all at a block's start, two blocks ahead
# (up to 23 KB for int8) left one position of int8 5-27% behind the rows from L3; spread out per
# group, 1-16 KB ahead measured alike (4 KB chosen), at the rows' speed or better.
STREAM_AHEAD = 4096
SIDE = SUPER * 2 * ROWS * 4  # scratch bytes of an octet's scales and minimums


def block_codes(codes: np.ndarray, int4: bool, scales: np.ndarray | None = None) -> np.ndarray:
    """The codes of a matrix ``[N, K]`` (int8, as bytes) or ``[N, K / 2]`` (int4) in the order the
    block kernels read them: ``[N / 16, bytes of sixteen rows]``, each group's sixteen rows as
    vectors of 64 bytes whose lane ``j`` (4 bytes) is row ``j``'s. An int8 code is stored plus 128
    (unsigned, as ``vpdpbusd`` multiplies), and after each group's codes its sixteen rows' fp32
    ``scales`` (``[N, K / 32]``; gathered row by row they cost as much as the products). ``N`` a
    multiple of 16."""
    n, width = codes.shape
    step = GROUP // 2 if int4 else GROUP  # code bytes per group
    g_n = width // step
    blocks = codes.reshape(n // ROWS, ROWS, g_n, step // 4, 4).transpose(0, 2, 3, 1, 4)
    blocks = np.ascontiguousarray(blocks).reshape(n // ROWS, g_n, ROWS * step)
    if int4:
        return blocks.reshape(n // ROWS, g_n * ROWS * step)
    side = np.ascontiguousarray(scales.astype(np.float32).reshape(n // ROWS, ROWS, g_n).transpose(0, 2, 1))
    whole = np.concatenate([blocks ^ np.uint8(0x80), side.view(np.uint8)], axis=2)
    return whole.reshape(n // ROWS, g_n * (ROWS * step + ROWS * 4))


def group_bytes(int4: bool) -> int:
    """Bytes of one group of a block in :func:`block_codes`' layout."""
    return ROWS * GROUP // 2 if int4 else ROWS * GROUP + ROWS * 4


@njit(inline="always")
def scratch_bytes(positions):
    """Bytes of the scratch buffer a block needs for ``positions`` activation rows: an octet's
    scales and minimums, and a running sum per position."""
    return SIDE + positions * ROWS * 4


def _block_codegen(mode: str, n_parts: int):
    """The code of a sixteen-row block (see the module docstring) for ``mode`` ``int8`` or
    ``int4``, activations of ``n_parts`` parts. Arguments ``(xa, blocked, scales, b, scratch, out,
    col0)``: ``out[t, col0 + j]`` for row ``16 b + j``."""
    tile_n = TILE if n_parts == 1 else TILE // 2  # two parts: twice the chains per position
    vectors = GROUP // 8 if mode == "int4" else GROUP // 4  # 64-byte code vectors per group
    stride = group_bytes(mode == "int4")

    def codegen(context, builder, signature, args):
        ty = signature.args
        xa_v, blk_v, scales_v, b_v, scratch_v, out_v, col0_v = args
        arr = lambda i, v: context.make_array(ty[i])(context, builder, v)
        bk_a, sc_a, scr_a, out_a = arr(1, blk_v), arr(2, scales_v), arr(4, scratch_v), arr(5, out_v)
        parts = [context.make_array(ty[0].types[i])(context, builder, builder.extract_value(xa_v, i))
                 for i in range(len(ty[0]))]
        # per part (xq, xd); then the group sums the correction multiplies (xs; xs1 of one part of two)
        if n_parts == 1:
            act, sums_a = [(parts[0], parts[1])], parts[2] if len(parts) == 3 else parts[5]
        else:
            act, sums_a = [(parts[0], parts[2]), (parts[1], parts[3])], parts[4]
        b_v = builder.sext(b_v, _I64) if b_v.type.width < 64 else b_v
        col0_v = builder.sext(col0_v, _I64) if col0_v.type.width < 64 else col0_v
        n0_v = builder.mul(b_v, ir.Constant(_I64, ROWS))
        blk_width = builder.extract_value(bk_a.shape, 1)
        g_n = builder.udiv(blk_width, ir.Constant(_I64, stride))
        s_width = builder.extract_value(sc_a.shape, 1)
        t_n = builder.extract_value(out_a.shape, 0)
        out_width = builder.extract_value(out_a.shape, 1)
        block = _row_ptr(builder, bk_a, b_v, blk_width)
        f32p, v16p = _F32.as_pointer(), _V16F.as_pointer()
        side_p = builder.bitcast(scr_a.data, f32p)  # the octet's scales and minimums, then a sum per position
        acc_base = builder.bitcast(builder.gep(side_p, [ir.Constant(_I64, SIDE // 4)]), v16p)

        def side(i, which):  # group i of the octet: its sixteen scales (0) or minimums (1)
            at = builder.add(builder.mul(i, ir.Constant(_I64, 2)), ir.Constant(_I64, which))
            return builder.gep(side_p, [builder.mul(at, ir.Constant(_I64, ROWS))])

        def acc_at(t):
            return builder.gep(acc_base, [t])

        if mode == "int4":  # the scales of the block AHEAD blocks on (int8's are in the blocks)
            srows = [_row_ptr(builder, sc_a, builder.add(n0_v, ir.Constant(_I64, j)), s_width) for j in range(ROWS)]
            ahead = builder.bitcast(_row_ptr(builder, sc_a, builder.mul(builder.add(b_v, ir.Constant(_I64, AHEAD)),
                                                                       ir.Constant(_I64, ROWS)), s_width),
                                    ir.IntType(8).as_pointer())
            lines = builder.udiv(builder.add(builder.mul(s_width, ir.Constant(_I64, ROWS * 4)), ir.Constant(_I64, 63)),
                                 ir.Constant(_I64, 64))
            with cgutils.for_range(builder, lines) as loop:  # past the array's end a prefetch is a no-op hint
                _prefetch(builder, ahead, builder.mul(loop.index, ir.Constant(_I64, 64)))

        zero16 = ir.Constant(_V16F, [0.0] * 16)
        with cgutils.for_range(builder, t_n) as loop:
            builder.store(zero16, acc_at(loop.index), align=4)
        octets = builder.udiv(builder.add(g_n, ir.Constant(_I64, SUPER - 1)), ir.Constant(_I64, SUPER))
        with cgutils.for_range(builder, octets) as octet_loop:
            o = octet_loop.index
            g0 = builder.mul(o, ir.Constant(_I64, SUPER))
            count = builder.sub(g_n, g0)
            count = builder.select(builder.icmp_unsigned("<", count, ir.Constant(_I64, SUPER)), count,
                                   ir.Constant(_I64, SUPER))
            if mode == "int4":
                _super_block_side(builder, srows, o, side)
            with cgutils.for_range(builder, count) as group_loop:
                i = group_loop.index
                g = builder.add(g0, i)
                at = builder.mul(g, ir.Constant(_I64, stride))
                # the codes' stream STREAM_AHEAD bytes on (past this block: the next ones, contiguous)
                for line in range(0, stride, 64):
                    _prefetch(builder, block, builder.add(at, ir.Constant(_I64, STREAM_AHEAD + line)))
                u = [_vload(builder, block, builder.add(at, ir.Constant(_I64, 64 * q)), _V64B) for q in range(vectors)]
                if mode == "int4":  # U = q: low nibbles weights 0-15, high nibbles 16-31
                    u = [builder.and_(v, _bytes(15, 64)) for v in u] + [builder.lshr(v, _bytes(4, 64)) for v in u]
                    sc = builder.load(builder.bitcast(side(i, 0), v16p), align=4)
                    mn = builder.load(builder.bitcast(side(i, 1), v16p), align=4)
                else:  # the scales after the codes
                    sc = _vload(builder, block, builder.add(at, ir.Constant(_I64, 64 * vectors)), _V16F)
                x0 = builder.mul(g, ir.Constant(_I64, GROUP))

                def position(t):
                    """Position ``t``'s products of the group: the same operations in the same order
                    in every tile (so the same bits alone or beside other positions)."""
                    fac = None
                    for xq_a, xd_a in act:
                        xq = _row_ptr(builder, xq_a, t, builder.extract_value(xq_a.shape, 1))
                        total = group_total(builder, xq, x0, u)
                        xd = builder.load(builder.gep(_row_ptr(builder, xd_a, t, builder.extract_value(xd_a.shape, 1)), [g]))
                        term = builder.fmul(total, _splat(builder, xd, _V16F), flags=_FAST)
                        fac = term if fac is None else builder.fadd(fac, term, flags=_FAST)
                    xsum = builder.load(builder.gep(_row_ptr(builder, sums_a, t, builder.extract_value(sums_a.shape, 1)), [g]))
                    if mode == "int8":  # U = code + 128
                        c = builder.fmul(xsum, ir.Constant(_F32, -128.0), flags=_FAST)
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
            dst = builder.gep(out_a.data, [builder.add(builder.mul(t, out_width), col0_v)])
            builder.store(builder.load(acc_at(t), align=4), builder.bitcast(dst, v16p), align=4)
        return context.get_dummy_value()

    return codegen


def _super_block_side(builder, srows, o, side):
    """The scales ``d * sc`` and minimums ``-dmin * mn`` of super-block ``o``'s 8 groups for the
    sixteen rows (``srows``: the rows' super-block bytes), into ``side(i, 0)`` / ``side(i, 1)``:
    the row kernels' arithmetic (:func:`.simd._super_block_scales`), sixteen rows at once."""
    meta_rows = [builder.bitcast(r, ir.IntType(8).as_pointer()) for r in srows]
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
            builder.store(value, builder.bitcast(side(ir.Constant(_I64, i), which), _V16F.as_pointer()), align=4)


def _product_block(mode: str):
    def typer(typingctx, xa, blocked, scales, b, scratch, out, col0):
        _check_activations(xa)
        _check((blocked, (types.uint8,)), (scales, (types.float32,)), (scratch, (types.uint8,)), (out, (types.float32,)))
        n_parts = 1 if mode == "int4" or len(xa) == 3 else 2
        return types.void(xa, blocked, scales, b, scratch, out, col0), _block_codegen(mode, n_parts)

    typer.__name__ = f"block_{mode}"
    typer.__doc__ = (f"``out[t, col0 + j]`` = row ``16 b + j`` of the {mode} matrix times activation row ``t``, "
                     "for the sixteen rows of block ``b`` and every position; ``blocked`` the codes from "
                     ":func:`block_codes`, ``scales`` as :func:`.simd.dot_" + mode + "` takes them; ``scratch`` "
                     "uint8 of at least :func:`scratch_bytes`. " + ("One-part activations (the first part of two)."
                                                                      if mode == "int4" else
                                                                      "One- or two-part activations."))
    return intrinsic(typer)


block_int8 = _product_block("int8")
block_int4 = _product_block("int4")
