"""docs/sampler.md's self-contained examples (preemption, echo, speculative decoding) run as written."""

from __future__ import annotations

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "sampler.md"
SECTIONS = ("## Preemption", "## Echo", "## Speculative decoding")


def test_sampler_doc_examples_run() -> None:
    text = DOC.read_text()
    ns: dict = {}
    ran = 0
    for title in SECTIONS:
        section = text[text.index(title):]
        section = section[:section.index("\n## ", 1)]
        for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
            exec(compile(block, f"{DOC}:{title}", "exec"), ns)  # the examples share one namespace, in order
            ran += 1
    assert ran == 3
    assert ns["new_tokens"].numel() >= 1 and ns["echo"].logprobs.shape == (4,)
