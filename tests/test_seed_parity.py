"""The seed notebook's hand-written TinyResNet with stochastic depth is reproduced by the pass."""

import torch
import torch.nn as nn

from sdsurgery import StochasticDepth as RetrofitStochasticDepth
from sdsurgery import apply_stochastic_depth, find_residual_sites, verify

# --- the seed notebook's code, verbatim in behaviour ---


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not (0.0 <= p < 1.0):
        raise ValueError("p must be in [0, 1).")
    if (not training) or p == 0.0:
        return x
    q = 1.0 - p
    shape = (x.size(0),) + (1,) * (x.ndim - 1)
    mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(q)
    return x * mask / q


class StochasticDepth(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        return stochastic_depth(x, p=self.p, training=self.training)


class BasicResBlockSD(nn.Module):
    def __init__(self, cin, cout, stride=1, sd_p=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.sd = StochasticDepth(p=sd_p)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = self.shortcut(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.sd(out)
        out = out + identity
        return self.act(out)


def make_sd_probs(num_blocks, p_max):
    if num_blocks <= 1:
        return [p_max]
    return [p_max * i / (num_blocks - 1) for i in range(num_blocks)]


def make_stage(cin, cout, num_blocks, stride, sd_probs):
    return nn.Sequential(
        *[
            BasicResBlockSD(cin if i == 0 else cout, cout, stride=stride if i == 0 else 1, sd_p=sd_probs[i])
            for i in range(num_blocks)
        ]
    )


class TinyResNetStochasticDepth(nn.Module):
    def __init__(self, num_classes=100, sd_max=0.2, blocks=(2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        probs = make_sd_probs(sum(blocks), sd_max)
        self.stage1 = make_stage(32, 32, blocks[0], 1, probs[: blocks[0]])
        self.stage2 = make_stage(32, 64, blocks[1], 2, probs[blocks[0] : blocks[0] + blocks[1]])
        self.stage3 = make_stage(64, 128, blocks[2], 2, probs[blocks[0] + blocks[1] :])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


# --- the specification ---

BLOCKS = ["stage1.0", "stage1.1", "stage2.0", "stage2.1", "stage3.0", "stage3.1"]


def test_finds_the_six_blocks_with_the_seed_rates():
    sites = find_residual_sites(TinyResNetStochasticDepth(num_classes=10, sd_max=0.0), 0.3)
    assert [s.block_path for s in sites] == BLOCKS
    assert [s.drop_rate for s in sites] == make_sd_probs(6, 0.3)
    torch.testing.assert_close(torch.tensor([s.drop_rate for s in sites]), torch.linspace(0, 0.3, 6))


def test_puts_one_stochastic_depth_per_block_on_the_branch():
    # The seed's own drop path (rate 0 here) is on each branch: it is re-rated where it is, never stacked.
    model = apply_stochastic_depth(TinyResNetStochasticDepth(num_classes=10, sd_max=0.0), 0.3)
    placed = {n: m.p for n, m in model.named_modules() if isinstance(m, RetrofitStochasticDepth)}
    assert placed == {f"{b}.sd": p for b, p in zip(BLOCKS, make_sd_probs(6, 0.3))}


def test_a_block_without_drop_path_gets_a_stochastic_depth_module_of_its_own():
    model = TinyResNetStochasticDepth(num_classes=10)
    for block in BLOCKS:
        model.get_submodule(block).sd = nn.Identity()
    model = apply_stochastic_depth(model, 0.3)
    placed = {n: m.p for n, m in model.named_modules() if isinstance(m, RetrofitStochasticDepth)}
    assert placed == {f"{b}.stochastic_depth": p for b, p in zip(BLOCKS, make_sd_probs(6, 0.3))}


def test_train_outputs_equal_the_hand_written_model_under_the_same_seed():
    torch.manual_seed(0)
    plain = TinyResNetStochasticDepth(num_classes=10, sd_max=0.0)
    hand_written = TinyResNetStochasticDepth(num_classes=10, sd_max=0.3)
    hand_written.load_state_dict(plain.state_dict())
    retrofitted = apply_stochastic_depth(plain, 0.3)
    x = torch.randn(8, 3, 32, 32)
    for seed in range(3):  # several draws, so that dropped and kept samples both occur
        torch.manual_seed(seed)
        expected = hand_written.train()(x)
        torch.manual_seed(seed)
        actual = retrofitted.train()(x)
        assert torch.equal(actual, expected)


def test_verifier_passes():
    plain = TinyResNetStochasticDepth(num_classes=10, sd_max=0.0)
    report = verify(plain, apply_stochastic_depth(plain, 0.3), torch.randn(2, 3, 32, 32))
    assert report.ok, report.summary()
    assert report.eval_max_abs_diff == 0.0
    assert len(report.sites) == 6
