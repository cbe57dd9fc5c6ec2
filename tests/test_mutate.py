"""The mutation tester's generated mutants (tests/mutate.py auto): which lines and arguments it changes."""
from tests.mutate import mutants

MODULE = '''"""A docstring: (never mutated) a + b"""
import os


def scale(values, factor=2):
    total = 0
    for value in values:
        total += value * factor
    report(total,
           unit="px")
    return round(total, ndigits=3)
'''


def mutated_lines():
    return {(n, line.strip()) for n, line, _ in mutants(MODULE)}


def test_operators_statements_and_keywords_are_mutated():
    lines = mutated_lines()
    assert (8, "total += value / factor") in lines
    assert (6, "total = 1") in lines
    assert (6, "pass") in lines and (8, "pass") in lines
    assert (11, "return round(total)") in lines
    assert (11, "pass") in lines


def test_blocks_docstrings_imports_and_multiline_statements_are_left_alone():
    changed = {n for n, _ in mutated_lines()}
    assert not changed & {1, 2, 5, 7}  # docstring, import, def, for
    assert not changed & {9, 10}  # a statement over two lines is not deleted by halves
    assert all(text.count("\n") == MODULE.count("\n") for _, _, text in mutants(MODULE))
