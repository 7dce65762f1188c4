import pytest
import torch

from perfit.core.importance import first_order, gradient_moments, importance, mixed, second_order


def test_first_order_is_abs_grad_times_theta():
    grad = torch.tensor([0.5, -2.0, 0.0, 3.0])
    theta = torch.tensor([2.0, 1.5, 7.0, -1.0])
    # |0.5*2|, |-2*1.5|, |0*7|, |3*-1|
    assert torch.equal(first_order(grad, theta), torch.tensor([1.0, 3.0, 0.0, 3.0]))


def test_second_order_is_abs_theta_fisher_theta():
    fisher = torch.tensor([4.0, 0.25, 1.0])
    theta = torch.tensor([0.5, -2.0, 3.0])
    # 0.25*4, 4*0.25, 9*1
    assert torch.equal(second_order(fisher, theta), torch.tensor([1.0, 1.0, 9.0]))


def test_mixed_subtracts_half_second_order_before_abs():
    grad = torch.tensor([1.0, 1.0, -1.0])
    fisher = torch.tensor([2.0, 8.0, 2.0])
    theta = torch.tensor([1.0, 1.0, 2.0])
    # 1*1 - 0.5*1*2*1 = 0 ; 1 - 0.5*8 = -3 -> 3 ; -2 - 0.5*4*2 = -6 -> 6
    assert torch.equal(mixed(grad, fisher, theta), torch.tensor([0.0, 3.0, 6.0]))
    assert torch.equal(importance("mixed", grad, fisher, theta), mixed(grad, fisher, theta))
    with pytest.raises(ValueError, match="metric"):
        importance("third", grad, fisher, theta)


def test_fisher_metrics_score_per_example_first_order_per_micro_batch():
    from perfit.core.importance import scoring_units

    batches = [["a", "b"], ["c"]]
    assert scoring_units(batches, "first") == batches
    assert scoring_units(batches, "second") == scoring_units(batches, "mixed") == [["a"], ["b"], ["c"]]
    # why: from one gradient, F = g^2 and Eq. 3 = theta^2 g^2 / 2 ranks exactly as Eq. 2 = |g theta|
    theta = torch.tensor([1.0, 2.0, 3.0])
    one = torch.tensor([3.0, 1.0, 0.5])  # |g theta| = 3, 2, 1.5: position 0 first
    grad, fisher = gradient_moments([one])
    assert torch.equal(second_order(fisher, theta).argsort(), first_order(grad, theta).argsort())
    # per-example gradients that agree on position 0 and disagree on 2: same mean, other ranking
    g1, g2 = torch.tensor([3.0, 1.0, 4.5]), torch.tensor([3.0, 1.0, -3.5])
    grad, fisher = gradient_moments([g1, g2])
    assert torch.equal(grad, one)
    # F = 9, 1, 16.25: theta^2 F = 9, 4, 146.25 -> position 2 is now the most important
    assert torch.equal(second_order(fisher, theta), torch.tensor([9.0, 4.0, 146.25]))
    assert int(second_order(fisher, theta).argmax()) == 2 and int(first_order(grad, theta).argmax()) == 0


def test_gradient_moments_mean_and_fisher():
    g1 = torch.tensor([1.0, -2.0])
    g2 = torch.tensor([3.0, 2.0])
    grad, fisher = gradient_moments([g1, g2])
    assert torch.equal(grad, torch.tensor([2.0, 0.0]))
    assert torch.equal(fisher, torch.tensor([5.0, 4.0]))  # (1+9)/2, (4+4)/2


def test_gradient_magnitude_ranks_without_theta():
    from perfit.core.importance import gradient_magnitude, scoring_units

    grad = torch.tensor([0.5, -2.0, 0.0, 3.0])
    theta = torch.tensor([8.0, 1.0, 7.0, -0.1])  # large theta_0 would put position 0 first under Eq. 2
    assert torch.equal(gradient_magnitude(grad), torch.tensor([0.5, 2.0, 0.0, 3.0]))
    fisher = torch.zeros(4)
    assert torch.equal(importance("gradient", grad, fisher, theta), gradient_magnitude(grad))
    assert int(importance("first", grad, fisher, theta).argmax()) == 0
    assert int(importance("gradient", grad, fisher, theta).argmax()) == 3  # the data's, not theta_0's, choice
    assert scoring_units([["a", "b"]], "gradient") == [["a", "b"]]  # the mean gradient: one per micro-batch
