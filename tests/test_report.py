"""The report tells the user what they got: report.md names the model and the data, explains the two
headline figures with this run's yardsticks and ends with the next commands; energy.png marks
PiSSA's top-r region and each panel's captured share."""

import json

import matplotlib.axes
import torch

from tests.models import init_llama


def test_report_md_explains_and_ends_with_the_next_commands(tmp_path):
    _, result, _, _ = init_llama()
    result.extra.update(model="/somewhere/my-llama", data="/somewhere/train.jsonl")
    out = result.save(tmp_path / "out")
    report = json.loads((out / "report.json").read_text())
    layer = report["layers"][0]
    sel = result.selections[layer["name"]]
    e = sel.energy.double()
    assert abs(layer["pissa_energy_captured"] - float(e[: sel.rank].sum() / e.sum())) < 1e-9
    assert layer["random_share"] == sel.rank / min(sel.shape)
    # fisherlora keeps the r largest energies: never less than PiSSA's choice
    assert all(x["energy_captured"] >= x["pissa_energy_captured"] - 1e-9 for x in report["layers"])
    md = (out / "report.md").read_text()
    for words in ("Model `my-llama` (float32), calibration data `train.jsonl`: 6 sequences",
                  "**Energy captured**", "**PiSSA overlap**", "a random choice of r of the k directions captures r/k",
                  f"({report['mean_random_share']:.1%} on average)", "PiSSA's top-r would capture"):
        assert words in md, words
    tail = md.strip().splitlines()[-4:]
    assert tail[0].startswith("fisherlora convert") and tail[1].startswith("fisherlora merge"), tail
    assert "is_trainable=True" in md and 'from_pretrained("my-llama", dtype=torch.float32)' in md


def test_energy_png_marks_pissa_region_and_captured_share(tmp_path, monkeypatch):
    from fisherlora.report import plot_energy

    spans, titles = [], []
    real_span, real_title = matplotlib.axes.Axes.axvspan, matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "axvspan", lambda ax, lo, hi, **kw: spans.append((lo, hi))
                        or real_span(ax, lo, hi, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, text, **kw: titles.append(text)
                        or real_title(ax, text, **kw))
    _, result, _, _ = init_llama()
    plot_energy(result.selections, tmp_path / "energy.png")
    assert len(spans) == len(titles) == len(result.selections) == 14
    panels = {title.split("\n")[0]: (span, title) for span, title in zip(spans, titles)}  # in the plot's order
    for sel in result.selections.values():
        (lo, hi), title = panels[sel.name]
        assert lo == torch.sort(sel.sigma, descending=True).values[sel.rank - 1].item() and hi > sel.sigma.max()
        assert f"captured {sel.energy_captured:.0%} of the Fisher energy" in title
        assert f"PiSSA overlap {sel.pissa_overlap:.0%}" in title
    assert (tmp_path / "energy.png").stat().st_size > 10_000
