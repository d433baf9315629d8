"""The examples and the README's fine-tuning walk-through run as printed: each example at tiny size,
and the walk-through's commands, read from the README itself (as .ci/run reads the quick start, so
the two cannot drift apart), on the embedded model at CI size, asking no Hub."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = "## Fine-tuning with TRL or the Trainer"
#: appended to each README command at CI size (argparse: the last flag wins), keyed by its first words
CI_SIZE = {
    ".venv/bin/python examples/sft_trl.py": ["--max-steps", "2", "--train-samples", "4"],
    ".venv/bin/python examples/trainer.py": ["--max-steps", "2", "--train-samples", "4"],
    ".venv/bin/fisherlora convert": [],
    ".venv/bin/fisherlora merge": [],
}
#: what the Hugging Face libraries print when something asks the Hub (or fails to): never in our output
HUB_NOISE = ("kernels-community", "Could not find a config file", "Unable to fetch remote file",
             "huggingface.co", "offline mode")


def run(cmd, cwd, timeout=600, env=None):
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def assert_no_hub(proc, log: Path):
    assert not log.exists(), log.read_text()[:3000]
    noise = [w for w in HUB_NOISE if w in proc.stdout + proc.stderr]
    assert not noise, (noise, proc.stderr[-3000:])


@pytest.mark.parametrize("script", ["sft_trl.py", "trainer.py"])
def test_each_example_runs_at_tiny_size(script, tmp_path):
    out = run([sys.executable, str(ROOT / "examples" / script), "--tiny", "--max-steps", "2"], cwd=tmp_path).stdout
    assert "trained adapter saved" in out and "rank 8 (twice the trained rank" in out, out[-2000:]
    if script == "sft_trl.py" and not torch.cuda.is_available():  # TRL's default bf16 is emulated on a CPU
        assert "training on the CPU in float32" in out, out[-2000:]
    assert list(tmp_path.iterdir()) == []  # --tiny works in a temporary folder and removes it


def readme_block(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(title):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def as_here(words: list[str]) -> list[str]:
    """A README command line as this interpreter runs it: ``.venv/bin/python`` is this Python,
    ``.venv/bin/fisherlora`` the command's module, ``examples/`` the repository's."""
    prefix = {".venv/bin/python": [sys.executable], ".venv/bin/fisherlora": [sys.executable, "-m", "fisherlora.cli"]}
    assert words[0] in prefix, f"the README runs {words[0]!r}: the quick start installs into .venv/"
    return prefix[words[0]] + [str(ROOT / w) if w.startswith("examples/") else w for w in words[1:]]


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_printed_on_the_embedded_model(tmp_path):
    """After the quick start (here its ``fisherlora init`` at CI size: 8 sequences, rank 4, the
    attention's q and v only, which the trainers and the converter treat as any targets), every
    line of the README's fine-tuning section runs as printed, in order, on the embedded SmolLM2-135M
    (both trainers once refused it as a GGUF-quantised model), in a process that cannot reach the
    network and without the Hub switches set, and none of them asks the Hub or prints the
    libraries' Hub warnings."""
    from tests.no_network import no_network_env

    log = tmp_path / "network.log"
    env = no_network_env(log)
    quick_start = run([sys.executable, "-m", "fisherlora.cli", "init", "--num-samples", "8", "--max-length", "128",
                       "--rank", "4", "--target-modules", "q_proj,v_proj", "--quiet"], cwd=tmp_path, env=env)
    assert_no_hub(quick_start, log)
    lines = readme_block(WALKTHROUGH)
    assert [next(k for k in CI_SIZE if line.startswith(k)) for line in lines] == list(CI_SIZE), lines
    for line in lines:
        key = next(k for k in CI_SIZE if line.startswith(k))
        proc = run(as_here(shlex.split(line)) + CI_SIZE[key], cwd=tmp_path, env=env)
        assert_no_hub(proc, log)
    plain = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert plain["r"] == 8 and plain["task_type"] == "CAUSAL_LM"  # twice the rank 4 of the init
    assert (tmp_path / "merged" / "config.json").is_file()
    # both trainers' saves carried the initialisation's lineage tag (docs/DESIGN.md §9)
    from fisherlora.adapter import recorded_lineage

    for trained in ("trained", "trained-trainer"):
        assert (tmp_path / trained / "adapter_model.safetensors").is_file()
        assert recorded_lineage(tmp_path / trained) == recorded_lineage(tmp_path / "fisherlora-out") is not None


@pytest.mark.slow
def test_the_default_path_from_python_asks_no_hub(tmp_path):
    """From Python, without the Hub switches: the README's calls on the embedded model, then PEFT's
    own ``save_pretrained`` (twice, as a Trainer's checkpoints do) and ``fisherlora.load`` with the
    trained adapter: no network request, and none of PEFT's "Could not find a config file" /
    "Unable to fetch remote file" warnings about the recorded base name."""
    from tests.no_network import no_network_env

    code = """
import torch, fisherlora
from fisherlora.data import calibration_batches, load_model_and_tokenizer, load_records, tokenize_records
model, tok = load_model_and_tokenizer("smollm2-135m")
cal = tokenize_records(load_records("gsm8k", num_samples=4), tok, max_length=256)
result = fisherlora.initialize_fisher_lora(model, None, calibration_batches(cal, tok, 2),
                                           fisherlora.FisherLoraConfig(rank=2, target_modules=["v_proj"]))
result.save("out")
result.model.save_pretrained("again")
base, _ = load_model_and_tokenizer("smollm2-135m")
peft_model = fisherlora.load(base, "out", is_trainable=True)
peft_model.save_pretrained("trained")
peft_model.save_pretrained("trained")
fisherlora.load(load_model_and_tokenizer("smollm2-135m")[0], "out", adapter="trained")
print("done")
"""
    log = tmp_path / "network.log"
    proc = run([sys.executable, "-c", code], cwd=tmp_path, env=no_network_env(log))
    assert proc.stdout.split()[-1] == "done"
    assert_no_hub(proc, log)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "smollm2-135m"


def test_the_readme_classifier_snippet_runs_as_written(tmp_path):
    """The README's classifier example, pasted on its own into a fresh interpreter (it once used
    ``fisherlora.`` without importing it)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Classifiers, encoder-decoders and other models"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code += "\nprint(type(peft_clf).__name__, peft_clf.peft_config['default'].r)\n"
    out = run([sys.executable, "-c", code], cwd=tmp_path).stdout
    assert out.split()[-2:] == ["PeftModelForSequenceClassification", "8"], out[-2000:]
