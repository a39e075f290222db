"""Hugging Face transformers models: example inputs from a model's config, and local model directories.

A model directory is what ``save_pretrained`` writes: ``config.json`` and the weights. The command line
builds the model it holds (nothing is downloaded) and retrofits it on example inputs made from its config:
the model's ``main_input_name`` (``input_ids`` — a short token sequence —, ``pixel_values`` at the
config's image size, ``input_values``, ``input_features``), plus ``decoder_input_ids`` for an
encoder-decoder and token boxes for a layout model (``bbox``). Everything here needs ``transformers``
(``pip install 'sdsurgery[hf]'``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError, first_line
from .weights import describe_key_problems

SEQUENCE_LENGTH = 8
"""Tokens (or audio frames per feature) in example inputs made from a config."""


class HFModelError(SurgeryError):
    """A Hugging Face model directory or config cannot be turned into a model or its example inputs."""


def is_model_directory(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a ``config.json`` (as written by ``save_pretrained``)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise HFModelError("Hugging Face models need transformers: pip install 'sdsurgery[hf]'") from error
    return transformers


def model_class(config: Any) -> type[nn.Module]:
    """The class a config's ``architectures`` names (``BertForMaskedLM``), or the base model class of its
    model type when it names none that transformers has."""
    transformers = _transformers()
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError as error:
        raise HFModelError(f"transformers has no model class for model type '{config.model_type}'") from error


def load_model_directory(path: str | Path) -> nn.Module:
    """The model saved in the directory ``path`` with its weights (local files only), in eval mode; ``HFModelError``
    when its weights leave parameters of the config's model missing or hold keys it has no place for."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise HFModelError(f"cannot read the Hugging Face config in {path}: {first_line(error)}") from error
    cls = model_class(config)
    try:
        with _quiet(transformers.utils.logging):
            model, loading = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as error:
        raise HFModelError(f"cannot load {cls.__name__} from {path}: {first_line(error)}") from error
    # from_pretrained initialises missing weights at random and only logs it: that model must not be retrofitted.
    problems = describe_key_problems(sorted(loading["missing_keys"]), sorted(loading["unexpected_keys"]))
    if problems:
        raise HFModelError(f"the weights in {path} do not fit its config.json ({cls.__name__}): {problems}")
    return model.eval()


@contextmanager
def _quiet(logging: Any) -> Iterator[None]:
    """transformers without its progress bars and its load report (a command's output is its own; what the
    report says of missing or unexpected weights is raised as an error)."""
    progress, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if progress:
            logging.enable_progress_bar()


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (what ``config.json`` holds), to store in a checkpoint."""
    return config.to_dict()


def model_from_config_dict(data: Mapping[str, Any]) -> nn.Module:
    """A model with random weights built from a config dict stored by :func:`config_to_dict`."""
    transformers = _transformers()
    data = dict(data)
    try:
        config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    except Exception as error:
        raise HFModelError(f"cannot rebuild the Hugging Face config: {first_line(error)}") from error
    return model_class(config)(config).eval()


def example_inputs(model: nn.Module, batch_size: int = 2, sequence_length: int = SEQUENCE_LENGTH) -> dict[str, Any]:
    """Keyword example inputs for a transformers ``model``, made from its config (random, seeded).

    ``HFModelError`` when the model's main input is of a kind not known here.
    """
    config = model.config
    generator = torch.Generator().manual_seed(0)
    parameters = inspect.signature(model.forward).parameters
    name = getattr(model, "main_input_name", "input_ids")
    inputs: dict[str, Any] = {}
    pairs = _pairs_text_with_images(config, parameters)
    if name == "input_ids" or pairs:
        inputs["input_ids"] = _token_ids(config, batch_size, sequence_length, generator)
    if name in ("pixel_values", "pixel_values_videos") or pairs:
        name = "pixel_values" if name == "input_ids" else name
        size = _setting(config, "image_size") or 224
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = _setting(config, "num_channels") or 3
        inputs[name] = torch.randn((batch_size, channels, height, width), generator=generator)
    elif name == "input_values":
        inputs[name] = torch.randn((batch_size, 200 * sequence_length), generator=generator)
    elif name == "input_features":
        bins = _setting(config, "num_mel_bins") or _setting(config, "feature_size") or 80
        positions = _setting(config, "max_source_positions")
        frames = 2 * positions if positions else 16 * sequence_length
        inputs[name] = torch.randn((batch_size, bins, frames), generator=generator)
    elif name != "input_ids":
        raise HFModelError(f"{type(model).__name__}'s main input '{name}' has no example made from its config")
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        inputs["decoder_input_ids"] = _token_ids(config, batch_size, sequence_length, generator)
    if "input_ids" in inputs and "bbox" in parameters:  # a layout model: a box per token (x0, y0, x1, y1)
        inputs["bbox"] = _boxes(batch_size, sequence_length, generator)
    device = next(model.parameters(), torch.empty(0)).device
    return {k: v.to(device) for k, v in inputs.items()}


def _token_ids(config: Any, batch_size: int, sequence_length: int, generator: torch.Generator) -> torch.Tensor:
    vocab = _setting(config, "vocab_size") or 100
    return torch.randint(0, min(int(vocab), 1000), (batch_size, sequence_length), generator=generator)


def _boxes(batch_size: int, sequence_length: int, generator: torch.Generator) -> torch.Tensor:
    """Token boxes on the 0-1000 grid layout models use, each with its corners in order."""
    # [..., axis (x, y), (low, high)] -> (x0, y0, x1, y1)
    spans = torch.randint(0, 1000, (batch_size, sequence_length, 2, 2), generator=generator).sort(dim=-1).values
    return spans.transpose(-1, -2).reshape(batch_size, sequence_length, 4)


def _pairs_text_with_images(config: Any, parameters: Mapping[str, Any]) -> bool:
    """Whether the model embeds text and images side by side (CLIP-style: both inputs are required), as
    opposed to placing image features at image tokens of the text (LLaVA-style: text alone runs)."""
    has_image_tokens = any(getattr(config, n, None) is not None for n in ("image_token_id", "image_token_index"))
    return (
        "input_ids" in parameters
        and "pixel_values" in parameters
        and getattr(config, "vision_config", None) is not None
        and getattr(config, "text_config", None) is not None
        and not has_image_tokens
    )


def _setting(config: Any, name: str) -> Any:
    """``config.name``, or the same setting of its first sub-config that has it (``vision_config``)."""
    value = getattr(config, name, None)
    if value is not None:
        return value
    for attribute in ("vision_config", "text_config", "encoder_config", "audio_config"):
        sub = getattr(config, attribute, None)
        if sub is not None and getattr(sub, name, None) is not None:
            return getattr(sub, name)
    return None
