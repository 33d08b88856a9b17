import json

import pytest
import torch

from selftune.train.checkpoint import (
    TrainingState,
    list_checkpoints,
    load_training_state,
    new_run_dir,
    rotate_checkpoints,
    save_checkpoint,
)


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def save_pretrained(self, folder, safe_serialization=True):
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(folder / "adapter_model.safetensors"))


def trained_parts(steps=3, fused=None):
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(steps):
        model.linear(torch.randn(2, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def save(run_dir, step, parts, **state):
    model, optimizer, scheduler = parts
    return save_checkpoint(
        run_dir,
        step,
        model,
        None,
        optimizer,
        scheduler,
        TrainingState(step=step, epoch=1.0, micro_batches_done=0, **state),
        {"model": "m"},
        full_model=False,
    )


def test_run_dirs_are_versioned(tmp_path):
    first = new_run_dir(tmp_path)
    second = new_run_dir(tmp_path)
    assert first.name.startswith("v0-") and second.name.startswith("v1-")


def test_resume_state_round_trip(tmp_path):
    parts = trained_parts()
    checkpoint = save(tmp_path, 3, parts)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    save(tmp_path, 3, parts)  # the RNG state saved is the one right now
    model, optimizer, scheduler = trained_parts(steps=0)
    torch.manual_seed(999)
    state = load_training_state(checkpoint, model, optimizer, scheduler)
    assert state.step == 3
    assert torch.equal(torch.rand(3), expected_draw)
    assert scheduler.last_epoch == parts[2].last_epoch
    saved = parts[1].state_dict()["state"]
    for index, entry in optimizer.state_dict()["state"].items():
        torch.testing.assert_close(entry["exp_avg"], saved[index]["exp_avg"])
    assert json.loads((checkpoint / "args.json").read_text()) == {"model": "m"}


@pytest.mark.parametrize("saved_fused, resumed_fused", [(None, True), (True, None)])
def test_resume_keeps_this_runs_kernel_choice(tmp_path, saved_fused, resumed_fused):
    """A run saved unfused (on a CPU) resumes fused on a GPU, and the reverse: the saved state
    comes back, the choice of kernel stays the resumed run's."""
    parts = trained_parts(fused=saved_fused)
    checkpoint = save(tmp_path, 3, parts)
    model, optimizer, scheduler = trained_parts(steps=0, fused=resumed_fused)
    load_training_state(checkpoint, model, optimizer, scheduler)
    assert optimizer.param_groups[0]["fused"] == resumed_fused
    assert optimizer.param_groups[0]["lr"] == parts[1].param_groups[0]["lr"]
    saved = parts[1].state_dict()["state"]
    for index, entry in optimizer.state_dict()["state"].items():
        torch.testing.assert_close(entry["exp_avg_sq"], saved[index]["exp_avg_sq"])
    model.linear(torch.randn(2, 4)).pow(2).sum().backward()
    optimizer.step()  # the resumed optimizer steps with its own kernel


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    parts = trained_parts()
    good = save(tmp_path, 2, parts)
    before = (good / "adapter_model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("selftune.train.checkpoint.write_json_atomic", disk_full)
    with pytest.raises(OSError):
        save(tmp_path, 2, parts)  # same step: would replace the good one
    with pytest.raises(OSError):
        save(tmp_path, 4, parts)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    assert (good / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    monkeypatch.undo()
    model, optimizer, scheduler = trained_parts(steps=0)
    assert load_training_state(good, model, optimizer, scheduler).step == 2


def test_rotation_keeps_best_and_last(tmp_path):
    parts = trained_parts()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, parts)
    rotate_checkpoints(tmp_path, 2, best="checkpoint-2")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]
    rotate_checkpoints(tmp_path, 1, best="checkpoint-2")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]
