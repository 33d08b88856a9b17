"""Gate, up and SwiGLU as one autograd node (selftune.accel.kernels.lora_mlp): PEFT's gradients, the
forward the MLP had where it does not run, and down_proj's adapter gradient handed over."""

from __future__ import annotations

import types

import pytest
import torch
from support import assert_close_to_scale, build_tiny_llama, build_tiny_qwen2, graph_nodes
from test_dropout import gpu_lora_model
from test_lora import lora_model, loss_and_grads, packed_batch

from selftune.accel.kernels import dropout as fused_dropout
from selftune.accel.lora_routing import fuse_lora, unfuse_lora

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")


def test_the_mlp_runs_gate_up_and_swiglu_as_one_node_in_training_only():
    """LoraSwiglu where autograd records; the forward the MLP had (an instance forward, as
    Liger binds one) without grad, with a hook on a projection, and after unfuse_lora."""
    model = lora_model(build_tiny_llama)
    first, second = (
        model.get_base_model().model.layers[0].mlp,
        model.get_base_model().model.layers[1].mlp,
    )
    calls = []

    def bound(self, x):
        calls.append(x.shape)
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    first.forward = types.MethodType(bound, first)
    x = torch.randn(1, 5, 32, requires_grad=True)  # the tiny Llama's hidden size
    want = first(x)
    fuse_lora(model)
    got = first(x)
    assert "LoraSwigluBackward" in graph_nodes(got) and len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "LoraSwigluBackward" in graph_nodes(second(x))
    with torch.no_grad():
        torch.testing.assert_close(first(x), want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2
    seen = []
    hook = first.gate_proj.register_forward_pre_hook(lambda module, args: seen.append(1))
    assert "LoraSwigluBackward" not in graph_nodes(first(x)) and seen == [1]
    hook.remove()
    unfuse_lora(model)
    assert first.forward.__func__ is bound and "forward" not in second.__dict__
    assert "LoraSwigluBackward" not in graph_nodes(second(x))


def test_backward_and_global_hooks_see_the_projections_run_as_modules():
    """LoraSwiglu never calls gate or up as modules, nor down_proj when it hands its gradient
    over: with a hook that would then miss them, they run as modules."""
    model = lora_model(build_tiny_llama)
    mlp = model.get_base_model().model.layers[0].mlp
    fuse_lora(model)
    x = torch.randn(1, 5, 32, requires_grad=True)
    seen = []
    hooks = [
        module.register_full_backward_hook(lambda *_, name=name: seen.append(name))
        for name, module in (("down", mlp.down_proj), ("gate", mlp.gate_proj))
    ]
    out = mlp(x)
    assert "LoraSwigluBackward" not in graph_nodes(out)  # the MLP's own forward
    out.sum().backward()
    assert sorted(seen) == ["down", "gate"]
    hooks.pop().remove()  # down_proj's alone: gate and up through LoraSwiglu, down as a module
    out = mlp(x)
    assert "LoraSwigluBackward" in graph_nodes(out)
    out.sum().backward()
    assert sorted(seen) == ["down", "down", "gate"]
    hooks.pop().remove()
    names = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, *_: names.append(type(module).__name__)
    )
    assert "LoraSwigluBackward" not in graph_nodes(mlp(x))
    hook.remove()
    assert names.count("Linear") >= 3  # the projections' base layers ran as modules
    assert "LoraSwigluBackward" in graph_nodes(mlp(x))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_a_second_backward_through_the_graph_fails_loudly(device):
    """The backward writes gate's and up's gradients over their saved outputs (on a GPU the
    kernel, through pointers): a second pass (retain_graph) must raise, not compute from
    gradients."""
    if device == "cuda":
        model, width = gpu_lora_model(dropout=0.0), 64
        mlp = model.base_model.model.model.layers[0].mlp
    else:
        model, width = lora_model(build_tiny_llama), 32
        mlp = model.get_base_model().model.layers[0].mlp
    fuse_lora(model)
    x = torch.randn(1, 5, width, requires_grad=True).to(device, next(mlp.parameters()).dtype)
    out = mlp(x).float().sum()
    assert "LoraSwigluBackward" in graph_nodes(out)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.backward()


def test_a_forward_bound_after_routing_is_routed_again_and_kept_on_unfuse():
    """Liger's patch applied to a model routed for training (decoding it after training
    does): reroute_mlps keeps LoraSwiglu for training and the new forward for the rest."""
    from selftune.accel.lora_routing import reroute_mlps

    model = lora_model(build_tiny_llama)
    mlp = model.get_base_model().model.layers[0].mlp
    fuse_lora(model)
    calls = []

    def bound(self, x):
        calls.append(1)
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    mlp.forward = types.MethodType(bound, mlp)  # as Liger binds its SwiGLU forward
    x = torch.randn(1, 5, 32)
    assert "LoraSwigluBackward" not in graph_nodes(mlp(x.requires_grad_()))
    reroute_mlps(model)
    assert "LoraSwigluBackward" in graph_nodes(mlp(x))
    with torch.no_grad():
        mlp(x)
    assert len(calls) == 2
    unfuse_lora(model)
    assert mlp.forward.__func__ is bound


def handoff_and_plain_gradients(model, batches, device: str) -> tuple:
    """Loss and gradients with down_proj's adapter gradient handed to LoraSwiglu, then with
    down_proj run on its own (a no-op hook on each down_proj stops the handoff)."""
    fuse_lora(model)
    downs = [layer.mlp.down_proj for layer in model.get_base_model().model.layers]
    results = []
    for handed in (True, False):
        hooks = [] if handed else [d.register_forward_pre_hook(lambda *_: None) for d in downs]
        torch.manual_seed(3)
        if device == "cuda":
            torch.cuda.manual_seed(3)
        results.append(loss_and_grads(model, batches))
        for hook in hooks:
            hook.remove()
    return results


def test_down_projs_handoff_gives_the_gradients_of_down_proj_alone():
    model = lora_model(build_tiny_qwen2)  # no dropout: the handoff's case
    (loss, grads), (plain_loss, plain_grads) = handoff_and_plain_gradients(
        model, [packed_batch([9, 14])], "cpu"
    )
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@cuda
def test_routed_mlp_on_a_gpu_equals_plain_autograd_under_the_kernels_mask():
    """An MLP through LoraSwiglu in bf16 with dropout, against PEFT's formula under the mask the
    group drew (its first draw from the generator after seeding)."""
    model = gpu_lora_model(dropout=0.3)
    mlp = model.base_model.model.model.layers[0].mlp
    mlp.down_proj.lora_dropout["default"] = torch.nn.Identity()  # the group's draw alone
    fuse_lora(model)
    members = [mlp.gate_proj, mlp.up_proj]
    x = torch.randn(2, 40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def grads():
        found = [x.grad.float()] + [m.lora_A["default"].weight.grad for m in members]
        return found + [m.lora_B["default"].weight.grad for m in members]

    torch.manual_seed(5)
    fused = mlp(x)
    assert "LoraSwigluBackward" in graph_nodes(fused)
    fused.float().square().sum().backward()
    fused_grads = [g.clone() for g in grads()]
    x.grad = None
    model.zero_grad()
    torch.manual_seed(5)
    seed = fused_dropout.draw_seed(x.device)
    dropped = fused_dropout.dropped(x.detach().reshape(-1, 64), 0.3, seed).float()
    keep = (dropped != 0).float().view(2, 40, 64)
    outputs = []
    for m in members:
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        lora = (x.float() * keep / 0.7) @ a.t() @ b.t()
        outputs.append(m.base_layer(x).float() + m.scaling["default"] * lora)
    hidden = torch.nn.functional.silu(outputs[0]) * outputs[1]
    reference = mlp.down_proj(hidden.to(torch.bfloat16))
    reference.float().square().sum().backward()
    assert_close_to_scale(fused.float(), reference.float(), 3e-2)
    for got, want in zip(fused_grads, grads()):
        assert_close_to_scale(got.float(), want.float(), 5e-2)


@cuda
def test_down_projs_handoff_on_a_gpu_gives_the_gradients_of_down_proj_alone():
    """In bf16, through the kernels (no dropout: the handoff's case)."""
    model = gpu_lora_model(dropout=0.0)
    batches = [{k: v.cuda() for k, v in packed_batch([9, 30, 14]).items()}]
    (loss, grads), (plain_loss, plain_grads) = handoff_and_plain_gradients(model, batches, "cuda")
    assert loss == pytest.approx(plain_loss, rel=1e-3)
    for name, grad in plain_grads.items():
        assert_close_to_scale(grads[name], grad, 2e-2, msg=name)


def test_biased_mlps_give_peft_loss_and_gradients():
    """Llama's mlp_bias: the biases go into gate's and up's plain outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mlp_bias=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    for name, param in model.named_parameters():
        if "bias" in name:
            torch.nn.init.normal_(param, std=0.1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).train()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    batches = [packed_batch([7, 12])]
    peft_loss, peft_grads = loss_and_grads(model, batches)
    fuse_lora(model)
    mlp = model.get_base_model().model.layers[0].mlp
    assert "LoraSwigluBackward" in graph_nodes(mlp(torch.randn(1, 3, 32)))
    fused_loss, fused_grads = loss_and_grads(model, batches)
    assert abs(fused_loss - peft_loss) <= 1e-5 * abs(peft_loss)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
