"""Zoo sweep: retrofit every torchvision classifier, one small model per timm architecture module and the
torchvision dense-prediction models (segmentation, detection, video).

Each model runs in its own subprocess with a time limit. For each: how it traced (whole / partial / failed,
with the reason), the number of sites and blocks and the residuals left alone, the verifier's result, the
surgery time, for timm families with native drop path whether our placement equals timm's, and for every
model with native stochastic depth (timm ``drop_path_rate``, torchvision ``stochastic_depth_prob``) whether
train-mode outputs equal the native model's under the same weights and seed (placement *and* rates).
Dense-prediction models are checked against the number of residual blocks of their backbone. Writes a
Markdown report and a CSV.

    python benchmarks/zoo.py                      # the full sweep -> docs/zoo.md, docs/zoo.csv
    python benchmarks/zoo.py --zoo dense --out /tmp/dense      # one part; parts run side by side
    python benchmarks/zoo.py --from-csv /tmp/tv/zoo.csv /tmp/timm/zoo.csv /tmp/dense/zoo.csv  # merge parts
    python benchmarks/zoo.py --only resnet18 tiny_vit_5m_224 --out /tmp/zoo   # a few models
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Measure the sdsurgery of this checkout, whatever else is installed. Workers start in it too: a process whose
# working directory was removed meanwhile dies loading torch ("Intel oneMKL FATAL ERROR: Cannot load ...").
CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

P_MAX = 0.1
# Train-mode parity with the native model runs at a high rate so that many branches are dropped in one pass.
P_PARITY = 0.5
OFF_RESIDUAL = "differs (off-residual):"  # timm drops paths that no residual addition adds
BATCH = 2
# Models this large (parameters, or input side in pixels) run with batch 1 to keep the sweep under an hour.
LARGE_PARAMS_M, LARGE_SIDE = 100, 384
MEMORY_BUDGET_GIB = 24
# Peak memory is about this many fp32 copies of the weights: the original, the retrofitted copy, the copies
# the verifier trains at rate 0 and, for timm, the native drop-path model; activations come on top.
WEIGHT_COPIES = 5

# One small model per timm architecture module (the smallest that builds with its default config). A module
# missing here (a newer timm) falls back to its first registered model.
TIMM_REPRESENTATIVES = {
    "beit": "beit_base_patch16_224",
    "byoanet": "halonet26t",
    "byobnet": "gernet_s",
    "cait": "cait_xxs24_224",
    "coat": "coat_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_768_32",
    "convnext": "convnext_atto",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240",
    "csatv2": "csatv2",
    "cspnet": "cs3darknet_s",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla34",
    "dpn": "dpn68",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "efficientnet_b0",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": "eva02_tiny_patch14_224",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_lrf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_a",
    "hgnet": "hgnet_tiny",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": "mambaout_femto",
    "maxxvit": "maxvit_pico_rw_256",
    "metaformer": "caformer_s18",
    "mlp_mixer": "mixer_s16_224",
    "mobilenetv3": "mobilenetv3_small_100",
    "mobilenetv5": "mobilenetv5_300m",
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_gap",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "nf_regnet_b0",
    "pit": "pit_xs_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_88m",
    "rdnet": "rdnet_tiny",
    "regnet": "regnety_002",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m0_9",
    "res2net": "res2net50d",
    "resnest": "resnest14d",
    "resnet": "resnet18",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s1",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_svt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "vit_tiny_patch16_224",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "vit_relpos_small_patch16_224",
    "vision_transformer_sam": "samvit_base_patch16_224",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim",
    "xception": "legacy_xception",
    "xception_aligned": "xception41",
    "xcit": "xcit_nano_12_p16_224",
}


# torchvision dense-prediction models: (constructor options, example input, the residual blocks of the
# backbone). Detection models run at a small image size; their heads and pyramids hold no residual block.
_DETECTION = dict(weights_backbone=None, min_size=160, max_size=160)
_SEGMENTATION = dict(weights_backbone=None)
_IMAGE, _CLIP, _CLIP_224 = (3, 160, 160), (3, 16, 112, 112), (3, 16, 224, 224)
DENSE_MODELS = {
    "fcn_resnet50": (_SEGMENTATION, _IMAGE, 16),
    "fcn_resnet101": (_SEGMENTATION, _IMAGE, 33),
    "deeplabv3_resnet50": (_SEGMENTATION, _IMAGE, 16),
    "deeplabv3_resnet101": (_SEGMENTATION, _IMAGE, 33),
    "deeplabv3_mobilenet_v3_large": (_SEGMENTATION, _IMAGE, 10),
    "lraspp_mobilenet_v3_large": (_SEGMENTATION, _IMAGE, 10),
    "fasterrcnn_resnet50_fpn": (_DETECTION, _IMAGE, 16),
    "fasterrcnn_resnet50_fpn_v2": (_DETECTION, _IMAGE, 16),
    "fasterrcnn_mobilenet_v3_large_fpn": (_DETECTION, _IMAGE, 10),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (_DETECTION, _IMAGE, 10),
    "retinanet_resnet50_fpn": (_DETECTION, _IMAGE, 16),
    "retinanet_resnet50_fpn_v2": (_DETECTION, _IMAGE, 16),
    "fcos_resnet50_fpn": (_DETECTION, _IMAGE, 16),
    "maskrcnn_resnet50_fpn": (_DETECTION, _IMAGE, 16),
    "maskrcnn_resnet50_fpn_v2": (_DETECTION, _IMAGE, 16),
    "keypointrcnn_resnet50_fpn": (_DETECTION, _IMAGE, 16),
    "ssdlite320_mobilenet_v3_large": (dict(weights_backbone=None), _IMAGE, 10),
    "ssd300_vgg16": (dict(weights_backbone=None), _IMAGE, 0),
    "r3d_18": ({}, _CLIP, 8),
    "mc3_18": ({}, _CLIP, 8),
    "r2plus1d_18": ({}, _CLIP, 8),
    "s3d": ({}, _CLIP, 0),
    "swin3d_t": ({}, _CLIP, 12),
    "swin3d_s": ({}, _CLIP, 24),
    "swin3d_b": ({}, _CLIP, 24),
    "mvit_v1_b": ({}, _CLIP_224, 16),
    "mvit_v2_s": ({}, _CLIP_224, 16),
}
_DETECTION_FAMILIES = ("rcnn", "retinanet", "fcos", "ssd")


# Why a model misses a target, found by reading the model's code (see docs/residual-rules.md). The report
# lists every miss with its cause here, or as unexplained.
KNOWN_CAUSES = {
    "resnest14d": "timm's ResNestBottleneck calls drop path on the block's input x, not on its branch "
    "(resnest.py: `x = self.drop_path(x)` before `shortcut = self.downsample(x)`): the branch is never dropped and, "
    "where the block has a downsample, its projected shortcut is computed from the dropped input. Placement "
    "and rates of the residual branches are timm's; sdsurgery drops the branch, as stochastic depth means",
    "rexnet_100": "timm drops all channels of the block's output (`x = self.drop_path(x)` before "
    "`cat([x[:, :in_chs] + shortcut, x[:, in_chs:]])`), the channels beyond the shortcut too, which are no "
    "residual branch; sdsurgery drops the residual branch `x[:, :in_chs]` only (placement of the residuals "
    "equal)",
    "edgenext_xx_small": "timm also drops the XCA residual nested inside each SplitTransposeBlock's own residual "
    "branch (two drop-path calls per block). By default only trunk residuals count (rule 5); `nested=True` "
    "adds it.",
    "mobilevit_xxs": "timm calls drop path on the output of the stride-2 bottleneck blocks that have no shortcut "
    "(stages.1.0 to stages.4.0: in training it zeroes those blocks' whole output for the dropped samples); "
    "there is no residual addition there to put stochastic depth on, and dropping a whole output is not "
    "stochastic depth. Every residual block matches timm: with those four drop paths set to 0 in the native "
    "model, train outputs equal ours (max |diff| 4e-08 at 256 px, batch 2).",
    "nextvit_small": "timm splits the rate of each NextTransformerBlock over its paths: the efficient "
    "multi-head self-attention residual gets 0.75 of the block's rate and the convolutional attention "
    "residual 0.25 (mix_block_ratio), the MLP the full rate. sdsurgery gives a repeated block one rate, so "
    "those two residuals differ from timm in the 4 transformer blocks of 20. Placement and grouping are "
    "timm's: with both attention drop paths set to the block's rate in the native model, train outputs "
    "equal ours (max |diff| 7e-07 at 96 px, batch 2; 0.16 with timm's split).",
    "ese_vovnet19b_slim": "VoVNet has no residual addition in this configuration; timm drops the paths that its "
    "one-shot-aggregation blocks concatenate. Stochastic depth on a concatenated path is not a residual drop.",
    "rdnet_tiny": "RDNet is a densely concatenating network with no residual addition; timm drops the paths it "
    "concatenates. Stochastic depth on a concatenated path is not a residual drop.",
    **{
        name: "the sites are exactly the backbone's residual blocks, but the verifier of that sweep also ran the "
        "model in training mode (at rate 0), where torchvision's detection models require targets and raise. "
        "The verifier now skips the train-mode check for a model that raises there, saying so: rerun with it, "
        "fasterrcnn_resnet50_fpn and retinanet_resnet50_fpn verify (16 sites each, eval outputs equal)."
        for name in DENSE_MODELS
        if any(k in name for k in _DETECTION_FAMILIES) and name != "ssd300_vgg16"
    },
    "regnet_y_128gf": "not measured in this run: its worker (644 M parameters, about 12 GiB of weight copies) was "
    "stopped when the shared machine ran out of free memory. The previous sweep, on an idle machine, "
    "retrofitted and verified it (27 sites in 27 blocks).",
    "gemma4_vit_167m": "not measured in this run: the worker was killed (SIGKILL) when the shared machine ran out "
    "of memory. The previous sweep retrofitted it part by part and verified it (32 sites, placement equal to "
    "timm's).",
    "vit_h_14": "not measured in this run for the same reason as regnet_y_128gf (632 M parameters); the previous "
    "sweep retrofitted and verified it (64 sites in 32 blocks).",
    "ssd300_vgg16": "VGG-16 has no residual addition and SSD's own forward does not trace (it reads the length "
    "of its optional targets), so the TraceError is raised instead of NoResidualSitesError: no site, as "
    "expected.",
}


# Why a Hugging Face model type misses the target, found by reading its code (filled from the sweep).
_RESIDUALS_IN_MODEL_FORWARD = (
    "the residual additions are written in the model's own forward (attention and FFN module lists, no layer "
    "module: `tensor = tensor + attn`), and that forward asserts on tensor values (`assert lengths.max().item() "
    "<= slen`), so it does not trace and no module holding a residual is left to trace on its own"
)
HF_KNOWN_CAUSES: dict[str, str] = {
    "cvt": "HF's CvT applies its drop path after the layer's second residual addition (`layer_output = "
    "self.output(layer_output, hidden_state); layer_output = self.drop_path(layer_output)`), so it drops the "
    "skip too; the same `drop_path` module serves the first residual's branch, so it is re-rated in place and "
    "the verifier rightly reports its second call, after the addition (stage 2, the only stage with a "
    "drop_path_rate; the other 26 sites verify)",
    "flaubert": _RESIDUALS_IN_MODEL_FORWARD,
    "xlm": _RESIDUALS_IN_MODEL_FORWARD,
    "gemma3n_vision": "a timm MobileNetV5 wrapped by TimmWrapperModel: its size comes from the timm architecture, "
    "not from the config the sweep shrinks, and the verifier's drop check of each of its 80 sites "
    "runs past the 45 s CPU limit (retrofitted; not verified in time)",
    "gemma4_text": "its layers share keys and values with later layers through an object they write into "
    "(KVSharingDict) and a cache filled during the example call; the traced attention takes the "
    "path of the example's key length (transformers/integrations/sdpa_attention.py:169, "
    "`kv_length > q_length`), which a training call does not match: the guard raises (never a "
    "silently different result)",
    "gemma4_unified_text": "as gemma4_text: a guarded key-length path (sdpa_attention.py:169) that a training call "
    "does not match",
    "gpt_neox_japanese": "each layer tests `attn_bias is not None` on the output of its attention module, kept as "
    "one call because its code only traces for the example's shapes (and holds no residual); a "
    "traced value is never None, so the layer's graph takes the bias path and raises in "
    "training where the attention returns None (all layers but the last)",
    "higgs_audio_v2": "its layers route text and audio tokens with boolean masks (`hidden_states[audio_token_mask]`, "
    "shapes that depend on the data) and add the MLP outputs in place at the masked positions, which "
    "fx cannot trace; no layer traces, so its residuals, all in the layers, are not seen (reported "
    "as no-residual with the untraced layers named)",
    "zaya": "its attention calls `cache.get_conv_state(...)` and tests the result against None (`if cached_qk_states "
    "is not None`, modeling_zaya.py:225); traced, a method call on the cache is never None, so the layer's "
    "graph takes the cached path and raises in training where the cache holds no state yet",
    "ibert": "I-BERT adds each residual inside its quantising activation (QuantAct: `identity + x`), whose "
    "training code updates its range from tensor values (`if self.x_min.min() > -1.1e-5 ...`): those "
    "blocks do not trace in train mode, so they are left as they are and nothing is retrofitted",
    "switch_transformers": "the router multiplies its input by jitter noise in place (`hidden_states *= "
    "torch.empty_like(hidden_states).uniform_(...)` after a `.to()` that returns the same "
    "tensor), so in eager training the noise also reaches the experts through the caller's "
    "tensor; fx records `*=` as an out-of-place multiply, so train outputs at rate 0 differ by "
    "the jitter (max 0.018; with router_jitter_noise=0 it verifies)",
}


@dataclass
class Row:
    """One model's result; every field is a CSV column."""

    zoo: str
    family: str
    model: str
    params_m: float = 0.0
    batch: int = BATCH
    status: str = ""  # whole | partial | failed | no-residual | skipped | timeout | crashed
    reason: str = ""
    sites: int = 0
    blocks: int = 0
    untraced: int = 0
    specialised: int = 0
    verified: str = ""  # ok | FAILED: ... | not run
    eval_max_abs_diff: float = math.nan
    surgery_s: float = math.nan
    native_rule: str = ""  # linear | uniform | i/N | other | none (no native drop path)
    placement: str = ""  # equal | differs: ... | n/a
    rates: str = ""  # equal | differs | n/a (...)
    total_s: float = math.nan
    left_alone: int = 0  # residual blocks outside the repeated blocks, left alone by default
    parity: str = (
        ""  # train outputs vs the native model: equal | equal (uniform) | equal (schedule=list) | differs | n/a
    )
    parity_max_abs_diff: float = math.nan
    expected_blocks: int = -1  # dense models: the residual blocks of the backbone


# ---------------------------------------------------------------------------------------------------------
# The model list.


def timm_models() -> list[tuple[str, str]]:
    import timm.models

    return [(m, TIMM_REPRESENTATIVES.get(m) or timm.list_models(module=m)[0]) for m in timm.models.list_modules()]


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def dense_family(name: str) -> str:
    if name in ("r3d_18", "mc3_18", "r2plus1d_18", "s3d") or name.startswith(("swin3d", "mvit")):
        return "video"
    return "detection" if any(k in name for k in _DETECTION_FAMILIES) else "segmentation"


def all_jobs() -> list[tuple[str, str, str]]:
    return (
        [("torchvision", "torchvision", n) for n in torchvision_models()]
        + [("timm", family, n) for family, n in timm_models()]
        + [("dense", dense_family(n), n) for n in DENSE_MODELS]
    )


# Hugging Face: every model type with a base model class, from its default config shrunk to a tiny size.
HF_TINY = {
    # widths: small, and divisible by the head counts below
    "hidden_size": 32,
    "d_model": 32,
    "n_embd": 32,
    "word_embed_proj_dim": 32,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "d_ff": 64,
    "n_inner": 64,
    "mlp_dim": 64,
    # depths
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_encoder_layers": 2,
    # heads
    "num_attention_heads": 2,
    "n_head": 2,
    "n_heads": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_heads": 2,
    "head_dim": 16,
    "d_kv": 16,
    "rotary_dim": 16,  # at most the head width
    # multi-head latent attention (DeepSeek-style): the rotary part is the head width
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "qk_head_dim": 32,
    "v_head_dim": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "num_groups": 8,  # group norm groups: the tiny widths are multiples of 8
}
HF_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
HF_DEFAULT_MROPE_SECTION = (16, 24, 24)  # what multimodal-rope models fall back on (a head width of 128)
HF_MAX_VOCAB = 1000
# Model types per worker process: one import of torch and transformers (tens of seconds on a loaded machine)
# for many small models; a worker that times out or dies is replaced by a fresh one for the rest of its chunk.
HF_CHUNK = 40
HF_MAX_IMAGE = 64


def hf_model_types() -> list[str]:
    """Every transformers model type with a base model class (``AutoModel``), sorted."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


def tiny_config(config):
    """``config`` (and its sub-configs) shrunk: 2 layers, width 32, 2 heads, at most 1000 tokens in the
    vocabulary, images at most 64 px, one block per stage where depths are a list. Returns ``config``."""
    for key, value in list(vars(config).items()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            tiny_config(value)
        elif key in HF_TINY and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, min(value, HF_TINY[key]))
        elif key == "vocab_size" and isinstance(value, int) and value > HF_MAX_VOCAB:
            config.vocab_size = HF_MAX_VOCAB
            for token in (
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
                "sep_token_id",
                "cls_token_id",
                "decoder_start_token_id",
                "unk_token_id",
                "mask_token_id",
            ):
                if isinstance(getattr(config, token, None), int) and getattr(config, token) >= HF_MAX_VOCAB:
                    setattr(config, token, 1)
        elif (
            key == "image_size"
            and isinstance(value, int)
            and value > HF_MAX_IMAGE
            and not hasattr(config, "window_size")
        ):
            patch = getattr(config, "patch_size", 1)
            if isinstance(patch, int) and HF_MAX_IMAGE % patch == 0:
                config.image_size = HF_MAX_IMAGE
        elif key in ("depths", "num_layers_per_stage", "layers_per_stage") and isinstance(value, (list, tuple)):
            setattr(config, key, [1] * len(value))
        elif key == "hidden_sizes" and isinstance(value, (list, tuple)):
            config.hidden_sizes = [min(v, 16 * 2**i) for i, v in enumerate(value)]
    heads = getattr(config, "num_heads", None)
    if isinstance(heads, (list, tuple)) and isinstance(getattr(config, "embed_dim", None), int):  # Swin-style stages
        config.num_heads = [2**i for i in range(len(heads))]
        config.embed_dim = min(config.embed_dim, 16)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, (list, tuple)) and isinstance(getattr(config, "hidden_sizes", None), list):  # PVT-style stages
        config.num_attention_heads = [min(h, 2**i) for i, h in enumerate(heads)]
    if getattr(config, "num_key_value_heads", None) and getattr(config, "num_attention_heads", None):
        config.num_key_value_heads = min(config.num_key_value_heads, config.num_attention_heads)
    _tiny_layer_types(config)
    _tiny_mrope_section(config)
    return config


def _tiny_layer_types(config) -> None:
    """Keep one layer of each kind a config's ``layer_types`` lists (the first two layers of a hybrid model
    may both be linear attention, which builds a model whose cache has no attention layer)."""
    types = getattr(config, "layer_types", None)
    count_key = next((k for k in HF_LAYER_COUNTS if isinstance(getattr(config, k, None), int)), None)
    if not isinstance(types, list) or count_key is None or not types:
        return
    layers = getattr(config, count_key)
    kinds = list(dict.fromkeys(types))
    kept = kinds + [types[-1]] * max(layers - len(kinds), 0)
    # Layers are built in order: the kind with the last layer (full attention closing a hybrid stack) last.
    kept.sort(key=lambda kind: kind == types[-1])
    try:
        config.layer_types = kept
    except AttributeError:  # a read-only view of another setting
        return
    setattr(config, count_key, len(kept))


def _tiny_mrope_section(config) -> None:
    """Shrink a multimodal rotary embedding's sections (temporal, height, width) to the tiny head width."""
    parameters = getattr(config, "rope_parameters", None)
    declared = "mrope_section" in getattr(type(config), "ignore_keys_at_rope_validation", ())
    if not isinstance(parameters, dict) or not (declared or "mrope_section" in parameters):
        return
    sections = parameters.get("mrope_section") or HF_DEFAULT_MROPE_SECTION
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = int(head_dim * parameters.get("partial_rotary_factor", 1.0)) // 2
    scaled = [s * half // sum(sections) for s in sections]
    scaled[-1] += half - sum(scaled)
    parameters["mrope_section"] = scaled


# ---------------------------------------------------------------------------------------------------------
# The worker: one model, in its own process.


def _build(zoo: str, name: str, **kwargs):
    import torch

    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        return timm.create_model(name, **kwargs)
    import torchvision

    if zoo == "dense":
        kwargs = {**DENSE_MODELS[name][0], **kwargs}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _example_inputs(zoo: str, name: str, model, batch: int) -> tuple:
    import torch

    import sdsurgery

    if zoo != "dense":
        return sdsurgery.default_example_inputs(model, batch_size=batch)
    shape = DENSE_MODELS[name][1]
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    return (list(x),) if dense_family(name) == "detection" else (x,)


def _params_m(zoo: str, name: str) -> float:
    """Parameter count in millions, without allocating the weights where the constructor allows."""
    import torch

    try:
        with torch.device("meta"):
            model = _build(zoo, name)
    except Exception:  # an initialiser that reads values (torchvision's RegNet)
        model = _build(zoo, name)
    return sum(p.numel() for p in model.parameters()) / 1e6


def _drop_path_calls(model, kinds, rate_of, batch: int) -> dict[str, list[float]]:
    """block path -> rates of the non-zero drop-path calls one train forward makes, in call order."""
    import torch

    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, list[float]] = defaultdict(list)

    def hook(module, args, output):
        if rate_of(module) > 0:
            calls[names[module].rpartition(".")[0]].append(rate_of(module))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        x = torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.train()(x)
    finally:
        for handle in handles:
            handle.remove()
    return dict(calls)


def _zero_rate_slots(model, kind) -> set[str]:
    """Blocks where timm built its drop path with rate 0: timm's convention is an ``nn.Identity`` in the
    attribute a ``DropPath`` would hold (``drop_path``, ``drop_path1``, ``mhsa_drop_path``, ...)."""
    from torch import nn

    slots = set()
    for name, module in model.named_modules():
        block, _, attribute = name.rpartition(".")
        if "drop_path" in attribute.lower() and isinstance(module, (nn.Identity, kind)):
            slots.add(block)
    return slots


def _native_rule(rates: list[float], p: float) -> str:
    """The rule behind timm's non-zero per-block rates, in timm's call order (a first, zero, block left out)."""
    if not rates:
        return "none"
    if all(math.isclose(r, p, abs_tol=1e-6) for r in rates):
        return "uniform"
    if all(math.isclose(r, p * (i + 1) / len(rates), abs_tol=1e-6) for i, r in enumerate(rates)):
        return "linear"
    steps = [r / p for r in rates]
    for n in range(len(rates) + 1, 4 * len(rates) + 2):  # i / N with N counting blocks that have no residual
        ks = [s * n for s in steps]
        if all(abs(k - round(k)) < 1e-4 for k in ks) and all(b > a for a, b in zip(ks, ks[1:])) and ks[-1] < n:
            return "i/N"
    return "other"


def _compare_with_native(name: str, plain, result_linear, batch: int) -> tuple[str, str, str]:
    """(native rule, placement verdict, rates verdict) against ``timm.create_model(name, drop_path_rate=P)``."""
    import timm
    from timm.layers import DropPath

    from sdsurgery import StochasticDepth, apply_stochastic_depth, plan_stochastic_depth

    try:
        native = timm.create_model(name, drop_path_rate=P_MAX)
    except TypeError:
        return "none (no drop_path_rate)", "n/a", "n/a"
    if not any(isinstance(m, DropPath) for m in native.modules()):
        return "none (no DropPath)", "n/a", "n/a"
    native_calls = _drop_path_calls(native, DropPath, lambda m: float(m.drop_prob), batch)
    zero_slots = _zero_rate_slots(native, DropPath) - native_calls.keys()
    del native
    rule = _native_rule([rates[0] for rates in native_calls.values()], P_MAX)  # in timm's call order
    if result_linear is None:  # we found no residual addition
        return rule, f"{OFF_RESIDUAL} no residual addition, timm drops {len(native_calls)} blocks' paths", "n/a"

    sd_rate = lambda m: float(m.p)  # noqa: E731
    uniform = apply_stochastic_depth(plain, P_MAX, schedule="uniform", verify=False)
    ours = _drop_path_calls(uniform, StochasticDepth, sd_rate, batch)  # every site, every block
    order = list(ours)  # our blocks in depth order (first call order)
    depth_rates = [native_calls[b][0] for b in order if b in native_calls]

    native_counts = {b: len(r) for b, r in native_calls.items()}
    our_counts = {b: len(r) for b, r in ours.items()}
    missing = [b for b in native_counts if b not in our_counts]
    wrong = [b for b in native_counts if b in our_counts and our_counts[b] != native_counts[b]]
    first_native = min((order.index(b) for b in native_counts if b in our_counts), default=len(order))
    # Our blocks timm drops nothing in: not compared where timm's rule gives them rate 0 (a zero-rate slot,
    # or the leading blocks of a rising schedule), else extra.
    extra = [b for i, b in enumerate(order) if b not in native_counts and b not in zero_slots and i > first_native]
    problems = []
    # timm blocks that hold no residual addition at all (nested ones included): timm drops a path there
    # that nothing adds back, which no residual retrofit reproduces.
    residual_blocks = (
        {s.block_path for s in plan_stochastic_depth(plain, P_MAX, nested=True).sites} if missing else set()
    )
    off_residual = [b for b in missing if not any(r == b or r.startswith(b + ".") for r in residual_blocks)]
    if missing and off_residual == missing and not wrong and not extra:
        return rule, f"{OFF_RESIDUAL} {len(missing)} blocks without a residual ({', '.join(missing[:3])})", "n/a"
    if missing:
        problems.append(f"{len(missing)} native blocks missing ({', '.join(missing[:3])})")
    if wrong:
        b = wrong[0]
        problems.append(
            f"{len(wrong)} blocks with other call counts ({b}: ours {our_counts[b]}, timm {native_counts[b]})"
        )
    if extra:
        problems.append(f"{len(extra)} extra blocks ({', '.join(extra[:3])})")
    placement = "equal" if not problems else "differs: " + "; ".join(problems)

    if rule in ("linear", "uniform"):
        check = result_linear if rule == "linear" else uniform
        got = {b: sorted(r) for b, r in _drop_path_calls(check, StochasticDepth, sd_rate, batch).items()}
        want = {b: sorted(r) for b, r in native_calls.items()}
        same = got.keys() == want.keys() and all(
            all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(got[b], want[b])) for b in want
        )
        rates = "equal" if same else "differs"
    elif rule == "i/N":
        rising = all(b > a for a, b in zip(depth_rates, depth_rates[1:]))
        rates = "n/a (i/N counts blocks without a residual); depth order " + ("equal" if rising else "differs")
    else:
        rates = f"n/a (rule {rule})"
    return rule, placement, rates


def _native_rate_kwarg(zoo: str) -> str:
    return "drop_path_rate" if zoo == "timm" else "stochastic_depth_prob"


def _native_rates(model) -> dict[str, float]:
    """block path -> rate of the native stochastic-depth modules (timm DropPath, torchvision StochasticDepth)."""
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

    rates = {}
    for name, module in model.named_modules():
        if isinstance(module, DropPath):
            rates.setdefault(name.rpartition(".")[0], float(module.drop_prob))
        elif isinstance(module, TorchvisionStochasticDepth):
            rates.setdefault(name.rpartition(".")[0], float(module.p))
    return rates


def _scale_native_rates(model, factor: float) -> None:
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

    for module in model.modules():
        if isinstance(module, DropPath):
            module.drop_prob *= factor
        elif isinstance(module, TorchvisionStochasticDepth):
            module.p *= factor


def _train_outputs(model, inputs, seed: int):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        return model.train()(*inputs)


def _max_abs_diff(a, b) -> float:
    import torch

    if isinstance(a, torch.Tensor):
        return (a.float() - b.float()).abs().max().item() if a.shape == b.shape else math.inf
    if isinstance(a, dict):
        return max((_max_abs_diff(a[k], b[k]) for k in a), default=0.0) if a.keys() == b.keys() else math.inf
    if isinstance(a, (list, tuple)):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else math.inf
    return 0.0 if a == b else math.inf


def _parity(zoo: str, name: str, plain, inputs) -> tuple[str, float]:
    """Train-mode outputs of our retrofit against the native model with stochastic depth at ``P_PARITY``,
    same weights, same seed. The schedule is ours by default (linear) when the native rates follow it,
    uniform when they are uniform, else the native rates passed as a list (``schedule=[...]``)."""

    from sdsurgery import apply_stochastic_depth, plan_stochastic_depth

    try:
        native = _build(zoo, name, **{_native_rate_kwarg(zoo): P_PARITY})
    except TypeError as error:
        if "multiple values" not in str(error):
            return "n/a (no native stochastic depth)", math.nan
        # The builder sets the rate itself (torchvision's Swin, MaxViT): its schedule is linear in the rate,
        # so scale the built rates to peak at P_PARITY.
        native = _build(zoo, name)
        _scale_native_rates(native, P_PARITY / max(_native_rates(native).values(), default=1.0))
    native_rates = _native_rates(native)
    if not any(r > 0 for r in native_rates.values()):
        return "n/a (no native stochastic depth)", math.nan
    native.load_state_dict(plain.state_dict())
    plan = plan_stochastic_depth(plain, P_PARITY, example_inputs=inputs)
    first_site = {}
    for site in plan.sites:
        first_site.setdefault(site.depth, site.block_path)
    wanted = [native_rates.get(first_site[d], 0.0) for d in range(plan.num_blocks)]
    by_depth = {s.depth: s.drop_rate for s in plan.sites}
    if all(math.isclose(by_depth[d], w, abs_tol=1e-6) for d, w in enumerate(wanted)):
        schedule, label = "linear", "equal"
    elif all(math.isclose(w, P_PARITY, abs_tol=1e-6) for w in wanted):
        schedule, label = "uniform", "equal (uniform)"
    else:
        schedule, label = wanted, "equal (schedule=list)"
    ours = apply_stochastic_depth(
        copy.deepcopy(plain), P_PARITY, schedule=schedule, example_inputs=inputs, verify=False
    )
    diff, scale = 0.0, 1.0
    for seed in (0, 1):
        expected = _train_outputs(native, inputs, seed)
        diff = max(diff, _max_abs_diff(expected, _train_outputs(ours, inputs, seed)))
        scale = max(scale, _max_abs(expected))
    # Equal up to float rounding (timm scales the mask before multiplying, we after; it grows over deep
    # models): a misplaced or mis-rated drop changes the outputs by orders of magnitude more.
    return (label if diff <= 1e-4 * scale else "differs"), diff


def _max_abs(value) -> float:
    import torch

    if isinstance(value, torch.Tensor):
        return value.float().abs().max().item() if value.numel() else 0.0
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return max((_max_abs(v) for v in value), default=0.0)
    return 0.0


def run_one(zoo: str, family: str, name: str) -> Row:
    """Build, plan, retrofit, verify and (timm) compare one model with timm's native drop path."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_one(zoo, family, name)


def _run_one(zoo: str, family: str, name: str) -> Row:
    import sdsurgery
    from sdsurgery import NoResidualSitesError, plan_stochastic_depth, verify

    started = time.perf_counter()
    row = Row(zoo, family, name)
    row.params_m = round(_params_m(zoo, name), 3)
    estimate_gib = row.params_m * 1e6 * 4 * WEIGHT_COPIES / 2**30
    if estimate_gib > MEMORY_BUDGET_GIB:
        row.status, row.reason = (
            "skipped",
            f"about {estimate_gib:.0f} GiB of weights in copies > {MEMORY_BUDGET_GIB} GiB",
        )
        return row

    plain = _build(zoo, name)
    if zoo == "dense":
        row.batch = 1 if row.params_m > LARGE_PARAMS_M or dense_family(name) == "video" else BATCH
        row.expected_blocks = DENSE_MODELS[name][2]
    else:
        side = max(sdsurgery.default_example_inputs(plain, batch_size=1)[0].shape[-2:])
        row.batch = 1 if row.params_m > LARGE_PARAMS_M or side > LARGE_SIDE else BATCH
    inputs = _example_inputs(zoo, name, plain, row.batch)
    try:
        plan = plan_stochastic_depth(plain, P_MAX, example_inputs=inputs)
    except Exception as error:  # a TraceError names the module; anything else is reported as it is
        row.status, row.reason = "failed", f"{type(error).__name__}: {_first_line(error)}"
        row.total_s = round(time.perf_counter() - started, 2)
        return row
    row.sites, row.blocks, row.untraced = len(plan.sites), plan.num_blocks, len(plan.untraced)
    row.left_alone = len(plan.left_alone)
    row.specialised = len(plan.specialised)
    row.status = "partial" if plan.untraced else "whole"
    row.reason = "; ".join(f"{p or '<root>'}: {why}" for p, why in list(plan.untraced.items())[:3])
    if len(plan.untraced) > 3:
        row.reason += f"; and {len(plan.untraced) - 3} more"

    t0 = time.perf_counter()
    try:
        result = sdsurgery.apply_stochastic_depth(plain, P_MAX, example_inputs=inputs, verify=False)
    except NoResidualSitesError as error:
        row.status, row.reason = "no-residual", _first_line(error)
        if zoo == "timm":
            row.native_rule, row.placement, row.rates = _compare_with_native(name, plain, None, row.batch)
        row.total_s = round(time.perf_counter() - started, 2)
        return row
    except Exception as error:
        row.status, row.reason = "failed", f"surgery: {type(error).__name__}: {_first_line(error)}"
        row.total_s = round(time.perf_counter() - started, 2)
        return row
    row.surgery_s = round(time.perf_counter() - t0, 2)

    try:
        report = verify(plain, result, inputs)
        row.verified = "ok" if report.ok else report.summary()
        row.eval_max_abs_diff = report.eval_max_abs_diff
    except Exception as error:
        row.verified = f"FAILED: {type(error).__name__}: {_first_line(error)}"

    if zoo == "timm":
        try:
            row.native_rule, row.placement, row.rates = _compare_with_native(name, plain, result, row.batch)
        except Exception as error:
            row.native_rule, row.placement = "error", f"{type(error).__name__}: {_first_line(error)}"
    try:
        row.parity, row.parity_max_abs_diff = _parity(zoo, name, plain, inputs)
    except Exception as error:
        row.parity = f"error: {type(error).__name__}: {_first_line(error)}"
    row.total_s = round(time.perf_counter() - started, 2)
    return row


def run_hf(model_type: str) -> Row:
    """Build the base model of ``model_type`` from its tiny default config, plan, retrofit and verify it on
    example inputs made from the config (:func:`sdsurgery.hf.example_inputs`)."""
    import warnings

    import torch
    import transformers

    from sdsurgery import apply_plan, plan_stochastic_depth, verify
    from sdsurgery.hf import example_inputs

    started = time.perf_counter()
    row = Row("hf", model_type, model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        try:
            torch.manual_seed(0)
            config = tiny_config(transformers.AutoConfig.for_model(model_type))
            plain = transformers.AutoModel.from_config(config).eval()
            row.model = type(plain).__name__
            row.params_m = round(sum(p.numel() for p in plain.parameters()) / 1e6, 3)
            inputs = example_inputs(plain, batch_size=BATCH)
            with torch.no_grad():
                plain(**inputs)
        except Exception as error:
            row.status, row.reason = "build-failed", f"{type(error).__name__}: {_first_line(error)}"
            row.total_s = round(time.perf_counter() - started, 2)
            return row
        try:
            plan = plan_stochastic_depth(plain, P_MAX, example_inputs=inputs)
        except Exception as error:
            row.status, row.reason = "failed", f"{type(error).__name__}: {_first_line(error)}"
            row.total_s = round(time.perf_counter() - started, 2)
            return row
        row.sites, row.blocks, row.untraced = len(plan.sites), plan.num_blocks, len(plan.untraced)
        row.specialised = len(plan.specialised)
        row.status = "partial" if plan.untraced else "whole"
        row.reason = "; ".join(f"{p or '<root>'}: {why}" for p, why in list(plan.untraced.items())[:3])
        if len(plan.untraced) > 3:
            row.reason += f"; and {len(plan.untraced) - 3} more"
        if not plan.sites:
            row.status, row.reason = "no-residual", row.reason or "no residual addition found"
            row.total_s = round(time.perf_counter() - started, 2)
            return row
        t0 = time.perf_counter()
        try:  # the plan made above, applied (the sweep shares a small machine: no second trace)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = apply_plan(plain, plan, verify=False)
        except Exception as error:
            row.status, row.reason = "failed", f"surgery: {type(error).__name__}: {_first_line(error)}"
            row.total_s = round(time.perf_counter() - started, 2)
            return row
        row.surgery_s = round(time.perf_counter() - t0, 2)
        # Blocks that trace within the model but not on their own are left as they are, with a warning.
        left = [str(w.message).partition(": ")[2] for w in caught if "without stochastic depth" in str(w.message)]
        if left:
            row.status = "partial"
            row.reason = "; ".join(filter(None, [f"not retrofitted: {left[0]}", row.reason]))
        try:
            report = verify(plain, result, inputs)
            row.verified = "ok" if report.ok else report.summary()
            row.eval_max_abs_diff = report.eval_max_abs_diff
        except Exception as error:
            row.verified = f"FAILED: {type(error).__name__}: {_first_line(error)}"
    row.total_s = round(time.perf_counter() - started, 2)
    return row


def _hf_worker(model_types: list[str], limit: float) -> None:
    """Run each model type in turn, printing its row. One that uses more than ``limit`` seconds of CPU time
    (not wall time: the sweep shares its machine) is stopped by an alarm, and the worker stops after it: the
    alarm may have broken a half-done import, so the driver goes on in a fresh worker."""
    import signal

    import torch._dynamo  # noqa: F401  (imported before any alarm can interrupt it)
    import transformers  # noqa: F401

    def alarm(signum, frame):
        raise TimeoutError(f"over the {limit:.0f} s CPU-time limit")

    signal.signal(signal.SIGPROF, alarm)
    for model_type in model_types:
        signal.setitimer(signal.ITIMER_PROF, limit)
        timed_out = False
        try:
            row = run_hf(model_type)
        except TimeoutError as error:
            row = Row("hf", model_type, model_type, status="timeout", reason=str(error), total_s=limit)
            timed_out = True
        except Exception as error:
            row = Row(
                "hf", model_type, model_type, status="crashed", reason=f"{type(error).__name__}: {_first_line(error)}"
            )
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        print("ROW " + json.dumps(asdict(row)), flush=True)
        if timed_out:
            return


def _run_hf_chunk(model_types: list[str], limit: float) -> list[Row]:
    """Rows of ``model_types``, run in as few worker processes as it takes: when a worker stops (after a
    timeout, or because it died), the types it did not report go on in a fresh one; a type a worker died on
    is reported as crashed."""
    rows: dict[str, Row] = {}
    remaining = list(model_types)
    while remaining:
        command = [sys.executable, os.path.abspath(__file__), "--hf-worker", str(limit), *remaining]
        stderr = ""
        try:
            # a wall-time backstop for a worker stuck outside Python (the limit itself is CPU time)
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=4 * limit * len(remaining) + 600, cwd=CHECKOUT
            )
            stdout, stderr = done.stdout, done.stderr
        except subprocess.TimeoutExpired as expired:
            stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        reported = [Row(**json.loads(line[4:])) for line in stdout.splitlines() if line.startswith("ROW ")]
        rows.update((row.family, row) for row in reported)
        remaining = [t for t in remaining if t not in rows]
        if remaining and not reported:  # it died on the first one
            tail = (stderr.strip().splitlines() or ["the worker died"])[-1]
            rows[remaining[0]] = Row("hf", remaining[0], remaining[0], status="crashed", reason=tail[:300])
            remaining = remaining[1:]
        elif remaining and reported[-1].status != "timeout":  # it died after the last one it reported
            tail = (stderr.strip().splitlines() or ["the worker died"])[-1]
            rows[remaining[0]] = Row("hf", remaining[0], remaining[0], status="crashed", reason=tail[:300])
            remaining = remaining[1:]
    return [rows[t] for t in model_types]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


# ---------------------------------------------------------------------------------------------------------
# The driver.


def _run_in_subprocess(zoo: str, family: str, name: str, timeout: float) -> Row:
    command = [sys.executable, os.path.abspath(__file__), "--worker", zoo, family, name]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=CHECKOUT)
    except subprocess.TimeoutExpired:
        return Row(zoo, family, name, status="timeout", reason=f"over the {timeout:.0f} s limit", total_s=timeout)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("ROW "):
            return Row(**json.loads(line[4:]))
    tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return Row(zoo, family, name, status="crashed", reason=tail[:300], total_s=round(time.perf_counter() - started, 2))


def _is_residual_model(row: Row) -> bool:
    return row.status in ("whole", "partial") or (row.status == "failed" and row.sites > 0)


def _has_parity(row: Row) -> bool:
    """Whether ``row``'s model has native stochastic depth to compare train outputs with."""
    if row.parity:
        return not row.parity.startswith("n/a")
    return row.zoo == "timm" and bool(row.native_rule) and not row.native_rule.startswith(("none", "error"))


def summarise(rows: list[Row]) -> dict[str, str]:
    """The headline numbers of the issue's targets."""
    tv = [r for r in rows if r.zoo == "torchvision"]
    tv_residual = [r for r in tv if r.status != "no-residual"]
    tv_ok = [r for r in tv_residual if r.status in ("whole", "partial") and r.verified == "ok"]
    tm = [r for r in rows if r.zoo == "timm"]
    tm_residual = [r for r in tm if r.status not in ("no-residual", "skipped")]
    tm_ok = [r for r in tm_residual if r.status in ("whole", "partial") and r.verified == "ok"]
    native = [r for r in tm if r.placement not in ("", "n/a") and not r.native_rule.startswith("none")]
    on_residual = [r for r in native if not r.placement.startswith(OFF_RESIDUAL)]
    equal = [r for r in native if r.placement == "equal"]
    tm_native = [r for r in tm if _has_parity(r)]
    tm_native_residual = [r for r in tm_native if not r.placement.startswith(OFF_RESIDUAL)]
    tm_parity = [r for r in tm_native if r.parity.startswith("equal")]
    tm_default = [r for r in tm_native if r.parity in ("equal", "equal (uniform)")]
    tv_native = [r for r in rows if r.zoo in ("torchvision", "dense") and _has_parity(r)]
    tv_parity = [r for r in tv_native if r.parity.startswith("equal")]
    tv_families = sorted({_torchvision_family(r.model) for r in tv_native})
    tv_families_ok = [
        f
        for f in tv_families
        if all(r.parity.startswith("equal") for r in tv_native if _torchvision_family(r.model) == f)
    ]
    dense = [r for r in rows if r.zoo == "dense"]
    dense_exact = [r for r in dense if r.blocks == r.expected_blocks]
    dense_residual = [r for r in dense if r.expected_blocks > 0]
    dense_verified = [r for r in dense_residual if r.verified == "ok"]
    pct = lambda a, b: f"{len(a)}/{len(b)} = {100 * len(a) / max(len(b), 1):.1f}%"  # noqa: E731
    return {
        "torchvision classifiers with residual additions, retrofitted and verified (target 100%)": pct(
            tv_ok, tv_residual
        ),
        "torchvision classifiers without residual additions (clear NoResidualSitesError)": str(
            len(tv) - len(tv_residual)
        ),
        "timm families with residual additions, retrofitted (whole or partial) and verified (target 100%)": pct(
            tm_ok, tm_residual
        ),
        "timm families without residual additions (clear NoResidualSitesError)": str(
            sum(r.status == "no-residual" for r in tm)
        ),
        "timm families with native drop path whose placement equals timm's": pct(equal, native),
        "... of those whose native drop path is on residual branches": pct(equal, on_residual),
        "timm families with native drop path whose train outputs equal timm's, same weights and seed "
        "(placement and rates; target 95%)": pct(tm_parity, tm_native),
        "... of the timm families whose native drop path is on residual branches": pct(tm_parity, tm_native_residual),
        "... with the default schedule (linear, or uniform where timm's is uniform)": pct(tm_default, tm_native),
        "torchvision models with stochastic_depth_prob whose train outputs equal torchvision's (target 100%)": pct(
            tv_parity, tv_native
        ),
        "... torchvision families (" + ", ".join(tv_families) + ")": pct(tv_families_ok, tv_families),
        "torchvision dense-prediction models whose blocks are exactly the residual blocks of the backbone": pct(
            dense_exact, dense
        ),
        "... of those with residual blocks, verified (the verifier trains at rate 0: detection models need "
        "targets there)": pct(dense_verified, dense_residual),
        "timm families skipped as too large": str(sum(r.status == "skipped" for r in tm)),
    }


def _torchvision_family(name: str) -> str:
    return name.split("_")[0].rstrip("0123456789") if not name.startswith("efficientnet_v2") else "efficientnet_v2"


def _hf_builds(row: Row) -> bool:
    return row.status != "build-failed"


def _hf_without_residuals(row: Row) -> bool:
    """Whether ``row``'s model has no residual addition: none found, and every module traced (a model whose
    layers did not trace may hold residuals nobody saw; it counts as a miss)."""
    return row.status == "no-residual" and row.untraced == 0


def summarise_hf(rows: list[Row]) -> dict[str, str]:
    """The headline numbers of the Hugging Face sweep (issue 8's target: 90%)."""
    built = [r for r in rows if _hf_builds(r)]
    residual = [r for r in built if not _hf_without_residuals(r)]
    ok = [r for r in residual if r.status in ("whole", "partial") and r.verified == "ok"]
    pct = lambda a, b: f"{len(a)}/{len(b)} = {100 * len(a) / max(len(b), 1):.1f}%"  # noqa: E731
    return {
        "model types with a base model class": str(len(rows)),
        "... that build and run from a tiny config": str(len(built)),
        "... with residual additions (or modules that did not trace), retrofitted (whole or partial) and verified "
        "(target 90%)": pct(ok, residual),
        "... without a residual addition, every module traced (clear NoResidualSitesError)": str(
            sum(map(_hf_without_residuals, built))
        ),
    }


def _hf_miss(row: Row) -> str:
    if row.status == "build-failed" or _hf_without_residuals(row):
        return ""
    if row.status not in ("whole", "partial"):
        return f"{row.status}: {row.reason}"
    return "" if row.verified == "ok" else f"verifier {row.verified}"


def _hf_build_failures(rows: list[Row]) -> dict[str, list[str]]:
    """The model types that do not build, grouped by their error (numbers written N), most frequent first."""
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r.status == "build-failed":
            groups[re.sub(r"\d+", "N", r.reason).replace("`", "'")[:120]].append(r.family)
    return dict(sorted(groups.items(), key=lambda item: -len(item[1])))


def _hf_tables(rows: list[Row]) -> list[str]:
    lines = ["## Hugging Face misses and their causes", ""]
    for r in rows:
        miss = _hf_miss(r)
        if miss:
            lines.append(
                f"- **{r.family}** ({r.model}): {miss}. Cause: {HF_KNOWN_CAUSES.get(r.family, '**unexplained**')}"
            )
    lines += ["", "## Hugging Face model types without a residual addition", ""]
    for r in rows:
        if _hf_without_residuals(r):
            lines.append(f"- {r.family} ({r.model}): {r.reason}")
    failures = _hf_build_failures(rows)
    lines += [
        "",
        "## Hugging Face model types that do not build from a tiny config, by error",
        "",
        f"{sum(map(len, failures.values()))} model types; the error of building the model from its shrunk "
        "default config, or of running it on inputs made from the config (numbers written N):",
        "",
    ]
    for error, types in failures.items():
        lines.append(f"- {len(types)} x `{error}`: {', '.join(types)}")
    headers = [
        "model type",
        "class",
        "params M",
        "status",
        "sites",
        "blocks",
        "untraced",
        "specialised",
        "verifier",
        "surgery s",
        "total s",
        "untraced modules / reason",
    ]
    lines += [
        "",
        "## Hugging Face transformers (tiny configs)",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for r in rows:
        cells = [
            r.family,
            r.model,
            r.params_m,
            r.status,
            r.sites,
            r.blocks,
            r.untraced,
            r.specialised,
            r.verified,
            r.surgery_s,
            r.total_s,
            r.reason,
        ]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return [*lines, ""]


def _miss(row: Row) -> str:
    """Which target ``row`` misses ('' for none)."""
    if row.status in ("no-residual", "skipped"):
        if row.zoo == "dense" and row.expected_blocks != 0:
            return f"{row.status}, expected {row.expected_blocks} blocks"
        return f"placement {row.placement}" if row.placement.startswith("differs") else ""
    if row.status not in ("whole", "partial"):
        if row.zoo == "dense" and row.expected_blocks == 0 and row.status == "failed":
            return f"{row.status} (no residual block expected): {row.reason}"
        return f"{row.status}: {row.reason}"
    if row.verified != "ok":
        return f"verifier {row.verified}"
    problems = []
    if row.zoo == "dense" and row.blocks != row.expected_blocks:
        problems.append(f"{row.blocks} blocks, expected {row.expected_blocks}")
    if row.placement.startswith("differs") or row.native_rule == "error":
        problems.append(f"placement {row.placement}")
    if row.parity.startswith(("differs", "error")):
        problems.append(f"train outputs {row.parity} (max |diff| {row.parity_max_abs_diff:.3g})")
    return "; ".join(problems)


def _row_key(row: Row) -> tuple[str, str]:
    """What a row measured: a model, or for Hugging Face a model type (its class is known only once built)."""
    return (row.zoo, row.family if row.zoo == "hf" else row.model)


def _read_csv(path: Path) -> list[Row]:
    types = {f.name: f.type for f in fields(Row)}
    rows = []
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            values = {}
            for name, text in record.items():
                kind = types[name]
                if kind == "float":
                    values[name] = float(text) if text else math.nan
                elif kind == "int":
                    values[name] = int(text) if text else 0
                else:
                    values[name] = text
            rows.append(Row(**values))
    return rows


def _parity_cell(row: Row) -> str:
    if not row.parity or row.parity.startswith("n/a") or math.isnan(row.parity_max_abs_diff):
        return row.parity
    return f"{row.parity} ({row.parity_max_abs_diff:.2g})"


def _transformers_version(rows: list[Row]) -> str:
    if not any(r.zoo == "hf" for r in rows):
        return ""
    import transformers

    return f", transformers {transformers.__version__}"


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_reports(rows: list[Row], out: Path, wall_s: float, command: str, missing: Sequence[str] = ()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "zoo.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in fields(Row)])
        for row in rows:
            writer.writerow([_cell(v) for v in asdict(row).values()])

    import timm
    import torch
    import torchvision

    took = "" if math.isnan(wall_s) else f" in {wall_s / 60:.1f} min"  # a merge of CSVs has no wall time
    lines = [
        "# Zoo coverage",
        "",
        f"Generated by `{command}`{took} on {platform.machine()} CPU "
        f"(torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}"
        f"{_transformers_version(rows)}), "
        f"p_max = {P_MAX}, batch {BATCH} (1 above {LARGE_PARAMS_M} M parameters or {LARGE_SIDE} px), random weights. Columns are explained at the end; "
        "[residual-rules.md](residual-rules.md) explains what counts as a site and what *partial* means.",
        "",
        "## Targets",
        "",
        *[f"- {k}: **{v}**" for k, v in summarise(rows).items()],
        "",
        f"Statuses: {dict(Counter(r.status for r in rows))}",
        "",
    ]
    if missing:
        lines += [
            "## Not measured in this run",
            "",
            f"{len(missing)} of {len(rows) + len(missing)} models did not finish before the report was written "
            "(the sweep ran on a shared machine); the targets above count only the models measured: "
            + ", ".join(missing)
            + ".",
            "",
        ]
    hf = [r for r in rows if r.zoo == "hf"]
    if hf:
        lines += ["## Hugging Face transformers", "", *[f"- {k}: **{v}**" for k, v in summarise_hf(hf).items()], ""]
    lines += ["## Misses and their causes", ""]
    for r in rows:
        if r.zoo == "hf":
            continue
        miss = _miss(r)
        if miss:
            cause = KNOWN_CAUSES.get(r.model, "**unexplained**")
            lines.append(f"- **{r.model}** ({r.zoo} {r.family}): {miss}. Cause: {cause}")
    lines.append("")
    headers = [
        "model",
        "params M",
        "batch",
        "status",
        "sites",
        "blocks",
        "left alone",
        "untraced",
        "specialised",
        "verifier",
        "surgery s",
        "native rule",
        "placement vs timm",
        "rates",
        "train outputs vs native",
        "reason / untraced modules",
    ]
    for zoo in ("torchvision", "timm"):
        lines += [
            f"## {zoo}",
            "",
            "| " + ("family | " if zoo == "timm" else "") + " | ".join(headers) + " |",
            "|" + "---|" * (len(headers) + (zoo == "timm")),
        ]
        for r in (r for r in rows if r.zoo == zoo):
            cells = [
                r.model,
                r.params_m,
                r.batch,
                r.status,
                r.sites,
                r.blocks,
                r.left_alone,
                r.untraced,
                r.specialised,
                r.verified,
                r.surgery_s,
                r.native_rule,
                r.placement,
                r.rates,
                _parity_cell(r),
                r.reason,
            ]
            lines.append("| " + (f"{r.family} | " if zoo == "timm" else "") + " | ".join(map(_cell, cells)) + " |")
        lines.append("")
    dense_headers = [
        "task",
        "model",
        "params M",
        "batch",
        "status",
        "expected blocks",
        "sites",
        "blocks",
        "left alone",
        "untraced",
        "verifier",
        "surgery s",
        "train outputs vs native",
        "reason / untraced modules",
    ]
    lines += [
        "## torchvision dense prediction",
        "",
        "Expected blocks: the residual blocks of the backbone (ResNet-50: 16, ResNet-101: 33, MobileNetV3-Large: "
        "10, R(2+1)D/MC3/R3D-18: 8, Swin3D-T/S/B: 12/24/24, MViT: 16; SSD300-VGG16 and S3D have none). Heads, "
        "feature pyramids and ASPP modules hold no residual block.",
        "",
        "| " + " | ".join(dense_headers) + " |",
        "|" + "---|" * len(dense_headers),
    ]
    for r in (r for r in rows if r.zoo == "dense"):
        cells = [
            r.family,
            r.model,
            r.params_m,
            r.batch,
            r.status,
            r.expected_blocks,
            r.sites,
            r.blocks,
            r.left_alone,
            r.untraced,
            r.verified,
            r.surgery_s,
            _parity_cell(r),
            r.reason,
        ]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    lines.append("")

    if hf:
        lines += _hf_tables(hf)
    lines += [
        "## Columns",
        "",
        "- **status**: `whole` — the whole model traced; `partial` — some modules did not trace and were kept "
        "as they are (listed in the last column, with the reason; their own residuals are not retrofitted); "
        "`failed` — nothing could be traced; `no-residual` — `NoResidualSitesError`, the model has no residual "
        "addition; `skipped` — too large for this machine; `timeout` / `crashed` — the worker did not finish.",
        "- **sites / blocks**: residual additions that got stochastic depth, and the blocks (depth indices) "
        "they belong to. **untraced**: modules kept as they are. **specialised**: modules whose forward only "
        "traced with the example input's concrete shapes (guarded, see residual-rules.md).",
        "- **verifier**: `sdsurgery.verify` on a random input: eval outputs bit-equal, train outputs equal "
        "at rate 0, and every site drops to its skip.",
        "- **surgery s**: wall time of `apply_stochastic_depth(model, p_max, verify=False)` (trace, plan, rewrite).",
        f"- **native rule / placement / rates** (timm only): `timm.create_model(name, drop_path_rate={P_MAX})` "
        "is run in train mode with a hook on every `DropPath`; the blocks whose drop path is called with a "
        "non-zero rate, and the number of calls per block, are compared with ours (applied with the uniform "
        "schedule so that every site is called). Blocks where timm's own rule gives rate 0 are not compared: "
        "blocks holding timm's rate-0 placeholder (an `nn.Identity` in a `drop_path*` attribute, e.g. CaiT's "
        "class-attention blocks) and the leading blocks of a rising schedule. The rule is read from timm's "
        "non-zero rates in call order: `linear` i/(L-1), `uniform`, `i/N` (EfficientNet-style, N counting "
        "blocks without a residual), `other`. Rates are compared exactly for linear (our default schedule) "
        "and uniform; for i/N we check that our depth order is timm's (rates rise along it).",
        "- **left alone**: residual blocks outside the model's repeated blocks (downsampling layers, patch "
        "embeddings, position encodings between blocks), not retrofitted by default (residual-rules.md, section 4).",
        f"- **train outputs vs native**: the native model built with `drop_path_rate={P_PARITY}` (timm) or "
        f"`stochastic_depth_prob={P_PARITY}` (torchvision), loaded with the same weights, against our retrofit at "
        f"p_max = {P_PARITY}: train-mode outputs under `torch.manual_seed(0)` and `(1)` are compared (equal up to float "
        "rounding: max |diff| at most 1e-4 of the largest output). This checks placement *and* rates and the "
        "order of the random draws. `equal`: with our default linear schedule; `equal (uniform)`: with "
        '`schedule="uniform"` (the native rates are uniform); `equal (schedule=list)`: the native rule is '
        "neither (EfficientNet's i/N counts blocks without a residual; DaViT-style, VOLO-style or per-stage rules), "
        "so the native rate of each of our blocks is passed as `schedule=[...]`: placement and grouping are "
        "checked, not the rule. The number after the verdict is the max |diff|.",
        "",
    ]
    (out / "zoo.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names to run (default: the whole zoo)")
    parser.add_argument("--zoo", choices=("all", "timm", "torchvision", "dense", "hf"), default="all")
    parser.add_argument(
        "--hf-sample-order",
        action="store_true",
        help="run the Hugging Face model types in a fixed pseudo-random order instead of by name",
    )
    parser.add_argument("--hf-timeout", type=float, default=45.0, help="CPU seconds per Hugging Face model type")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1, help="models run side by side (one thread each)")
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs")
    parser.add_argument("--worker", nargs=3, metavar=("ZOO", "FAMILY", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--hf-worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument(
        "--from-csv",
        type=Path,
        nargs="+",
        help="rewrite the report from these CSVs (parts of one sweep) without running models",
    )
    parser.add_argument("--wall-min", type=float, default=math.nan, help="with --from-csv: the sweep's wall time")
    parser.add_argument(
        "--command",
        default="python benchmarks/zoo.py",
        help="with --from-csv: how the sweep was run, for the report's header",
    )
    args = parser.parse_args(argv)

    if args.from_csv:
        # A model measured again in a later CSV (a rerun of a few models) replaces its earlier row.
        latest = {_row_key(row): row for path in args.from_csv for row in _read_csv(path)}
        rows = list(latest.values())
        order = {zoo: i for i, zoo in enumerate(("torchvision", "timm", "dense", "hf"))}
        rows.sort(key=lambda r: order.get(r.zoo, len(order)))
        missing = [name for zoo, _, name in all_jobs() if (zoo, name) not in latest]
        missing += [t for t in hf_model_types() if ("hf", t) not in latest] if any(r.zoo == "hf" for r in rows) else []
        write_reports(rows, args.out, args.wall_min * 60, args.command, missing)
        print("\n".join(f"{k}: {v}" for k, v in summarise(rows).items()))
        return 0

    if args.hf_worker:
        import torch

        torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
        _hf_worker(args.hf_worker[1:], float(args.hf_worker[0]))
        return 0

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
        try:
            row = run_one(*args.worker)
        except Exception as error:
            traceback.print_exc()
            row = Row(*args.worker, status="crashed", reason=f"{type(error).__name__}: {_first_line(error)}")
        print("ROW " + json.dumps(asdict(row)), flush=True)
        return 0

    jobs = [j for j in all_jobs() if args.zoo in ("all", j[0]) and (not args.only or j[2] in args.only)]
    command = "python benchmarks/zoo.py" + (f" --zoo {args.zoo}" if args.zoo != "all" else "")
    started = time.perf_counter()
    rows: list[Row] = []
    done: dict[int, Row] = {}
    # Workers are subprocesses; threads only wait for them. The report is rewritten after every model, so
    # an interrupted sweep leaves the rows it finished.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_run_in_subprocess, *job, args.timeout): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            row = done[futures[future]] = future.result()
            print(
                f"[{len(done)}/{len(jobs)}] {row.zoo} {row.model}: {row.status} sites={row.sites} "
                f"verified={row.verified} placement={row.placement} parity={row.parity} {row.total_s}s "
                f"{row.reason[:120]}",
                flush=True,
            )
            rows = [done[i] for i in sorted(done)]
            write_reports(rows, args.out, time.perf_counter() - started, command)
    if args.zoo in ("all", "hf"):
        args.out.mkdir(parents=True, exist_ok=True)
        hf_types = [t for t in hf_model_types() if not args.only or t in args.only]
        if args.hf_sample_order:  # a fixed pseudo-random order: a sweep stopped early has swept a fair sample
            hf_types.sort(key=lambda t: hashlib.sha1(t.encode()).hexdigest())
        for start in range(0, len(hf_types), HF_CHUNK):
            for row in _run_hf_chunk(hf_types[start : start + HF_CHUNK], args.hf_timeout):
                rows.append(row)
                print(
                    f"[hf {len(rows)}/{len(hf_types)}] {row.family} ({row.model}): {row.status} sites={row.sites} "
                    f"verified={row.verified} {row.total_s}s {row.reason[:120]}",
                    flush=True,
                )
            with open(args.out / "zoo-hf-partial.csv", "w", newline="") as f:  # progress, for a long sweep
                writer = csv.writer(f)
                writer.writerow([f.name for f in fields(Row)])
                writer.writerows([_cell(v) for v in asdict(r).values()] for r in rows)
    swept = {row.zoo for row in rows}
    if (args.out / "zoo.csv").exists() and not args.only:  # keep the rows of the zoos not swept this time
        rows = [r for r in _read_csv(args.out / "zoo.csv") if r.zoo not in swept] + rows
    write_reports(rows, args.out, time.perf_counter() - started, command)
    print("\n".join(f"{k}: {v}" for k, v in summarise(rows).items()))
    if any(r.zoo == "hf" for r in rows):
        print("\n".join(f"Hugging Face {k}: {v}" for k, v in summarise_hf([r for r in rows if r.zoo == "hf"]).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
