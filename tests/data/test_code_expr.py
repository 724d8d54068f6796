import pytest

from quillan.data.code_expr import evaluation_trace, subexpressions


def test_evaluation_trace_lists_inner_values_innermost_first():
    # sorted([3, 1] + [2])[::-1]
    expr = ["rev", ["call", "sorted", ["bin", "+", ["lit", [3, 1]], ["lit", [2]]]]]
    assert evaluation_trace(expr) == ["[3, 1, 2]", "[1, 2, 3]"]
    # min(sorted([v * 4 for v in [48, 75]])) * 6 = 1152
    expr = ["bin", "*", ["call", "min", ["call", "sorted", ["comp", "mul", ["lit", 4], ["lit", [48, 75]]]]], ["lit", 6]]
    assert evaluation_trace(expr) == ["[192, 300]", "[192, 300]", "192"]
    # strings keep their quotes; both operands of a binary operation are traced, left first
    expr = ["bin", "+", ["method", "upper", ["lit", "cat"]], ["rev", ["lit", "dog"]]]
    assert evaluation_trace(expr) == ["'CAT'", "'god'"]


def test_a_single_operation_has_no_trace():
    assert evaluation_trace(["bin", "*", ["lit", "code"], ["lit", 2]]) == []
    assert evaluation_trace(["slice", ["lit", [1, 2, 3]], ["lit", 0], ["lit", 2]]) == []
    assert subexpressions(["lit", 3]) == []


def test_unknown_node_kind_is_named():
    with pytest.raises(ValueError, match="'call_fn'"):
        evaluation_trace(["call_fn", "x"])
