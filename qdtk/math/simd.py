"""Two vector primitives for the CPU kernels, written as LLVM IR through Numba intrinsics.

Numba leaves "add +-v by bit e of a word" scalar (32 compares and selects per word, 4-7x
slower); here a word becomes a <32 x i1> mask of one select over a <32 x float> vector, which
LLVM lowers to the host's vector unit (AVX-512: mask registers). Called only from njit code.
`signed_axpy` keeps the float32 operations of the scalar code in the same order (no fused
multiply-add: the IR asks for none), so it gives the same bits as FORMAT.md's evaluation;
`signed_row_sums` is a product, held to 1e-5 of the unpacked matmul, not to its bits.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 32  # one 32-bit word of signs
GROUP_WORDS = 4  # words of a plane row of a full 128-column group
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)
_MASK = ir.VectorType(ir.IntType(1), LANES)  # bit e of the word is lane e (little-endian)
_I32 = ir.IntType(32)


def _at(context, builder, aryty, ary, index):
    """Pointer to element `index` of a contiguous array."""
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [index])


def _vector_at(builder, ptr, offset):
    return builder.bitcast(builder.gep(ptr, [offset]), _VEC.as_pointer())


def _signs(builder, words_ptr, q):
    return builder.bitcast(builder.load(builder.gep(words_ptr, [q])), _MASK)


def _total(builder, v):
    """Sum of the lanes (pairwise halves)."""
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n),
                                                      list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def signed_axpy(typingctx, out, o0, b, b0, a, words, u0, nw):
    """out[o0 + 32 q + e] += (bit e of words[u0 + q] ? s : -s), s = a * b[b0 + 32 q + e] (one
    float32 product), for q < nw. out, b float32 and words uint32: 1-D contiguous arrays."""
    sig = types.void(out, o0, b, b0, a, words, u0, nw)

    def codegen(context, builder, signature, args):
        out_v, o0_v, b_v, b0_v, a_v, words_v, u0_v, nw_v = args
        op = _at(context, builder, signature.args[0], out_v, o0_v)
        bp = _at(context, builder, signature.args[2], b_v, b0_v)
        wp = _at(context, builder, signature.args[5], words_v, u0_v)
        av = builder.insert_element(ir.Constant(_VEC, None), a_v, ir.Constant(_I32, 0))
        av = builder.shuffle_vector(av, av, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
        with cgutils.for_range(builder, nw_v) as loop:
            q = loop.index
            off = builder.mul(q, ir.Constant(q.type, LANES))
            optr = _vector_at(builder, op, off)
            s = builder.fmul(av, builder.load(_vector_at(builder, bp, off), align=4))
            signed = builder.select(_signs(builder, wp, q), s, builder.fneg(s))
            builder.store(builder.fadd(builder.load(optr, align=4), signed), optr, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _broadcast(builder, value):
    v = builder.insert_element(ir.Constant(_VEC, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


ROWS = 4  # output rows per call of signed_row_sums: each vector of x (.) b loaded serves 4 rows


@intrinsic
def signed_row_sums(typingctx, src, half, planes, row_scale, i0, word, nw, y):
    """y[r] = sum_p a_p[r] sum_{words u of plane p} sum_e (bit e of planes[r, u] ? +1 : -1)
    src[32 u + e] for the ROWS rows r = i0 .. i0 + ROWS - 1 (clamped to the last row: a row past
    it recomputes and rewrites that one), a_p[r] = row_scale[p, r] (float16 bits).

    The signed sum is 2 (sum of src over the set bits) - (sum of src over all bits): each word is
    one masked vector add per row (no negation, no blend), the planes' totals come in as
    half [32 P], half[32 p + e] = (1/2) sum_u src[32 u + e] over plane p's words. Each row's lanes
    start at -half, so they stay half of the signed sum (no large partial sums to cancel when
    x has a mean). src, half float32 and y float32 1-D contiguous; planes uint32 [n, U] and
    row_scale uint16 [P, n] C-contiguous; word, nw int64 [P] (the plane's first word, its count).
    """
    sig = types.void(src, half, planes, row_scale, i0, word, nw, y)

    def codegen(context, builder, signature, args):
        src_v, half_v, planes_v, rs_v, i0_v, word_v, nw_v, y_v = args
        index = i0_v.type
        zero = ir.Constant(_VEC, [0.0] * LANES)
        sp = _at(context, builder, signature.args[0], src_v, ir.Constant(index, 0))
        hp = _at(context, builder, signature.args[1], half_v, ir.Constant(index, 0))
        pl = context.make_array(signature.args[2])(context, builder, planes_v)
        n, n_words = cgutils.unpack_tuple(builder, pl.shape, 2)
        last = builder.sub(n, ir.Constant(index, 1))
        rows = []
        for r in range(ROWS):
            i = builder.add(i0_v, ir.Constant(index, r))
            rows.append(builder.select(builder.icmp_signed("<", i, n), i, last))
        words = [builder.gep(pl.data, [builder.mul(i, n_words)]) for i in rows]
        rs = context.make_array(signature.args[3])(context, builder, rs_v)
        n_cols = cgutils.unpack_tuple(builder, rs.shape, 2)[1]
        word_a = context.make_array(signature.args[5])(context, builder, word_v)
        nw_a = context.make_array(signature.args[6])(context, builder, nw_v)
        yp = _at(context, builder, signature.args[7], y_v, ir.Constant(index, 0))
        n_planes = cgutils.unpack_tuple(builder, word_a.shape, 1)[0]
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(ROWS)]
        part = [cgutils.alloca_once_value(builder, zero) for _ in range(ROWS)]

        def add_word(u):
            v = builder.load(_vector_at(builder, sp, builder.mul(u, ir.Constant(index, LANES))),
                             align=4)
            for r in range(ROWS):
                old = builder.load(part[r])
                builder.store(builder.select(_signs(builder, words[r], u), builder.fadd(old, v),
                                             old), part[r])

        with cgutils.for_range(builder, n_planes) as lp:
            p = lp.index
            u0 = builder.load(builder.gep(word_a.data, [p]))
            count = builder.load(builder.gep(nw_a.data, [p]))
            minus_half = builder.fneg(builder.load(
                _vector_at(builder, hp, builder.mul(p, ir.Constant(index, LANES))), align=4))
            for r in range(ROWS):
                builder.store(minus_half, part[r])
            full = builder.icmp_signed("==", count, ir.Constant(count.type, GROUP_WORDS))
            with builder.if_else(full, likely=True) as (group, narrow):
                with group:  # every group but the last: straight-line code
                    for q in range(GROUP_WORDS):
                        add_word(builder.add(u0, ir.Constant(index, q)))
                with narrow, cgutils.for_range(builder, count) as lq:
                    add_word(builder.add(u0, lq.index))
            for r in range(ROWS):
                h = builder.load(builder.gep(rs.data, [builder.add(builder.mul(p, n_cols),
                                                                   rows[r])]))
                a = builder.fpext(builder.bitcast(h, ir.HalfType()), _F32)  # exact
                builder.store(builder.fadd(builder.load(acc[r]), builder.fmul(
                    _broadcast(builder, a), builder.load(part[r]))), acc[r])
        two = ir.Constant(_F32, 2.0)
        for r in range(ROWS):
            builder.store(builder.fmul(two, _total(builder, builder.load(acc[r]))),
                          builder.gep(yp, [rows[r]]))
        return context.get_dummy_value()

    return sig, codegen
