"""Short Python expressions over ints, strings and lists, built as data.

An expression is a JSON-able tree (nested lists) so it can be stored next to the task
and re-checked later. `build_expression` returns the tree *and* its value, computed while
building it; `evaluate` is an independent interpreter over the same tree that the verifier
uses. Neither ever calls `eval`/`exec`: a generated string is data, never code.
"""

from __future__ import annotations

import random
from typing import Any

Node = list  # ["lit", v] | ["call", fn, arg] | ["method", name, obj, *args] | ["bin", op, a, b]
#            | ["index", seq, i] | ["slice", seq, i, j] | ["rev", seq] | ["comp", kind, k, seq]

_WORDS = ["cat", "dog", "sun", "tree", "blue", "code", "bit", "moe", "quill", "data", "loop", "node"]


# Bounds on what a stored tree may make the verifier compute: a hostile row in a data file must
# not be able to allocate gigabytes ("x" * 10**12) or recurse without end.
MAX_DEPTH = 32
MAX_LEN = 10_000
MAX_INT = 10**18


def evaluate(node: Node, depth: int = 0) -> Any:
    """Value of an expression tree; raises ValueError on a malformed, too deep or too large tree."""
    if depth > MAX_DEPTH:
        raise ValueError(f"expression nested deeper than {MAX_DEPTH}")
    value = _evaluate(node, depth + 1)
    if isinstance(value, (str, list)) and len(value) > MAX_LEN or isinstance(value, int) and abs(value) > MAX_INT:
        raise ValueError("expression value out of bounds")
    return value


def _evaluate(node: Node, depth: int) -> Any:
    if not isinstance(node, list) or not node:
        raise ValueError(f"not an expression node: {node!r:.60}")
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "call":
        fn, arg = node[1], evaluate(node[2], depth)
        funcs = {"len": len, "sum": sum, "max": max, "min": min, "sorted": sorted, "abs": abs}
        if fn not in funcs:
            raise ValueError(f"unknown function {fn!r}")
        return funcs[fn](arg)
    if kind == "method":
        name, obj = node[1], evaluate(node[2], depth)
        args = [evaluate(a, depth) for a in node[3:]]
        if name in ("upper", "lower") and isinstance(obj, str):
            return getattr(obj, name)()
        if name == "count" and isinstance(obj, (str, list)):
            return obj.count(args[0])
        raise ValueError(f"unknown method {name!r} on {type(obj).__name__}")
    if kind == "bin":
        op, a, b = node[1], evaluate(node[2], depth), evaluate(node[3], depth)
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            sized, times = (a, b) if isinstance(a, (str, list)) else (b, a)
            if isinstance(sized, (str, list)) and isinstance(times, int) and len(sized) * times > MAX_LEN:
                raise ValueError("expression value out of bounds")
            return a * b
        if op == "%":
            return a % b
        raise ValueError(f"unknown operator {op!r}")
    if kind == "index":
        return evaluate(node[1], depth)[evaluate(node[2], depth)]
    if kind == "slice":
        return evaluate(node[1], depth)[evaluate(node[2], depth) : evaluate(node[3], depth)]
    if kind == "rev":
        return evaluate(node[1], depth)[::-1]
    if kind == "comp":
        comp, k, seq = node[1], evaluate(node[2], depth), evaluate(node[3], depth)
        if comp == "mul":
            return [v * k for v in seq]
        if comp == "add":
            return [v + k for v in seq]
        if comp == "mod_eq0":
            return [v for v in seq if v % k == 0]
        raise ValueError(f"unknown comprehension {comp!r}")
    raise ValueError(f"unknown node kind {kind!r}")


def render(node: Node) -> str:
    """Python source text of an expression tree."""
    kind = node[0]
    if kind == "lit":
        return repr(node[1])
    if kind == "call":
        return f"{node[1]}({render(node[2])})"
    if kind == "method":
        args = ", ".join(render(a) for a in node[3:])
        return f"{_atom(node[2])}.{node[1]}({args})"
    if kind == "bin":
        return f"{_atom(node[2])} {node[1]} {_atom(node[3])}"
    if kind == "index":
        return f"{_atom(node[1])}[{render(node[2])}]"
    if kind == "slice":
        return f"{_atom(node[1])}[{render(node[2])}:{render(node[3])}]"
    if kind == "rev":
        return f"{_atom(node[1])}[::-1]"
    if kind == "comp":
        comp, k, seq = node[1], render(node[2]), render(node[3])
        if comp == "mul":
            return f"[v * {k} for v in {seq}]"
        if comp == "add":
            return f"[v + {k} for v in {seq}]"
        return f"[v for v in {seq} if v % {k} == 0]"
    raise ValueError(f"unknown node kind {kind!r}")


def subexpressions(node: Node) -> list[Node]:
    """The operands of `node` that are expressions themselves (not literals), in evaluation order."""
    kind = node[0]
    operands = {"lit": [], "call": node[2:3], "method": node[2:], "bin": node[2:4], "index": node[1:3],
                "slice": node[1:4], "rev": node[1:2], "comp": node[2:4]}
    if kind not in operands:
        raise ValueError(f"unknown node kind {kind!r}")
    return [child for child in operands[kind] if child[0] != "lit"]


def evaluation_trace(node: Node) -> list[str]:
    """The values (as `repr`) of every non-literal subexpression below the root, innermost first
    (post-order): what a person writes when evaluating `sorted([3, 1] + [2])[::-1]` by hand,
    `['[3, 1, 2]', '[1, 2, 3]']`, before the answer `[3, 2, 1]`. Empty for a single operation."""
    trace: list[str] = []
    for child in subexpressions(node):
        trace += evaluation_trace(child)
        trace.append(repr(evaluate(child)))
    return trace


def _atom(node: Node) -> str:
    # Binary operations need parentheses when they are the operand of something else.
    text = render(node)
    return f"({text})" if node[0] == "bin" else text


def _int_list(rng: random.Random, difficulty: int) -> tuple[Node, list[int]]:
    n = rng.randint(2, 2 + 2 * difficulty)
    hi = 10 ** min(difficulty, 2)
    xs = [rng.randint(0, hi - 1) for _ in range(n)]
    return ["lit", xs], xs


def _string(rng: random.Random) -> tuple[Node, str]:
    s = rng.choice(_WORDS)
    if rng.random() < 0.3:
        s = s + rng.choice(_WORDS)
    return ["lit", s], s


def _list_expr(rng: random.Random, depth: int, difficulty: int) -> tuple[Node, list[int]]:
    """A list-of-int valued expression and its value."""
    node, val = _int_list(rng, difficulty)
    if depth <= 0:
        return node, val
    choice = rng.choice(["sorted", "rev", "slice", "comp_mul", "comp_add", "comp_mod", "concat"])
    inner, v = _list_expr(rng, depth - 1, difficulty)
    if choice == "sorted":
        return ["call", "sorted", inner], sorted(v)
    if choice == "rev":
        return ["rev", inner], v[::-1]
    if choice == "slice":
        i = rng.randint(0, max(0, len(v) - 1))
        j = rng.randint(i, len(v))
        return ["slice", inner, ["lit", i], ["lit", j]], v[i:j]
    if choice in ("comp_mul", "comp_add"):
        k = rng.randint(2, 5)
        kind = choice.split("_")[1]
        return ["comp", kind, ["lit", k], inner], [x * k if kind == "mul" else x + k for x in v]
    if choice == "comp_mod":
        k = rng.randint(2, 3)
        return ["comp", "mod_eq0", ["lit", k], inner], [x for x in v if x % k == 0]
    other, w = _int_list(rng, difficulty)
    return ["bin", "+", inner, other], v + w


def _int_expr(rng: random.Random, depth: int, difficulty: int) -> tuple[Node, int]:
    """An int valued expression and its value."""
    lst, v = _list_expr(rng, max(0, depth - 1), difficulty)
    nonempty = len(v) > 0
    options = ["len", "count"] + (["sum", "max", "min", "index"] if nonempty else [])
    choice = rng.choice(options)
    if choice == "len":
        node, val = ["call", "len", lst], len(v)
    elif choice == "count":
        target = rng.choice(v) if nonempty else 0
        node, val = ["method", "count", lst, ["lit", target]], v.count(target)
    elif choice == "index":
        i = rng.randint(-len(v), len(v) - 1)
        node, val = ["index", lst, ["lit", i]], v[i]
    else:
        fn = {"sum": sum, "max": max, "min": min}[choice]
        node, val = ["call", choice, lst], fn(v)
    if difficulty >= 2 and rng.random() < 0.5:
        k = rng.randint(1, 9)
        op = rng.choice(["+", "*", "-"])
        val = val + k if op == "+" else val * k if op == "*" else val - k
        node = ["bin", op, node, ["lit", k]]
    return node, val


def _str_expr(rng: random.Random, depth: int, difficulty: int) -> tuple[Node, Any]:
    """A string (or int, for count/len) valued expression and its value."""
    node, s = _string(rng)
    steps = ["upper", "rev", "repeat", "concat", "slice"]
    for _ in range(depth):
        choice = rng.choice(steps)
        if choice == "upper":
            node, s = ["method", "upper", node], s.upper()
        elif choice == "rev":
            node, s = ["rev", node], s[::-1]
        elif choice == "repeat":
            k = rng.randint(2, 3)
            node, s = ["bin", "*", node, ["lit", k]], s * k
        elif choice == "concat":
            other, t = _string(rng)
            node, s = ["bin", "+", node, other], s + t
        else:
            i = rng.randint(0, max(0, len(s) - 2))
            j = rng.randint(i + 1, len(s))
            node, s = ["slice", node, ["lit", i], ["lit", j]], s[i:j]
    if rng.random() < 0.3 and s:
        ch = rng.choice(s)
        return ["method", "count", node, ["lit", ch]], s.count(ch)
    return node, s


def build_expression(rng: random.Random, difficulty: int) -> tuple[Node, Any]:
    """A random expression tree of the given difficulty (1..3) and its value, by construction."""
    depth = difficulty
    kind = rng.choice(["list", "int", "str"])
    if kind == "list":
        return _list_expr(rng, depth, difficulty)
    if kind == "int":
        return _int_expr(rng, depth, difficulty)
    return _str_expr(rng, depth, difficulty)
