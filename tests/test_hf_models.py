"""Hugging Face transformers models built from tiny configs: retrofitted per layer, still the same HF model.

Nothing is downloaded: every model is built from a config written here, with random weights.
"""

import copy
import logging
import warnings

import pytest
import torch
from torch import fx

transformers = pytest.importorskip("transformers")

from sdsurgery import (  # noqa: E402
    RetrofittedBlock,
    StochasticDepth,
    apply_stochastic_depth,
    find_residual_sites,
    plan_stochastic_depth,
    set_drop_rates,
    verify,
)
from sdsurgery.tracing import SurgeryTracer, TraceOptions, trace  # noqa: E402

P_MAX = 0.2
LAYERS = 3
VOCAB = 100


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=37,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _vit():
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=37,
    )
    return transformers.ViTModel(config)


def _swin():
    config = transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 2],
        num_heads=[1, 2],
        window_size=2,
        drop_path_rate=0.1,
    )
    return transformers.SwinModel(config)


def _tokens(batch=2, length=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # the first sequence is padded
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(batch=2, seed=0):
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


# name -> (builder, example inputs, other call forms, the repeated layers holding the residuals)
MODELS = {
    "bert": (_bert, _tokens(), [_tokens(3, 5, seed=1), _tokens(2, 11, seed=2)], "encoder.layer.{}"),
    "gpt2": (_gpt2, _tokens(), [_tokens(3, 5, seed=1), _tokens(2, 11, seed=2)], "transformer.h.{}"),
    "llama": (_llama, _tokens(), [_tokens(3, 5, seed=1), _tokens(2, 11, seed=2)], "model.layers.{}"),
    "vit": (_vit, _pixels(), [_pixels(3, seed=1)], "layers.{}"),
}


def _build(name):
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def _main_output(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.fixture(scope="module")
def retrofitted():
    """Each model and its retrofitted copy, built once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _build(name)
            cache[name] = (model, apply_stochastic_depth(model, P_MAX, example_inputs=MODELS[name][1]))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_sites_per_layer_one_rate_per_layer(name):
    model = _build(name)
    sites = find_residual_sites(model, P_MAX, example_inputs=MODELS[name][1])
    layer = MODELS[name][3]
    assert len(sites) == 2 * LAYERS
    for index in range(LAYERS):
        layer_sites = [s for s in sites if s.block_path.startswith(layer.format(index))]
        assert [s.depth for s in layer_sites] == [index, index]
        assert [s.drop_rate for s in layer_sites] == pytest.approx([P_MAX * index / (LAYERS - 1)] * 2)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_verified_and_still_the_same_class(name, retrofitted):
    model, result = retrofitted(name)
    assert type(result) is type(model)
    assert result.config is not model.config and result.config.to_dict() == model.config.to_dict()
    assert verify(model, result, MODELS[name][1]).ok


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_outputs_equal_on_other_call_forms(name, retrofitted):
    model, result = retrofitted(name)
    for inputs in MODELS[name][2]:  # other batch sizes and sequence lengths, other padding
        with torch.no_grad():
            assert torch.equal(_main_output(result(**inputs)), _main_output(model(**inputs)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_forward_backward_reaches_every_weight(name, retrofitted):
    _, result = retrofitted(name)
    result = copy.deepcopy(result).train()
    torch.manual_seed(0)
    _main_output(result(**MODELS[name][1])).float().square().mean().backward()
    unused = {"pooler.dense.weight", "pooler.dense.bias"}  # BERT's pooler is not on the loss here
    missing = [n for n, p in result.named_parameters() if p.grad is None and n not in unused]
    assert missing == []


def _without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


# Training batches of one look (no padding) but other sizes, then padded ones: a causal LM's layers are
# called with a cache object and, unpadded, without the attention mask the example call passed them.
TRAINING_BATCHES = [_tokens(4, 16, seed=3), _tokens(3, 7, seed=4), _tokens(5, 12, seed=5), _tokens(2, 9, seed=6)]
for batch in TRAINING_BATCHES[:3]:
    batch["attention_mask"].fill_(1)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_train_outputs_at_rate_zero_equal_the_original_on_every_call_form(name, retrofitted):
    model, result = retrofitted(name)
    model, result = _without_dropout(copy.deepcopy(model)).train(), _without_dropout(copy.deepcopy(result)).train()
    set_drop_rates(result, 0.0)
    for inputs in TRAINING_BATCHES:
        assert torch.equal(result(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_calls_of_one_look_are_traced_for_once(name, retrofitted, monkeypatch):
    _, result = retrofitted(name)
    result = copy.deepcopy(result).train()
    traces = []
    trace_graph = SurgeryTracer.trace

    def counted(*args, **kwargs):
        traces.append(args[1])
        return trace_graph(*args, **kwargs)

    monkeypatch.setattr(SurgeryTracer, "trace", counted)
    batches = TRAINING_BATCHES[:3] if name != "vit" else MODELS[name][2] * 3
    _main_output(result(**batches[0])).sum().backward()
    first = len(traces)
    for inputs in batches[1:]:
        _main_output(result(**inputs)).sum().backward()
    assert len(traces) == first


def test_surgery_and_training_log_no_errors():
    # Example values are fake tensors; an op that fails on them leaves its value unknown, and torch would log
    # each failure with a traceback (a causal LM's layers, traced with the example call's cache, do so).
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    logger.addHandler(handler)
    try:
        result = apply_stochastic_depth(_build("gpt2"), P_MAX, example_inputs=MODELS["gpt2"][1])
        result.train()(**TRAINING_BATCHES[0]).logits.sum().backward()
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


def _wav2vec2():
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.2,  # SpecAugment: time steps masked in training, drawn with NumPy
    )
    torch.manual_seed(0)
    return transformers.Wav2Vec2Model(config).eval(), {"input_values": torch.randn(2, 1600)}


def test_an_encoder_adding_a_position_convolution_keeps_the_sites_of_its_layers():
    # Wav2Vec2's encoder adds a grouped position convolution (more parameters than a layer's attention) and
    # then runs its layers: the layers are blocks of their own, not parts of the encoder.
    model, inputs = _wav2vec2()
    sites = find_residual_sites(model, P_MAX, example_inputs=inputs)
    layers = [f"encoder.layers.{i}" for i in range(LAYERS)]
    assert [s.block_path for s in sites] == ["encoder", *(path for path in layers for _ in range(2))]


def test_a_speech_encoder_with_layer_drop_and_numpy_masking_is_retrofitted_and_verified():
    model, inputs = _wav2vec2()
    result = apply_stochastic_depth(model, P_MAX, example_inputs=inputs, verify=False)
    assert all(isinstance(layer, RetrofittedBlock) for layer in result.encoder.layers)
    report = verify(model, result, inputs)
    assert report.ok and report.train_max_abs_diff == 0.0 and len(report.sites) == 2 * LAYERS


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_pretrained_round_trip(name, retrofitted, tmp_path):
    model, result = retrofitted(name)
    assert list(result.state_dict()) == list(model.state_dict())
    result.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()  # the original class reads the retrofitted weights
    for key, value in result.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = MODELS[name][1]
    with torch.no_grad():
        assert torch.equal(_main_output(loaded(**inputs)), _main_output(result(**inputs)))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_with_cache_equals_the_original(name, retrofitted):
    model, result = retrofitted(name)
    prompt = _tokens(1, 4)["input_ids"]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    actual = result.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(actual, expected)
    assert expected.shape == (1, 10)


def test_retrofitted_layers_keep_their_decorators(retrofitted):
    # BertLayer's forward is wrapped by deprecate_kwarg (past_key_values -> cache) and by transformers'
    # gradient checkpointing; the retrofitted layer calls its traced forward through both.
    _, result = retrofitted("bert")
    layer = result.encoder.layer[0].attention.output
    assert isinstance(layer, RetrofittedBlock)
    llama = retrofitted("llama")[1].model.layers[0]
    assert isinstance(llama, RetrofittedBlock) and llama.block_class.__name__ == "LlamaDecoderLayer"
    assert getattr(type(llama).forward, "__wrapped__", None) is not None


def test_gradient_checkpointing_checkpoints_each_retrofitted_layer(retrofitted):
    # ViTLayer owns both residuals, so each layer is a RetrofittedBlock behind transformers' checkpointing wrapper.
    model, result = retrofitted("vit")
    result = copy.deepcopy(result).train()
    result.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(isinstance(layer, RetrofittedBlock) and layer.gradient_checkpointing for layer in result.layers)
    calls = []
    for layer in result.layers:
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _c=checkpoint, **k: calls.append(1) or _c(*a, **k)
    torch.manual_seed(0)
    result(**MODELS["vit"][1]).last_hidden_state.square().mean().backward()
    assert len(calls) == LAYERS
    assert all(p.grad is not None for p in result.layers.parameters())
    # positive control: without checkpointing the wrapper calls nothing
    calls.clear()
    result.gradient_checkpointing_disable()
    result(**MODELS["vit"][1])
    assert calls == []


def test_rates_rise_with_depth_in_a_causal_lm(retrofitted):
    _, result = retrofitted("llama")
    rates = [m.p for m in result.modules() if isinstance(m, StochasticDepth)]
    assert rates == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.2])


def test_trains_with_the_transformers_trainer(retrofitted, tmp_path):
    model, result = retrofitted("gpt2")
    result = copy.deepcopy(result)
    before = {n: p.detach().clone() for n, p in result.named_parameters()}
    batch = _tokens(4, 8, seed=3)
    examples = [{"input_ids": ids, "attention_mask": mask, "labels": ids} for ids, mask in zip(*batch.values())]
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=result, args=arguments, train_dataset=examples)
    output = trainer.train()
    assert output.global_step == 2 and torch.isfinite(torch.tensor(output.training_loss))
    assert trainer.model is result and type(result) is type(model)
    changed = [n for n, p in result.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "transformer.h.2.mlp.c_fc.weight" in changed
    assert sum(isinstance(m, StochasticDepth) for m in result.modules()) == 2 * LAYERS


def test_native_drop_path_is_re_rated_not_stacked():
    # Swin built with drop_path_rate has a SwinDropPath (a drop rate and a training flag, no parameters) on
    # each attention residual but the first (rate 0: nn.Identity), and none on the MLP residuals.
    torch.manual_seed(0)
    model = _swin().eval()
    result = apply_stochastic_depth(model, P_MAX, example_inputs=_pixels())
    blocks = [result.encoder.layers[0].blocks[0], *result.encoder.layers[1].blocks]
    assert [type(block.drop_path).__name__ for block in model.encoder.layers[1].blocks] == ["SwinDropPath"] * 2
    native = [block.drop_path for block in blocks[1:]]
    # re-rated in its place (one sdsurgery op, so that modes and the rate scheduler apply to it too)
    assert all(isinstance(m, StochasticDepth) for m in native)
    assert [m.p for m in native] == pytest.approx([0.1, 0.2])  # the linear schedule
    added = [[n for n, m in block.named_children() if isinstance(m, StochasticDepth)] for block in blocks]
    assert added == [["stochastic_depth", "stochastic_depth_1"], *[["drop_path", "stochastic_depth"]] * 2]
    assert verify(model, result, _pixels()).ok


class _EncoderReturningModelOutput(torch.nn.Module):
    """The shape of a Hugging Face encoder: residual layers, then a ModelOutput."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(2))

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = hidden_states + layer(hidden_states)
        return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden_states)


def test_a_traced_forward_returns_the_model_output_of_the_original():
    # fx turns dicts into plain dicts; a ModelOutput a traced block returns must stay one, since callers read
    # its attributes (`encoder_outputs.last_hidden_state`).
    encoder, hidden = _EncoderReturningModelOutput(), torch.randn(2, 5, 32)
    module = fx.GraphModule(encoder, trace(encoder, TraceOptions()).graph)
    expected, actual = encoder(hidden), module(hidden)
    assert type(actual) is type(expected) is transformers.modeling_outputs.BaseModelOutput
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    result = apply_stochastic_depth(encoder, P_MAX, example_inputs=hidden)
    assert type(result.train()(hidden)) is transformers.modeling_outputs.BaseModelOutput  # training runs the graph


def test_blocks_given_a_cache_object_trace_the_path_its_class_takes():
    # ProphetNet's attention reads `past_key_values.self_attention_cache` when it is an EncoderDecoderCache
    # (isinstance): a trace that failed that check would call `update` on the wrong cache in training.
    config = transformers.ProphetNetConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        num_encoder_layers=1,
        num_decoder_layers=1,
        num_encoder_attention_heads=2,
        num_decoder_attention_heads=2,
        ngram=2,
        num_buckets=8,
        relative_max_distance=16,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.ProphetNetModel(config).eval()
    inputs = {"input_ids": _tokens()["input_ids"], "decoder_input_ids": _tokens(seed=1)["input_ids"]}
    result = apply_stochastic_depth(model, P_MAX, example_inputs=inputs)
    assert isinstance(result.decoder.layers[0], RetrofittedBlock)
    report = verify(model, result, inputs)
    assert report.ok and report.train_max_abs_diff == 0.0
    result.train()(**inputs).last_hidden_state.sum().backward()


def test_a_model_that_samples_in_eval_is_verified_under_one_seed():
    # ViTMAE masks a random subset of patches in eval mode too.
    config = transformers.ViTMAEConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        mask_ratio=0.5,
    )
    torch.manual_seed(0)
    model = transformers.ViTMAEModel(config).eval()
    with torch.no_grad():
        first, second = (model(**_pixels()).last_hidden_state for _ in range(2))
    assert not torch.equal(first, second)  # the original itself differs from call to call
    result = apply_stochastic_depth(model, P_MAX, example_inputs=_pixels())
    report = verify(model, result, _pixels())
    assert report.ok and report.eval_max_abs_diff == 0.0


def test_a_layer_taking_a_structured_argument_with_defaults_is_retrofitted():
    # Swinv2's layers take `input_dimensions` (a tuple, flattened by the trace) beside a defaulted flag.
    config = transformers.Swinv2Config(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=2,
    )
    torch.manual_seed(0)
    model = transformers.Swinv2Model(config).eval()
    result = apply_stochastic_depth(model, P_MAX, example_inputs=_pixels())
    report = verify(model, result, _pixels())
    assert report.ok and len(report.sites) == 4  # both residuals of both layers


def test_a_causal_lm_handing_its_cache_to_its_layers_is_retrofitted_without_a_warning():
    # LlamaForCausalLM's own forward does not trace (a DynamicCache object), but it adds no tensors itself:
    # its layers are traced on their own and nothing residual is lost, so there is nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_stochastic_depth(_build("llama"), P_MAX)
        apply_stochastic_depth(_build("llama"), P_MAX)
    assert plan.untraced_without_additions == tuple(plan.untraced) != ()
    assert len(plan.sites) == 2 * LAYERS


def test_a_model_whose_own_forward_returns_a_cache_is_retrofitted_layer_by_layer():
    # CTRL's forward creates a DynamicCache and returns it in its output: no graph can hold it, so the model's
    # own forward stays as it is and its layers are traced (and retrofitted) on their own.
    config = transformers.CTRLConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, dff=37, n_positions=64)
    torch.manual_seed(0)
    model = transformers.CTRLModel(config).eval()
    with pytest.warns(UserWarning, match=r"kept these modules as they are .*<model forward> \(argument of type"):
        result = apply_stochastic_depth(model, P_MAX, example_inputs=_tokens())
    assert [isinstance(layer, RetrofittedBlock) for layer in result.h] == [True, True]
    assert sum(isinstance(m, StochasticDepth) for m in result.modules()) == 4
    assert verify(model, result, _tokens()).ok


def test_example_inputs_of_a_layout_model_hold_a_box_per_token():
    from sdsurgery.hf import example_inputs

    config = transformers.LayoutLMConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    model = transformers.LayoutLMModel(config).eval()
    inputs = example_inputs(model)
    boxes = inputs["bbox"]
    assert boxes.shape == (2, 8, 4) and bool((boxes[..., :2] <= boxes[..., 2:]).all())
    assert "bbox" not in example_inputs(_build("bert"))
    result = apply_stochastic_depth(model, P_MAX)  # inputs made from the config, the boxes with them
    assert verify(model, result, inputs).ok
