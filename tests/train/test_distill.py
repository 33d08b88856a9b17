import math

import pytest
import torch
from support import build_tiny_gemma2, build_tiny_llama, lora_args, random_examples

from selftune.data.batches import packed, with_label_index
from selftune.data.pack import pad_batch
from selftune.train.distill import attach_teacher
from selftune.train.loop import wrap_model
from selftune.train.loss import batch_loss

VOCAB = 96


@pytest.fixture()
def student():
    return build_tiny_llama(VOCAB, seed=0)


@pytest.fixture()
def teacher():
    return build_tiny_llama(VOCAB, seed=1)


def reference_kl(model, example, top_k=None):
    """KL(teacher || model) summed over the example's labelled positions, from full logits."""
    ids = torch.tensor([example.input_ids])
    log_q = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    total = torch.zeros(())
    for t in range(1, len(example.input_ids)):
        probs = example.teacher_probs[t]
        if probs.sum() == 0:
            continue
        picked = example.teacher_ids[t]
        total = total + (probs * (probs.clamp_min(1e-12).log() - log_q[t - 1, picked])).sum()
    return total


@pytest.mark.parametrize("split", [False, True], ids=["split in the loss", "split on the host"])
def test_special_heads_take_the_same_kl(teacher, split):
    model = build_tiny_gemma2(VOCAB, seed=0)
    plain, replay = random_examples(2, VOCAB, seed=6)
    attach_teacher(teacher, [replay], top_k=VOCAB)
    batch = pad_batch([plain, replay], pad_id=2)
    loss, _, _ = batch_loss(model, with_label_index(batch) if split else batch)
    expected = batch_loss(model, pad_batch([plain], pad_id=2))[0] + reference_kl(model, replay)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_teacher_is_the_models_top_k_at_labelled_positions(teacher):
    examples = random_examples(3, VOCAB)
    attach_teacher(teacher, examples, top_k=5)
    for example in examples:
        ids = torch.tensor([example.input_ids])
        logits = teacher(input_ids=ids).logits[0]
        assert example.teacher_probs.shape == (len(example.input_ids), 5)
        for t, label in enumerate(example.labels):
            if t == 0 or label == -100:
                assert float(example.teacher_probs[t].sum()) == 0.0
                continue
            assert math.isclose(float(example.teacher_probs[t].sum()), 1.0, rel_tol=1e-5)
            assert int(example.teacher_ids[t, 0]) == int(logits[t - 1].argmax())
            assert bool((example.teacher_probs[t, :-1] >= example.teacher_probs[t, 1:]).all())


@pytest.mark.parametrize("split", [False, True], ids=["split in the loss", "split on the host"])
@pytest.mark.parametrize("lora", [False, True], ids=["trainable head", "LoRA, frozen head"])
def test_replay_rows_train_on_kl_from_the_teacher_and_plain_rows_on_cross_entropy(
    student, teacher, lora, split
):
    model = wrap_model(student, lora_args()) if lora else student
    if lora:  # move the adapter off zero so the student differs in every layer
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.3)
    plain, replay = random_examples(2, VOCAB, seed=3)
    attach_teacher(teacher, [replay], top_k=VOCAB)
    batch = pad_batch([plain, replay], pad_id=2)
    loss, count, correct = batch_loss(model, with_label_index(batch) if split else batch)
    expected_ce, plain_count, _ = batch_loss(model, pad_batch([plain], pad_id=2))
    expected = expected_ce + reference_kl(model, replay)
    assert count == plain_count + sum(1 for x in replay.labels[1:] if x != -100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert 0 <= correct <= count
    # and the gradient is that of the reference (the KL chunks are recomputed in backward)
    trainable = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, trainable)
    want = torch.autograd.grad(expected, trainable)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_model_as_its_own_teacher_gives_zero_loss_and_no_gradient(student):
    model = wrap_model(student, lora_args())  # LoRA starts as the identity
    examples = random_examples(3, VOCAB, seed=4)
    attach_teacher(model, examples, top_k=VOCAB)
    loss, _, _ = batch_loss(model, pad_batch(examples, pad_id=2))
    assert abs(float(loss.detach())) < 1e-4
    loss.backward()
    for param in model.parameters():
        if param.requires_grad and param.grad is not None:
            assert float(param.grad.abs().max()) < 1e-5


def test_packed_and_padded_replay_rows_give_the_same_loss(student, teacher):
    examples = random_examples(4, VOCAB, seed=5)
    attach_teacher(teacher, examples[1:3], top_k=8)  # two replay rows among plain ones
    padded_loss, padded_count, _ = batch_loss(student, pad_batch(examples, pad_id=2))
    (pack,) = packed(examples, max_tokens=1000)
    assert pack["teacher_probs"].shape[:2] == pack["input_ids"].shape
    packed_loss, packed_count, _ = batch_loss(student, pack)
    assert packed_count == padded_count
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-4)


def test_top_k_zero_leaves_rows_on_their_greedy_labels(teacher):
    examples = random_examples(2, VOCAB)
    attach_teacher(teacher, examples, top_k=0)
    assert all(e.teacher_probs is None for e in examples)
    assert "teacher_probs" not in pad_batch(examples, pad_id=2)


def test_host_split_sorts_each_label_position_by_its_row(teacher):
    examples = random_examples(4, VOCAB, seed=7)
    attach_teacher(teacher, examples[1:3], top_k=4)
    (pack,) = packed(examples, max_tokens=1000)
    bounds = pack["cu_seq_lens_q"].tolist()
    segments = list(zip(bounds, bounds[1:], strict=False))
    ids = pack["input_ids"][0].tolist()
    replay_ids = (examples[1].input_ids, examples[2].input_ids)
    replayed = {i for i, (a, b) in enumerate(segments) if ids[a:b] in replay_ids}
    segment_of = [i for i, (a, b) in enumerate(segments) for _ in range(a, b)]
    index = pack["label_index"].tolist()
    soft, hard = pack["soft_index"].tolist(), pack["hard_index"].tolist()
    assert soft == [j for j, at in enumerate(index) if segment_of[at + 1] in replayed]
    assert len(soft) == sum(1 for e in examples[1:3] for x in e.labels[1:] if x != -100)
    assert sorted(soft + hard) == list(range(len(index)))
    assert "soft_index" not in packed(examples[:1], max_tokens=1000)[0]
