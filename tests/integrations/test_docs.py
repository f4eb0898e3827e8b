"""Every example in docs/integrations.md runs as written and does what the text around it says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from integ_helpers import history

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"

#: section title -> (the modules it needs, its store, the history it must leave, what it prints)
EXAMPLES = {
    "Hugging Face Trainer": (["transformers"], "runs/bert",
                             [(0, "baseline"), (10, None), (20, None), (20, "final")], "drift events: []"),
    "PEFT / LoRA with the Trainer": (["transformers", "peft"], "runs/lora",
                                     [(0, "baseline"), (10, None), (20, None), (20, "final")],
                                     "10 trainable tensors (the adapters and the new head), 41 frozen (the base "
                                     "model), drift events: []"),
    "PyTorch Lightning": (["lightning"], "runs/lightning",
                          [(0, "baseline"), (10, None), (20, None), (20, "final")], ""),
    "accelerate": (["accelerate"], "runs/accelerate",
                   [(0, "baseline"), (4, None), (8, None), (12, None), (16, None)],
                   "16 updates, drift events: []"),
}


def example(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)
    assert len(blocks) == 1, f"section {title!r} should have exactly one python example"
    return blocks[0]


def test_every_section_has_a_checked_example():
    assert re.findall(r"^## (.+)$", DOC.read_text(), re.M) == list(EXAMPLES)


@pytest.mark.parametrize("title", list(EXAMPLES))
def test_example_runs_as_written(title, tmp_path, monkeypatch, capsys):
    needs, store, expected_history, printed = EXAMPLES[title]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    if printed:
        assert printed in " ".join(DOC.read_text().split())  # the text quotes what the example prints
    monkeypatch.chdir(tmp_path)
    code = compile(example(title), f"{DOC.name}: {title}", "exec")
    exec(code, {"__name__": "__main__"})  # noqa: S102 - our own documentation's example

    assert printed in capsys.readouterr().out
    assert history(tmp_path / store) == expected_history
