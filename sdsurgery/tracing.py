"""torch.fx tracing that knows about stochastic depth, timm's helpers and modules that do not trace.

Two kinds of trace are made: one of the whole model, to find residual additions and their order in depth,
and one per block that owns an addition, in train and in eval mode, which becomes that block's new forward.

Code that reads tensor shapes in Python (``if H == self.window_size``, ``int(math.sqrt(N))``, ``len(x.shape)``)
does not trace symbolically. With ``TraceOptions.concrete_shapes`` every traced value also carries an example
value, a fake tensor that has a shape but no data (computed alongside from an example input), and such code
takes the branch the example's shapes take. Each such decision is recorded in the graph as a
``torch._assert`` guard, so a later input that would take another branch raises instead of computing
something else. Shapes that only flow into tensor operations stay symbolic; data-dependent control flow
(``if x.sum() > 0``) still does not trace.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import operator
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .decorators import cell_contents
from .errors import TraceError
from .inputs import bind_arguments
from .ops import is_stochastic_depth_op, known_stochastic_depth_functions, stochastic_depth_functions_in


def _timm_layers() -> Any:
    # A model with timm's layers has imported timm; without one there is nothing of timm's to know about,
    # and importing it here would cost every trace a second.
    return sys.modules.get("timm.layers")


def timm_autowrap_functions() -> tuple[Callable[..., Any], ...]:
    """The functions timm registers as not traceable (empty unless timm is imported). They take tensors, not
    modules, so recording them as single calls cannot hide a parametrised residual branch: they are always
    wrapped."""
    layers = _timm_layers()
    if layers is None:
        return ()
    return tuple(fn for fn in layers.get_notrace_functions() if callable(fn))


def torch_autowrap_functions() -> tuple[Callable[..., Any], ...]:
    """torch.nn's mask helpers, recorded as single calls: they check their arguments' types and values in
    Python (``_none_or_dtype`` raises on anything but a tensor, ``_detect_is_causal_mask`` compares a mask's
    values), and they take masks, not modules, so no residual branch can hide in them."""
    from torch.nn import functional
    from torch.nn.modules import transformer

    names = ((functional, "_canonical_mask"), (functional, "_none_or_dtype"), (transformer, "_detect_is_causal_mask"))
    return tuple(getattr(module, name) for module, name in names if callable(getattr(module, name, None)))


COMPOSITE_TORCH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
"""torch.nn modules that fx keeps whole (as it keeps every torch.nn module) although their forward calls other
modules and holds residual additions: they are traced into."""


def timm_leaf_modules() -> tuple[type[nn.Module], ...]:
    """The module classes timm registers as not traceable (empty unless timm is imported). Some are whole
    residual blocks, so they are used only for a module that does not trace otherwise."""
    layers = _timm_layers()
    if layers is None:
        return ()
    return tuple(m for m in layers.get_notrace_modules() if isinstance(m, type))


class _Unknown:
    """The example value of a node that could not be computed."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = _Unknown()


@dataclass(frozen=True)
class ShapeExamples:
    """Example argument values (fake tensors: shapes, no data) of module calls, keyed by module path.

    ``calls[path]`` binds the first call of the module at ``path`` (relative to the model) to its parameter
    names; ``prefix`` is where the module being traced sits, so ``at("")`` is its own call.
    """

    fake_mode: Any
    calls: Mapping[str, Mapping[str, Any]]
    prefix: str = ""

    def at(self, path: str) -> Mapping[str, Any] | None:
        return self.calls.get(join_path(self.prefix, path))

    def relative_to(self, path: str) -> ShapeExamples:
        return replace(self, prefix=join_path(self.prefix, path))


def join_path(*parts: str) -> str:
    """The qualified module name of ``parts`` joined with dots, empty parts (the root) left out."""
    return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class TraceOptions:
    """What to keep opaque while tracing, and whether shapes may be specialised.

    ``leaf_modules``: module classes never traced into. ``leaf_paths``: qualified module names never traced
    into. ``autowrap_functions``: functions recorded as one call instead of being traced (timm's registered
    ones are added when timm is imported). ``concrete_shapes``: let Python code that reads shapes use the
    example values in ``examples`` (see the module docstring).
    """

    leaf_modules: tuple[type[nn.Module], ...] = ()
    leaf_paths: frozenset[str] = frozenset()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    concrete_shapes: bool = False
    examples: ShapeExamples | None = None

    def with_leaf_paths(self, paths: Iterable[str]) -> TraceOptions:
        return replace(self, leaf_paths=self.leaf_paths | frozenset(paths))

    def with_leaf_modules(self, classes: Iterable[type[nn.Module]]) -> TraceOptions:
        return replace(self, leaf_modules=tuple(dict.fromkeys((*self.leaf_modules, *classes))))

    def relative_to(self, path: str) -> TraceOptions:
        """The same options for tracing the submodule at ``path`` on its own."""
        if not path:
            return self
        prefix = path + "."
        paths = frozenset(p[len(prefix) :] for p in self.leaf_paths if p.startswith(prefix))
        examples = self.examples.relative_to(path) if self.examples is not None else None
        return replace(self, leaf_paths=paths, examples=examples)


@dataclass
class ModuleCall:
    """How a module was first called while tracing its parent: the arguments bound to its parameter names,
    and, when tracing with example values, the example value of each argument."""

    arguments: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] | None = None

    def concrete_args(self) -> dict[str, Any]:
        """Arguments that were plain Python values (not traced tensors), to specialise a standalone trace on."""
        concrete = {}
        for name, value in self.arguments.items():
            if _is_traced(value) or not _is_plain(value, tensors=True):
                continue
            concrete[name] = pytree.tree_map(lambda v: fx.PH if _is_traced(v) else v, value)
        return concrete


def _is_plain(value: Any, *, tensors: bool = False) -> bool:
    """Whether ``value`` is a plain Python value a trace may be specialised on (and guarded): ``None``, a
    number, a string, a dtype or device, or a tuple/list/dict of such values (or of tensors, with
    ``tensors``, which stay inputs). Other objects (a key-value cache, a config) are passed to the traced
    code as they come."""
    if tensors and _is_traced(value):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v, tensors=tensors) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(v, tensors=tensors) for v in value.values())
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device))


def check_keyword_arguments(keywords: dict[str, Any], names: tuple[str, ...], plain: dict[str, Any]) -> None:
    """Raise ``TypeError`` unless a traced forward's ``**kwargs`` hold exactly the keywords it was traced with,
    with the same plain values: the trace read them as they were."""
    if tuple(keywords) != names and set(keywords) != set(names):
        raise TypeError(
            f"this retrofitted block was traced for the keyword arguments {sorted(names)} in **kwargs, "
            f"got {sorted(keywords)}; retrofit it with example inputs that call it this way"
        )
    for name, value in plain.items():
        if keywords[name] is not value and keywords[name] != value:
            raise TypeError(
                f"this retrofitted block was traced with {name}={value!r}, got {name}={keywords[name]!r}; "
                "retrofit it with example inputs that call it this way"
            )


def _var_keyword_name(fn: Callable[..., Any]) -> str | None:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None)


def _is_object(value: Any) -> bool:
    """Whether ``value`` is an object other than a tensor, a plain value or a container (a key-value cache)."""
    return not isinstance(value, (torch.Tensor, fx.Proxy, tuple, list, dict)) and not _is_plain(value)


def _is_traced(value: Any) -> bool:
    # Tensors stand for traced values too: a call captured by running the model holds tensors, and a
    # tensor must never be baked into a graph as a constant.
    return isinstance(value, (fx.Proxy, torch.Tensor))


class ValueProxy(fx.Proxy):
    """A proxy that can be converted to a Python value when its tracer knows the example value."""

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.concretise(self, len)

    def __int__(self) -> int:
        return self.tracer.concretise(self, int)

    def __index__(self) -> int:
        return self.tracer.concretise(self, operator.index)

    def __float__(self) -> float:
        return self.tracer.concretise(self, float)


class _ValueAttribute(fx.proxy.Attribute, ValueProxy):
    pass


class ObjectProxy(ValueProxy):
    """A traced input that stands for an object, not a tensor (a key-value cache). ``isinstance`` sees the
    class of the object the example call passed, so code choosing what to do by the object's type
    (``isinstance(cache, EncoderDecoderCache)``) takes the example's path, guarded in the graph by
    :func:`check_argument_type`; a plain proxy would fail every such check and silently take another path."""

    def __init__(self, node: fx.Node, tracer: SurgeryTracer, cls: type) -> None:
        super().__init__(node, tracer)
        self.example_class = cls
        self.type_guarded = False

    def __setitem__(self, key: Any, value: Any) -> None:
        # Code storing into the object (a layer sharing its keys and values with later layers) does so in the
        # graph too.
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # read by isinstance() when the proxy's own type does not match
        if not self.type_guarded:
            self.type_guarded = True
            name = class_name(self.example_class)  # a graph's arguments cannot be classes
            self.tracer.create_proxy("call_function", check_argument_type, (self, name), {})
        return self.example_class


def class_name(cls: type) -> str:
    """``module.QualifiedName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def check_argument_type(value: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``value``'s class is the one named ``name`` (:func:`class_name`): a graph
    traced for an argument of that class took the paths its code takes for it."""
    if class_name(type(value)) != name:
        raise TypeError(
            f"this retrofitted block was traced for an argument of type {name.rpartition('.')[2]}, got "
            f"{type(value).__name__}; retrofit it with example inputs that call it this way"
        )


class SurgeryTracer(fx.Tracer):
    """An fx tracer that keeps stochastic-depth modules as leaves, records how each module is called and,
    given example values, specialises shape-reading Python code on them (see the module docstring)."""

    def __init__(
        self,
        options: TraceOptions = TraceOptions(),
        extra_leaves: Iterable[nn.Module] = (),
        example_values: Mapping[str, Any] | None = None,
        stochastic_depth_functions: Iterable[Callable[..., Any]] = (),
    ) -> None:
        autowrap = tuple(
            dict.fromkeys(
                (
                    *known_stochastic_depth_functions(),
                    *stochastic_depth_functions,
                    *torch_autowrap_functions(),
                    *timm_autowrap_functions(),
                    *options.autowrap_functions,
                )
            )
        )
        super().__init__(autowrap_functions=autowrap, param_shapes_constant=True)
        self.options = options
        self.extra_leaves = {id(m) for m in extra_leaves}
        self.module_calls: dict[str, ModuleCall] = {}
        self.failed_module: tuple[str, str] | None = None
        self.specialised: dict[str, str] = {}
        self.fake_mode = options.examples.fake_mode if options.examples is not None else None
        self.example_values = example_values if options.concrete_shapes and self.fake_mode is not None else None
        self.argument_examples = example_values or {}  # the root's arguments in the example call, always
        self.computing = False  # fx patches module calls and attributes while it traces; see call_module

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with (
            _calls_recorded(self, RANDOM_FACTORIES, traced_only=False),
            _calls_recorded(self, SIZED_FACTORIES, traced_only=True),
            _type_info_specialised(self),
            _fake_tensor_errors_unlogged(),
        ):
            return super().trace(root, concrete_args)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> Any:
        # A decorated forward (``functools.wraps``: transformers' ``deprecate_kwarg``, ``can_return_tuple``,
        # gradient-checkpointing wrappers) is traced through the function it wraps: fx reads the parameters
        # of the innermost function but would call the wrapper, whose code has no such parameters.
        # :class:`.rewrite.RetrofittedBlock` puts the decorators back around the traced forward.
        root_fn = inspect.unwrap(root_fn)
        keywords_name = _var_keyword_name(root_fn)
        keywords = None
        if keywords_name is not None and isinstance(concrete_args, dict):
            # fx cannot generate a forward that takes both ``**kwargs`` and a flattened structured argument:
            # containers stay single inputs (code unpacking them still traces).
            keywords = concrete_args.get(keywords_name)
            concrete_args = {k: v for k, v in concrete_args.items() if not isinstance(v, (tuple, list, dict))}
        if keywords is None and keywords_name is not None and self.options.examples is not None:
            keywords = (self.options.examples.at("") or {}).get(keywords_name)
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        placeholder = next(
            (a for a in args if isinstance(a, fx.Proxy) and a.node.target == "**" + str(keywords_name)), None
        )
        if placeholder is None or not isinstance(keywords, dict):
            return fn, args
        # ``**kwargs`` of a root traced on its own: the keywords of the call it was seen in, each read from the
        # placeholder (or, for a plain value such as ``None``, specialised on it), with a guard that a later
        # call passes the same keywords.
        expanded = {k: v if _is_plain(v) else placeholder[k] for k, v in keywords.items()}
        plain = {k: v for k, v in expanded.items() if not isinstance(v, fx.Proxy)}
        self.create_proxy("call_function", check_keyword_arguments, (placeholder, tuple(keywords), plain), {})

        def with_keywords(*call_args: Any) -> Any:
            return fn(*(expanded if a is placeholder else a for a in call_args))

        return with_keywords, args

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.extra_leaves or module_qualified_name in self.options.leaf_paths:
            return True
        if self._is_stochastic_depth(m) or isinstance(m, self.options.leaf_modules):
            return True
        if isinstance(m, COMPOSITE_TORCH_MODULES):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def _is_stochastic_depth(self, m: nn.Module) -> bool:
        # Recognising a module may run it on a probe input: as its own code, not as part of the trace.
        computing, self.computing = self.computing, True
        try:
            return is_stochastic_depth_op(m)
        finally:
            self.computing = computing

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self.computing:  # running a module on example values: its own code, not a trace
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        if path not in self.module_calls:
            arguments = bind_arguments(m, args, kwargs)
            values = pytree.tree_map(self.value_of, arguments) if self.example_values is not None else None
            self.module_calls[path] = ModuleCall(arguments, values)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module whose code raised
                self.failed_module = (path, type(m).__name__)
            raise

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # Example values.

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "placeholder":
            example = self.argument_examples.get(node.target.lstrip("*"))
            if example is not None and _is_object(example):
                return ObjectProxy(node, self, type(example))
        return ValueProxy(node, self)

    def create_arg(self, a: Any) -> Any:
        # fx turns every dict into a plain dict: a ``ModelOutput`` (a dataclass that is a dict) a traced
        # forward returns must come back as itself, since callers read its attributes.
        if isinstance(a, dict) and dataclasses.is_dataclass(a) and not isinstance(a, fx.Proxy):
            fields = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example_values is not None:
            proxy.node.meta["example_value"] = self._compute(proxy.node)
        return proxy

    def value_of(self, value: Any) -> Any:
        """The example value of a proxy (``UNKNOWN`` when not known); other values are returned as they are."""
        if isinstance(value, fx.Proxy):
            return self._node_value(value.node)
        return value

    def _node_value(self, node: fx.Node) -> Any:
        if "example_value" not in node.meta:
            node.meta["example_value"] = self._compute(node) if node.op == "get_attr" else UNKNOWN
        return node.meta["example_value"]

    def _compute(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self._placeholder_value(node.target.lstrip("*"))
        if node.op == "get_attr":
            value: Any = self.root
            self.computing = True
            try:
                for part in node.target.split("."):
                    value = getattr(value, part, UNKNOWN)
            finally:
                self.computing = False
            return value
        unknown = False

        def lookup(n: fx.Node) -> Any:
            nonlocal unknown
            value = self._node_value(n)
            unknown = unknown or value is UNKNOWN
            return value

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lookup)
        if unknown:
            return UNKNOWN
        self.computing = True
        try:
            with self.fake_mode, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self.root.get_submodule(node.target)(*args, **kwargs)
        except Exception:  # an op fake tensors cannot run, or data-dependent: the value stays unknown
            return UNKNOWN
        finally:
            self.computing = False
        return UNKNOWN

    def _placeholder_value(self, name: str) -> Any:
        if name in self.example_values:
            return self.example_values[name]
        # fx names the placeholders of a structured concrete argument "name_1", "name_2", ... in the order
        # of its flattened leaves.
        base, _, index = name.rpartition("_")
        if base in self.example_values and index.isdigit():
            leaves = pytree.tree_leaves(self.example_values[base])
            if 0 < int(index) <= len(leaves):
                return leaves[int(index) - 1]
        return UNKNOWN

    def concretise(self, proxy: fx.Proxy, convert: Callable[[Any], Any]) -> Any:
        """``convert(value)`` of a proxy's example value, guarded in the graph; ``TraceError`` without one."""
        value = self.value_of(proxy) if self.example_values is not None else UNKNOWN
        if value is UNKNOWN or isinstance(value, torch.Tensor):  # tensors hold data: never concretised
            raise fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to control flow")
        result = convert(value)
        where = _user_location()
        path = next(reversed(self.module_stack.values()))[0] if self.module_stack else ""
        self.specialised.setdefault(path, where)
        if convert is bool:
            condition = proxy if result else self.create_proxy("call_function", operator.not_, (proxy,), {})
        elif convert is len:
            condition = self.create_proxy(
                "call_function", operator.eq, (self.create_proxy("call_function", len, (proxy,), {}), result), {}
            )
        else:  # int(), float(), index(): the value itself is what the code went on with
            condition = self.create_proxy("call_function", operator.eq, (proxy, value), {})
        message = (
            f"sdsurgery specialised this block on its example input's shapes ({where}: {convert.__name__} was "
            f"{result!r}); retrofit it with an example input of the shape you run it on"
        )
        self.create_proxy("call_function", torch._assert, (condition, message), {})
        return result

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concretise(obj, bool)

    def iter(self, obj: fx.Proxy) -> Iterator:
        length = self.concretise(obj, len)
        return (obj[i] for i in range(length))


RANDOM_FACTORIES = ("rand", "randn", "randint", "randperm", "normal")
"""torch functions that draw new random numbers. Called with sizes only (``torch.rand([])``, no traced value
among the arguments) fx would run them once while tracing and bake the numbers they drew into the graph:
layer drop (``if self.training and torch.rand([]) < p``) would skip the same layers at every step."""


SIZED_FACTORIES = ("ones", "zeros", "empty", "full")
"""torch functions making a tensor of a given size. torch's argument parser rejects traced sizes passed one by
one (``torch.ones(batch, length)`` with sizes read from a traced shape: "ones() takes 1 positional argument
but 2 were given"), so such calls are recorded as nodes; calls with plain sizes run as they are."""


@contextmanager
def _torch_functions_wrapped(
    names: Iterable[str], wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Replace ``torch.<name>`` by ``wrap(torch.<name>)`` for each of ``names`` until the block ends."""
    originals = {name: getattr(torch, name) for name in names}
    for name, function in originals.items():
        setattr(torch, name, wrap(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(torch, name, function)


def _calls_recorded(tracer: SurgeryTracer, names: Iterable[str], *, traced_only: bool) -> Any:
    """While tracing, record the calls of the torch functions ``names`` as nodes of the graph: every call, or
    with ``traced_only`` the calls that have a traced value among their arguments (the others run)."""

    def recorded(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if tracer.computing or (
                traced_only and not any(isinstance(v, fx.Proxy) for v in pytree.tree_leaves((args, kwargs)))
            ):
                return function(*args, **kwargs)
            return tracer.create_proxy("call_function", function, args, kwargs)

        return call

    return _torch_functions_wrapped(names, recorded)


def _type_info_specialised(tracer: SurgeryTracer) -> Any:
    """Let ``torch.finfo(x.dtype)`` / ``torch.iinfo`` of a traced value use the example's dtype, guarded (as
    shapes are, see :meth:`SurgeryTracer.concretise`): mask code reads ``torch.finfo(x.dtype).min``."""

    def specialised(info: Any) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if args and isinstance(args[0], fx.Proxy) and not tracer.computing:
                args = (tracer.concretise(args[0], dtype), *args[1:])
            return info(*args)

        return call

    return _torch_functions_wrapped(("finfo", "iinfo"), specialised)


@contextmanager
def _fake_tensor_errors_unlogged() -> Iterator[None]:
    """Keep torch from logging each op that fails on the example values' fake tensors: such a value stays
    unknown (see :meth:`SurgeryTracer._compute`), which is no error of the user's."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def dtype(value: torch.dtype) -> torch.dtype:
    """The dtype a traced value had in the example (named so in guard messages)."""
    return value


def _user_location() -> str:
    """``file:line`` of the innermost frame outside torch and sdsurgery: the model code being traced."""
    here = os.path.dirname(__file__)
    torch_dir = os.path.dirname(torch.__file__)
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith((here, torch_dir)) and "<" not in filename:
            parts = filename.replace(os.sep, "/").split("/")
            return f"{'/'.join(parts[-2:])}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def new_fake_mode() -> Any:
    """A fake-tensor mode that accepts real parameters and buffers (converted on the fly, never changed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def to_fake(fake_mode: Any, value: Any) -> Any:
    """``value`` with every tensor replaced by a fake tensor of the same shape, dtype and device."""
    from torch._subclasses.fake_tensor import FakeTensor

    def convert(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
            return fake_mode.from_tensor(v)
        return v

    return pytree.tree_map(convert, value)


@dataclass
class Trace:
    """A traced graph, the calls its tracer saw (keyed by qualified module name relative to the root), the
    tensor constants its ``get_attr`` nodes name (fx would have stored them on the traced module) and the
    modules whose code was specialised on example shapes (path -> ``file:line``)."""

    graph: fx.Graph
    module_calls: dict[str, ModuleCall]
    constants: dict[str, torch.Tensor]
    specialised: dict[str, str] = field(default_factory=dict)


def trace(
    module: nn.Module,
    options: TraceOptions,
    *,
    path: str = "",
    extra_leaves: Iterable[nn.Module] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Trace:
    """Trace ``module`` in its current train/eval mode; raise ``TraceError`` naming the module that failed.

    ``path`` is the module's qualified name in the model, used only in error messages. The module and its
    descendants are left exactly as they were (attributes, buffers), whatever the traced code wrote.
    """
    examples = options.examples.at("") if options.examples is not None else None
    # Stochastic-depth functions the module's code calls (a third-party drop_connect) stay single calls, so
    # the pass sees them on the branch and re-rates them instead of tracing their random ops.
    tracer = SurgeryTracer(options, extra_leaves, examples, stochastic_depth_functions_in(module))
    attributes_before = dict(vars(module))
    containers_before = _container_copies(module)
    try:
        with warnings.catch_warnings(), left_unchanged(module, buffers=tracer.example_values is not None):
            warnings.simplefilter("ignore")  # fx warns for every specialised argument it cannot assert on
            graph = tracer.trace(module, concrete_args=concrete_args or None)
    except Exception as error:
        inner_path, inner_type = tracer.failed_module or ("", type(module).__name__)
        full_path = join_path(path, inner_path)
        raise TraceError(full_path, inner_type, error) from error
    finally:
        # fx stores tensor constants on the traced module; take them back off so tracing changes nothing.
        constants = {name: vars(module).pop(name) for name in set(vars(module)) - set(attributes_before)}
        # Code that sets an attribute of the traced module itself (``self.window_size = min(resolution)``)
        # would leave a proxy there for the next trace.
        for name, value in attributes_before.items():
            if vars(module).get(name) is not value:
                vars(module)[name] = value
        # ... and code that reassigns one of its buffers (``self.table = self.table.to(x.device)``) a proxy
        # in its ``_buffers``.
        _restore_containers(attributes_before, containers_before)
    _restore_specialised_names(graph, concrete_args or {})
    _drop_flattened_defaults(graph)
    return Trace(graph, tracer.module_calls, constants, tracer.specialised)


@contextmanager
def left_unchanged(root: nn.Module, *, buffers: bool) -> Iterator[None]:
    """Undo what traced code writes on the root's descendants: attributes it sets or containers it fills (a
    cache such as ``self.rel_indices = ...`` or ``self.bias_cache[key] = ...`` would otherwise keep a proxy)
    and, with ``buffers``, buffer contents that modules run on example values update in place."""
    modules = [m for _, m in root.named_modules(remove_duplicate=True) if m is not root]
    saved = [(m, dict(vars(m)), _container_copies(m)) for m in modules]
    contents = [(b, b.detach().clone()) for b in root.buffers()] if buffers else []
    try:
        yield
    finally:
        # Results cached by the methods themselves were computed on proxies or fake tensors.
        for cache in method_caches(root):
            cache.cache_clear()
        for m, attributes, containers in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            _restore_containers(attributes, containers)
        with torch.no_grad():
            for buffer, value in contents:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


def method_caches(root: nn.Module) -> list[Any]:
    """The ``functools`` caches of the methods of ``root``'s module classes (transformers caches position
    embeddings by shape with ``lru_cache`` on ``forward``), found on the methods and their wrappers."""
    caches: dict[int, Any] = {}
    for cls in {type(m) for m in root.modules()}:
        for base in cls.__mro__:
            if base in (nn.Module, object):
                break
            for method in vars(base).values():
                seen: set[int] = set()
                while callable(method) and id(method) not in seen:  # down the chain of wrappers
                    seen.add(id(method))
                    for value in (method, *map(cell_contents, getattr(method, "__closure__", None) or ())):
                        if callable(getattr(value, "cache_clear", None)):
                            caches[id(value)] = value
                    method = getattr(method, "__wrapped__", None)
    return list(caches.values())


def _container_copies(module: nn.Module) -> dict[str, Any]:
    """Shallow copies of a module's plain container attributes (see :func:`_shallow`), by name."""
    return {name: _shallow(value) for name, value in vars(module).items()}


def _restore_containers(attributes: Mapping[str, Any], copies: Mapping[str, Any]) -> None:
    """Put back the contents of each container attribute that traced code changed from its copy
    (:func:`_container_copies`). Containers left as they were are not touched: a frozen one (diffusers'
    ``FrozenDict`` config) refuses ``update`` after ``clear`` has emptied it."""
    for name, saved in copies.items():
        if saved is not None and _changed(attributes[name], saved):
            original = attributes[name]
            original.clear()
            original.update(saved) if isinstance(original, (dict, set)) else original.extend(saved)


def _changed(container: Any, saved: Any) -> bool:
    """Whether a container holds other contents than its shallow copy (other objects, by identity)."""
    if isinstance(container, set):
        return container != saved
    if isinstance(container, dict):
        pairs = zip(container.values(), saved.values())
        return list(container) != list(saved) or any(a is not b for a, b in pairs)
    return len(container) != len(saved) or any(a is not b for a, b in zip(container, saved))


def _shallow(value: Any) -> Any:
    """The contents of a dict, list or set attribute (``_modules``, ``_buffers``, caches) as a plain container
    of its type's base, else None: copying the subclass itself may run its checks (a frozen dict refuses the
    items ``copy.copy`` puts back)."""
    for base in (dict, list, set):
        if isinstance(value, base):
            return base(value)
    return None


def _restore_specialised_names(graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    # fx names a specialised parameter's placeholder "name_1"; callers passing it by keyword need "name".
    for node in graph.find_nodes(op="placeholder"):
        name, _, count = node.target.rpartition("_")
        if count == "1" and name in concrete_args and not isinstance(concrete_args[name], (tuple, list, dict)):
            node.target = name


def _drop_flattened_defaults(graph: fx.Graph) -> None:
    # A graph with a structured (flattened) input unpacks its placeholders in one generated line that fx
    # writes with their defaults ("x, flag = False, = ..."), which is no Python; its forward's signature has
    # no defaults anyway (it is the traced function's parameter names), so the defaults are dropped.
    if getattr(graph._codegen, "pytree_info", None) is not None:
        for node in graph.find_nodes(op="placeholder"):
            node.args = ()


def owner_path(node: fx.Node) -> str | None:
    """Qualified name of the module whose own forward created ``node`` ('' for the root).

    Returns ``None`` for nodes created by a second or later call of a module (weight sharing): the first
    call already stands for that code.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    _, (path, _) = next(reversed(stack.items()))
    if any("@" in k for k in stack):
        return None
    return path
