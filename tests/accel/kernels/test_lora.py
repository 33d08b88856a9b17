"""Grouped LoRA (selftune.accel.kernels.lora) against PEFT's own forward and backward."""

from __future__ import annotations

import pytest
import torch
from support import build_tiny_llama, build_tiny_qwen2

from selftune.accel.lora_routing import fuse_lora, unfuse_lora
from selftune.train.loop import accumulate_gradients

VOCAB = 300


def lora_model(builder, dropout: float = 0.0, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model = builder(VOCAB, seed=seed)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    for name, param in model.named_parameters():  # B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def packed_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def loss_and_grads(model, batches) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _, _ = accumulate_gradients(model, batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_grouped_lora_gives_peft_loss_and_gradients(builder):
    model = lora_model(builder)
    batches = [packed_batch([7, 12, 5]), packed_batch([20], seed=1)]
    peft_loss, peft_grads = loss_and_grads(model, batches)
    routed = fuse_lora(model)
    assert routed == 7 * 2  # every adapted projection of both layers
    fused_loss, fused_grads = loss_and_grads(model, batches)
    assert fused_grads.keys() == peft_grads.keys() and len(peft_grads) == 2 * routed
    assert abs(fused_loss - peft_loss) <= 1e-5 * abs(peft_loss)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    unfuse_lora(model)
    again_loss, _ = loss_and_grads(model, batches)
    assert abs(again_loss - peft_loss) <= 1e-6 * abs(peft_loss)


def test_projections_that_share_an_input_run_as_one_group():
    model = lora_model(build_tiny_qwen2)
    fuse_lora(model)
    attention = model.base_model.model.model.layers[0].self_attn
    mlp = model.base_model.model.model.layers[0].mlp
    group = attention.q_proj._selftune_group
    assert group is attention.k_proj._selftune_group is attention.v_proj._selftune_group
    assert mlp.gate_proj._selftune_group is mlp.up_proj._selftune_group
    assert attention.o_proj._selftune_group.modules == [attention.o_proj]
    calls = []
    original = group.run
    group.run = lambda x, name: calls.append(x) or original(x, name)
    x = torch.randn(1, 5, 64)
    outputs = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
    assert len(calls) == 1 and group.last_input is None  # one run, then nothing held
    assert [o.shape[-1] for o in outputs] == [64, 32, 32]


def test_dropout_matches_the_same_mask_in_plain_autograd():
    """With dropout, one mask per group: the result equals plain autograd under that mask."""
    model = lora_model(build_tiny_qwen2, dropout=0.3)
    fuse_lora(model)
    attention = model.base_model.model.model.layers[0].self_attn
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    x = torch.randn(2, 6, 64, requires_grad=True)
    torch.manual_seed(5)
    fused = [m(x) for m in members]
    sum(o.square().sum() for o in fused).backward()
    fused_grads = [x.grad.clone()] + [m.lora_A["default"].weight.grad.clone() for m in members]
    fused_grads += [m.lora_B["default"].weight.grad.clone() for m in members]
    x.grad = None
    for m in members:
        m.zero_grad()
    torch.manual_seed(5)
    dropped, _ = torch.native_dropout(x.reshape(-1, 64), 0.3, True)
    reference = []
    for m in members:
        base = m.base_layer(x)
        lora = dropped @ m.lora_A["default"].weight.t() @ m.lora_B["default"].weight.t()
        reference.append(base + m.scaling["default"] * lora.view(*x.shape[:-1], -1))
    sum(o.square().sum() for o in reference).backward()
    reference_grads = [x.grad] + [m.lora_A["default"].weight.grad for m in members]
    reference_grads += [m.lora_B["default"].weight.grad for m in members]
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no dropout outside training
        model.eval()
        torch.testing.assert_close(members[0](x), type(members[0]).forward(members[0], x))


def test_disabled_and_merged_adapters_keep_peft_behaviour():
    model = lora_model(build_tiny_llama)
    fuse_lora(model)
    batch = packed_batch([9, 6])
    with torch.no_grad():
        tuned = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
        model.merge_adapter()
        merged = model(**batch).logits
        model.unmerge_adapter()
    assert (tuned - base).abs().max() > 1e-3  # the adapters matter, and were switched off
    unfuse_lora(model)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**batch).logits, base)
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_returns_float32_gradients_to_float32_adapters():
    model = lora_model(build_tiny_llama)
    fuse_lora(model)
    batch = packed_batch([10, 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = accumulate_gradients(model, [batch])
    assert torch.isfinite(torch.tensor(loss))
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)


def peft_and_fused_losses(builder, make_optimizer, steps) -> dict[bool, list[float]]:
    """Each step's loss, PEFT's forward (False) and grouped LoRA (True), from the same start."""
    losses = {}
    for fused in (False, True):
        model = lora_model(builder)
        if fused:
            fuse_lora(model)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        losses[fused] = []
        for batch in steps:
            loss, _, _ = accumulate_gradients(model, [batch])
            optimizer.step()
            optimizer.zero_grad()
            losses[fused].append(loss)
    return losses


def test_each_optimizer_step_sees_the_updated_adapters():
    """The cast adapters are cached between calls: an in-place update must refresh them."""
    steps = [packed_batch([8, 11], seed=step) for step in range(3)]
    losses = peft_and_fused_losses(build_tiny_qwen2, lambda ps: torch.optim.SGD(ps, lr=0.5), steps)
    assert losses[False][2] != losses[False][0]
    for peft_loss, fused_loss in zip(losses[False], losses[True]):
        assert abs(fused_loss - peft_loss) <= 1e-5 * abs(peft_loss)


def test_an_update_through_data_refreshes_the_cast_adapters():
    """A step that writes `.data` leaves the version counters alone; the step count does not."""

    class DataSGD(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.5})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad, alpha=-group["lr"])

    losses = peft_and_fused_losses(build_tiny_llama, DataSGD, [packed_batch([8, 11])] * 2)
    assert losses[False][1] != losses[False][0]
    for peft_loss, fused_loss in zip(losses[False], losses[True]):
        assert abs(fused_loss - peft_loss) <= 1e-5 * abs(peft_loss)


def test_checkpointed_layers_recompute_the_same_gradients():
    from selftune.accel.memory import set_checkpointing

    model = lora_model(build_tiny_qwen2, dropout=0.2)
    batches = [packed_batch([9, 14])]
    torch.manual_seed(7)
    fuse_lora(model)
    plain_loss, plain_grads = loss_and_grads(model, batches)
    set_checkpointing(model.get_base_model(), None)
    torch.manual_seed(7)  # the same dropout masks, also in the recompute
    checked_loss, checked_grads = loss_and_grads(model, batches)
    assert checked_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


class WeightReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators, views left out, that read each watched weight's storage."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.storages = {w.untyped_storage().data_ptr(): name for name, w in weights.items()}
        self.reads = dict.fromkeys(weights, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg in [] if func.is_view else torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(arg, torch.Tensor):
                name = self.storages.get(arg.untyped_storage().data_ptr())
                if name is not None:
                    self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def test_a_checkpointed_recompute_stops_before_the_last_base_gemm():
    """Backward of a checkpointed layer reads down_proj's frozen weight once (its input
    gradient), o_proj's twice (the recompute needs its output, then its input gradient)."""
    from selftune.accel.memory import set_checkpointing

    model = lora_model(build_tiny_qwen2, dropout=0.1)
    fuse_lora(model)
    set_checkpointing(model.get_base_model(), None)
    layer = model.get_base_model().model.layers[0]
    weights = {
        "down": layer.mlp.down_proj.base_layer.weight,
        "o": layer.self_attn.o_proj.base_layer.weight,
        "gate": layer.mlp.gate_proj.base_layer.weight,
    }
    loss = model(**packed_batch([9, 14])).loss
    watch = WeightReads(weights)
    with watch:
        loss.backward()
    assert watch.reads == {"down": 1, "o": 2, "gate": 2}


def test_dora_and_mixed_adapter_batches_keep_peft():
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(
        build_tiny_llama(VOCAB),
        LoraConfig(r=4, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM"),
    )
    assert fuse_lora(dora) == 0
    model = lora_model(build_tiny_llama)
    fuse_lora(model)
    model.eval()
    batch = packed_batch([6, 6])
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["default"]).logits
        tuned = model(**batch).logits
    torch.testing.assert_close(mixed, tuned, rtol=1e-5, atol=1e-6)
