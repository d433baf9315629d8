"""The examples and the README's fine-tuning walk-through run as written, at tiny size (CI): the
walk-through's commands are read from the README itself, as .ci/run reads the quick start, so the
two cannot drift apart."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = "## Fine-tuning with TRL or the Trainer"
#: appended to each README command (argparse: the last flag wins), keyed by its first words
TINY = {
    "fisherlora init": ["--num-samples", "8", "--max-length", "512", "--rank", "4", "--backend", "torch", "--quiet"],
    "python examples/sft_trl.py": ["--max-steps", "2", "--train-samples", "4"],
    "fisherlora convert": [],
}


def run(cmd, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("script", ["sft_trl.py", "trainer.py"])
def test_each_example_runs_at_tiny_size(script, tmp_path):
    out = run([sys.executable, str(ROOT / "examples" / script), "--tiny", "--max-steps", "2"], cwd=tmp_path).stdout
    assert "trained adapter saved" in out and "rank 8 (twice the trained rank" in out, out[-2000:]
    assert list(tmp_path.iterdir()) == []  # --tiny works in a temporary folder and removes it


def readme_block(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(title):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_walkthrough_runs_as_written_at_tiny_size(tmp_path):
    from fisherlora.testing import save_tiny_chat_model

    model = str(save_tiny_chat_model(tmp_path / "tiny-model"))
    lines = readme_block(WALKTHROUGH)
    assert [next(k for k in TINY if line.startswith(k)) for line in lines] == list(TINY), lines
    for line in lines:
        words = shlex.split(line.split("  #")[0])
        key = next(k for k in TINY if line.startswith(k))
        prefix = [sys.executable, "-m", "fisherlora.cli"] if words[0] == "fisherlora" else [sys.executable]
        rest = [str(ROOT / w) if w.startswith("examples/") else w for w in words[1:]]
        run(prefix + rest + ["--model", model] + TINY[key], cwd=tmp_path)
    cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    # TRL's SFTTrainer and PEFT's save_pretrained carried the initialisation's lineage tag (§9)
    from fisherlora.adapter import recorded_lineage

    assert recorded_lineage(tmp_path / "trained") == recorded_lineage(tmp_path / "fisherlora-out") is not None


def test_the_readme_classifier_snippet_runs_as_written(tmp_path):
    """The README's classifier example, pasted on its own into a fresh interpreter (it once used
    ``fisherlora.`` without importing it)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Classifiers, encoder-decoders and other models"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code += "\nprint(type(peft_clf).__name__, peft_clf.peft_config['default'].r)\n"
    out = run([sys.executable, "-c", code], cwd=tmp_path).stdout
    assert out.split()[-2:] == ["PeftModelForSequenceClassification", "8"], out[-2000:]
