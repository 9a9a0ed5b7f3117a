"""QuantizeOptions (qdtk.options): one typed object, checked once, fingerprinted from the fields
that change the result and from no other."""

from dataclasses import fields, replace

import pytest

from qdtk.allocate import ALLOCATION_KEYS
from qdtk.errors import QdtkError
from qdtk.options import RUN_ONLY, QuantizeOptions

# a different valid value of every field (knapsack options, so that each one matters)
BASE = QuantizeOptions(abmp="knapsack", bits=2.1, budget_scope="layer")
OTHER = {"method": "gptq", "bits": 2.3, "abmp": "swap", "rho": 0.1, "count": "planes",
         "budget_scope": "model", "orders": (1, 2), "iters": 3, "tau": 1.5, "lam": 2.0,
         "percdamp": 0.05, "compensate": False, "feedback": "block", "refit": False,
         "refine": "rows", "refine_rounds": 2, "backend": "reference", "shrink": 0.25,
         "rotate": "hadamard", "rotate_seed": 5, "early_stop": True, "group_refine": 1,
         "candidate_iters": 0,
         "rotate_exclude": ("*.v_proj.weight",),
         "trust_remote_code": True, "model_code": "native", "cluster": "ray", "num_cpus": 4}


def test_every_field_that_changes_the_result_is_fingerprinted_and_no_other():
    assert set(OTHER) == {f.name for f in fields(QuantizeOptions)}
    rotated = replace(BASE, rotate="hadamard")  # the seed matters where there is a rotation
    for name, value in OTHER.items():
        integer_bits = {"bits": 2} if name in ("abmp", "method") else {}
        base = rotated if name in ("rotate_seed", "rotate_exclude") else BASE
        base = replace(base, refine="full") if name == "early_stop" else base  # stops rounds
        base = replace(base, feedback="block") if name == "group_refine" else base  # its metric
        changed = replace(base, **{name: value, **integer_bits})
        same = changed.fingerprinted() == base.fingerprinted()
        assert same == (name in RUN_ONLY), name
    assert set(ALLOCATION_KEYS) <= set(rotated.fingerprinted())
    # without a rotation its fields are left out: fingerprints of earlier runs stay valid
    assert replace(BASE, rotate_seed=5).fingerprinted() == BASE.fingerprinted()
    assert "rotate" not in BASE.fingerprinted()
    assert replace(BASE, rotate_exclude=("*",)).fingerprinted() == BASE.fingerprinted()
    assert "rotate_exclude" not in rotated.fingerprinted()  # rotated runs of before stay valid
    some = replace(rotated, rotate_exclude=("*.v_proj.weight", "re:q_proj"))
    assert some.rotation("m.layers.0.attn.v_proj.weight", 64) is None
    assert some.rotation("m.layers.0.attn.q_proj.weight", 64) is None
    assert some.rotation("m.layers.0.attn.o_proj.weight", 64).block == 64
    # early stopping: left out when off, and off where there are no rounds to stop
    assert "early_stop" not in replace(BASE, refine="full").fingerprinted()
    assert replace(BASE, early_stop=True).fingerprinted() == BASE.fingerprinted()
    # the sweep's group refinement: left out when off, and off without block feedback
    assert "group_refine" not in replace(BASE, feedback="block").fingerprinted()
    assert replace(BASE, group_refine=2).group_refine == 0
    assert replace(BASE, feedback="block", compensate=False, group_refine=2).group_refine == 0
    # the candidates' iterations: left out when unset, unset where they are the sweep's or
    # there are no candidates (then they change nothing)
    assert "candidate_iters" not in BASE.fingerprinted()
    assert replace(BASE, candidate_iters=BASE.iters) == BASE
    assert replace(BASE, abmp="swap", bits=2, candidate_iters=1).candidate_iters is None
    assert replace(BASE, candidate_iters=1).group_settings(candidates=True)["iters"] == 1
    assert replace(BASE, candidate_iters=1).group_settings()["iters"] == BASE.iters


def test_equal_meanings_fingerprint_alike():
    a = QuantizeOptions.of({"method": "daq", "bits": 2, "iters": 4})
    b = QuantizeOptions.of({"method": "daq", "bits": 2.0, "iters": 4, "orders": [3, 1, 2, 2],
                            "backend": "cpu", "cluster": "ray", "num_cpus": 2})
    assert a.fingerprinted() == b.fingerprinted() and a.bits == 2 and isinstance(a.bits, int)
    k = QuantizeOptions(abmp="knapsack", bits=2)
    assert k.bits == 2.0 and isinstance(k.bits, float)  # a budget in bits per weight
    assert QuantizeOptions(method="rtn", iters=3).fingerprinted() == \
        QuantizeOptions(method="rtn").fingerprinted() == {"method": "rtn", "bits": 2,
                                                          "percdamp": 0.01}
    assert QuantizeOptions.of(a) is a


@pytest.mark.parametrize("given, match", [
    ({"iter": 3}, r"unknown quantize option\(s\) 'iter'"),
    ({"iters": "3"}, r"--iters must be a whole number, got '3'"),
    ({"iters": -1}, r"--iters must be at least 0"),
    ({"candidate_iters": -1}, r"--candidate-iters must be at least 0"),
    ({"candidate_iters": 1.5}, r"--candidate-iters must be a whole number"),
    ({"bits": True}, r"--bits must be a finite number"),
    ({"tau": float("nan")}, r"--tau must be a finite number"),
    ({"orders": "1,2"}, r"--orders must be a list"),
    ({"orders": [0, 2]}, r"--orders must be a non-empty subset"),
    ({"feedback": "full"}, r"--feedback must be one of diagonal, block, got 'full'"),
    ({"backend": "auto"}, r"--backend must be one of reference, cpu, cuda"),
    ({"percdamp": 0}, r"--percdamp must be positive"),
    ({"compensate": "no"}, r"compensate must be true or false"),
    ({"num_cpus": 0}, r"--num-cpus must be at least 1"),
    ({"model_code": "mine"}, r"--model-code must be one of auto, native, remote"),
    ({"budget_scope": "model"}, r"--budget-scope model needs --abmp knapsack"),
])
def test_bad_values_are_clear_errors(given, match):
    with pytest.raises(QdtkError, match=match):
        QuantizeOptions.of(given)
