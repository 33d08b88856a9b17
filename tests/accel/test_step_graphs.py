"""Training passes replayed as CUDA graphs (selftune.accel.step_graphs) against eager passes. The
label-index loss runs everywhere; the graphs themselves need a GPU (bench/README.md records the
run of these tests on one)."""

from __future__ import annotations

import pytest
import torch
from support import build_tiny_llama, build_tiny_qwen2

from selftune.accel.step_graphs import (
    LABEL_STEP,
    LENGTH_STEP,
    MAX_TOKENS,
    SEGMENT_STEP,
    TOKEN_STEP,
    StepGraphs,
    batch_key,
    pad_pack,
    planned_tokens,
)
from selftune.data.batches import label_index, packed
from selftune.data.encode import Example
from selftune.train.loop import accumulate_gradients, to_device
from selftune.train.loss import batch_loss, label_tokens

VOCAB = 300
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def rows(lengths: list[int], seed: int) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=generator).tolist()
        out.append(Example(input_ids=ids, labels=[-100] * (n // 3) + ids[n // 3 :]))
    return out


def lora_model(builder, device: str, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    model = builder(VOCAB).to(device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():  # B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def test_label_index_picks_what_the_label_mask_picks():
    labels = torch.tensor([[-100, 5, 6, -100, 7], [-100, -100, 8, 9, -100]])
    index = label_index(labels)
    hidden = torch.arange(10).view(2, 5)
    assert hidden.flatten()[index].tolist() == hidden[:, :-1][labels[:, 1:] != -100].tolist()
    assert labels.flatten()[index + 1].tolist() == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_loss_by_label_index_equals_loss_by_mask(builder):
    model = lora_model(builder, "cpu")
    (batch,) = packed(rows([9, 14, 6], seed=0), 64)
    assert "label_index" in batch
    without = {k: v for k, v in batch.items() if k != "label_index"}
    loss, count, correct = batch_loss(model, batch)
    loss_ref, count_ref, correct_ref = batch_loss(model, without)
    assert count == count_ref == label_tokens([batch])
    torch.testing.assert_close(loss, loss_ref)
    assert int(correct) == int(correct_ref)


def test_batch_key_is_the_shapes_and_values_a_capture_fixes():
    (batch,) = packed(rows([9, 14, 6], seed=0), 64)
    (reordered,) = packed(rows([6, 9, 14], seed=1), 64)
    (longer,) = packed(rows([9, 15, 6], seed=0), 64)
    (longest_differs,) = packed(rows([8, 16, 5], seed=0), 64)
    assert batch_key(batch, True) == batch_key(reordered, True)
    assert batch_key(batch, True) != batch_key(reordered, False)  # dropout on or off
    assert batch_key(batch, True) != batch_key(longer, True)
    assert batch_key(batch, True) != batch_key(longest_differs, True)  # same total, new max
    replay = {**batch, "teacher_ids": batch["labels"], "teacher_probs": batch["labels"]}
    assert batch_key(replay, True) is None  # its loss splits on a mask: eager
    assert batch_key({k: v for k, v in batch.items() if k != "label_index"}, True) is None


def test_pad_pack_rounds_each_size_up_and_pads_with_ignored_positions():
    (batch,) = packed(rows([9, 14, 6], seed=0), 64)
    padded = pad_pack(batch)
    width = padded["input_ids"].shape[1]
    cu = padded["cu_seq_lens_q"]
    assert width % TOKEN_STEP == 0 and padded["pad_tokens"] == width - 29
    assert (len(cu) - 1) % SEGMENT_STEP == 0 and int(cu[-1]) == width
    assert torch.equal(cu[:4], batch["cu_seq_lens_q"]) and torch.equal(cu, padded["cu_seq_lens_k"])
    assert padded["max_length_q"] % LENGTH_STEP == 0
    assert padded["max_length_q"] >= int((cu[1:] - cu[:-1]).max())
    index = padded["label_index"]
    assert len(index) % LABEL_STEP == 0 and padded["label_tokens"] == len(batch["label_index"])
    assert torch.equal(index[: len(batch["label_index"])], batch["label_index"])
    assert (padded["labels"].flatten()[index[len(batch["label_index"]) :] + 1] == -100).all()
    assert torch.equal(padded["input_ids"][:, :29], batch["input_ids"])
    assert (padded["labels"][0, 29:] == -100).all()
    # each padding conversation counts its positions from 0
    starts = cu[3:-1]
    assert (padded["position_ids"][0, starts] == 0).all()
    (similar,) = packed(rows([10, 15, 8], seed=3), 64)
    assert batch_key(pad_pack(similar), True) == batch_key(padded, True)


def test_memory_plans_for_the_padded_pass_and_a_graph_of_at_most_max_tokens():
    for lengths in ([9, 14, 6], [250], [3] * 17, [1000, 1000, 1000, 1046]):
        (batch,) = packed(rows(lengths, seed=0), 8192)
        tokens = batch["input_ids"].shape[1]
        biggest, graph = planned_tokens(tokens)
        assert pad_pack(batch)["input_ids"].shape[1] <= biggest
        assert graph == min(biggest, MAX_TOKENS)
    assert planned_tokens(8192) == (8192, MAX_TOKENS)  # long packs keep their shape


def test_packs_with_replay_rows_are_not_padded():
    (batch,) = packed(rows([9, 14, 6], seed=0), 64)
    width = batch["input_ids"].shape[1]
    teacher = {
        "teacher_ids": torch.zeros(1, width, 3, dtype=torch.long),
        "teacher_probs": torch.zeros(1, width, 3),
    }
    replay = {**batch, **teacher}
    assert pad_pack(replay) is replay  # never replayed as a graph: padding would only cost
    model = lora_model(build_tiny_llama, "cpu")
    loss, count, _ = batch_loss(model, replay)
    assert count == len(batch["label_index"]) and torch.isfinite(loss)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_a_padded_pack_trains_as_the_pack(builder):
    model = lora_model(builder, "cpu")
    (batch,) = packed(rows([9, 14, 6], seed=0), 64)
    results = []
    for version in (batch, pad_pack(batch)):
        model.zero_grad(set_to_none=True)
        loss, count, correct = batch_loss(model, version)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), count, int(correct), grads))
    (loss, count, correct, grads), (loss_p, count_p, correct_p, grads_p) = results
    torch.testing.assert_close(loss_p, loss)
    assert (count_p, correct_p) == (count, correct)
    for a, b in zip(grads, grads_p):
        torch.testing.assert_close(b, a)


def train_steps(model, steps, graphs=None, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for group in steps:
        loss, _, _ = accumulate_gradients(model, group, graphs=graphs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphs is None)
        losses.append(loss)
    return losses


def graphs_for(model) -> StepGraphs:
    params = [p for p in model.parameters() if p.requires_grad]
    return StepGraphs(lambda batch: batch_loss(model, batch), model, params)


def assert_trained_alike(model, losses, twin, twin_losses) -> None:
    torch.testing.assert_close(
        torch.tensor(twin_losses), torch.tensor(losses), rtol=2e-3, atol=2e-3
    )
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=name)


def graph_case(builder, dropout: float = 0.0):
    """A model on the fast path and four packs: 0 and 3 hold rows of the same lengths. Each call
    builds the same model anew (a deep copy would share the first one's LoRA groups)."""
    from selftune.accel.fast_path import enable_fast_path

    model = lora_model(builder, "cuda", dropout)
    enable_fast_path(model.get_base_model(), "cuda", packing=True)
    sizes = [[9, 14, 6], [20, 11], [5, 7], [6, 14, 9]]
    packs = [to_device(packed(rows(n, seed), 64)[0], "cuda") for seed, n in enumerate(sizes)]
    return model, packs


@cuda
@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_replayed_passes_train_as_eager_passes(builder):
    model, packs = graph_case(builder)
    twin, _ = graph_case(builder)
    # packs 0 and 3 share their shapes (rows of the same lengths); up to two passes a step
    assert batch_key(packs[0], True) == batch_key(packs[3], True)
    steps = [[packs[0], packs[1]], [packs[3], packs[0]], [packs[2], packs[1]], [packs[3]]] * 2
    eager = train_steps(model, steps)
    graphs = graphs_for(twin)
    replayed = train_steps(twin, steps, graphs)
    assert graphs.replays >= 6 and not graphs.off, graphs.failure
    assert_trained_alike(model, eager, twin, replayed)


@cuda
def test_padded_packs_of_similar_size_share_one_graph():
    model, _ = graph_case(build_tiny_qwen2)
    twin, _ = graph_case(build_tiny_qwen2)
    sizes = [[9, 14, 6], [10, 15, 8], [7, 13, 6], [12, 12], [9, 9, 9]]
    groups = [packed(rows(lengths, seed), 64) for seed, lengths in enumerate(sizes)] * 2
    eager = train_steps(model, [[to_device(b, "cuda") for b in g] for g in groups])
    graphs = graphs_for(twin)
    steps = [[to_device(graphs.prepare(b), "cuda") for b in g] for g in groups]
    replayed = train_steps(twin, steps, graphs)
    assert not graphs.off, graphs.failure
    assert len(graphs.graphs) == 1 and graphs.replays == len(groups) - 2
    assert_trained_alike(model, eager, twin, replayed)


@cuda
def test_replays_draw_new_dropout_masks():
    model, packs = graph_case(build_tiny_qwen2, dropout=0.5)
    graphs = graphs_for(model)
    losses = [float(graphs.backward(packs[0], 0.0)[0]) for _ in range(5)]
    assert graphs.replays == 3
    assert len(set(losses[2:])) == 3


@cuda
def test_a_capture_that_fails_turns_graphs_off_and_training_goes_on():
    model, packs = graph_case(build_tiny_llama, dropout=0.1)

    def syncing_loss(batch):
        loss, count, correct = batch_loss(model, batch)
        return loss, count, int(correct)  # waits for the GPU: not allowed while capturing

    params = [p for p in model.parameters() if p.requires_grad]
    graphs = StepGraphs(syncing_loss, model, params)
    before = [p.detach().clone() for p in params]
    losses = train_steps(model, [[packs[0]]] * 4, graphs)
    assert graphs.off and graphs.replays == 0 and "captur" in graphs.failure
    # eager passes after the failed capture still draw dropout masks, and the model trains
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    torch.randn(4, device="cuda")


@cuda
def test_gradients_dropped_between_steps_are_captured_anew():
    model, packs = graph_case(build_tiny_llama)
    twin, _ = graph_case(build_tiny_llama)
    batch_loss(twin, packs[0])[0].backward()  # one eager pass: the reference gradient
    once = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = StepGraphs(lambda b: batch_loss(model, b), model, params)
    for _ in range(3):  # eager, eager + capture, replay
        graphs.backward(packs[0], 1.0)
    assert graphs.replays == 1
    model.zero_grad(set_to_none=True)  # the captured graph's gradient tensors are gone
    for _ in range(2):  # captured anew into fresh gradients, then replayed
        graphs.backward(packs[0], 1.0)
    assert not graphs.off, graphs.failure
    assert graphs.replays == 2
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * once[name], rtol=2e-2, atol=1e-3, msg=name)


@cuda
def test_checkpointed_layers_recompute_the_replayed_dropout_masks():
    from selftune.accel.memory import set_checkpointing

    plain, packs = graph_case(build_tiny_qwen2, dropout=0.5)
    checked, _ = graph_case(build_tiny_qwen2, dropout=0.5)
    set_checkpointing(checked.get_base_model(), None)
    results = []
    for model in (plain, checked):
        params = [p for p in model.parameters() if p.requires_grad]
        graphs = StepGraphs(lambda b, m=model: batch_loss(m, b), model, params)
        for _ in range(2):  # eager, then eager + capture
            graphs.backward(packs[0], 1.0)
        for p in params:
            p.grad.zero_()
        torch.cuda.manual_seed(123)  # the same masks in both forwards
        loss = float(graphs.backward(packs[0], 1.0)[0])
        assert graphs.replays == 1
        results.append((loss, [p.grad.clone() for p in params]))
    (loss, grads), (loss_checked, grads_checked) = results
    assert loss_checked == pytest.approx(loss, rel=1e-3)
    # a recompute that drew new masks would give the gradient of another function
    for a, b in zip(grads, grads_checked):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)
