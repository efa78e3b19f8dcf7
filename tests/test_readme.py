"""Every Python example in README.md runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("source", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(source: str, tmp_path: Path) -> None:
    exec(compile(source, str(README), "exec"), {"BASE_URI": (tmp_path / "lr").as_uri()})


def test_readme_has_examples() -> None:
    assert EXAMPLES


def test_readme_component_yaml_is_the_example_stage() -> None:
    """The YAML in the README is what the example location loads (same attributes)."""
    import yaml

    shown = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)[0]
    real = README.parent / "definitions" / "stages" / "quality" / "defs.yaml"
    assert yaml.safe_load(shown) == yaml.safe_load(real.read_text())
