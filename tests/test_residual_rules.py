"""Which residuals count by default: trunk residuals only. Re-parameterisation sums and positional-conv adds
are judged by the same rules as every other addition, and users override them with include= / exclude=."""

import torch
import torch.nn.functional as F
from torch import nn

from sdsurgery import apply_stochastic_depth, find_residual_sites, plan_stochastic_depth, verify


def _conv_bn(c, k):
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c))


class RepVggStyle(nn.Module):
    """``conv_kxk(x) + conv_1x1(x) + bn(x)``: one residual, the batch norm is the (projection) shortcut."""

    def __init__(self, c=4):
        super().__init__()
        self.conv_kxk = _conv_bn(c, 3)
        self.conv_1x1 = _conv_bn(c, 1)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.conv_kxk(x) + self.conv_1x1(x) + self.identity(x))


def test_reparameterisation_sum_is_one_site_with_the_norm_as_skip():
    sites = find_residual_sites(RepVggStyle())
    assert [(s.skip, s.shortcut) for s in sites] == [("identity", "projection")]


def test_reparameterisation_inner_sum_of_equal_depth_is_no_site_even_when_nested_are_kept():
    sites = find_residual_sites(RepVggStyle(), nested=True)
    assert [s.skip for s in sites] == ["identity"]


class KernelSum(nn.Module):
    """``large(x) + small(x)`` (RepLKNet / FastViT): a multi-branch sum of equal depth has no shortcut."""

    def __init__(self, c=4):
        super().__init__()
        self.large = _conv_bn(c, 7)
        self.small = _conv_bn(c, 3)

    def forward(self, x):
        return self.large(x) + self.small(x)


def test_sum_of_paths_of_equal_depth_is_not_a_site_whatever_their_parameters():
    assert find_residual_sites(KernelSum()) == []


class DownsamplingProjection(nn.Module):
    """A ResNet downsampling block: the projection shortcut (conv, bn) is shallower than the branch."""

    def __init__(self, c=4):
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(c, c, 1, stride=2), nn.BatchNorm2d(c))
        self.branch = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, x):
        return self.shortcut(x) + self.branch(x)


def test_projection_shortcut_is_the_path_with_fewer_parametrised_layers():
    sites = find_residual_sites(DownsamplingProjection())
    assert [(s.skip, s.branch, s.shortcut) for s in sites] == [("shortcut_1", "branch_3", "projection")]


class PositionalConv(nn.Module):
    """A conditional position encoding, ``x + dwconv(x)`` (CPVT/Twins ``PosConv``, CoaT/DaViT ``ConvPosEnc``)."""

    def __init__(self, c=8):
        super().__init__()
        self.proj = nn.Conv1d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        return x + self.proj(x)


class TransformerLikeBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.cpe = PositionalConv(c)
        self.mix = nn.Conv1d(c, c, 1)
        self.mlp = nn.Sequential(nn.Conv1d(c, 2 * c, 1), nn.GELU(), nn.Conv1d(2 * c, c, 1))

    def forward(self, x):
        x = self.cpe(x)
        x = x + self.mix(x)
        return x + self.mlp(x)


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(TransformerLikeBlock(), TransformerLikeBlock())
        self.pos = PositionalConv()  # on the model's trunk, between blocks

    def forward(self, x):
        return self.blocks[1](self.pos(self.blocks[0](x)))


X = torch.randn(2, 8, 5)


def test_positional_conv_on_the_trunk_is_a_site():
    sites = find_residual_sites(Trunk(), example_inputs=X)
    assert [s.block_path for s in sites] == ["blocks.0", "blocks.0", "pos", "blocks.1", "blocks.1"]


class TwinsLike(nn.Module):
    """Twins: the position encoding follows the first block of a stage that then runs its blocks back to back."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(TransformerLikeBlock(), TransformerLikeBlock(), TransformerLikeBlock())
        self.pos = PositionalConv()

    def forward(self, x):
        return self.blocks[2](self.blocks[1](self.pos(self.blocks[0](x))))


def test_positional_conv_between_repeated_blocks_is_left_alone():
    plan = plan_stochastic_depth(TwinsLike(), 0.1, example_inputs=X)
    assert [s.block_path for s in plan.sites] == [
        "blocks.0",
        "blocks.0",
        "blocks.1",
        "blocks.1",
        "blocks.2",
        "blocks.2",
    ]
    assert plan.left_alone == ["pos"]


def test_positional_conv_on_a_trunk_without_repeated_blocks_is_a_site():
    # Trunk never runs two blocks back to back, so it repeats no block and every residual counts.
    assert plan_stochastic_depth(Trunk(), 0.1, example_inputs=X).left_alone == []


def test_positional_conv_inside_a_block_is_part_of_that_block():
    sites = find_residual_sites(Trunk(), nested=True, example_inputs=X)
    assert [s.block_path for s in sites] == [
        "blocks.0.cpe",
        "blocks.0",
        "blocks.0",
        "pos",
        "blocks.1.cpe",
        "blocks.1",
        "blocks.1",
    ]


class PositionConvEncoder(nn.Module):
    """wav2vec2's encoder: adds a wide position convolution (more parameters than each residual branch of a
    block), then runs its blocks, held in a ``ModuleList`` or (``listed=False``) as two attributes."""

    def __init__(self, c=8, listed=True):
        super().__init__()
        self.pos = nn.Conv1d(c, c, 15, padding=7)
        blocks = [TransformerLikeBlock(c), TransformerLikeBlock(c)]
        if listed:
            self.blocks = nn.ModuleList(blocks)
        else:
            self.first, self.second = blocks

    def forward(self, x):
        x = x + self.pos(x)
        for block in self.blocks if hasattr(self, "blocks") else (self.first, self.second):
            x = block(x)
        return x


class SpeechLike(nn.Module):
    def __init__(self, listed=True):
        super().__init__()
        self.encoder = PositionConvEncoder(listed=listed)

    def forward(self, x):
        return self.encoder(x)


def test_blocks_a_module_runs_from_a_list_are_not_parts_of_it():
    sites = find_residual_sites(SpeechLike(), example_inputs=X)
    assert [s.block_path for s in sites] == ["encoder", *(["encoder.blocks.0"] * 2), *(["encoder.blocks.1"] * 2)]


def test_lighter_residual_modules_a_module_calls_by_name_are_parts_of_it():
    sites = find_residual_sites(SpeechLike(listed=False), example_inputs=X)
    assert [s.block_path for s in sites] == ["encoder"]


def test_exclude_by_class_drops_positional_convs():
    sites = find_residual_sites(Trunk(), exclude=[PositionalConv], example_inputs=X)
    assert [s.block_path for s in sites] == ["blocks.0", "blocks.0", "blocks.1", "blocks.1"]


def test_include_by_glob_keeps_only_matching_blocks():
    sites = find_residual_sites(Trunk(), include=["blocks.1*"], nested=True, example_inputs=X)
    assert [(s.block_path, s.depth) for s in sites] == [("blocks.1.cpe", 0), ("blocks.1", 1), ("blocks.1", 1)]


class TwoStreams(nn.Module):
    """Two resolutions exchanging features, like CoaT's parallel blocks: each stream's residual feeds the
    other stream's branch, but goes on along its own trunk, so neither is nested."""

    def __init__(self, c=8):
        super().__init__()
        self.f_a, self.f_b, self.g_a, self.g_b = (nn.Linear(c, c) for _ in range(4))

    def forward(self, a, b):
        a = a + self.f_a(a)
        b = b + self.f_b(b + a)
        a2 = a + self.g_a(a + b)
        b2 = b + self.g_b(b + a)
        return a2, b2


def test_residuals_of_exchanging_streams_are_not_nested():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    sites = find_residual_sites(TwoStreams(), example_inputs=(a, b))
    assert [s.add for s in sites] == ["add", "add_2", "add_4", "add_6"]


def test_retrofitted_streams_verify():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    original = TwoStreams()
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=(a, b))
    report = verify(original, retrofitted, (a, b))
    assert report.ok and len(report.sites) == 4
