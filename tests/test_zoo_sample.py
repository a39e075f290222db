"""A fast sample of the zoo sweep (benchmarks/zoo.py): the same measurements on a handful of small models."""

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("zoo", Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py")
zoo = sys.modules.setdefault("zoo", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(zoo)


@pytest.fixture(scope="module")
def rows():
    sample = [
        ("torchvision", "torchvision", "resnet18"),
        ("torchvision", "torchvision", "squeezenet1_1"),
        ("timm", "tiny_vit", "tiny_vit_5m_224"),
        ("timm", "convit", "convit_tiny"),
        ("timm", "mobilenetv3", "mobilenetv3_small_100"),
        ("timm", "levit", "levit_128s"),
        ("timm", "cait", "cait_xxs24_224"),
        ("dense", "segmentation", "lraspp_mobilenet_v3_large"),
    ]
    return {name: zoo.run_one(*job) for job in sample for name in [job[2]]}


def test_torchvision_resnet_is_whole_and_verified(rows):
    row = rows["resnet18"]
    assert (row.status, row.sites, row.blocks, row.verified, row.eval_max_abs_diff) == ("whole", 8, 8, "ok", 0.0)


def test_model_without_residual_additions_reports_the_clear_error(rows):
    row = rows["squeezenet1_1"]
    assert row.status == "no-residual"
    assert row.reason.startswith("no residual addition found in SqueezeNet")


def test_shape_dependent_timm_blocks_are_specialised_and_match_timm(rows):
    row = rows["tiny_vit_5m_224"]
    assert (row.status, row.sites, row.blocks, row.untraced, row.specialised) == ("whole", 22, 12, 0, 10)
    assert (row.verified, row.native_rule, row.placement, row.rates) == ("ok", "linear", "equal", "equal")


def test_train_outputs_equal_timms_native_drop_path_with_the_default_schedule(rows):
    row = rows["tiny_vit_5m_224"]
    assert row.parity == "equal" and row.parity_max_abs_diff < 1e-4


def test_uniform_native_rates_are_reproduced_with_the_uniform_schedule(rows):
    assert rows["levit_128s"].parity == "equal (uniform)"


def test_native_rules_we_do_not_schedule_are_reproduced_with_a_list(rows):
    # MobileNetV3's i/N counts blocks without a residual; CaiT's class-attention blocks have rate 0.
    assert rows["mobilenetv3_small_100"].parity == "equal (schedule=list)"
    assert rows["cait_xxs24_224"].parity == "equal (schedule=list)"


def test_model_without_native_stochastic_depth_has_no_parity_check(rows):
    assert rows["resnet18"].parity == "n/a (no native stochastic depth)"


def test_dense_model_has_exactly_its_backbone_blocks(rows):
    row = rows["lraspp_mobilenet_v3_large"]
    assert (row.status, row.expected_blocks, row.sites, row.blocks, row.left_alone, row.verified) == (
        "whole",
        10,
        10,
        10,
        0,
        "ok",
    )


def test_untraceable_timm_attention_is_kept_whole_and_reported(rows):
    row = rows["convit_tiny"]
    assert (row.status, row.sites, row.untraced, row.verified, row.placement) == ("partial", 24, 10, "ok", "equal")
    assert row.reason.startswith("blocks.0.attn: timm registers GPSA as not traceable")


def test_efficientnet_style_rule_is_recognised_and_depth_order_checked(rows):
    row = rows["mobilenetv3_small_100"]
    assert (row.sites, row.verified, row.native_rule, row.placement) == (6, "ok", "i/N", "equal")
    assert row.rates.endswith("depth order equal")


def test_uniform_family_rates_are_compared_with_the_uniform_schedule(rows):
    row = rows["levit_128s"]
    assert (row.sites, row.blocks, row.native_rule, row.placement, row.rates) == (20, 11, "uniform", "equal", "equal")


def test_blocks_timm_rates_zero_by_rule_are_not_compared(rows):
    # CaiT's class-attention blocks hold timm's rate-0 placeholder: same placement, other rates.
    row = rows["cait_xxs24_224"]
    assert (row.sites, row.blocks, row.verified, row.placement, row.rates) == (51, 26, "ok", "equal", "differs")


def test_report_states_the_targets_and_lists_every_model(rows, tmp_path):
    zoo.write_reports(list(rows.values()), tmp_path, wall_s=60.0, command="python benchmarks/zoo.py")
    report = (tmp_path / "zoo.md").read_text()
    assert (
        "torchvision classifiers with residual additions, retrofitted and verified (target 100%): **1/1 = 100.0%**"
        in report
    )
    assert "timm families with native drop path whose placement equals timm's: **5/5 = 100.0%**" in report
    assert (
        "timm families with native drop path whose train outputs equal timm's, same weights and seed (placement "
        "and rates; target 95%): **5/5 = 100.0%**"
    ) in report
    assert "| segmentation | lraspp_mobilenet_v3_large |" in report
    assert all(f"| {name} |" in report for name in rows)
    csv_lines = (tmp_path / "zoo.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows)
    assert csv_lines[0].startswith("zoo,family,model,params_m,batch,status,reason,sites")


def test_hf_workers_run_after_the_directory_the_sweep_started_in_is_removed(tmp_path, monkeypatch):
    # A worker started in a removed directory dies loading torch ("Intel oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so"): every worker after the first one of a long sweep crashed that way.
    pytest.importorskip("transformers")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    [row] = zoo._run_hf_chunk(["resnet"], 120)
    assert (row.family, row.status, row.verified) == ("resnet", "whole", "ok")


def test_hf_block_whose_second_branch_leads_back_to_the_first_site_is_retrofitted():
    # Inkling 2's short convolution block: the stochastic depth put on its first residual branch lies on the
    # path of its second one; the module is installed before the second site looks for existing ones.
    pytest.importorskip("transformers")
    row = zoo.run_hf("inkling2_text")
    assert (row.status, row.verified) == ("partial", "ok") and row.sites == 7
