import math

import pytest
import torch
from support import lora_args, random_examples

from selftune.data.pack import pad_batch as padded
from selftune.train.loop import accumulate_gradients, make_optimizer, wrap_model
from selftune.train.loss import batch_loss
from selftune.train.plan import Plan, lr_lambda, make_plan, step_groups


def test_batch_loss_matches_transformers_loss(tiny_llama, smol_tokenizer):
    batch = padded(random_examples(3, len(smol_tokenizer)), pad_id=2)
    loss_sum, count, correct = batch_loss(tiny_llama, batch)
    reference = tiny_llama(**batch).loss
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert math.isclose(float(loss_sum) / count, float(reference), rel_tol=1e-5)
    assert 0 <= correct <= count


def test_gradient_accumulation_is_token_weighted(tiny_llama, smol_tokenizer):
    """Micro-batches of very different sizes give the gradient of one big batch's token mean."""
    model = wrap_model(tiny_llama, lora_args())
    examples = random_examples(4, len(smol_tokenizer))
    group = [padded(examples[:1], 2), padded(examples[1:], 2)]
    accumulate_gradients(model, group)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model(**padded(examples, 2)).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(accumulated[name], param.grad, rtol=1e-4, atol=1e-7)
    # the mean of micro-batch means would differ here
    first = batch_loss(model, group[0])
    second = batch_loss(model, group[1])
    mean_of_means = (first[0] / first[1] + second[0] / second[1]) / 2
    token_mean = (first[0] + second[0]) / (first[1] + second[1])
    assert abs(float(mean_of_means - token_mean)) > 1e-4


def test_warmup_then_cosine():
    plan = Plan(1e-3, 1, 10, total_steps=10, warmup_steps=2, eval_steps=5, save_steps=5)
    factor = lr_lambda(plan, "cosine")
    assert factor(0) < factor(1) < factor(2) == pytest.approx(1.0)
    assert factor(6) == pytest.approx(0.5)
    assert factor(10) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda(plan, "linear")(6) == pytest.approx(0.5)


def test_plan_defaults_follow_ms_swift():
    plan = make_plan(lora_args(per_device_train_batch_size=2), 40, n_params=7_000_000_000)
    assert plan.grad_accum == 8 and plan.steps_per_epoch == 5 and plan.total_steps == 15
    assert plan.learning_rate == 1e-4
    assert make_plan(lora_args(), 40, n_params=135_000_000).learning_rate == 1e-3
    assert make_plan(lora_args(max_steps=7), 40, 1).total_steps == 7


def test_resumed_steps_see_the_same_batches():
    plan = Plan(
        1e-3,
        grad_accum=3,
        steps_per_epoch=4,
        total_steps=9,
        warmup_steps=0,
        eval_steps=5,
        save_steps=5,
    )
    batches = lambda epoch: list(range(10))  # noqa: E731
    full = list(step_groups(batches, plan, seed=1, start_step=0))
    resumed = list(step_groups(batches, plan, seed=1, start_step=5))
    assert [s for s, _, _ in full] == list(range(9))
    assert resumed == full[5:]
    assert sorted(i for _, _, g in full[:4] for i in g) == list(range(10))  # one epoch, each once
    assert [g for _, _, g in full[:4]] != [g for _, _, g in full[4:8]]  # reshuffled per epoch


def test_optimizer_is_fused_only_for_plain_cuda_parameters():
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert not make_optimizer(cpu, 1e-3, 0.0).defaults["fused"]
    assert make_optimizer(cpu, 1e-3, 0.1).defaults["weight_decay"] == 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimizer_is_fused_on_one_gpu():
    gpu = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
    assert make_optimizer(gpu, 1e-3, 0.0).defaults["fused"]
    assert not make_optimizer(gpu, 1e-3, 0.0, sharded=True).defaults["fused"]
