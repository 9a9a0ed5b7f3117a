"""The vector primitives of the CPU kernels, written as LLVM IR through Numba intrinsics.

Numba leaves "add +-v by bit e of a word" scalar (32 compares and selects per word, 4-7x
slower); here a word becomes a <32 x i1> mask of one select over a <32 x float> vector, which
LLVM lowers to the host's vector unit (AVX-512: mask registers). Called only from njit code.
`signed_axpy` keeps the float32 operations of the scalar code in the same order (no fused
multiply-add: the IR asks for none), so it gives the same bits as FORMAT.md's evaluation;
`signed_row_sums` (masked adds) and `nibble_row_sums` (AVX-512 table lookups) are products,
held to 1e-5 of the unpacked matmul, not to its bits.
"""

from __future__ import annotations

import numba
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 32  # one 32-bit word of signs
# `nibble_row_sums` needs AVX-512's 16-lane variable permute, in the code Numba compiles for
# this host (a NUMBA_CPU_NAME target other than the host may lack it).
HAS_AVX512 = (numba.config.CPU_NAME in (None, "host")
              and bool(binding.get_host_cpu_features().get("avx512f")))
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


def _broadcast(builder, value):
    v = builder.insert_element(ir.Constant(_VEC, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


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
        av = _broadcast(builder, a_v)
        with cgutils.for_range(builder, nw_v) as loop:
            q = loop.index
            off = builder.mul(q, ir.Constant(q.type, LANES))
            optr = _vector_at(builder, op, off)
            s = builder.fmul(av, builder.load(_vector_at(builder, bp, off), align=4))
            signed = builder.select(_signs(builder, wp, q), s, builder.fneg(s))
            builder.store(builder.fadd(builder.load(optr, align=4), signed), optr, align=4)
        return context.get_dummy_value()

    return sig, codegen


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


TABLE_ROWS = 16  # output rows per call of nibble_row_sums: one AVX-512 vector of rows
NIBBLES = LANES // 4  # 4-sign nibbles per word
_VF16 = ir.VectorType(_F32, TABLE_ROWS)
_VI16 = ir.VectorType(_I32, TABLE_ROWS)


def _permute(builder, table, index):
    """[16] float32: table[index[r] mod 16] for each lane r (vpermps)."""
    fnty = ir.FunctionType(_VF16, [_VF16, _VI16])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.sf.512")
    return builder.call(fn, [table, index])


def _row_words(builder, rows, u0):
    """The 4 words u0 .. u0 + 3 of each of 16 rows (pointers `rows`) as 4 vectors of the 16
    rows' word: 16 loads of 4 words, then a transposition in registers."""
    v4 = ir.VectorType(_I32, 4)
    quads = [builder.load(builder.bitcast(builder.gep(r, [u0]), v4.as_pointer()), align=4)
             for r in rows]
    eights = [builder.shuffle_vector(quads[2 * r], quads[2 * r + 1],
                                     ir.Constant(ir.VectorType(_I32, 8), list(range(8))))
              for r in range(8)]
    sixteens = [builder.shuffle_vector(eights[2 * r], eights[2 * r + 1],
                                       ir.Constant(_VI16, list(range(16)))) for r in range(4)]
    out = []
    for q in range(GROUP_WORDS):  # word q of rows 0-7 from the first two, 8-15 the last two
        pick = ir.Constant(ir.VectorType(_I32, 8), [q + 4 * k for k in range(8)])
        lo = builder.shuffle_vector(sixteens[0], sixteens[1], pick)
        hi = builder.shuffle_vector(sixteens[2], sixteens[3], pick)
        out.append(builder.shuffle_vector(lo, hi, ir.Constant(_VI16, list(range(16)))))
    return out


@intrinsic
def nibble_row_sums(typingctx, table, planes, row_scale, i0, word, nw, y):
    """y[i0 + r] = sum_p a_p[r] sum_{words u of plane p} sum_{j < 8}
    table[128 u + 16 j + (nibble j of planes[i0 + r, u])] for the 16 rows r < 16 (all of them
    rows of planes: the caller keeps i0 + 16 <= n), a_p[r] = row_scale[p, i0 + r] (float16
    bits). table[128 u + 16 j + c] is the signed sum of inputs 4 j .. 4 j + 3 of word u under the 4
    signs of c (`qdtk.math.bcq_matmul.nibble_tables`).

    T-MAC style: the 16 rows are the 16 lanes of one vector, so a word of 32 signs of all 16 rows
    costs 8 table lookups (vpermps: the 16 entries of a nibble's table are one vector, the
    rows' nibbles its indices) and 8 adds, and a plane's row scales are one vector multiply; no
    sums across lanes. AVX-512 only (HAS_AVX512). table, y float32 1-D contiguous; planes uint32
    [n, U] and row_scale uint16 [P, n] C-contiguous; word, nw int64 [P].
    """
    sig = types.void(table, planes, row_scale, i0, word, nw, y)

    def codegen(context, builder, signature, args):
        tab_v, planes_v, rs_v, i0_v, word_v, nw_v, y_v = args
        index = i0_v.type
        tp = _at(context, builder, signature.args[0], tab_v, ir.Constant(index, 0))
        pl = context.make_array(signature.args[1])(context, builder, planes_v)
        n_words = cgutils.unpack_tuple(builder, pl.shape, 2)[1]
        rows = [builder.gep(pl.data, [builder.mul(builder.add(i0_v, ir.Constant(index, r)),
                                                  n_words)]) for r in range(TABLE_ROWS)]
        rs = context.make_array(signature.args[2])(context, builder, rs_v)
        n_cols = cgutils.unpack_tuple(builder, rs.shape, 2)[1]
        word_a = context.make_array(signature.args[4])(context, builder, word_v)
        nw_a = context.make_array(signature.args[5])(context, builder, nw_v)
        yp = builder.bitcast(_at(context, builder, signature.args[6], y_v, i0_v),
                             _VF16.as_pointer())
        n_planes = cgutils.unpack_tuple(builder, word_a.shape, 1)[0]
        zero = ir.Constant(_VF16, [0.0] * TABLE_ROWS)
        acc = cgutils.alloca_once_value(builder, zero)
        part = [cgutils.alloca_once_value(builder, zero) for _ in range(NIBBLES)]  # 8 chains

        def lookups(w, u):
            base = builder.mul(u, ir.Constant(index, 16 * NIBBLES))
            for j in range(NIBBLES):  # vpermps reads the low 4 bits of each index
                nib = builder.lshr(w, ir.Constant(_VI16, [4 * j] * TABLE_ROWS)) if j else w
                t = builder.load(builder.bitcast(builder.gep(tp, [builder.add(
                    base, ir.Constant(index, 16 * j))]), _VF16.as_pointer()), align=4)
                builder.store(builder.fadd(builder.load(part[j]), _permute(builder, t, nib)),
                              part[j])

        with cgutils.for_range(builder, n_planes) as lp:
            p = lp.index
            u0 = builder.load(builder.gep(word_a.data, [p]))
            count = builder.load(builder.gep(nw_a.data, [p]))
            for pt in part:
                builder.store(zero, pt)
            full = builder.icmp_signed("==", count, ir.Constant(count.type, GROUP_WORDS))
            with builder.if_else(full, likely=True) as (group, narrow):
                with group:
                    for q, w in enumerate(_row_words(builder, rows, u0)):
                        lookups(w, builder.add(u0, ir.Constant(index, q)))
                with narrow, cgutils.for_range(builder, count) as lq:  # a narrow last group
                    u = builder.add(u0, lq.index)
                    w = ir.Constant(_VI16, None)
                    for r, ptr in enumerate(rows):
                        w = builder.insert_element(w, builder.load(builder.gep(ptr, [u])),
                                                   ir.Constant(_I32, r))
                    lookups(w, u)
            hp = builder.gep(rs.data, [builder.add(builder.mul(p, n_cols), i0_v)])
            a = builder.fpext(builder.load(builder.bitcast(
                hp, ir.VectorType(ir.HalfType(), TABLE_ROWS).as_pointer()), align=2), _VF16)
            v = [builder.load(pt) for pt in part]
            while len(v) > 1:  # a fixed tree
                v = [builder.fadd(v[2 * k], v[2 * k + 1]) for k in range(len(v) // 2)]
            builder.store(builder.fadd(builder.load(acc), builder.fmul(a, v[0])), acc)
        builder.store(builder.load(acc), yp, align=4)
        return context.get_dummy_value()

    return sig, codegen
