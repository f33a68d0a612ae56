import math

import torch

from soup.losses.sft import IGNORE_INDEX, count_trained_tokens, next_token_loss_sum


def test_loss_sum_matches_hand_computed_log_softmax():
    # One sequence of 3 tokens, vocab 2. Position 0 predicts labels[1]=1, position 1 predicts labels[2]=0.
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[7, 1, 0]])  # labels[0] is never a target
    loss_sum, n = next_token_loss_sum(logits, labels)
    # p(1 | pos0) = 3/4, p(0 | pos1) = 4/5
    expected = -math.log(3 / 4) - math.log(4 / 5)
    assert n == 2
    assert abs(loss_sum.item() - expected) < 1e-6


def test_ignored_positions_carry_no_loss_and_no_count():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [1, 2, 3, 4, 5]])
    loss_sum, n = next_token_loss_sum(logits, labels)
    assert n == 2 + 4 == count_trained_tokens(labels)
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="none")
    assert torch.allclose(loss_sum, per_token.sum())


def test_half_precision_logits_are_upcast():
    logits = torch.randn(1, 4, 50).to(torch.bfloat16)
    labels = torch.tensor([[0, 1, 2, 3]])
    loss_sum, _ = next_token_loss_sum(logits, labels)
    assert loss_sum.dtype == torch.float32
