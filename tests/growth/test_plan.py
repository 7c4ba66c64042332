"""Growth timing: the fitted formula's check values (METHODS.md), its range warnings, the CLI."""
import pytest

from kiln.growth.plan import growth_tokens, plan
from tests.trainer.conftest import kiln


def test_formula_reproduces_the_papers_check_values():
    assert growth_tokens(7e9, 2e12) == pytest.approx(11.1e9, rel=0.005)    # 7B, 2T -> ~11.1B
    assert growth_tokens(8e9, 15e12) == pytest.approx(6.6e9, rel=0.005)    # Llama3-8B, 15T -> ~6.6B
    assert plan(7e9, 2e12).warnings == []


def test_plan_warns_outside_the_fitted_range_and_when_d_exceeds_the_budget():
    tiny = plan(4.7e6, 6e5)
    assert len(tiny.warnings) == 2 and "extrapolation" in tiny.warnings[0] and "never grow" in tiny.warnings[1]
    assert tiny.tokens > tiny.target_tokens
    with pytest.raises(ValueError):
        growth_tokens(0, 1e9)


def test_kiln_grow_plan_prints_d_share_and_the_recipe_line():
    out = kiln("grow", "plan", "--target-params", "7e9", "--target-tokens", "2e12").stdout
    assert "d = 11.1B tokens (0.556% of the budget)" in out and "at_tokens: 11112953126" in out
    assert "warning" not in out
    out = kiln("grow", "plan", "--target-params", "5e6", "--target-tokens", "1e6").stdout
    assert out.count("warning:") == 2 and "choose growth.at_tokens yourself" in out
    res = kiln("grow", "plan", "--target-params", "7e9", "--target-tokens", "2e12", "--factor", "1", check=False)
    assert res.returncode == 2 and res.stderr.strip().startswith("kiln: error: kiln grow plan needs")
