"""The README's file:line pointers into the code still point where they say."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[([^\]]+)\]\((para/\w+\.py)#L(\d+)\)")


def test_readme_pointers_name_the_lines_they_point_at():
    links = LINK.findall((ROOT / "README.md").read_text())
    assert len(links) >= 8
    for text, path, line in links:
        source = (ROOT / path).read_text().splitlines()[int(line) - 1]
        if text.startswith("`"):    # [`Block.prompt_vectors`](...): that name is defined on the line
            name = text.strip("`").split(".")[-1]
            assert re.match(rf"\s*(class|def) {name}\b", source), (text, path, line, source)
        else:                       # [para/model.py:117](...#L117): the text repeats the target
            assert text == f"{path}:{line}", (text, path, line)
