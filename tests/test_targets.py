"""The one rule every document judges a target by (saferclip.evaluation.targets)."""

import pytest

from saferclip.evaluation.targets import verdict


def test_a_figure_is_judged_as_it_is_printed():
    # 10.04 prints as 10.0: it must not read "missed" against ≤ 10
    assert verdict("10.0", 10.04, "at-most", 10) == "met: 10.0 ≤ 10"
    assert verdict("10.1", 10.06, "at-most", 10) == "missed: 10.1 against ≤ 10 (0.1 points over)"
    assert verdict("77.4 [73.8, 81.0]", 77.4, "at-least", 80) == (
        "missed: 77.4 [73.8, 81.0] against ≥ 80 (2.6 points short)"
    )


def test_whole_points_units_and_no_gap():
    assert verdict("89%", 89, "at-least", 90, bound_text="90%", digits=0) == "missed: 89% against ≥ 90% (1 point short)"
    assert verdict("27%", 27, "at-least", 90, bound_text="90%", digits=0).endswith("(63 points short)")
    assert verdict("3.20×", 3.2, "at-most", 3, digits=2, unit=None) == "missed: 3.20× against ≤ 3"


def test_an_unknown_comparison_is_refused():
    with pytest.raises(ValueError, match="op must be one of at-least, at-most"):
        verdict("1", 1, "equal", 1)
