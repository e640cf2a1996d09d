"""The untrusted-name check: exactly the Unicode categories Cc, Zl and Zp, nothing else."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from vmfenced.backends.text import check_name, split_lines, untrusted_chars
from vmfenced.errors import ParseError


def test_untrusted_is_exactly_cc_zl_zp_over_every_code_point() -> None:
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    expected = [c for c in every if unicodedata.category(c) in ("Cc", "Zl", "Zp")]
    assert untrusted_chars(every) == expected


@pytest.mark.parametrize("bad", ["\r", "\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", "\u2029"])
def test_a_name_with_a_line_breaking_character_is_refused_and_named(bad: str) -> None:
    with pytest.raises(ParseError) as caught:
        check_name("vmdumper -l", f"victim{bad}x")
    assert f"U+{ord(bad):04X}" in caught.value.reason


@pytest.mark.parametrize(
    "name", ["node1", "a b", 'q"uote', "naïve", "日本", "x\u00a0y", "tab-less"]
)
def test_ordinary_names_pass_whole(name: str) -> None:
    assert check_name("vmdumper -l", name) == name


def test_lines_split_on_newline_only() -> None:
    assert split_lines("a\rb\u2028c\nd\n") == ["a\rb\u2028c", "d"]
    assert split_lines("") == []
