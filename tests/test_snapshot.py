"""The one restore mechanism: ModelState puts back flags, forwards, RNG, weights, and with
structure=True the module tree, hooks and root attributes."""

import pytest
import torch
from torch import nn

from fisherlora.snapshot import ModelState, restore_on_error
from tests.models import TinyMLP, assert_restored, model_snapshot


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1


def _mess_up(model, state):
    """Everything a failed initialisation could leave behind."""
    state.stash(model.fc1.weight)
    with torch.no_grad():
        model.fc1.weight.mul_(3)
    model.fc2 = Wrapper(model.fc2)
    model.fc1.register_forward_hook(lambda *a: None)
    model.stray = 1
    model.fc1.weight.requires_grad_(False)
    model.eval()
    model.fc1.forward = lambda x: x
    torch.rand(3)  # advances the global RNG


@pytest.mark.parametrize("on_disk", [True, False], ids=["stash in a file", "stash in RAM"])
def test_restore_on_error_puts_everything_back(monkeypatch, on_disk):
    import fisherlora.snapshot as fs

    monkeypatch.setattr(fs, "_stash_on_disk", lambda p: on_disk)
    model = TinyMLP().train()
    snap = model_snapshot(model)
    x = torch.randn(2, 5)
    before = model(x)
    rng = torch.random.get_rng_state()
    with pytest.raises(KeyboardInterrupt), restore_on_error(model) as state:
        _mess_up(model, state)
        raise KeyboardInterrupt
    assert_restored(model, snap)
    assert model.training and "forward" not in model.fc1.__dict__
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(model(x), before)


def test_plain_restore_keeps_the_structure_but_resets_flags_forwards_and_rng():
    model = TinyMLP().train()
    rng = torch.random.get_rng_state()
    state = ModelState(model)
    _mess_up(model, state)
    state.restore()
    state.close()
    assert isinstance(model.fc2, Wrapper) and model.stray == 1 and model.fc1._forward_hooks
    assert model.fc1.weight.requires_grad and model.training and "forward" not in model.fc1.__dict__
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_every_public_entry_point_leaves_the_global_rng_as_it_found_it(tmp_path):
    """Models and data are built outside the measured calls (their constructors seed the RNG)."""
    import fisherlora
    from tests.models import CFG, batches, tiny_llama

    def same_rng_after(what, fn):
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        out = fn()
        assert torch.equal(torch.random.get_rng_state(), before), f"{what} moved the global RNG"
        return out

    models = [tiny_llama(torch.float32) for _ in range(4)]
    data = batches()
    result = same_rng_after("initialize_fisher_lora",
                            lambda: fisherlora.initialize_fisher_lora(models[0], None, data, CFG, progress=False))
    same_rng_after("get_peft_model", lambda: fisherlora.get_peft_model(models[1], None, data, CFG, progress=False))
    out = same_rng_after("FisherLoraResult.save", lambda: result.save(tmp_path / "out"))
    same_rng_after("load", lambda: fisherlora.load(models[2], out))
    modules = fisherlora.find_target_modules(models[3], CFG.to_lora_config())
    stats = same_rng_after("collect_statistics",
                           lambda: fisherlora.collect_statistics(models[3], modules, data, CFG, progress=False))
    same_rng_after("compute_initialization", lambda: fisherlora.compute_initialization(
        modules, stats, CFG.to_lora_config(), CFG, progress=False))
