"""Which additions are residual sites, and which operand is the branch: decided by the graph alone."""

import torch
import torch.nn.functional as F
from torch import nn

from sdsurgery import find_residual_sites


class Branch(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


class SkipFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = Branch()

    def forward(self, x):
        return x + self.f(x)


class BranchFirst(SkipFirst):
    def forward(self, x):
        return self.f(x) + x


class InPlace(SkipFirst):
    def forward(self, x):
        x += self.f(x)
        return x


class TorchAdd(SkipFirst):
    def forward(self, x):
        return torch.add(x, self.f(x))


class MethodAdd(SkipFirst):
    def forward(self, x):
        return x.add(self.f(x))


class MethodAddInPlace(SkipFirst):
    def forward(self, x):
        out = self.f(x)
        out.add_(x)
        return out


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.downsample = nn.Conv2d(4, 8, 1, stride=2)

    def forward(self, x):
        return self.downsample(x) + self.f(x)


class IdentityModuleShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = Branch()
        self.shortcut = nn.Identity()

    def forward(self, x):
        return self.f(x) + self.shortcut(x)


def _only_site(model):
    sites = find_residual_sites(model, 0.1)
    assert len(sites) == 1
    return sites[0]


def test_skip_first_operand():
    site = _only_site(SkipFirst())
    assert (site.skip, site.branch, site.shortcut) == ("x", "f_bn", "identity")


def test_branch_first_operand():
    site = _only_site(BranchFirst())
    assert (site.skip, site.branch) == ("x", "f_bn")


def test_in_place_add():
    site = _only_site(InPlace())
    assert (site.skip, site.branch) == ("x", "f_bn")


def test_torch_add():
    assert _only_site(TorchAdd()).branch == "f_bn"


def test_tensor_add_method():
    assert _only_site(MethodAdd()).branch == "f_bn"


def test_tensor_add_in_place_method():
    site = _only_site(MethodAddInPlace())
    assert (site.skip, site.branch) == ("x", "f_bn")


def test_projection_shortcut_skip_is_the_cheaper_path():
    site = _only_site(Projection())
    assert (site.skip, site.branch, site.shortcut) == ("downsample", "f_2", "projection")


def test_parameter_free_shortcut_module_is_an_identity_shortcut():
    site = _only_site(IdentityModuleShortcut())
    assert (site.skip, site.branch, site.shortcut) == ("shortcut", "f_bn", "identity")


def test_site_records_its_block_path_and_depth():
    model = nn.Sequential(SkipFirst(), SkipFirst(), SkipFirst())
    sites = find_residual_sites(model, 0.2)
    assert [(s.block_path, s.depth) for s in sites] == [("0", 0), ("1", 1), ("2", 2)]
    assert [s.drop_rate for s in sites] == [0.0, 0.1, 0.2]


# Additions that are not residual sites.


class BiasAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x):
        return self.conv(x) + self.bias


class PositionalEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))

    def forward(self, x):
        return self.proj(x) + self.pos_embed


class RelativePositionBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.table = nn.Parameter(torch.zeros(9, 1))
        self.register_buffer("index", torch.arange(25).remainder(9).view(5, 5))

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        attn = q @ k.transpose(-2, -1)
        return attn + self.table[self.index].squeeze(-1)


class Rope(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("cos", torch.rand(5, 8))
        self.register_buffer("sin", torch.rand(5, 8))

    def forward(self, x):
        x = self.proj(x)
        rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
        return x * self.cos + rotated * self.sin


class TanhGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        x = self.proj(x)
        return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3))))


class AttentionMaskFromShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 16)

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        attn = q @ k.transpose(-2, -1)
        mask = x.new_zeros(x.shape[1], x.shape[1]).fill_(-100.0).triu(1)
        return attn + mask


class AttentionMaskBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.register_buffer("mask", torch.zeros(5, 5).fill_(-100.0).triu(1))

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        return q @ k.transpose(-2, -1) + self.mask


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.g = nn.Linear(8, 8)

    def forward(self, x, y):
        return self.f(x) + self.g(y)


class Concatenation(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = Branch()

    def forward(self, x):
        return torch.cat([x, self.f(x)], dim=1)


class ConstantAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return self.f(x) + 1.0


class SymmetricSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_bias_parameter_add_is_not_a_site():
    assert find_residual_sites(BiasAdd()) == []


def test_positional_embedding_add_is_not_a_site():
    assert find_residual_sites(PositionalEmbedding()) == []


def test_relative_position_table_add_is_not_a_site():
    assert find_residual_sites(RelativePositionBias()) == []


def test_rope_table_sum_is_not_a_site():
    assert find_residual_sites(Rope()) == []


def test_tanh_gelu_polynomial_is_not_a_site():
    assert find_residual_sites(TanhGelu()) == []


def test_attention_mask_built_from_the_input_shape_is_not_a_site():
    assert find_residual_sites(AttentionMaskFromShape()) == []


def test_attention_mask_buffer_is_not_a_site():
    assert find_residual_sites(AttentionMaskBuffer()) == []


def test_sum_of_paths_from_different_inputs_is_not_a_site():
    assert find_residual_sites(TwoInputs()) == []


def test_concatenation_is_not_a_site():
    assert find_residual_sites(Concatenation()) == []


def test_constant_add_is_not_a_site():
    assert find_residual_sites(ConstantAdd()) == []


def test_symmetric_two_branch_sum_is_not_a_site():
    assert find_residual_sites(SymmetricSum()) == []


# Nesting.


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = SkipFirst()
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x + self.proj(F.relu(self.inner(x)))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.outer = Outer()

    def forward(self, x):
        return self.outer(x)


def test_residual_inside_another_blocks_branch_is_nested_and_left_out():
    sites = find_residual_sites(Wrapped())
    assert [s.block_path for s in sites] == ["outer"]


def test_nested_true_includes_inner_residuals():
    sites = find_residual_sites(Wrapped(), nested=True)
    assert [s.block_path for s in sites] == ["outer.inner", "outer"]


def test_addition_in_the_models_forward_never_swallows_a_block_it_calls():
    # The model's own forward calls every block: an addition written there (a U-Net's long skip, a global
    # residual) is not a block that encloses them.
    sites = find_residual_sites(Outer())
    assert [s.block_path for s in sites] == ["inner", ""]
