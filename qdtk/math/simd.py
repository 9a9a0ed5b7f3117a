"""Two vector primitives for the CPU kernels, written as LLVM IR through Numba intrinsics.

Numba leaves "add +-v by bit e of a word" scalar (32 compares and selects per word, 4-7x
slower); here a word becomes a <32 x i1> mask of one select over a <32 x float> vector, which
LLVM lowers to the host's vector unit (AVX-512: mask registers). Called only from njit code.
Both keep the float32 operations of the scalar code, in the same order (no fused
multiply-add: the IR asks for none), so `signed_axpy` gives the same bits as FORMAT.md's
evaluation.
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
def signed_sum(typingctx, src, s0, words, u0, nw):
    """float32 sum over q < nw, e < 32 of (bit e of words[u0 + q] ? +1 : -1) src[s0 + 32 q + e].
    src float32 and words uint32: 1-D contiguous arrays."""
    sig = types.float32(src, s0, words, u0, nw)

    def codegen(context, builder, signature, args):
        src_v, s0_v, words_v, u0_v, nw_v = args
        sp = _at(context, builder, signature.args[0], src_v, s0_v)
        wp = _at(context, builder, signature.args[2], words_v, u0_v)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_VEC, [0.0] * LANES))
        with cgutils.for_range(builder, nw_v) as loop:
            q = loop.index
            v = builder.load(_vector_at(builder, sp, builder.mul(q, ir.Constant(q.type, LANES))),
                             align=4)
            signed = builder.select(_signs(builder, wp, q), v, builder.fneg(v))
            builder.store(builder.fadd(builder.load(acc), signed), acc)
        return _total(builder, builder.load(acc))

    return sig, codegen


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


@intrinsic
def scaled_signed_sum(typingctx, src, words, row_scale, i, word, nw):
    """float32 sum over planes p of a_p * signed_sum(src, 32 word[p], words, word[p], nw[p]),
    a_p = row_scale[p, i] (float16 bits, uint16 [P, n] C-contiguous): one output row's product.
    The planes' vectors are scaled lane by lane and summed across lanes once at the end."""
    sig = types.float32(src, words, row_scale, i, word, nw)

    def codegen(context, builder, signature, args):
        src_v, words_v, rs_v, i_v, word_v, nw_v = args
        zero = ir.Constant(_VEC, [0.0] * LANES)
        sp = _at(context, builder, signature.args[0], src_v, ir.Constant(i_v.type, 0))
        wp = _at(context, builder, signature.args[1], words_v, ir.Constant(i_v.type, 0))
        rs = context.make_array(signature.args[2])(context, builder, rs_v)
        n_cols = cgutils.unpack_tuple(builder, rs.shape, 2)[1]
        word_a = context.make_array(signature.args[4])(context, builder, word_v)
        nw_a = context.make_array(signature.args[5])(context, builder, nw_v)
        planes = cgutils.unpack_tuple(builder, word_a.shape, 1)[0]
        acc = cgutils.alloca_once_value(builder, zero)
        parts = [cgutils.alloca_once_value(builder, zero) for _ in range(2)]

        def add_word(part, u):
            v = builder.load(_vector_at(builder, sp, builder.mul(u, ir.Constant(u.type, LANES))),
                             align=4)
            signed = builder.select(_signs(builder, wp, u), v, builder.fneg(v))
            builder.store(builder.fadd(builder.load(part), signed), part)

        one = ir.Constant(i_v.type, 1)
        with cgutils.for_range(builder, planes) as lp:
            p = lp.index
            u0 = builder.load(builder.gep(word_a.data, [p]))
            count = builder.load(builder.gep(nw_a.data, [p]))
            for part in parts:
                builder.store(zero, part)
            full = builder.icmp_signed("==", count, ir.Constant(count.type, GROUP_WORDS))
            with builder.if_else(full, likely=True) as (group, narrow):
                with group:  # every group but the last: straight-line code
                    for q in range(GROUP_WORDS):
                        add_word(parts[q % 2], builder.add(u0, ir.Constant(u0.type, q)))
                with narrow:  # words in pairs, into two sums: two chains of vector adds
                    with cgutils.for_range(builder, builder.ashr(count, one)) as lq:
                        u = builder.add(u0, builder.shl(lq.index, one))
                        add_word(parts[0], u)
                        add_word(parts[1], builder.add(u, one))
                    with builder.if_then(builder.trunc(count, ir.IntType(1))):  # odd last word
                        add_word(parts[0], builder.sub(builder.add(u0, count), one))
            h = builder.load(builder.gep(rs.data, [builder.add(builder.mul(p, n_cols), i_v)]))
            a = builder.fpext(builder.bitcast(h, ir.HalfType()), _F32)  # exact
            both = builder.fadd(builder.load(parts[0]), builder.load(parts[1]))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(_broadcast(builder, a),
                                                                        both)), acc)
        return _total(builder, builder.load(acc))

    return sig, codegen
