"""Family ``arithmetic``: whole-number arithmetic in English, in several wordings and operand ranges."""

from __future__ import annotations

from harvest.zoo._spec import family, procedural, rg

add = family("arithmetic", "Add, subtract or multiply whole numbers; the answer is a number.")


def _complex(z: tuple) -> str:
    re_, im = int(z[0]), int(z[1])
    return f"{re_} {'-' if im < 0 else '+'} {abs(im)}i"


def _complex_arith(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    op = meta["operation"]
    a, b = meta["num1"], meta["num2"]
    result = (a[0] + b[0], a[1] + b[1]) if op == "+" else (a[0] - b[0], a[1] - b[1])
    return f"Compute ({_complex(a)}) {op} ({_complex(b)})", _complex(result)


def _plus_words(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} plus {b}?", str(a + b)


def _subtract_from(rng):
    a, b = sorted(rng.sample(range(10, 100), 2))
    return f"Subtract {a} from {b}.", str(b - a)


def _times(rng):
    a, b = rng.randint(2, 9), rng.randint(10, 99)
    return f"What is {a} times {b}?", str(a * b)


def _add_three_digit(rng):
    a, b = rng.randint(100, 499), rng.randint(100, 499)
    return f"Add {a} and {b}.", str(a + b)


def _fill_blank(rng):
    a, b = rng.randint(10, 60), rng.randint(10, 39)
    return f"Fill in the blank: {a} + __ = {a + b}", str(b)


def _double_or_half(rng):
    n = rng.randint(6, 499)
    if rng.random() < 0.5:
        return f"Double {n}.", str(2 * n)
    return f"What is half of {2 * n}?", str(n)


def _difference(rng):
    a, b = rng.sample(range(5, 100), 2)
    return f"What is the difference between {a} and {b}?", str(abs(a - b))


def _equation_form(rng):
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    op = rng.choice("+-")
    return f"{a} {op} {b} = ?", str(a + b if op == "+" else a - b)


add("add_sub", "Add or subtract two numbers below 100.", "numeric",
    rg("basic_arithmetic", min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+", "-"),
       allow_parentheses=False, allow_negation=False), "reasoning_gym:basic_arithmetic")
add("chain_sum", "Evaluate a chain of three one-digit additions and subtractions.", "numeric",
    rg("chain_sum", min_terms=3, max_terms=3, min_digits=1, max_digits=1), "reasoning_gym:chain_sum")
add("solve_linear", "Solve a one-step linear equation with small numbers.", "numeric",
    rg("simple_equations", min_terms=2, max_terms=2, min_value=1, max_value=20, operators=("+", "-"),
       operators_weights=[0.5, 0.5]), "reasoning_gym:simple_equations")
add("complex_add", "Add or subtract two complex numbers with small parts.", "exact",
    rg("complex_arithmetic", _complex_arith, min_real=-5, max_real=5, min_imag=-5, max_imag=5, operations=("+", "-"),
       operations_weights=[0.5, 0.5]), "reasoning_gym:complex_arithmetic")
add("plus_words", "Add two two-digit numbers asked in words ('What is 47 plus 38?').", "numeric",
    procedural(_plus_words), "procedural")
add("subtract_from", "Subtract a smaller two-digit number from a larger one ('Subtract 19 from 73.').", "numeric",
    procedural(_subtract_from), "procedural")
add("times_small", "Multiply a one-digit number by a two-digit one.", "numeric",
    procedural(_times), "procedural")
add("add_three_digit", "Add two three-digit numbers below 500.", "numeric",
    procedural(_add_three_digit), "procedural")
add("fill_blank_add", "Find the missing addend in 'a + __ = c'.", "numeric", procedural(_fill_blank), "procedural")
add("double_half", "Double a number or halve an even one.", "numeric", procedural(_double_or_half), "procedural")
add("difference", "The (positive) difference between two numbers below 100.", "numeric",
    procedural(_difference), "procedural")
add("equation_form", "Evaluate 'a + b = ?' or 'a - b = ?' with operands up to 50.", "numeric",
    procedural(_equation_form), "procedural")
