"""One-token attention on a static cache (selftune.accel.kernels.decode_attention): the kernels against
RoPE, the cache write and SDPA as transformers runs them, and the static decoder's steps on the
fused path against a full forward of the same tokens."""

from __future__ import annotations

import types

import pytest
import torch
from support import assert_close_to_scale, run_interpreted, with_lora

from selftune.accel import decode_routing
from selftune.accel.kernels import decode_attention
from selftune.infer import static_decode

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")


def rope(dim: int, at: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (1, 1, dim) of position `at`, as transformers' rotary embedding gives them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.cat([at * inv_freq, at * inv_freq])
    return (angles.cos().to(device, dtype)[None, None], angles.sin().to(device, dtype)[None, None])


def reference(q, k, v, cos, sin, keys, values, at, scaling):
    """transformers' RoPE and cache write, then attention over positions 0..at, in float64."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _, kv_heads, _, dim = keys.shape
    q = q.view(1, 1, -1, dim).transpose(1, 2)
    k = k.view(1, 1, kv_heads, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys, values = keys.clone(), values.clone()
    keys[:, :, at] = k[:, :, 0]
    values[:, :, at] = v.view(kv_heads, dim)
    group = q.shape[1] // kv_heads
    seen_k = keys[:, :, : at + 1].double().repeat_interleave(group, dim=1)
    seen_v = values[:, :, : at + 1].double().repeat_interleave(group, dim=1)
    weights = torch.softmax(q.double() @ seen_k.transpose(-1, -2) * scaling, dim=-1)
    return (weights @ seen_v).transpose(1, 2).reshape(1, 1, -1), keys, values


class Layer:
    """A StaticCache layer's tensors, as `attend` reads them."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values
        self.cumulative_length = torch.tensor(0, device=keys.device)


def check_kernel(device: str, dtype: torch.dtype) -> None:
    """Grouped heads of 1, 2 and 7 queries a key/value head; caches of one chunk, several and
    the largest split; positions at 0, at a chunk's edges and at the cache's end."""
    cases = (
        (4, 4, 32, 40, (0, 1, 39)),
        (4, 2, 64, 256, (0, 31, 32, 33, 200, 255)),
        (14, 2, 128, 512, (7, 64, 300)),
        (9, 3, 64, 4096, (63, 64, 4000)),
        (4, 1, 32, 257, (5, 256)),
    )
    for heads, kv_heads, dim, cache_len, positions in cases:
        torch.manual_seed(cache_len + heads)
        keys = torch.randn(1, kv_heads, cache_len, dim).to(device, dtype)
        values = torch.randn(1, kv_heads, cache_len, dim).to(device, dtype)
        for at in positions:
            # q, k and v as views of one projection's output, as the stacked projections give
            qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * dim + 8).to(device, dtype)
            edges = (0, heads * dim, (heads + kv_heads) * dim, (heads + 2 * kv_heads) * dim)
            q, k, v = (qkv[..., a:b] for a, b in zip(edges, edges[1:]))
            cos, sin = rope(dim, at, dtype, device)
            scaling = dim**-0.5
            want, want_keys, want_values = reference(q, k, v, cos, sin, keys, values, at, scaling)
            layer = Layer(keys.clone(), values.clone())
            position = torch.tensor([[at]], device=device)
            got = decode_attention.attend(q, k, v, cos, sin, layer, position, scaling, dim)
            assert got is not None and got.shape == (1, 1, heads * dim) and got.dtype == dtype
            assert_close_to_scale(got.double(), want, 2e-2, f"{heads} {kv_heads} {dim} {at}")
            assert_close_to_scale(layer.keys.double(), want_keys.double(), 1e-2)
            # every other position of the cache is left as it was, the new value as given
            others = torch.arange(cache_len, device=device) != at
            assert torch.equal(layer.keys[:, :, others], keys[:, :, others])
            assert torch.equal(layer.values, want_values)
            assert int(layer.cumulative_length) == at + 1


def tiny_model(kind: str, dtype, device):
    """Tiny Llama and Qwen2 with head sizes the kernels take (32 and 64) and grouped heads."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(11)
    shared = {"vocab_size": 300, "num_hidden_layers": 2, "max_position_embeddings": 512}
    if kind == "llama":
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2, **shared)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(hidden_size=192, intermediate_size=256, num_attention_heads=6,
                             num_key_value_heads=2, head_dim=64, **shared)  # fmt: skip
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger weights: each token's logits depend on the whole context
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(4)
    return model.to(device, dtype).eval()


def routed(module) -> bool:
    forward = module.__dict__.get("forward")
    return hasattr(forward, "_selftune_decode_attention")


def check_decoder(device: str, dtype: torch.dtype, graphs: bool = False) -> None:
    """The static decoder's steps, with every attention module on the fused path,
    give a full forward's logits for the same tokens (teacher-forced), across a chunk's edge;
    the cache's length ends where update() would leave it. Base models, and Llama under an
    unmerged and a merged LoRA adapter. With `graphs`, the steps replay CUDA graphs."""
    calls = []
    attend = decode_attention.attend

    def counted(*args, **kwargs):
        out = attend(*args, **kwargs)
        calls.append(out is not None)
        return out

    decode_attention.attend = counted
    try:
        for kind, adapter in (("llama", None), ("qwen2", None), ("llama", 0), ("llama", 1)):
            model = tiny_model(kind, dtype, device)
            if adapter is not None:
                model = with_lora(model)
                if adapter:
                    model.merge_adapter()
            decoder = static_decode.StaticDecoder(model, use_graphs=graphs, fast=True)
            model._selftune_static_decoder = decoder
            decoder.prepare()
            assert decoder.fused_attention == 2
            torch.manual_seed(5)
            tokens = torch.randint(3, 300, (1, 44), device=device)
            prompt = tokens[0, :20].tolist()
            bucket = decoder.bucket(64)  # two chunks of 32 positions
            with torch.inference_mode():
                full = model(input_ids=tokens).logits[0].double()
                got = [decoder.prefill(bucket, prompt)]
                state = decoder.state()
                for token in tokens[0, 20:-1].tolist():
                    bucket.token.fill_(token)
                    if graphs:
                        logits, _ = decoder.replay(bucket, state)
                    else:
                        logits, _ = decoder.run_step(bucket)
                    got.append(logits.clone())
            got = torch.cat(got).double()
            case = f"{kind} adapter {adapter}"
            error = ((got - full[19:-1]).abs().max() / full.abs().max()).item()
            assert_close_to_scale(got, full[19:-1], 1e-2, f"{case}: {error:.4f} of the largest")
            assert (got.argmax(-1) == full[19:-1].argmax(-1)).float().mean() > 0.9, case
            for layer in bucket.cache.layers:
                assert int(layer.cumulative_length) == tokens.shape[1] - 1
            assert calls and all(calls)
            calls.clear()
            static_decode.disable(model)
            assert not any(routed(m) for m in model.modules()), case
    finally:
        decode_attention.attend = attend


def test_kernels_under_the_interpreter():
    run_interpreted("test_decode_attention", 'check_kernel("cpu", torch.float16)')


def test_decoder_steps_under_the_interpreter():
    run_interpreted("test_decode_attention", 'check_decoder("cpu", torch.float16)')


@cuda
def test_kernels_on_the_gpu():
    check_kernel("cuda", torch.bfloat16)


# float16, as under the interpreter: in bfloat16 the full forward's own rounding is the larger
# part of the difference (the kernels' bfloat16 results are pinned by test_kernels_on_the_gpu)
@cuda
def test_decoder_steps_on_the_gpu():
    check_decoder("cuda", torch.float16)


@cuda
def test_decoder_steps_replayed_as_cuda_graphs():
    check_decoder("cuda", torch.float16, graphs=True)


def test_layout_covers_the_cache_in_whole_tiles():
    for cache_len in (1, 31, 32, 40, 256, 257, 4096, 32768, 100_000):
        chunks, splits, chunk = decode_attention.layout(cache_len)
        assert splits & (splits - 1) == 0 and chunks <= splits <= decode_attention.MAX_SPLITS
        assert chunk % decode_attention.BLOCK == 0
        assert chunks * chunk >= cache_len > (chunks - 1) * chunk


def test_other_attention_keeps_its_own_forward():
    """Sliding windows, q/k norms and head sizes the kernels do not take are not routed; and
    outside the static decoder's steps a routed module runs its own forward."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.support import build_tiny_llama

    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
        )  # fmt: skip
    )
    for other in (qwen3, build_tiny_llama(100)):  # q/k norms; a head size of 8
        assert decode_routing.route_attention(other, decode_attention.Slot()) == 0
    model = tiny_model("llama", torch.float32, "cpu")
    ids = torch.tensor([[5, 6, 7]])
    slot = decode_attention.Slot()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert decode_routing.route_attention(model, slot) == 2
        torch.testing.assert_close(model(input_ids=ids).logits, want)
        # one token outside a decoder step: the module's own forward, as it gave alone
        torch.testing.assert_close(model(input_ids=ids[:, :1]).logits, want[:, :1])
    decode_routing.unroute_attention(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_sliding_window_cache_keeps_transformers_attention():
    """A window's cache layer rolls its positions: attend declines it before any launch."""
    keys = torch.zeros(1, 2, 64, 32, dtype=torch.float16)
    layer = Layer(keys, keys.clone())
    layer.is_sliding = True
    q = torch.zeros(1, 1, 4 * 32, dtype=torch.float16)
    k = torch.zeros(1, 1, 2 * 32, dtype=torch.float16)
    cos, sin = rope(32, 3, torch.float16, "cpu")
    position = torch.tensor([[3]])
    assert decode_attention.attend(q, k, k.clone(), cos, sin, layer, position, 0.2, 32) is None


def test_a_failing_kernel_falls_back_for_good(monkeypatch, caplog):
    """A kernel that raises (say, fails to compile) outside a capture: that step and every later
    one run transformers' attention, with a warning, and answer as the unrouted model does."""
    model = tiny_model("llama", torch.float32, "cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(input_ids=ids[:, :1]).logits
    tries = []

    def broken(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(decode_attention, "runs_on", lambda device: True)
    monkeypatch.setattr(decode_attention, "attend", broken)
    slot = decode_attention.Slot(cache=types.SimpleNamespace(layers=[None, None]))
    slot.position = torch.tensor([[0]])
    assert decode_routing.route_attention(model, slot) == 2
    with torch.no_grad(), caplog.at_level("WARNING"):
        torch.testing.assert_close(model(input_ids=ids[:, :1]).logits, want)
        model(input_ids=ids[:, :1])
    assert slot.failed and len(tries) == 1
    assert "attention kernels failed" in caplog.text
