"""bench/quality.py (and its helpers) at toy size: every setting the script offers runs end to end,
resumes, picks learning rates on validation only, and every method in its table starts where its
spec says (issue 18)."""

import json

import pytest
import torch

pytest.importorskip("matplotlib")

TOY = ["--model", "toy", "--train-pairs", "8", "--val-pairs", "4", "--eval-pairs", "4", "--em-pairs", "2",
       "--max-new-tokens", "3", "--calib-pairs", "4", "--max-length", "128", "--batch-size", "4", "--rank", "2",
       "--lrs", "1e-3", "--seeds", "0,1", "--eval-points", "1", "--max-extend", "1"]


@pytest.fixture(scope="module")
def toy_task():
    from bench import quality

    args = quality.parse(TOY + ["--setting", "standard"])
    task = quality.Gsm8kTask(args)
    task.model.requires_grad_(False)
    return task


@pytest.mark.parametrize("setting", ["standard", "cpu", "quick"])
def test_every_setting_runs_end_to_end_and_resumes(tmp_path, setting):
    """The non-quick path used to die in exact_match after the whole base evaluation."""
    from bench import quality

    assert set(quality.SETTINGS) == {"standard", "cpu", "quick"}  # a new setting needs its case here
    methods = ["lora", "fisherlora"] if setting == "standard" else ["fisherlora"]
    steps = ["--steps", "2"] if setting == "quick" else []  # quick counts steps, the others epochs
    argv = TOY + steps + ["--setting", setting, "--methods", ",".join(methods), "--out", str(tmp_path)]
    stem = tmp_path / f"quality_{setting}_toy"
    log = tmp_path / f"{stem.name}_runs.jsonl"
    if setting == "quick":  # a run log kept elsewhere (a tracked folder) is where runs go and resume from
        log = tmp_path / "tracked" / "log.jsonl"
        argv += ["--runs", str(log)]
    assert quality.main(argv) == 0
    assert not (setting == "quick" and (tmp_path / f"{stem.name}_runs.jsonl").exists())
    runs = log.read_text().splitlines()
    report = json.loads(stem.with_suffix(".json").read_text())
    for m in methods:
        s = report["summary"][m]
        # a one-point grid is extended once, then the other seed runs at the chosen lr
        assert sorted(map(float, s["sweep"])) == [1e-3, 3.16e-3] and s["n"] == 2, (m, s)
        assert s["verdict"] in ("reference", "better", "worse", "within noise"), s
        assert s["metric_mean"] is not None  # exact match ran (on 2 questions)
        assert [p[0] for p in s["curves"]["0"]] == [0, 2]  # 2 steps, or one epoch of 8 pairs at batch 4
    assert report["meta"]["base_metric"] is not None and stem.with_suffix(".png").stat().st_size > 0
    assert quality.main(argv) == 0  # resumed: every run skipped, nothing appended
    assert len(log.read_text().splitlines()) == len(runs)


def test_exact_match_needs_no_tensors_from_the_tokenizer(toy_task, monkeypatch):
    """``tok.pad`` returned lists there (AttributeError: 'list' object has no attribute 'to')."""
    from bench import quality

    monkeypatch.setattr(type(toy_task.tok), "pad", lambda self, enc, **kw: {k: list(v) for k, v in enc.items()},
                        raising=False)
    em = quality.exact_match(toy_task.model, toy_task.tok, toy_task.questions[:3], toy_task.answers[:3], 2)
    assert 0.0 <= em <= 1.0


def test_selection_uses_validation_and_extends_the_grid_at_an_edge():
    from bench import quality_stats as qs

    assert qs.next_grid_point({1e-4: 2.0, 3.16e-4: 1.5, 1e-3: 1.2}, 2) == 3.16e-3  # best at the top
    assert qs.next_grid_point({1e-4: 1.0, 3.16e-4: 1.5}, 2) == 3.16e-5  # best at the bottom
    assert qs.next_grid_point({1e-4: 2.0, 3.16e-4: 1.0, 1e-3: 1.2}, 2) is None  # interior
    assert qs.next_grid_point({1e-1: 1.0, 3.16e-2: 2.0}, 2) is None  # not past LR_MAX
    records = [{"method": "m", "lr": lr, "seed": 0, "val_loss": v, "final_loss": h, "curve": [], "metric": None}
               for lr, v, h in ((1e-4, 2.0, 0.1), (1e-3, 1.0, 9.0))]
    assert qs.summarise(records, ["m"], "m", 0)["m"]["best_lr"] == 1e-3  # the held-out loss plays no part


def test_verdict_is_a_paired_t_test():
    from bench import quality_stats as qs

    assert qs.verdict([-0.10, -0.11, -0.09]) == "better"
    assert qs.verdict([0.10, 0.11, 0.09]) == "worse"
    assert qs.verdict([-0.10, 0.12, 0.01]) == "within noise"
    assert qs.verdict([-0.5]) == "n/a"
    # a second name for the reference's spec (fisher:top_sigma while it is the default) shares its
    # runs: it is the reference, not a method "within noise" of itself
    runs = [{"key": f"k{sd}", "method": m, "lr": 1e-3, "seed": sd, "val_loss": 1.0, "final_loss": 1.0 + sd / 10,
             "curve": [], "metric": None} for m in ("fisherlora", "fisher:top_sigma") for sd in (0, 1, 2)]
    other = [{**r, "key": "o" + r["key"], "method": "lora", "final_loss": r["final_loss"] - 0.1} for r in runs[:3]]
    summary = qs.summarise(runs + other, ["fisherlora", "fisher:top_sigma", "lora"], "fisherlora", 0)
    assert [summary[m]["verdict"] for m in summary] == ["reference", "reference", "better"]


def test_schedule_warms_up_then_decays_to_zero():
    from bench.quality_loop import schedule

    f = [schedule(s, 20, 0.1) for s in range(20)]
    assert f[0] == 0.5 and f[1] == 1.0 and all(a >= b for a, b in zip(f[1:], f[2:], strict=False)) and f[-1] < 0.01


def test_every_method_starts_as_its_spec_says(toy_task):
    """Outputs unchanged at step 0; fisher:zero is B = 0 on untouched weights with A's rows the
    fisherlora-unit directions at PEFT's default row norm; each magnitude variant has its size."""
    from bench.quality_methods import METHODS, Initialisers, adapter_size
    from fisherlora.adapter import lora_layers

    base = toy_task.model
    batch = toy_task.calib[0]
    with torch.no_grad():
        ref = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    inits = Initialisers(base, toy_task, rank=2, alpha=2.0)
    built = {}
    for name, spec in METHODS.items():
        pm = inits.get(spec, seed=0)
        with torch.no_grad():
            out = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3, msg=name)
        built[name] = pm
    unit = dict(lora_layers(built["fisher:unit"]))
    for lname, layer in lora_layers(built["fisher:zero"]):
        A = layer.lora_A["default"].weight
        assert layer.lora_B["default"].weight.abs().max() == 0
        torch.testing.assert_close(A.norm(dim=1), torch.full((A.shape[0],), 3 ** -0.5))
        v = torch.nn.functional.normalize(unit[lname].lora_A["default"].weight, dim=1)
        torch.testing.assert_close(A * 3 ** 0.5, v, rtol=1e-5, atol=1e-6)
        orig = dict(base.named_modules())[lname].weight
        assert torch.equal(layer.get_base_layer().weight, orig)  # W untouched, no residual
    sizes = {n: adapter_size(built[n])["delta_fro"] for n in ("lora", "fisher:zero", "fisher:unit", "fisher:sigma",
                                                             "sigma:unit", "milora", "pissa")}
    assert sizes["lora"] == 0 and sizes["fisher:zero"] == 0
    assert sizes["fisher:unit"] == pytest.approx(sizes["sigma:unit"], rel=1e-4)  # both magnitude 1 on r directions
    assert sizes["pissa"] >= sizes["fisher:sigma"] > 0 and sizes["pissa"] > sizes["milora"] > 0
    # the global allocation shares the same budget of rank x layers directions
    ranks = [layer.lora_A["default"].weight.shape[0] for _, layer in lora_layers(built["fisher:global"])]
    assert sum(ranks) == 2 * len(unit) and all(r >= 1 for r in ranks)


#: issue 31's methods: the two gradient starts and two more readings of FILet's energy
ISSUE31 = ["natural_gradient", "gradient", "fisher_sigma:top_sigma", "fisher_low:top_sigma"]


def test_the_gradient_starts_and_energy_readings_run_in_the_cpu_setting(tmp_path):
    """The four methods of issue 31 in ``--setting cpu`` (at toy size): every one runs both seeds,
    from one calibration pass with the weight gradient once a gradient start needs it."""
    from bench import quality
    from bench.quality_methods import METHODS

    assert [m for m in ISSUE31 if m not in METHODS] == []
    assert any("natural" in m for m in ISSUE31) and any("low" in m for m in ISSUE31)
    argv = TOY + ["--setting", "cpu", "--methods", ",".join(ISSUE31), "--out", str(tmp_path)]
    assert quality.main(argv) == 0
    report = json.loads((tmp_path / "quality_cpu_toy.json").read_text())
    for m in ISSUE31:
        s = report["summary"][m]
        assert s["n"] == 2 and "error" not in s and s["final_mean"] > 0, (m, s)


def test_the_gradient_starts_hold_their_directions_at_the_stated_scale(toy_task):
    """``gradient`` and ``natural_gradient``: A's rows and B's columns of norm ζ = d_out^{1/4}/4 (the
    scale rule of docs/DESIGN.md §1 step 6), the two subspaces different, the lowest-energy reading
    choosing other directions than the default."""
    from bench.quality_methods import METHODS, Initialisers
    from fisherlora.adapter import lora_layers

    inits = Initialisers(toy_task.model, toy_task, rank=2, alpha=2.0)
    built = {m: dict(lora_layers(inits.get(METHODS[m], seed=0))) for m in ISSUE31 + ["fisher:top_sigma"]}
    assert inits.stats.grad, "the gradient starts' statistics serve the other variants too"
    for name in built["natural_gradient"]:
        for m in ("gradient", "natural_gradient"):
            A, B = built[m][name].lora_A["default"].weight, built[m][name].lora_B["default"].weight
            zeta = B.shape[0] ** 0.25 / 4
            torch.testing.assert_close(A.norm(dim=1), torch.full((2,), zeta), rtol=1e-5, atol=0)
            torch.testing.assert_close(B.norm(dim=0), torch.full((2,), zeta), rtol=1e-5, atol=0)
    differs = [not torch.allclose(built["fisher_low:top_sigma"][n].lora_A["default"].weight,
                                  built["fisher:top_sigma"][n].lora_A["default"].weight) for n in built["gradient"]]
    assert all(differs)


CLS_TOY = ["--model", "toy", "--train-pairs", "8", "--val-pairs", "4", "--eval-pairs", "6", "--calib-pairs", "4",
           "--max-length", "48", "--batch-size", "4", "--rank", "2", "--lrs", "1e-3", "--seeds", "0,1",
           "--eval-points", "1", "--max-extend", "1"]


def test_classification_labels_count_solution_steps():
    from bench.quality_cls import steps_label

    assert steps_label("a <<1+1=2>>2\nb\nc\n#### 2") == 0  # 3 steps
    assert steps_label("a\n\nb\nc\nd\n#### 7") == 1  # 4 non-empty steps


def test_match_pairs_pair_each_question_once_with_its_own_or_another_solution():
    from bench.quality_cls import match_pairs

    partner, label = match_pairs(1000, seed=0)
    assert len(partner) == len(label) == 1000 and set(partner) <= set(range(1000))
    assert all((p == i) == bool(y) for i, (p, y) in enumerate(zip(partner, label)))
    assert 450 <= sum(label) <= 550  # a fair coin: 500 +- 3.2 standard deviations
    assert match_pairs(1000, seed=0) == (partner, label) and match_pairs(1000, seed=1) != (partner, label)


@pytest.mark.parametrize("label", ["match", "steps"])
def test_classification_labels_build_the_pairs_they_describe(tmp_path, label):
    from bench import quality_cls

    args = quality_cls.parse(CLS_TOY + ["--setting", "quick", "--label", label, "--out", str(tmp_path)])
    task = quality_cls.Gsm8kClsTask(args)
    ids, labels = task.train
    sep = task.tok.sep_token_id
    assert len(ids) == len(labels) == 8 and set(labels) <= {0, 1}
    assert all(len(x) <= 48 for x in ids)
    # a pair is two segments, a question alone is one
    assert all(x.count(sep) == (2 if label == "match" else 1) for x in ids)
    assert task.name == f"gsm8k-{label}" and args.task == task.name


@pytest.mark.parametrize("setting", ["standard", "quick"])
def test_classification_task_runs_its_baselines_in_every_setting(tmp_path, setting):
    from bench import quality_cls

    assert set(quality_cls.SETTINGS) == {"standard", "quick"}
    steps = ["--steps", "2"] if setting == "quick" else []
    argv = CLS_TOY + steps + ["--setting", setting, "--methods", "lora,milora", "--reference", "lora",
                              "--out", str(tmp_path)]
    assert quality_cls.main(argv) == 0
    report = json.loads((tmp_path / f"quality_cls_{setting}_toy.json").read_text())
    for m in ("lora", "milora"):
        s = report["summary"][m]
        assert s["n"] == 2 and 0.0 <= s["metric_mean"] <= 1.0 and s["final_mean"] > 0, (m, s)
    assert report["summary"]["milora"]["verdict"] in ("better", "worse", "within noise")


def test_classification_task_runs_fisherlora_through_the_generic_path(tmp_path):
    from bench import quality_cls
    from bench.quality_methods import fisherlora_takes_loss_fn

    if not fisherlora_takes_loss_fn():
        pytest.skip("initialize_fisher_lora has no loss_fn parameter yet (issue 16's generic path for "
                    "model heads); the classification task reports fisherlora as not run until then")
    argv = CLS_TOY + ["--setting", "quick", "--methods", "fisherlora,fisher:zero", "--out", str(tmp_path)]
    assert quality_cls.main(argv) == 0
    report = json.loads((tmp_path / "quality_cls_quick_toy.json").read_text())
    for m in ("fisherlora", "fisher:zero"):
        assert report["summary"][m]["n"] == 2 and "error" not in report["summary"][m], report["summary"][m]


def test_the_gradient_starts_and_energy_readings_run_on_the_classifier(tmp_path):
    from bench import quality_cls
    from bench.quality_methods import fisherlora_takes_loss_fn

    if not fisherlora_takes_loss_fn():
        pytest.skip("initialize_fisher_lora has no loss_fn parameter yet")
    argv = CLS_TOY + ["--setting", "quick", "--methods", ",".join(ISSUE31), "--out", str(tmp_path)]
    assert quality_cls.main(argv) == 0
    report = json.loads((tmp_path / "quality_cls_quick_toy.json").read_text())
    for m in ISSUE31:
        assert report["summary"][m]["n"] == 2 and "error" not in report["summary"][m], report["summary"][m]


def test_calibration_comes_from_the_train_split_only(toy_task):
    train = {tuple(x) for x in toy_task.train.input_ids}
    others = {tuple(x) for x in toy_task.val.input_ids + toy_task.held.input_ids}
    calib = [tuple(int(t) for t, m in zip(row, mask, strict=True) if m)
             for b in toy_task.calib for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]
    assert len(calib) == 4 and all(c in train and c not in others for c in calib)


def test_every_method_starts_on_the_classifier_with_its_outputs_unchanged(tmp_path):
    """The second task's table lists every method, PEFT's data-driven initialisers (EVA, CorDA,
    LoRA-GA) and OLoRA included: each builds on the sequence classifier from the calibration
    batches (one label per sequence) and computes the same logits at step 0."""
    from bench import quality_cls
    from bench.quality_methods import METHODS, Initialisers

    args = quality_cls.parse(CLS_TOY + ["--setting", "quick", "--out", str(tmp_path)])
    task = quality_cls.Gsm8kClsTask(args)
    task.model.requires_grad_(False)
    batch = task.calib[0]
    with torch.no_grad():
        ref = task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    inits = Initialisers(task.model, task, rank=2, alpha=2.0)
    for name, spec in METHODS.items():
        pm = inits.get(spec, seed=0).eval()  # BERT's dropout: the builders leave the model in train mode
        with torch.no_grad():
            out = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3, msg=name)


def test_a_benchmark_makes_no_network_request(tmp_path):
    """Every model and data set of bench/ is local, as for the command: a benchmark keeps itself
    offline even where PEFT's import of bitsandbytes would ask the Hub for a kernel."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.no_network import no_network_env

    log = tmp_path / "network.log"
    argv = TOY + ["--quick", "--steps", "1", "--seeds", "0", "--max-extend", "0", "--methods", "lora",
                  "--reference", "lora", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "bench.quality", *argv], cwd=Path(__file__).resolve().parents[1],
                          env=no_network_env(log), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not log.exists(), log.read_text()[:3000]


BAD_FLAGS = [["--lrs", "abc"], ["--lrs", "0"], ["--seeds", "x"], ["--train-pairs", "990", "--val-pairs", "20"],
             ["--lrs", "1e-3,1e-3"], ["--seeds", "0,1,0"], ["--batch-size", "0"], ["--train-pairs", "0"],
             ["--val-pairs", "0"], ["--eval-pairs", "0"], ["--eval-pairs", "400"], ["--calib-pairs", "0"],
             ["--calib-pairs", "100"], ["--max-length", "0"], ["--eval-points", "0"], ["--rank", "0"],
             ["--alpha", "0"], ["--steps", "0"], ["--epochs", "0"], ["--steps", "5", "--epochs", "1"],
             ["--warmup", "1.5"], ["--warmup", "-0.1"], ["--max-extend", "-1"], ["--setting", "cpu"],
             ["--out", "README.md"], ["--runs", "bench"]]


@pytest.mark.parametrize("bad", BAD_FLAGS, ids=[" ".join(b) for b in BAD_FLAGS])
def test_bad_flags_exit_with_one_line_before_any_model_loads(bad):
    """Both tasks check their flags completely before building the task (which loads the model):
    sizes of 0, repeated lrs or seeds (a run counted twice), contradictions, paths of the wrong kind."""
    from pathlib import Path

    from bench import quality, quality_cls

    root = Path(__file__).resolve().parents[1]
    bad = [str(root / b) if b in ("README.md", "bench") else b for b in bad]
    for module in (quality, quality_cls):
        if bad == ["--setting", "cpu"] and "cpu" not in module.SETTINGS:
            continue
        with pytest.raises(SystemExit) as exc:
            module.parse(["--quick", *bad])  # --quick: with --setting cpu, a contradiction
        assert isinstance(exc.value.code, str) and "\n" not in exc.value.code, exc.value.code


def test_cuda_is_refused_where_torch_sees_none():
    from bench import quality

    if torch.cuda.is_available():
        assert quality.parse(["--device", "cuda"]).device == "cuda"
    else:
        with pytest.raises(SystemExit, match="no CUDA device"):
            quality.parse(["--device", "cuda"])


def test_explicit_epochs_replace_the_settings_step_count():
    from bench import quality

    args = quality.parse(["--quick", "--epochs", "2"])
    assert args.steps is None and args.epochs == 2.0
    assert quality.parse(["--quick"]).steps == 20 and quality.parse(["--setting", "cpu"]).epochs == 1.0


def test_a_run_log_cut_short_resumes_and_a_corrupt_line_stops_with_its_place(tmp_path, capsys):
    from bench.quality_loop import RunStore

    log = tmp_path / "runs.jsonl"
    good = '{"key": "a", "final_loss": 1.0}\n'
    log.write_text(good + '{"key": "b", "final_lo')  # killed while appending
    store = RunStore(log, {})
    assert set(store.done) == {"a"} and log.read_text() == good
    assert "runs.jsonl:2: a run record cut short" in capsys.readouterr().err
    store.add({"key": "b", "final_loss": 2.0})
    assert set(RunStore(log, {}).done) == {"a", "b"}  # the next record starts on its own line
    log.write_text(good + "not json\n" + good)
    with pytest.raises(SystemExit, match=r"runs.jsonl:2: not a run record"):
        RunStore(log, {})


def test_help_gives_each_settings_value_for_every_size_flag(capsys):
    """``--help`` names what each size flag means and its value under every setting, from the
    settings table itself (so the help cannot drift from the runs)."""
    from bench import quality, quality_cls

    for module in (quality, quality_cls):
        with pytest.raises(SystemExit) as exc:
            module.parse(["--help"])
        assert exc.value.code == 0
        text = "".join(capsys.readouterr().out.split())  # argparse wraps to the terminal, at hyphens too
        for name, values in module.SETTINGS.items():
            assert f"{name}:{values['train_pairs']}" in text and f"{name}:{values['lrs']}" in text
        assert "examples:" in text


def test_the_default_setting_fits_the_device_and_a_classifier_has_no_generation_flags(capsys):
    """Without --setting, the GSM8K task runs the CPU-sized setting on the CPU (the GPU-sized one
    would take about 12 h there) and the standard one on a GPU; the classifier has one size for both."""
    from bench import quality, quality_cls

    assert quality.parse([]).setting == "cpu"
    assert quality.default_setting(quality.SETTINGS, "cuda") == "standard"  # parse refuses cuda on a CPU machine
    assert quality.parse(["--quick"]).setting == "quick"
    assert quality_cls.parse([]).setting == "standard"
    args = quality_cls.parse([])
    assert args.em_pairs == 0 and args.max_new_tokens == 0  # still in the run keys, as before
    with pytest.raises(SystemExit) as exc:
        quality_cls.parse(["--em-pairs", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --em-pairs 3" in capsys.readouterr().err
