"""The README's examples are real: its Python block runs as written and its error text is the
one the toolkit prints."""

import contextlib
import io
import re

import pytest

import mlsys_jax as mj
from mlsys_jax.models import get_config, llama


def blocks(readme: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", readme, flags=re.DOTALL)


@pytest.fixture(scope="module")
def readme(repo_root) -> str:
    return (repo_root / "README.md").read_text()


def test_quick_start_is_the_two_commands(readme):
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in blocks(quick, "bash")[0].splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_the_functional_api_example_runs_as_written(readme, devices):
    (code,) = blocks(readme.split("## The functional API", 1)[1].split("\n## ", 1)[0], "python")
    assert 15 <= len([line for line in code.splitlines() if line.strip()]) <= 25
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - the README example runs as written
    loss_line, spec_line, sampled_line = out.getvalue().strip().splitlines()
    assert 4.0 < float(loss_line.split()[1]) < 8.0
    assert spec_line in ("P(None, 'fsdp', 'tensor')", "PartitionSpec(None, 'fsdp', 'tensor')")
    assert sampled_line == "(8,)"


def test_the_error_shown_is_the_error_raised(readme, devices):
    shown = blocks(readme.split("## The functional API", 1)[1], "text")[0]
    with pytest.raises(mj.PlanError) as err:
        mj.Plan(mj.make_mesh(tensor=8), mj.rules("tp")).placements(llama.param_specs(get_config("tiny")))
    normalize = lambda s: " ".join(s.split())
    assert normalize(shown) == normalize(f"PlanError: {err.value}")
