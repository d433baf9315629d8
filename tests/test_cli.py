"""The `fisherlora` command: the real embedded model end to end, and errors that leave nothing behind."""

import json
import subprocess
import sys

import pytest
import torch

from fisherlora import cli
from tests.no_network import no_network_env

pytestmark = pytest.mark.slow

def run(*args, check_rc=0, env=None):
    proc = subprocess.run([sys.executable, "-m", "fisherlora.cli", *args], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def embedded_out(tmp_path_factory):
    """The main job on the embedded model and data, small, in a process without network."""
    out = tmp_path_factory.mktemp("cli") / "out"
    proc = run("init", "--num-samples", "4", "--max-length", "96", "--batch-size", "2", "--rank", "4",
               "--target-modules", "q_proj,v_proj,down_proj", "--output", str(out), "--save-residual", "--quiet",
               env=no_network_env(out.parent / "network.log"))
    (out.parent / "stderr.txt").write_text(proc.stderr)
    return out


def test_the_job_makes_no_network_request(embedded_out):
    log = embedded_out.parent / "network.log"
    assert not log.exists(), log.read_text()[:3000]
    # the same environment does catch a request
    probe = embedded_out.parent / "probe.log"
    subprocess.run([sys.executable, "-c", "import socket\ntry: socket.getaddrinfo('example.org', 443)\n"
                    "except OSError: pass"], env=no_network_env(probe), timeout=60, check=True)
    assert "getaddrinfo" in probe.read_text()


def test_quiet_draws_no_progress_bar(embedded_out):
    stderr = (embedded_out.parent / "stderr.txt").read_text()
    assert "it/s" not in stderr and "de-quantizing" not in stderr, stderr[-2000:]


def test_offline_mode_brings_no_library_warnings_about_the_hub(embedded_out):
    """The command turns the Hub off; bitsandbytes (importing PEFT) then fails to fetch an optional
    CPU kernel and says so, and ``kernels`` says it skipped a trust check: noise the command's own
    switch causes, so the command keeps it out of the user's output."""
    stderr = (embedded_out.parent / "stderr.txt").read_text()
    assert "kernels-community" not in stderr and "offline mode" not in stderr, stderr[-2000:]


def test_the_command_gives_back_the_callers_environment_and_loggers(monkeypatch, capsys):
    """``cli.main`` called from Python sets offline mode and quiets its noise for its own run only."""
    import logging
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    logging.getLogger(cli.OFFLINE_NOISE[0]).setLevel(logging.DEBUG)
    before = {name: logging.getLogger(name).level for name in cli.OFFLINE_NOISE}
    assert cli.main(["plan", "--model", "llama-3-8b"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert {name: logging.getLogger(name).level for name in cli.OFFLINE_NOISE} == before
    logging.getLogger(cli.OFFLINE_NOISE[0]).setLevel(logging.NOTSET)


def test_init_on_the_embedded_model_and_gsm8k(embedded_out):
    report = json.loads((embedded_out / "report.json").read_text())
    assert report["num_layers"] == 90  # 30 decoder layers × 3 target types
    assert report["calibration"]["sequences"] == 4
    assert 0 < report["calibration"]["label_tokens"] < report["calibration"]["tokens"]
    assert {"collect", "decompose", "load model"} <= set(report["timings_s"])
    cfg = json.loads((embedded_out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["init_lora_weights"] is True
    assert (embedded_out / "energy.png").stat().st_size > 10_000


def test_outputs_load_on_the_original_base_and_with_peft_on_the_residual(embedded_out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import fisherlora
    from fisherlora.data import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer("smollm2-135m")
    ids = tok("Natalia sold clips to 48 of her friends in April.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        loaded = fisherlora.load(base, embedded_out)
        a = loaded(input_ids=ids).logits
        residual = AutoModelForCausalLM.from_pretrained(embedded_out / "residual", dtype=torch.float32)
        b = PeftModel.from_pretrained(residual, str(embedded_out))(input_ids=ids).logits
    scale = ref.abs().max()
    assert (a - ref).abs().max() <= 1e-4 * scale
    assert (b - ref).abs().max() <= 1e-4 * scale


def test_report_command(embedded_out):
    assert "layers adapted" in run("report", str(embedded_out)).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "200", "--target-modules", "k_proj"], "rank 200 exceeds"),  # checked on the GGUF's config
        (["--data", "/does/not/exist.jsonl"], "does not exist"),
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--score", "loud"], "invalid choice"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    proc = run("init", "--num-samples", "2", "--max-length", "32", "--output", str(out), "--quiet", *args,
               check_rc=2)
    assert message in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "output, extra, message",
    [
        ("out", [], "--overwrite"),  # exists and is not empty
        ("out", ["--overwrite"], "not written by fisherlora"),
        ("dangling", [], "symbolic link"),
        (".", [], "working directory"),
    ],
)
def test_output_problems_are_refused_before_any_work(tmp_path, monkeypatch, capsys, output, extra, message):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path / "out" if output == "." else tmp_path)
    before = sorted(map(str, tmp_path.rglob("*")))
    assert cli.main(["init", "--output", output, "--model", "/not/loaded", *extra]) == 2
    assert message in capsys.readouterr().err
    assert sorted(map(str, tmp_path.rglob("*"))) == before and (tmp_path / "out" / "x").read_text() == "keep"


@pytest.mark.parametrize("json_path, message", [("missing/plan.json", "does not exist"), (".", "is a directory")])
def test_plan_checks_its_json_path_before_building_the_model(tmp_path, monkeypatch, capsys, json_path, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fisherlora.models.meta_model_from_config", _raise(AssertionError("the model was built")))
    assert cli.main(["plan", "--model", "llama-3.2-1b", "--json", json_path]) == 2
    assert message in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("free_gb", ["0", "-4", "nan", "inf", "lots"])
def test_plan_refuses_a_free_memory_that_is_not_a_positive_number(free_gb, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--model", "llama-3.2-1b", "--free-gb", free_gb])
    assert exc.value.code == 2 and "--free-gb: a positive number of GB" in capsys.readouterr().err


def test_plan_uses_the_free_memory_it_is_given(capsys):
    assert cli.main(["plan", "--model", "llama-3.2-1b", "--free-gb", "0.5"]) == 0
    assert "memory_mode=auto with 0.5 GB free" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def tiny_init(tmp_path, model, *extra):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"what is {i} + {i}?", "answer": f"{2 * i}"})
                              for i in range(4)))
    return ["init", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
            "--num-samples", "2", "--max-length", "32", "--rank", "2", "--backend", "torch", "--quiet", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "20", "--target-modules", "k_proj"], "rank 20 exceeds min(d_out, d_in) = 16"),
        (["--target-modules", "no_such_proj"], "no_such_proj"),
    ],
)
def test_targets_and_ranks_are_checked_on_the_config_before_the_model_loads(tmp_path, tiny_model, monkeypatch,
                                                                            capsys, extra, message):
    monkeypatch.setattr("fisherlora.data.load_model_and_tokenizer", _raise(AssertionError("the model was loaded")))
    assert cli.main(tiny_init(tmp_path, tiny_model, *extra)) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_a_warning_is_one_line_in_the_commands_words_and_the_callers_filters_are_kept(tmp_path, tiny_model, capsys):
    """Two 32-token sequences for 32-wide layers: A is rank-deficient in every layer. The command
    says so once, on one line (not Python's file:line and source line), and gives back the
    caller's warning filters and ``showwarning``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)  # the suite's configuration ignores this one warning
        before = (list(warnings.filters), warnings.showwarning)
        assert cli.main(tiny_init(tmp_path, tiny_model)) == 0
        assert (list(warnings.filters), warnings.showwarning) == before
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "rank-deficient" in line]
    assert len(lines) == 1 and lines[0].startswith("fisherlora init: warning: the activation covariance A"), err
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err, err


def test_statistics_are_checked_against_the_targets_before_the_model_loads(tmp_path, tiny_model, monkeypatch, capsys):
    """Statistics saved for q_proj,v_proj and reused with the default targets: refused before the
    model loads, naming what the file holds and the flags that select it; a re-selection within the
    file names the calibration data the statistics came from, not the statistics file."""
    saved = tmp_path / "saved"
    saved.mkdir()
    assert cli.main(tiny_init(saved, tiny_model, "--target-modules", "q_proj,v_proj", "--save-statistics")) == 0
    stats = saved / "out" / "statistics.safetensors"
    from fisherlora import data as fdata

    real_load = fdata.load_model_and_tokenizer
    monkeypatch.setattr(fdata, "load_model_and_tokenizer", _raise(AssertionError("the model was loaded")))
    out = tmp_path / "reuse"
    assert cli.main(["init", "--model", str(tiny_model), "--statistics", str(stats), "--output", str(out),
                     "--rank", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds factors for 4 layers (q_proj,v_proj; memory mode full)" in err, err
    assert "--target-modules q_proj,v_proj" in err and not out.exists()
    monkeypatch.setattr(fdata, "load_model_and_tokenizer", real_load)
    assert cli.main(["init", "--model", str(tiny_model), "--statistics", str(stats), "--output", str(out),
                     "--rank", "1", "--target-modules", "q_proj,v_proj", "--quiet"]) == 0
    card = (out / "README.md").read_text()
    assert "data.jsonl" in card and "statistics.safetensors" not in card.split("## How it was made")[1][:600], card


def _raise(exc):
    def raiser(*args, **kwargs):
        raise exc

    return raiser


@pytest.mark.parametrize(
    "target, exc, rc, words",
    [
        ("fisherlora.initialize.collect_statistics", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate "
         "2.00 GiB.\nSee documentation for Memory Management"), 1,
         ["out of memory", "the calibration passes (memory_mode=full, layer group 1/1)", "--memory-mode projected",
          "--layer-groups"]),
        ("fisherlora.initialize.compute_initialization", RuntimeError("[enforce fail at alloc_cpu.cpp:117] "
         "data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes."), 1,
         ["out of memory", "the decomposition (memory_mode=full", "--memory-mode projected"]),
        ("fisherlora.initialize.wrap_and_write", MemoryError(), 1, ["out of memory", "writing the adapter"]),
        ("fisherlora.initialize.compute_initialization", torch.linalg.LinAlgError(
         "linalg.eigh: The algorithm failed to converge because the input matrix is ill-conditioned\n"
         "Intel oneMKL ERROR: Parameter 8 was incorrect on entry to SSYEVD."), 1,
         ["LinAlgError: linalg.eigh: The algorithm failed to converge", "the decomposition", "--debug"]),
        ("fisherlora.initialize.collect_statistics", RuntimeError("no forward pass reached the target layers"), 1,
         ["RuntimeError: no forward pass reached", "the calibration passes", "--debug"]),
        ("fisherlora.report.write_report", KeyboardInterrupt(), 130, ["interrupted", "nothing was written"]),
    ],
    ids=["cuda-oom", "cpu-oom", "memoryerror", "linalg", "runtime", "interrupt"],
)
def test_every_failure_is_one_line_and_a_nonzero_exit(tmp_path, tiny_model, monkeypatch, capsys, target, exc, rc,
                                                     words):
    monkeypatch.setattr(target, _raise(exc))
    assert cli.main(tiny_init(tmp_path, tiny_model)) == rc
    # the tiny calibration set also brings one warning line (rank-deficient A) when it gets that far
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith("fisherlora init: warning: ")]
    assert len(err) == 1 and err[0].startswith("fisherlora init: "), err
    assert all(w in err[0] for w in words), err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no output, no temporary directory


def test_debug_lets_the_exception_through_with_its_phase(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr("fisherlora.initialize.compute_initialization", _raise(torch.linalg.LinAlgError("eigh")))
    with pytest.raises(torch.linalg.LinAlgError) as info:
        cli.main(tiny_init(tmp_path, tiny_model, "--debug"))
    assert "fisherlora phase: the decomposition (memory_mode=full, layer group 1/1)" in info.value.__notes__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_help_teaches():
    text = cli.build_parser().format_help()
    assert "Fisher energy" in text and "fisherlora init" in text and "--debug" in text


@pytest.mark.parametrize("content, match", [
    ('{"model_type": "llama", "hidden_size": 0}', "cannot build a causal LM"),
    ("[1]", "not a transformers model config: it holds a JSON list"),
    (b"\xff\xfe", "not a transformers model config"),
])
def test_plan_names_a_config_it_cannot_read(tmp_path, capsys, content, match):
    cfg = tmp_path / "config.json"
    cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cli.main(["plan", "--model", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert match in err and "config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("content", ["[]", "{}", "{bad"])
def test_report_names_a_report_it_cannot_read(tmp_path, capsys, content):
    (tmp_path / "report.json").write_text(content)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "cannot be read as a fisherlora report" in capsys.readouterr().err


def test_embedded_outputs_travel_and_convert_without_naming_the_model(embedded_out, tmp_path):
    """No path of this machine in the files (the embedded model is named `smollm2-135m`), so
    `fisherlora convert` finds the base from fisherlora.json alone; chat records are labelled on the
    assistant turns of SmolLM2's own chat template."""
    from datasets import Dataset

    import fisherlora
    from fisherlora.data import load_model_and_tokenizer, tokenize_records

    for name in ("adapter_config.json", "fisherlora.json", "README.md", "report.json", "report.md"):
        text = (embedded_out / name).read_text()
        assert sys.prefix not in text and "site-packages" not in text and str(embedded_out) not in text, name
    cfg = json.loads((embedded_out / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["task_type"]) == ("smollm2-135m", "CAUSAL_LM")
    assert 'load_model_and_tokenizer("smollm2-135m", dtype=torch.float32)' in (embedded_out / "README.md").read_text()
    base, tok = load_model_and_tokenizer("smollm2-135m")
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    cal = tokenize_records(Dataset.from_list([{"messages": chat}]), tok)
    labelled = [t for t in cal.labels[0] if t != -100]
    assert tok.decode(labelled).strip() == "It is 4.<|im_end|>"
    model = fisherlora.load(base, embedded_out, is_trainable=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "trained")
    proc = run("convert", str(embedded_out), str(tmp_path / "trained"), "-o", str(tmp_path / "plain"))
    assert "rank 8 (twice the trained rank" in proc.stdout
