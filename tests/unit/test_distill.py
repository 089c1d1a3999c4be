"""Distillation on one process: the vocab-parallel KL against torch's, its gradient, the objective's
loss equal to a hand-computed KL + LM loss, layer pairs, and the teacher's checks."""
import pytest
import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.distill.config import DistillConfig
from nemo_quant.distill.kl import vocab_parallel_kl
from nemo_quant.distill.objective import DistillObjective, parse_layer_pairs
from nemo_quant.training.loop import forward_backward


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_and_its_gradient_equal_torch(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 40, generator=g) * 4, torch.randn(3, 7, 40, generator=g) * 4
    s1 = s.clone().requires_grad_(True)
    mine = vocab_parallel_kl(s1, t, temperature, true_vocab=37)
    mine.sum().backward()
    s2 = s.clone().requires_grad_(True)
    ref = torch.nn.functional.kl_div((s2[..., :37] / temperature).log_softmax(-1), (t[..., :37] / temperature).log_softmax(-1),
                                     log_target=True, reduction="none").sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)  # padded entries get no gradient
    assert vocab_parallel_kl(t, t, temperature, 37).abs().max() < 1e-6


def test_objective_loss_is_kl_plus_weighted_lm(megatron_tp1):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_quant.models.builder import build_gpt_model
    from tests.tiny_models import TINY

    torch.manual_seed(0)
    teacher = build_gpt_model(TINY).requires_grad_(False)
    torch.manual_seed(1)
    student = build_gpt_model(TINY)
    batch = torch.randint(0, 257, (2, 17), generator=torch.Generator().manual_seed(2))
    objective = DistillObjective(teacher, DistillConfig(temperature=2.0, lm_weight=0.5), 257, student)
    loss = forward_backward(student, batch, 1, objective)
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        t = teacher(batch[:, :-1], pos, None)
        s = student(batch[:, :-1], pos, None)
    kl = vocab_parallel_kl(s, t, 2.0, 257).mean(-1)  # per window, as each micro-batch is scored
    ce = vocab_parallel_cross_entropy(s.float(), batch[:, 1:]).mean(-1)
    assert float(loss) == pytest.approx(float((4.0 * kl + 0.5 * ce).mean()), rel=1e-5)


def test_layer_pairs_add_their_loss_and_reach_earlier_layers(megatron_tp1):
    from nemo_quant.models.builder import build_gpt_model
    from tests.tiny_models import TINY

    torch.manual_seed(0)
    teacher = build_gpt_model(TINY).requires_grad_(False)
    batch = torch.randint(0, 257, (1, 17), generator=torch.Generator().manual_seed(3))
    grads = {}
    for layers in ([], ["1:2"]):
        torch.manual_seed(1)
        student = build_gpt_model(TINY)
        objective = DistillObjective(teacher, DistillConfig(layers=layers, kd_weight=0.0, lm_weight=1.0), 257, student)
        forward_backward(student, batch, 1, objective)
        grads[len(layers)] = student.decoder.layers[0].mlp.linear_fc2.weight.grad.clone()
        objective.close()
    assert not torch.allclose(grads[0], grads[1])  # the layer-1 loss reaches layer 0


def test_layer_pair_syntax_and_teacher_vocabulary_are_checked(megatron_tp1, tiny_dir, tmp_path):
    from nemo_quant.distill.teacher import build_teacher

    assert parse_layer_pairs(["3:5", "0:0"]) == [(3, 5), (0, 0)]
    with pytest.raises(ConfigError, match=r"distill.layers\[0\]='3-5'"):
        parse_layer_pairs(["3-5"])
    with pytest.raises(ConfigError, match="distill.teacher has a vocabulary of 257 tokens but the student has 300"):
        build_teacher(str(tiny_dir / "hf"), "float32", None, DistillConfig(), student_vocab=300)
