"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    usage = next(b for b in blocks if "wrapper.fit(" in b)
    namespace: dict = {}
    exec(compile(usage, "README.md", "exec"), namespace)
    assert len(namespace["history"].outer_loss) == 20
