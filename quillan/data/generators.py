"""Procedural generators of verifiable tasks in four domains: math, code, reasoning, writing.

Each generator returns records shaped
`{"prompt", "answer", "target", "domain", "difficulty", "task", "verifier"}`: `answer` is the
final answer, `target` what the model learns to write (the answer, or worked steps ending in
"Answer: <answer>"), `verifier` the spec `quillan.data.verify.expected_answer` recomputes from.
Every task has several phrasings so a model cannot key on one template.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Literal, get_args

from quillan.data.code_expr import build_expression, evaluation_trace, render
from quillan.data.verify import ANSWER_MARK, expected_answer

Domain = Literal["math", "code", "reasoning", "writing"]
DOMAINS = get_args(Domain)
DIFFICULTIES = (1, 2, 3)

Record = dict[str, Any]

_MATH_TEMPLATES = {
    "add": ["What is {a} + {b}?", "{a} + {b} =", "Compute {a} plus {b}.", "Add {a} and {b}.",
            "Find the sum of {a} and {b}.", "Calculate: {a} + {b}", "What do you get when you add {b} to {a}?"],
    "sub": ["What is {a} - {b}?", "{a} - {b} =", "Compute {a} minus {b}.", "Subtract {b} from {a}.",
            "Find the difference {a} - {b}.", "Calculate: {a} - {b}", "What is {b} less than {a}?"],
    "mul": ["What is {a} * {b}?", "{a} * {b} =", "Compute {a} times {b}.", "Multiply {a} by {b}.",
            "Find the product of {a} and {b}.", "Calculate: {a} x {b}", "What is {a} multiplied by {b}?"],
}
_STEPS_SUFFIX = [" Show your steps.", " Work it out step by step.", " Explain briefly."]
_OPS = {"add": "+", "sub": "-", "mul": "*"}

_CODE_TEMPLATES = ["What does the Python expression `{src}` evaluate to?", "Evaluate in Python: {src}",
                   "What is the value of {src} in Python?", "In Python, what does {src} return?",
                   ">>> {src}", "Python expression: {src}\nResult?", "Compute the Python value of `{src}`."]

_REASONING_TEMPLATES = {
    "max": ["Which is the largest number: {items}?", "Find the maximum of {items}.",
            "What is the biggest value among {items}?", "Largest of {items}?"],
    "min": ["Which is the smallest number: {items}?", "Find the minimum of {items}.",
            "What is the lowest value among {items}?", "Smallest of {items}?"],
    "greater": ["Is {a} greater than {b}? Answer yes or no.", "Yes or no: {a} > {b}?",
                "Is {a} larger than {b}? Reply yes or no.", "Does {a} exceed {b}? yes/no"],
    "sort": ["Sort in {order} order: {items}", "Arrange {items} in {order} order.",
             "Put these numbers in {order} order: {items}", "Order {items} ({order})."],
    "count_even": ["How many even numbers are in {items}?", "Count the even numbers: {items}",
                   "Among {items}, how many are even?", "Number of even values in {items}?"],
    "count_gt": ["How many numbers in {items} are greater than {t}?", "Count values above {t}: {items}",
                 "Among {items}, how many exceed {t}?", "Number of items bigger than {t} in {items}?"],
    "next": ["What comes next: {items}, ?", "Continue the sequence: {items}, ...",
             "Next number in the sequence {items}?", "Find the next term: {items}"],
}

_WRITING_TEMPLATES = {
    "reverse": ["Reverse the word '{text}'.", "Write '{text}' backwards.", "Spell '{text}' in reverse.",
                "What is '{text}' reversed?"],
    "upper": ["Write '{text}' in capital letters.", "Convert to uppercase: {text}", "Uppercase this: {text}",
              "Shout it: {text}"],
    "capitalize": ["Capitalise each word: {text}", "Title-case this: {text}",
                   "Make the first letter of every word uppercase: {text}", "Capitalize: {text}"],
    "count_letter": ["How many times does the letter '{letter}' appear in '{text}'?",
                     "Count the '{letter}'s in '{text}'.", "Number of '{letter}' in '{text}'?",
                     "In '{text}', how often does '{letter}' occur?"],
    "length": ["How many characters are in '{text}'?", "What is the length of '{text}'?",
               "Count the letters in '{text}'.", "len('{text}') in characters?"],
    "word_count": ["How many words are in: {text}", "Count the words: {text}",
                   "Word count of '{text}'?", "How many words does this have: {text}"],
    "acronym": ["Write the first letter of each word in capitals: {text}", "Make an acronym from: {text}",
                "Acronym of '{text}'?", "Initials of: {text}"],
    "sort_words": ["Sort these words alphabetically: {text}", "Alphabetise: {text}",
                   "Put in alphabetical order: {text}", "Order the words A to Z: {text}"],
}

WORDS = (
    "apple river stone cloud bright quiet garden planet silver winter summer yellow orange purple "
    "forest ocean mountain valley desert island candle window mirror ladder pencil bottle basket "
    "rabbit turtle falcon tiger zebra monkey spider dragon castle bridge engine rocket signal "
    "market school doctor farmer sailor artist number letter circle square little gentle simple "
    "happy brave clever swift calm proud kind early later under over after before inside outside "
    "coffee butter honey lemon pepper tomato potato carrot melon cherry banana grape kettle blanket "
    "thunder shadow meadow harbor lantern compass anchor feather pillow marble velvet copper"
).split()


MathFormat = Literal["plain", "reversed", "columns", "columns_mul"]
MATH_FORMATS = get_args(MathFormat)
ReasoningFormat = Literal["plain", "steps"]
CodeFormat = Literal["plain", "steps"]
# A code trace longer than this is replaced by the bare answer: 96 characters are the `cpu`
# preset's decoding budget (benchmark.eval_max_new_tokens) at its one byte per token, and a
# target the model cannot finish within the budget can never be scored right.
CODE_STEPS_MAX_CHARS = 96
REVERSED_MARK = "rev"


def worked_target(steps: str, answer: str) -> str:
    """The target of a worked item: the steps, then a last line `Answer: <answer>`."""
    return f"{steps}\n{ANSWER_MARK} {answer}"


def reversed_digits(answer: str) -> str:
    """The answer's digits least significant first, a minus sign last: `-853` → `358-`."""
    return answer[::-1]


def _math(rng: random.Random, difficulty: int, steps_frac: float, math_format: MathFormat = "plain") -> Record:
    """An add/sub/mul item. `math_format: reversed` writes `rev <digits, least significant first>`
    before `Answer: N`: each digit then depends only on the operands' digits at that place and
    the carry, which small transformers learn far faster than most-significant-first output
    (Lee et al. 2023, arXiv 2307.03381, §4 "reverse"). `columns` writes every add/sub target as
    `column_steps` (one line per place, then `Answer: N`; with or without a request for steps)
    and mul as `reversed`; `columns_mul` also writes mul by a one-digit number in columns. The
    format never changes which random numbers are drawn: the prompts
    and answers are the same in every format."""
    op = rng.choice(tuple(_MATH_TEMPLATES))
    if op == "mul":
        da, db = {1: (1, 1), 2: (2, 1), 3: (2, 2)}[difficulty]
    else:
        da = db = {1: 2, 2: 3, 3: 4}[difficulty]
    a = rng.randint(10 ** (da - 1), 10**da - 1)
    b = rng.randint(10 ** (db - 1) if db > 1 else 0, 10**db - 1)
    spec = {"kind": "arith", "op": op, "a": a, "b": b}
    answer = expected_answer(spec)
    prompt = rng.choice(_MATH_TEMPLATES[op]).format(a=a, b=b)
    show_steps = difficulty > 1 and rng.random() < steps_frac
    if show_steps:
        prompt += rng.choice(_STEPS_SUFFIX)
    target = math_target(op, a, b, answer, math_format, show_steps)
    return {"prompt": prompt, "answer": answer, "target": target, "task": op, "verifier": spec}


def math_target(op: str, a: int, b: int, answer: str, math_format: MathFormat, show_steps: bool) -> str:
    """What the model learns to write for `a op b` (`answer` its value): column steps for add/sub
    in the `columns` formats and for mul by a one-digit `b` in `columns_mul` (asked for steps or
    not), else place-value worked steps when the prompt asks for steps, else the answer (`plain`)
    or `rev <digits>` before it."""
    in_columns = op != "mul" or b < 10 and math_format == "columns_mul"
    if math_format in ("columns", "columns_mul") and in_columns:
        return worked_target(column_steps(op, a, b), answer)
    if show_steps:
        return worked_target(worked_steps(op, a, b), answer)
    return answer if math_format == "plain" else worked_target(f"{REVERSED_MARK} {reversed_digits(answer)}", answer)


def column_steps(op: str, a: int, b: int) -> str:
    """Column arithmetic (a, b ≥ 0; for mul b < 10), one line per place value of `a`, units first:
    `x+y+c=d cC` (sub: `x-y-c=d cC`, the larger operand on top, a first line `neg` when a < b;
    mul: `x*b+c=d cC`), where x and y are the operands' digits at that place, c the carry (borrow)
    in, d the result digit and C the carry (borrow) out; a mul carry runs up to 8.
    `47 + 85` → `7+5+0=2 c1\n4+8+1=3 c1`, `47 * 8` → `7*8+0=6 c5\n4*8+5=7 c3`. Each line's last
    two numbers follow from the three before them by a one-digit fact, and its digits can be copied
    from the prompt by place; the answer is the result digits read bottom-up after the last carry
    (a scratchpad in the spirit of Lee et al. 2023, arXiv 2307.03381, §5 "simplified scratchpad":
    digit sums and carries, least significant first)."""
    if op not in _OPS or a < 0 or b < 0 or op == "mul" and b >= 10:
        raise ValueError(f"column_steps takes add, sub or mul by one digit of non-negative integers, got {op} {a} {b}")
    lines = []
    if op == "sub" and a < b:
        lines.append("neg")
        a, b = b, a
    xs, ys = str(a)[::-1], str(b)[::-1]
    sym, carry = _OPS[op], 0
    places = len(xs) if op == "mul" else max(len(xs), len(ys))
    for i in range(places):
        x = int(xs[i]) if i < len(xs) else 0
        y = b if op == "mul" else int(ys[i]) if i < len(ys) else 0
        if op == "mul":
            t = x * y + carry
            digit, out = t % 10, t // 10
        else:
            t = x + y + carry if op == "add" else x - y - carry
            digit, out = t % 10, int(t >= 10 or t < 0)
        lines.append(f"{x}{sym}{y}{sym if op != 'mul' else '+'}{carry}={digit} c{out}")
        carry = out
    return "\n".join(lines)


def worked_steps(op: str, a: int, b: int) -> str:
    """Place-value worked steps, e.g. `34 * 27 = 34 * 20 + 34 * 7 = 680 + 238 = 918`."""
    parts = [int(d) * 10**i for i, d in enumerate(reversed(str(b))) if d != "0"][::-1] or [0]
    sym = _OPS[op]
    if op == "mul":
        products = [a * p for p in parts]
        terms = " + ".join(f"{a} * {p}" for p in parts)
        return f"{a} * {b} = {terms} = {' + '.join(map(str, products))} = {a * b}"
    lines, acc = [], a
    for p in parts:
        nxt = acc + p if op == "add" else acc - p
        lines.append(f"{acc} {sym} {p} = {nxt}")
        acc = nxt
    return "; ".join(lines)


def _code(rng: random.Random, difficulty: int, steps_frac: float, code_format: CodeFormat = "plain") -> Record:
    """A Python expression to evaluate (`code_expr.build_expression`). The format never changes
    which random numbers are drawn (see `code_target`)."""
    expr, value = build_expression(rng, difficulty)
    spec = {"kind": "code", "expr": expr}
    answer = repr(value)
    prompt = rng.choice(_CODE_TEMPLATES).format(src=render(expr))
    return {"prompt": prompt, "answer": answer, "target": code_target(expr, answer, code_format),
            "task": expr[0] if expr[0] != "call" else expr[1], "verifier": spec}


def code_target(expr: list, answer: str, code_format: CodeFormat) -> str:
    """What the model learns to write for an expression: the answer (`plain`), or (`steps`) the
    value of each inner subexpression on its own line, innermost first, then `Answer: <answer>`
    (`code_expr.evaluation_trace`; a single operation has no inner values and stays the bare
    answer, and so does a trace longer than `CODE_STEPS_MAX_CHARS`)."""
    trace = evaluation_trace(expr) if code_format == "steps" else []
    if not trace:
        return answer
    target = worked_target("\n".join(trace), answer)
    return target if len(target) <= CODE_STEPS_MAX_CHARS else answer


def _numbers(rng: random.Random, difficulty: int, n: int) -> list[int]:
    hi = {1: 20, 2: 100, 3: 1000}[difficulty]
    return [rng.randint(0, hi) for _ in range(n)]


def _reasoning(rng: random.Random, difficulty: int, steps_frac: float,
               reasoning_format: ReasoningFormat = "plain") -> Record:
    """A max/min/greater/sort/count_even/count_gt/next item over small non-negative integers.
    The format never changes which random numbers are drawn (see `reasoning_target`)."""
    task = rng.choice(tuple(_REASONING_TEMPLATES))
    n = 2 + difficulty + rng.randint(0, difficulty)
    spec: dict[str, Any] = {"kind": "reasoning", "task": task}
    fields: dict[str, Any] = {}
    if task == "greater":
        a, b = _numbers(rng, difficulty, 2)
        while a == b:
            b = _numbers(rng, difficulty, 1)[0]
        spec["items"] = [a, b]
        fields = {"a": a, "b": b}
    elif task == "next":
        rule = rng.choice({1: ["arith"], 2: ["arith", "alt"], 3: ["arith", "alt", "geom"]}[difficulty])
        if rule == "geom":
            start, ratio = rng.randint(1, 5), rng.randint(2, 3)
            items = [start * ratio**i for i in range(4)]
        elif rule == "alt":
            s1, s2, d1 = rng.randint(1, 20), rng.randint(30, 60), rng.randint(1, 5)
            items = [s1 + d1 * (i // 2) if i % 2 == 0 else s2 - d1 * (i // 2) for i in range(5)]
        else:
            start, step = rng.randint(0, 10 * difficulty), rng.randint(1, 3 * difficulty + 2)
            items = [start + step * i for i in range(4)]
        spec.update(items=items, rule=rule)
        fields = {"items": ", ".join(map(str, items))}
    else:
        items = _numbers(rng, difficulty, n)
        spec["items"] = items
        fields = {"items": ", ".join(map(str, items))}
        if task == "sort":
            order = rng.choice(["asc", "desc"])
            spec["order"] = order
            fields["order"] = {"asc": "ascending", "desc": "descending"}[order]
        if task == "count_gt":
            spec["threshold"] = fields["t"] = rng.choice(items)
    prompt = rng.choice(_REASONING_TEMPLATES[task]).format(**fields)
    answer = expected_answer(spec)
    return {"prompt": prompt, "answer": answer, "target": reasoning_target(spec, answer, reasoning_format),
            "task": task, "verifier": spec}


def reasoning_target(spec: dict[str, Any], answer: str, reasoning_format: ReasoningFormat) -> str:
    """What the model learns to write for a reasoning item: the answer (`plain`, and `sort` and
    `greater` in every format), or `reasoning_steps(spec)` then `Answer: <answer>` (`steps`)."""
    steps = reasoning_steps(spec) if reasoning_format == "steps" else None
    return worked_target(steps, answer) if steps else answer


def reasoning_steps(spec: dict[str, Any]) -> str | None:
    """A scratchpad for a reasoning item, one line per list item, or None for `sort` and `greater`.

    max/min: `x m`, the item and the running extreme (`3, 9, 4` → `3 3\n9 9\n4 9`);
    count_even/count_gt: `x y|n c`, the item, whether it counts, the running count;
    next: the step from the rule's two terms, then the next term (`2, 5, 8, 11` → `11-8=3\n11+3=14`;
    geom `x/y=r` then `x*r=`; alt, two interleaved sequences, steps from the term two back).
    Each line needs one item copied by position and one comparison, parity or one-step sum, the
    intermediate results a transformer otherwise has to hold in one forward pass (the scratchpad
    idea of Nye et al. 2021, arXiv 2112.00114, §2)."""
    task, items = spec["task"], spec["items"]
    if task in ("max", "min"):
        pick, lines, best = (max if task == "max" else min), [], items[0]
        for x in items:
            best = pick(best, x)
            lines.append(f"{x} {best}")
        return "\n".join(lines)
    if task in ("count_even", "count_gt"):
        lines, count = [], 0
        for x in items:
            hit = x % 2 == 0 if task == "count_even" else x > spec["threshold"]
            count += hit
            lines.append(f"{x} {'y' if hit else 'n'} {count}")
        return "\n".join(lines)
    if task == "next":
        rule = spec["rule"]
        if rule == "geom":
            last, prev = items[-1], items[-2]
            return f"{last}/{prev}={last // prev}\n{last}*{last // prev}={last * (last // prev)}"
        last, prev = (items[-2], items[-4]) if rule == "alt" else (items[-1], items[-2])
        d = last - prev
        if d >= 0:
            return f"{last}-{prev}={d}\n{last}+{d}={last + d}"
        return f"{prev}-{last}={-d}\n{last}-{-d}={last + d}"
    return None


def _writing(rng: random.Random, difficulty: int, steps_frac: float, target_format: str = "plain") -> Record:
    task = rng.choice(tuple(_WRITING_TEMPLATES))
    single = task in ("reverse", "count_letter", "length")
    n_words = 1 if single else 1 + difficulty + rng.randint(0, 1)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    if single and difficulty == 3:
        words = [words[0] + rng.choice(WORDS)]
    text = " ".join(words)
    spec: dict[str, Any] = {"kind": "writing", "task": task, "text": text}
    fields = {"text": text}
    if task == "count_letter":
        spec["letter"] = fields["letter"] = rng.choice(text)
    prompt = rng.choice(_WRITING_TEMPLATES[task]).format(**fields)
    answer = expected_answer(spec)
    return {"prompt": prompt, "answer": answer, "target": answer, "task": task, "verifier": spec}


# (rng, difficulty, steps_frac, target format of the domain) -> record; writing has one format.
GENERATORS: dict[str, Callable[[random.Random, int, float, str], Record]] = {
    "math": _math, "code": _code, "reasoning": _reasoning, "writing": _writing,
}


def generate_tasks(n_per_domain: int, seed: int, steps_frac: float = 0.3,
                   domains: tuple[str, ...] = DOMAINS, math_format: MathFormat = "plain",
                   reasoning_format: ReasoningFormat = "plain", code_format: CodeFormat = "plain") -> list[Record]:
    """`n_per_domain` raw records per domain, equally spread over difficulties 1..3.

    Deterministic for a given seed: each (domain, difficulty) cell draws from its own RNG, so
    changing one domain's count leaves the others' records unchanged.
    """
    formats = {"math": math_format, "reasoning": reasoning_format, "code": code_format}
    records: list[Record] = []
    for domain in domains:
        for difficulty in DIFFICULTIES:
            rng = random.Random(f"{seed}/{domain}/{difficulty}")
            count = n_per_domain // len(DIFFICULTIES) + (difficulty <= n_per_domain % len(DIFFICULTIES))
            for _ in range(count):
                rec = GENERATORS[domain](rng, difficulty, steps_frac, formats.get(domain, "plain"))
                records.append({"domain": domain, "difficulty": difficulty, **rec})
    return records
