"""Sums that merge paths are not residual blocks; repeated blocks are the unit of depth and rate; light
residuals outside the repeated blocks are left alone (docs/residual-rules.md, sections 2-4)."""

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sdsurgery import apply_stochastic_depth, find_residual_sites, plan_stochastic_depth, verify


class Res(nn.Module):
    """``x + conv(relu(conv(x)))``: a residual block."""

    def __init__(self, c=4, k=3):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x):
        return x + self.f(x)


IMAGE = torch.randn(2, 4, 16, 16)


# A merge of two block inputs.


class MergeInputs(nn.Module):
    """``low + conv(high)``: the two inputs forked in the module that called it."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, low, high):
        return low + self.conv(high)


class TwoInputHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Res()
        self.deep = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.merge = MergeInputs()

    def forward(self, x):
        low = self.block(x)
        return self.merge(low, self.deep(low))


def test_sum_of_two_inputs_that_forked_outside_the_block_is_not_a_site():
    sites = find_residual_sites(TwoInputHead(), example_inputs=IMAGE)
    assert [s.block_path for s in sites] == ["block"]  # the residual block beside it is the positive control


def test_the_same_sum_computed_from_the_blocks_own_input_is_a_site():
    class OwnInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.merge = MergeInputs()

        def forward(self, x):
            return self.merge(x, x)

    assert [s.block_path for s in find_residual_sites(OwnInput(), example_inputs=IMAGE)] == ["merge"]


# A feature-pyramid merge.


class AddsWhatItIsPassed(nn.Module):
    """BERT's output sub-module: ``norm(dense(hidden) + input_tensor)``, both passed in by the layer."""

    def __init__(self, c=8):
        super().__init__()
        self.dense = nn.Linear(c, c)
        self.norm = nn.LayerNorm(c)

    def forward(self, hidden, input_tensor):
        return self.norm(self.dense(hidden) + input_tensor)


class PostNormLayer(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.intermediate = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.output = AddsWhatItIsPassed(c)

    def forward(self, x):
        return self.output(self.intermediate(x), x)


class PostNormEncoder(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.layer = nn.ModuleList(PostNormLayer() for _ in range(depth))

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


def test_a_sum_of_what_a_repeated_layer_passes_its_sub_module_is_that_layers_residual():
    plan = plan_stochastic_depth(PostNormEncoder(), 0.2, example_inputs=torch.randn(2, 5, 8))
    assert [(s.block_path, s.depth) for s in plan.sites] == [(f"layer.{i}.output", i) for i in range(3)]


def test_the_same_sub_module_outside_a_repeated_block_merges_two_inputs():
    class OneLayer(nn.Module):  # the control: the same sum, in no repeated block
        def __init__(self):
            super().__init__()
            self.layer = PostNormLayer()
            self.block = nn.Sequential(Res(8, 1), Res(8, 1))

        def forward(self, x):
            return self.block(self.layer(x).transpose(1, 2).unsqueeze(-1))

    sites = find_residual_sites(OneLayer(), example_inputs=torch.randn(2, 5, 8))
    assert [s.block_path for s in sites] == ["block.0", "block.1"]


class Pyramid(nn.Module):
    """FPN's top-down pathway: ``lateral(c) + upsample(top, size=lateral.shape)``."""

    def __init__(self, c=4):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(3))

    def forward(self, feats):
        top = self.lateral[2](feats[2])
        outs = [top]
        for i in (1, 0):
            lateral = self.lateral[i](feats[i])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, top)
        return outs


class PyramidNet(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1), Res(c)) for _ in range(3))
        self.fpn = Pyramid(c)

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.fpn(feats)


def test_feature_pyramid_merges_are_not_sites():
    sites = find_residual_sites(PyramidNet(), example_inputs=IMAGE)
    assert [s.block_path for s in sites] == ["stages.0.1", "stages.1.1", "stages.2.1"]


def test_torchvision_fpn_backbone_has_the_resnet_blocks_only():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    sites = find_residual_sites(backbone, example_inputs=torch.randn(1, 3, 64, 64))
    assert len(sites) == 8 and all(s.block_path.startswith("body.layer") for s in sites)


# A head that adds two classifiers.


def test_lraspp_head_sum_is_not_a_site_and_every_backbone_block_stays():
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    sites = find_residual_sites(model, example_inputs=torch.randn(1, 3, 64, 64))
    blocks = [s.block_path for s in sites]
    assert blocks == [f"backbone.{i}" for i in (1, 3, 5, 6, 8, 9, 10, 12, 14, 15)]


class TwoClassifiers(nn.Module):
    """``low_classifier(low) + high_classifier(high)`` on two features of a backbone, as LR-ASPP does."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(Res(), nn.Conv2d(4, 4, 3, padding=1), Res(), Res())
        self.low_classifier = nn.Conv2d(4, 3, 1)
        self.high_classifier = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))

    def forward(self, x):
        low = self.backbone[0](x)
        high = self.backbone[3](self.backbone[2](self.backbone[1](low)))
        return self.head(low, high)

    def head(self, low, high):
        return self.low_classifier(low) + self.high_classifier(high)


class HeadModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.low_classifier = nn.Conv2d(4, 3, 1)
        self.high_classifier = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))

    def forward(self, low, high):
        return self.low_classifier(low) + self.high_classifier(high)


class SegmentationNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(Res(), nn.Conv2d(4, 4, 3, padding=1), Res(), Res())
        self.classifier = HeadModule()

    def forward(self, x):
        low = self.backbone[0](x)
        high = self.backbone[3](self.backbone[2](self.backbone[1](low)))
        return self.classifier(low, high)


def test_head_adding_two_classifiers_is_not_a_site_and_swallows_no_backbone_block():
    sites = find_residual_sites(SegmentationNet(), example_inputs=IMAGE)
    assert [s.block_path for s in sites] == ["backbone.0", "backbone.2", "backbone.3"]


def test_hrnet_stream_fusions_are_not_sites_and_its_branch_blocks_all_stay():
    # HRNet's fusion adds a stream that a transition layer of the model made beside the fused module.
    plan = plan_stochastic_depth(timm.create_model("hrnet_w18_small"), 0.1)
    fusing_modules = {f"stage{i}.0" for i in (2, 3, 4)}
    assert not fusing_modules & {s.block_path for s in plan.sites}
    assert sum(".branches." in s.block_path for s in plan.sites) == 2 * (2 + 3 + 4)
    assert len(plan.sites) == 23 and plan.left_alone == [""]  # the head's merges in the model's forward


# A long skip from an encoder.


class DecoderBlock(nn.Module):
    """LinkNet's decoder block: ``up(x) + skip`` with ``skip`` an encoder feature."""

    def __init__(self, c=4):
        super().__init__()
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)

    def forward(self, x, skip):
        return self.up(x) + skip


class LinkNet(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), Res(c), Res(c)) for _ in range(3))
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(2))

    def forward(self, x):
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        x = feats[-1]
        for block, skip in zip(self.decoder, feats[-2::-1]):
            x = block(x, skip)
        return x


def test_decoder_adding_an_encoder_feature_is_not_a_site():
    sites = find_residual_sites(LinkNet(), example_inputs=IMAGE)
    assert [s.block_path for s in sites] == [f"encoder.{i}.{j}" for i in range(3) for j in (1, 2)]


class UNetInOneForward(nn.Module):
    """Encoder stages and the long skip written in the model's own forward."""

    def __init__(self, c=4):
        super().__init__()
        self.enc = nn.ModuleList(nn.Sequential(Res(c), Res(c)) for _ in range(3))
        self.up = nn.ModuleList(nn.ConvTranspose2d(c, c, 2, stride=2) for _ in range(2))

    def forward(self, x):
        e0 = self.enc[0](x)
        e1 = self.enc[1](F.max_pool2d(e0, 2))
        e2 = self.enc[2](F.max_pool2d(e1, 2))
        d1 = self.up[0](e2) + e1
        return self.up[1](d1) + e0


def test_long_skips_in_the_models_forward_are_left_alone_and_swallow_no_encoder_block():
    plan = plan_stochastic_depth(UNetInOneForward(), 0.1, example_inputs=IMAGE)
    assert [s.block_path for s in plan.sites] == [f"enc.{i}.{j}" for i in range(3) for j in range(2)]
    assert plan.left_alone == [""]


# A compound repeated block: three residual sub-blocks, one depth index and one rate.


class Attention(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.mix = nn.Conv2d(c, c, 1)
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.mlp(x)


class Compound(nn.Module):
    """MaxViT's block: an MBConv, block attention and grid attention, each residual."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = Res(c)
        self.attn_block = Attention(c)
        self.attn_grid = Attention(c)

    def forward(self, x):
        return self.attn_grid(self.attn_block(self.conv(x)))


class CompoundNet(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.blocks = nn.Sequential(*(Compound() for _ in range(depth)))

    def forward(self, x):
        return self.blocks(x)


def test_compound_repeated_block_is_one_unit_with_one_rate():
    plan = plan_stochastic_depth(CompoundNet(), 0.2, example_inputs=IMAGE)
    assert plan.num_blocks == 3 and plan.repeated_blocks == ("blocks.0", "blocks.1", "blocks.2")
    assert [(s.block_path, s.depth, s.drop_rate) for s in plan.sites] == [
        (f"blocks.{i}.{part}", i, 0.1 * i)
        for i in range(3)
        for part in ("conv", "attn_block", "attn_block", "attn_grid", "attn_grid")
    ]


def test_repeated_sub_blocks_of_one_kind_keep_an_index_each():
    # Positive control: a stage of plain Attention blocks numbers each block.
    model = nn.Sequential(Attention(), Attention(), Attention())
    plan = plan_stochastic_depth(model, 0.2, example_inputs=IMAGE)
    assert plan.num_blocks == 3 and [s.depth for s in plan.sites] == [0, 0, 1, 1, 2, 2]


def test_hybrid_stage_repeats_its_other_blocks_too():
    # NextViT / EdgeNeXt: a stage of convolution blocks ending in a transformer-like block of another kind.
    model = nn.Sequential(nn.Sequential(Res(), Res()), nn.Sequential(Res(), Res(), Attention()))
    plan = plan_stochastic_depth(model, 0.1, example_inputs=IMAGE)
    assert plan.repeated_blocks == ("0.0", "0.1", "1.0", "1.1", "1.2") and plan.left_alone == []
    assert [s.depth for s in plan.sites] == [0, 1, 2, 3, 4, 4]


def test_stage_of_distinct_sub_blocks_numbers_each():
    # iFormer's last stage: position encoding, attention and MLP blocks in a row, a composition that does not
    # repeat: each is a block of its own (as in timm), not one compound unit.
    model = nn.Sequential(
        nn.Sequential(Res(), Res()),
        nn.Sequential(Res(), nn.Sequential(Res(3), Attention(), Res(1))),
    )
    plan = plan_stochastic_depth(model, 0.1, example_inputs=IMAGE)
    assert plan.num_blocks == 6 and [s.depth for s in plan.sites] == [0, 1, 2, 3, 4, 4, 5]


def _train_outputs(model, x, seed=0):
    torch.manual_seed(seed)
    return model.train()(x)


def test_davit_retrofit_trains_like_timms_native_drop_path():
    config = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), num_classes=5)
    torch.manual_seed(0)
    plain = timm.create_model("davit_tiny", **config)
    native = timm.create_model("davit_tiny", drop_path_rate=0.5, **config)
    native.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    retrofitted = apply_stochastic_depth(plain, 0.5, example_inputs=x, verify=False)
    assert len({s.depth for s in plan_stochastic_depth(plain, 0.5, example_inputs=x).sites}) == 5
    torch.testing.assert_close(_train_outputs(retrofitted, x), _train_outputs(native, x))
    assert not torch.allclose(_train_outputs(plain, x), _train_outputs(native, x))  # drops did happen


# Light residuals outside the repeated blocks.


class Downsample(nn.Module):
    """A strided convolution followed by a light depthwise residual ``x + dwconv(x)``."""

    def __init__(self, c=4):
        super().__init__()
        self.reduce = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        x = self.reduce(x)
        return x + self.dw(x)


class Stage(nn.Module):
    def __init__(self, depth, c=4):
        super().__init__()
        self.downsample = Downsample(c)
        self.blocks = nn.Sequential(*(Res(c) for _ in range(depth)))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class StagedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(Stage(2), Stage(1))

    def forward(self, x):
        return self.stages(x)


def test_light_downsampling_residual_is_left_alone_by_default():
    plan = plan_stochastic_depth(StagedNet(), 0.1, example_inputs=IMAGE)
    assert [s.block_path for s in plan.sites] == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0"]
    assert plan.left_alone == ["stages.0.downsample", "stages.1.downsample"]
    assert [s.drop_rate for s in plan.sites] == [0.0, 0.05, 0.1]


class HeavyDownsample(nn.Module):
    """A strided convolution followed by a residual MLP wider than the blocks' branches (LeViT's downsampling)."""

    def __init__(self, c=4):
        super().__init__()
        self.reduce = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.mlp = nn.Sequential(nn.Conv2d(c, 8 * c, 1), nn.GELU(), nn.Conv2d(8 * c, c, 1))

    def forward(self, x):
        x = self.reduce(x)
        return x + self.mlp(x)


def test_heavy_residual_outside_the_repeated_blocks_is_a_block_of_its_own():
    model = StagedNet()
    model.stages[1].downsample = HeavyDownsample()
    plan = plan_stochastic_depth(model, 0.1, example_inputs=IMAGE)
    assert [s.block_path for s in plan.sites] == [
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1.downsample",
        "stages.1.blocks.0",
    ]
    assert plan.left_alone == ["stages.0.downsample"]


def test_levit_downsampling_mlp_keeps_its_drop_path_as_in_timm():
    plan = plan_stochastic_depth(timm.create_model("levit_128s"), 0.1)
    assert (len(plan.sites), plan.num_blocks, plan.left_alone) == (20, 11, [])


def test_include_adds_the_residuals_left_alone():
    plan = plan_stochastic_depth(StagedNet(), 0.1, include=["*"], example_inputs=IMAGE)
    assert [s.block_path for s in plan.sites] == [
        "stages.0.downsample",
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1.downsample",
        "stages.1.blocks.0",
    ]
    assert plan.num_blocks == 5 and plan.left_alone == []


def test_include_by_class_adds_only_that_kind_of_residual():
    plan = plan_stochastic_depth(StagedNet(), 0.1, include=[Downsample, Res], example_inputs=IMAGE)
    assert plan.num_blocks == 5


def test_residual_mlp_without_repeated_blocks_keeps_every_site():
    class HandWritten(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            x = x + self.fc1(x)
            x = x + torch.relu(self.fc2(x))
            return x + self.fc3(x)

    plan = plan_stochastic_depth(HandWritten(), 0.1, example_inputs=torch.randn(2, 6))
    assert len(plan.sites) == 3 and plan.num_blocks == 3 and plan.left_alone == []


def test_retrofit_with_residuals_left_alone_verifies():
    model = StagedNet()
    retrofitted = apply_stochastic_depth(model, 0.2, example_inputs=IMAGE)
    report = verify(model, retrofitted, IMAGE)
    assert report.ok and len(report.sites) == 3


# A stream merge in a multi-stream block (TNT's pixel stream summed into its patch stream).


class TwoStreamBlock(nn.Module):
    """A residual on each stream, and the pixel stream added into the patch stream between them."""

    def __init__(self, c=4):
        super().__init__()
        self.inner = nn.Linear(c, c)
        self.proj = nn.Linear(c, c)
        self.outer = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, pixel, patch):
        pixel = pixel + self.inner(pixel)
        patch = patch + self.proj(pixel)
        return pixel, patch + self.outer(patch)


class TwoStreamNet(nn.Module):
    def __init__(self, depth=3, c=4):
        super().__init__()
        self.embed = nn.Linear(c, c)
        self.to_patch = nn.Linear(c, c)
        self.blocks = nn.ModuleList(TwoStreamBlock(c) for _ in range(depth))

    def forward(self, x):
        pixel = self.embed(x)
        patch = self.to_patch(pixel)
        for block in self.blocks:
            pixel, patch = block(pixel, patch)
        return patch


TOKENS = torch.randn(2, 5, 4)


def test_stream_merge_is_no_site_in_any_block_of_its_class():
    # In the later blocks the streams fork in the block before: a merge. The first block's streams fork in
    # the model's stem, the patch stream a projection of the pixel stream; the same line of the same class
    # is a merge there too. The last block's pixel residual, which feeds only that merge, stays a site.
    plan = plan_stochastic_depth(TwoStreamNet(), 0.2, example_inputs=TOKENS)
    assert [(s.block_path, s.add, s.depth) for s in plan.sites] == [
        ("blocks.0", "add", 0),
        ("blocks.0", "add_2", 0),
        ("blocks.1", "add_3", 1),
        ("blocks.1", "add_5", 1),
        ("blocks.2", "add_6", 2),
        ("blocks.2", "add_8", 2),
    ]


class ProjectedShortcutBlock(nn.Module):
    """DLA's block: ``shortcut + F(x)`` with the shortcut projected and passed in by the caller."""

    def __init__(self, c=4):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x, shortcut):
        return shortcut + self.f(x)


class Tree(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.project = nn.Conv2d(c, c, 1)
        self.block = ProjectedShortcutBlock(c)

    def forward(self, x):
        return self.block(x, self.project(x))


def test_shortcut_projected_by_the_caller_stays_a_site():
    # Positive control for the stream merge: two block inputs, the shortcut made from the branch's input by
    # the calling module without any sum on its way, is a projection residual.
    sites = find_residual_sites(nn.Sequential(Tree(), Tree()), example_inputs=IMAGE)
    assert [s.block_path for s in sites] == ["0.block", "1.block"]


def test_tnt_retrofit_trains_like_timms_native_drop_path():
    config = dict(
        img_size=32,
        patch_size=16,
        embed_dim=32,
        inner_dim=8,
        depth=3,
        num_heads_inner=2,
        num_heads_outer=2,
        num_classes=5,
    )
    torch.manual_seed(0)
    plain = timm.create_model("tnt_s_patch16_224", **config)
    native = timm.create_model("tnt_s_patch16_224", drop_path_rate=0.5, **config)
    native.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plan = plan_stochastic_depth(plain, 0.5, example_inputs=x)
    assert (len(plan.sites), plan.num_blocks) == (12, 3)  # timm's four drop paths per block
    retrofitted = apply_stochastic_depth(plain, 0.5, example_inputs=x, verify=False)
    torch.testing.assert_close(_train_outputs(retrofitted, x), _train_outputs(native, x))
    assert not torch.allclose(_train_outputs(plain, x), _train_outputs(native, x))  # drops did happen


# Stages of varying depth and composition (SwiftFormer): each block is a unit, not the stage.


class VaryingStage(nn.Module):
    """A stage of convolution blocks ending in an attention block."""

    def __init__(self, convs, c=4):
        super().__init__()
        self.blocks = nn.Sequential(*(Res(c) for _ in range(convs)), Attention(c))

    def forward(self, x):
        return self.blocks(x)


def test_stages_of_varying_composition_number_each_block():
    # Stages 0 and 1 share a composition (one convolution block, one attention block), stage 2 does not: the
    # stage is the repeated element, not a compound block, so each of its blocks keeps an index.
    model = nn.Sequential(VaryingStage(1), VaryingStage(1), VaryingStage(2))
    plan = plan_stochastic_depth(model, 0.1, example_inputs=IMAGE)
    assert plan.repeated_blocks == (
        "0.blocks.0",
        "0.blocks.1",
        "1.blocks.0",
        "1.blocks.1",
        "2.blocks.0",
        "2.blocks.1",
        "2.blocks.2",
    )
    assert [s.depth for s in plan.sites] == [0, 1, 1, 2, 3, 3, 4, 5, 6, 6]


def test_swiftformer_retrofit_trains_like_timms_native_drop_path():
    config = dict(layers=(2, 2, 3, 2), embed_dims=(8, 16, 24, 32), num_classes=5, layer_scale_init_value=1.0)
    torch.manual_seed(0)
    plain = timm.create_model("swiftformer_xs", **config)
    native = timm.create_model("swiftformer_xs", drop_path_rate=0.5, **config)
    native.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert plan_stochastic_depth(plain, 0.5, example_inputs=x).num_blocks == 9  # one per block, as timm
    retrofitted = apply_stochastic_depth(plain, 0.5, example_inputs=x, verify=False)
    torch.testing.assert_close(_train_outputs(retrofitted, x), _train_outputs(native, x))
    assert not torch.allclose(_train_outputs(plain, x), _train_outputs(native, x))  # drops did happen


# A stage whose first block has no residual (EfficientNet, MobileNet: the first block changes channels).


class MaybeResidual(nn.Module):
    """An inverted-residual-like block: a residual only when channels and resolution stay."""

    def __init__(self, cin, cout):
        super().__init__()
        self.has_skip = cin == cout
        self.f = nn.Sequential(nn.Conv2d(cin, 4 * cin, 1), nn.ReLU(), nn.Conv2d(4 * cin, cout, 1))

    def forward(self, x):
        return x + self.f(x) if self.has_skip else self.f(x)


class Depthwise(nn.Module):
    """A lighter block class, used in the first stage only (EfficientNet's depthwise-separable block)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.has_skip = cin == cout
        self.dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin)
        self.pw = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return x + self.pw(self.dw(x)) if self.has_skip else self.pw(self.dw(x))


def _mobile_net(first_stage):
    stages = [
        first_stage,
        nn.Sequential(MaybeResidual(4, 6), MaybeResidual(6, 6), MaybeResidual(6, 6)),
        nn.Sequential(MaybeResidual(6, 8), MaybeResidual(8, 8)),
    ]
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(*stages))


def test_first_stage_of_one_block_class_counts_though_its_first_block_has_no_residual():
    model = _mobile_net(nn.Sequential(Depthwise(4, 4), Depthwise(4, 4)))
    plan = plan_stochastic_depth(model, 0.3, example_inputs=IMAGE)
    assert plan.repeated_blocks == ("1.0.0", "1.0.1", "1.1.1", "1.1.2", "1.2.1") and plan.left_alone == []
    model = _mobile_net(nn.Sequential(Depthwise(4, 3), Depthwise(3, 4)))  # no residual in the first stage
    model[1][0][1] = Depthwise(4, 4)
    plan = plan_stochastic_depth(model, 0.3, example_inputs=IMAGE)
    assert plan.repeated_blocks == ("1.0.1", "1.1.1", "1.1.2", "1.2.1") and plan.num_blocks == 4


def test_a_light_residual_in_a_container_of_several_classes_beside_the_stages_stays_alone():
    # Negative control: a stem of a convolution and a depthwise residual is no stage of blocks.
    model = _mobile_net(nn.Sequential(nn.Conv2d(4, 4, 1), Depthwise(4, 4)))
    plan = plan_stochastic_depth(model, 0.3, example_inputs=IMAGE)
    assert plan.left_alone == ["1.0.1"] and plan.num_blocks == 3


def test_efficientnet_first_stage_block_with_a_residual_is_rated_as_in_timm():
    model = timm.create_model("efficientnet_b1")
    plan = plan_stochastic_depth(model, 0.1, example_inputs=torch.randn(1, 3, 64, 64))
    residual_blocks = tuple(
        sorted(p for p, m in model.blocks.named_modules(prefix="blocks") if getattr(m, "has_skip", False))
    )
    assert "blocks.0.1" in residual_blocks and plan.repeated_blocks == residual_blocks and plan.left_alone == []
