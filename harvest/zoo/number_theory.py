"""Family ``number_theory``: divisors, primes, remainders and digits."""

from __future__ import annotations

from harvest.zoo._spec import family, procedural, rg, yes_no

add = family("number_theory", "Divisors, multiples, primes, remainders and digit sums.")


def _is_prime_number(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


_PRIMES = [n for n in range(2, 1000) if _is_prime_number(n)]
_COMPOSITES = [n for n in range(4, 1000) if not _is_prime_number(n)]


def _is_prime(rng):
    n = rng.choice(_PRIMES if rng.random() < 0.5 else _COMPOSITES)  # balanced: most numbers are composite
    return f"Is {n} a prime number? Answer Yes or No.", yes_no(_is_prime_number(n))


def _remainder(rng):
    n, k = rng.randint(10, 200), rng.randint(2, 12)
    return f"What is the remainder when {n} is divided by {k}?", str(n % k)


def _digit_sum(rng):
    n = rng.randint(100, 99999)
    return f"What is the sum of the digits of {n}?", str(sum(map(int, str(n))))


def _divisor_count(rng):
    n = rng.randint(2, 400)
    return f"How many positive divisors does {n} have?", str(sum(n % d == 0 for d in range(1, n + 1)))


def _next_multiple(rng):
    k, n = rng.randint(3, 12), rng.randint(10, 150)
    return f"What is the smallest multiple of {k} that is greater than {n}?", str((n // k + 1) * k)


def _smallest_prime_factor(rng):
    n = rng.randint(4, 999)
    while _is_prime_number(n):
        n = rng.randint(4, 999)
    return f"What is the smallest prime factor of {n}?", str(next(d for d in range(2, n) if n % d == 0))


add("gcd", "Find the greatest common divisor of two numbers up to 60.", "numeric",
    rg("gcd", min_value=2, max_value=60), "reasoning_gym:gcd")
add("lcm", "Find the least common multiple of two numbers up to 30.", "numeric",
    rg("lcm", min_value=2, max_value=30), "reasoning_gym:lcm")
add("prime_factors", "Write the prime factorization of a number up to 400.", "exact",
    rg("prime_factorization", min_value=2, max_value=400), "reasoning_gym:prime_factorization")
add("is_prime", "Is a number below 1000 prime (Yes or No).", "choice", procedural(_is_prime), "procedural")
add("remainder", "The remainder of a division by 2 to 12.", "numeric", procedural(_remainder), "procedural")
add("digit_sum", "The sum of the digits of a number.", "numeric", procedural(_digit_sum), "procedural")
add("divisor_count", "The number of divisors of a number up to 400.", "numeric",
    procedural(_divisor_count), "procedural")
add("next_multiple", "The smallest multiple of k above a number.", "numeric", procedural(_next_multiple), "procedural")
add("smallest_prime_factor", "The smallest prime factor of a composite number.", "numeric",
    procedural(_smallest_prime_factor), "procedural")
