"""The mutation tester's generated mutants (tests/mutate.py auto): which lines and arguments it changes."""
from tests.mutate import mutants

MODULE = '''"""A docstring: (never mutated) a + b"""
import os
RESUMABLE = frozenset({"train.epochs", "train.max_steps"})


def scale(values, factor=2,
          unit="px"):
    total = 0
    for value in values:
        total += value * factor
    report(total,
           unit=unit)
    flags = {"epochs": total, "max_steps": None}
    return round(total, ndigits=3)
'''


def mutated_lines():
    return {(n, line.strip()) for n, line, _ in mutants(MODULE)}


def test_operators_statements_and_keywords_are_mutated():
    lines = mutated_lines()
    assert (10, "total += value / factor") in lines
    assert (8, "total = 1") in lines
    assert (8, "pass") in lines and (10, "pass") in lines
    assert (14, "return round(total)") in lines
    assert (14, "pass") in lines


def test_keywords_starting_a_line_names_in_a_set_and_dict_entries_are_dropped():
    lines = mutated_lines()
    assert (12, ")") in lines  # a keyword first on a continued call's line
    assert (3, 'RESUMABLE = frozenset({"train.max_steps"})') in lines  # a string before another
    assert (13, 'flags = {"epochs": total}') in lines  # a dict entry after the first


def test_blocks_docstrings_imports_defaults_and_multiline_statements_are_left_alone():
    changed = {n for n, _ in mutated_lines()}
    assert not changed & {1, 2, 6, 7, 9}  # docstring, import, def (and its defaults on the next line), for
    assert not {n for n, line in mutated_lines() if line == "pass"} & {11, 12}  # not deleted by halves
    assert all(text.count("\n") == MODULE.count("\n") for _, _, text in mutants(MODULE))
