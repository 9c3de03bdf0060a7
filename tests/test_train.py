import math

import matplotlib
import pytest
import torch

from course.data import load_dataset
from course.model import ModelConfig, Transformer
from course.train import History, TrainConfig, evaluate, lr_at, make_optimizer, train

matplotlib.use("Agg")


def small_run(steps=80, grad_accum=1, seed=0):
    data = load_dataset("char")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=data.tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64))
    g = torch.Generator().manual_seed(seed)
    cfg = TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=10, eval_interval=40, eval_iters=4,
                      grad_accum=grad_accum, progress=False)
    return model, train(model, lambda s: data.batch(s, 8, 64, g), cfg)


def test_loss_falls_on_real_text():
    model, hist = small_run()
    uniform = math.log(model.config.vocab_size)
    assert hist.train_loss[0] > uniform - 0.3
    assert hist.final_val_loss < hist.val_loss[0] - 1.0  # learned character statistics
    assert len(hist.steps) == 80 and len(hist.val_steps) == 3
    assert all(t > 0 for t in hist.tokens_per_s) and hist.mfu[-1] is None  # CPU: no known peak
    assert "80 steps" in repr(hist)
    ax = hist.plot()
    assert ax.get_ylabel().startswith("cross-entropy")


def test_training_is_deterministic_under_a_seed():
    _, a = small_run(steps=15)
    _, b = small_run(steps=15)
    assert a.train_loss == b.train_loss


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
    a, b = Transformer(cfg), Transformer(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 20, (8, 8))
    y = torch.randint(0, 20, (8, 8))
    halves = iter([(x[:4], y[:4]), (x[4:], y[4:])])
    train(a, lambda s: (x, y), TrainConfig(max_steps=1, grad_accum=1, progress=False, eval_iters=1, warmup_steps=0))
    train(b, lambda s: next(halves) if s == "train" else (x, y),
          TrainConfig(max_steps=1, grad_accum=2, progress=False, eval_iters=1, warmup_steps=0))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_evaluate_uses_eval_mode_and_restores_training():
    model = Transformer(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    x = torch.randint(0, 20, (4, 8))
    model.train()
    a = evaluate(model, lambda s: (x, x), iters=2)
    b = evaluate(model, lambda s: (x, x), iters=2)
    assert a == b and model.training


@pytest.mark.parametrize("field,value", [("max_steps", 0), ("lr", -1.0), ("grad_accum", 0), ("grad_clip", 0.0)])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_the_foreach_optimizer_updates_bit_for_bit_like_the_per_tensor_one():
    """make_optimizer asks for foreach AdamW (torch's default only on CUDA): on the CPU it must change
    nothing but the speed. Same model, same gradients, both weight-decay groups, 5 steps: equal bits."""
    torch.manual_seed(0)
    a = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    b = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(lr=3e-3, weight_decay=0.1)
    fast = make_optimizer(a, cfg)
    assert fast.defaults["foreach"] is True
    names = {id(p): n for n, p in a.named_parameters()}  # b's parameters in a's groups, per tensor
    params_b = dict(b.named_parameters())
    slow = torch.optim.AdamW([{"params": [params_b[names[id(p)]] for p in g["params"]],
                               "weight_decay": g["weight_decay"]} for g in fast.param_groups],
                             lr=cfg.lr, betas=cfg.betas, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fast.step()
        slow.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
