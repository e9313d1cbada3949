"""Safe readers for the files of AIRI's released OmniFusion checkpoints.

The released adapter (``projection`` / ``projection.pt``) is a whole pickled
``models.VisualToGPTMapping`` module and ``special_embeddings.pt`` a pickled dict of
tensors. Both are read here without ``torch.load``: the torch zip archive is opened
with :mod:`zipfile` and ``data.pkl`` is unpickled by a restricted unpickler that
resolves only an explicit allow-list of globals. Any other global (``os.system``,
``builtins.eval``, ...) raises :class:`UnsafePickleError` when the unpickler first
meets it, before anything it could call is executed.

Unpickling yields plain data (`TorchArchive.unpickle`): modules become `PickledModule`
records through object creation + stored state only (a pickle calling a class is
refused, so no module ``__init__`` runs), tensors `TensorRecord`s (shape, stride, which
storage). Only once the structure and every shape are checked does
`TorchArchive.read_tensors` read the storages those tensors use, each after its declared
size is checked against them and against its zip entry, and no compressed entry may
inflate more than `MAX_INFLATION` times: memory stays bounded by what the expected
layout needs, whatever the file claims.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import re
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "PROJECTION_ALLOWED_GLOBALS",
    "PROJECTION_KEYS",
    "SPECIAL_EMBEDDINGS_ALLOWED_GLOBALS",
    "SPECIAL_EMBEDDING_KEYS",
    "ReleasedLayout",
    "ReleasedMixProjection",
    "ReleasedProjection",
    "PickledModule",
    "ReleasedVisualToGPTMapping",
    "StructureEntry",
    "TensorRecord",
    "TorchArchive",
    "UnsafePickleError",
    "collect_tensor_records",
    "describe_projection_structure",
    "find_released_layout",
    "format_structure",
    "load_projection",
    "read_mix_projection",
    "read_projection",
    "read_special_embeddings",
]

SPECIAL_EMBEDDING_KEYS = ("USER", "BOT", "SOI", "EOI")

PROJECTION_KEYS = (
    "transformer_layer.self_attn.in_proj_weight",
    "transformer_layer.self_attn.in_proj_bias",
    "transformer_layer.self_attn.out_proj.weight",
    "transformer_layer.self_attn.out_proj.bias",
    "transformer_layer.linear1.weight",
    "transformer_layer.linear1.bias",
    "transformer_layer.linear2.weight",
    "transformer_layer.linear2.bias",
    "transformer_layer.norm1.weight",
    "transformer_layer.norm1.bias",
    "transformer_layer.norm2.weight",
    "transformer_layer.norm2.bias",
    "linear.weight",
    "linear.bias",
)


class UnsafePickleError(ValueError):
    """A pickle referenced a global outside the allow-list, or tried to call a class; nothing it names was run."""


# Bounds on what a released file may make the reader hold. The released data.pkl records are a few kB and
# torch.save stores every entry uncompressed, so a compressed entry inflating more than MAX_INFLATION times is a bomb.
MAX_PICKLE_BYTES = 16 * 2**20
MAX_INFLATION = 20
MAX_MODULE_DEPTH = 8
READ_CHUNK_BYTES = 2**20


class _PickledModuleType(type):
    """Metaclass of the stand-ins: calling one (a pickle's REDUCE) is refused, so no module ``__init__`` ever runs."""

    def __call__(cls, *args, **kwargs):
        raise UnsafePickleError(
            f"refusing to call {cls.torch_name}(...) from a pickle: modules are only rebuilt from their stored state "
            "(object creation + state), as torch.save writes them; nothing was executed"
        )


class PickledModule(metaclass=_PickledModuleType):
    """
    The stored state of one torch module of a released pickle, as plain data: created by the pickle's NEWOBJ
    (``object.__new__``), its ``__dict__`` filled from the pickled state (``_parameters``, ``_modules``, plain
    attributes). No torch module code runs; tensors in it are `TensorRecord`s until `TorchArchive.read_tensors`.
    """

    torch_name = "torch.nn.Module"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise UnsafePickleError(f"refusing to create {cls.torch_name} with arguments from a pickle")
        return object.__new__(cls)

    def __setstate__(self, state: Any):
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise ValueError(f"the stored state of a {self.torch_name} must be a dict of attributes")
        vars(self).update(state)


def _stand_in(torch_name: str, base: type = PickledModule) -> type:
    return _PickledModuleType(torch_name.rsplit(".", 1)[1], (base,), {"torch_name": torch_name})


ReleasedVisualToGPTMapping = _stand_in("models.VisualToGPTMapping")
PickledTransformerEncoderLayer = _stand_in("torch.nn.TransformerEncoderLayer")
PickledMultiheadAttention = _stand_in("torch.nn.MultiheadAttention")
PickledLinear = _stand_in("torch.nn.Linear")
PickledNonDynamicallyQuantizableLinear = _stand_in(
    "torch.nn.modules.linear.NonDynamicallyQuantizableLinear", PickledLinear
)
PickledLayerNorm = _stand_in("torch.nn.LayerNorm")
PickledDropout = _stand_in("torch.nn.Dropout")


@dataclasses.dataclass(frozen=True)
class _Reference:
    """An allow-listed function a pickle may name as a value (e.g. an activation) but not call."""

    name: str


RELU = _Reference("torch.nn.functional.relu")


@dataclasses.dataclass(frozen=True)
class ReleasedProjection:
    """Weights and hyper-parameters of a released single-encoder transformer adapter."""

    state_dict: dict[str, torch.Tensor]
    vision_hidden_size: int
    text_hidden_size: int
    num_heads: int
    ffn_dim: int
    dropout: float
    activation_name: str
    layer_norm_eps: float
    norm_first: bool
    dtype: torch.dtype
    num_image_tokens: int | None = None
    batch_first: bool = True


@dataclasses.dataclass(frozen=True)
class ReleasedLayout:
    """Where the pieces of a released checkpoint live."""

    version: str
    root: Path
    projection: Path
    special_embeddings: Path
    lm_dir: Path
    tokenizer_dir: Path
    lm_weight_format: str


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class StorageRecord:
    """A storage as the pickle declares it (``data/<key>`` of the archive, ``numel`` elements); not read yet."""

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """A tensor as the pickle declares it: a view (offset, shape, stride) of a `StorageRecord`; not read yet."""

    storage: StorageRecord
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    is_parameter: bool = False  # pickled as an `nn.Parameter`

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def end(self) -> int:
        """One past the last storage element the view uses (0 for an empty view)."""
        if not all(self.shape):
            return 0
        return self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))


def _check_no_hooks(hooks: Any) -> None:
    if hooks is None:
        return
    if not isinstance(hooks, dict) or len(hooks) != 0:
        raise ValueError("tensors with backward hooks are not supported")


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """Checked replacement for ``torch._utils._rebuild_tensor_v2``: a `TensorRecord`, nothing allocated."""
    if not isinstance(storage, StorageRecord):
        raise ValueError("a tensor must be rebuilt from a storage stored in the archive")
    if type(storage_offset) is not int or storage_offset < 0:
        raise ValueError(f"invalid tensor storage offset {storage_offset!r}")
    if not (_is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)):
        raise ValueError("invalid tensor size/stride")
    if not isinstance(requires_grad, bool):
        raise ValueError("invalid requires_grad flag")
    _check_no_hooks(backward_hooks)
    if metadata:
        raise ValueError("tensor metadata (conj/neg bits) is not supported")
    tensor = TensorRecord(storage, storage_offset, size, stride)
    if tensor.end > storage.numel:
        raise ValueError(f"tensor view of size {size} exceeds its storage of {storage.numel} elements")
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """Checked replacement for ``torch._utils._rebuild_parameter`` (a parameter is read as its tensor)."""
    if not isinstance(data, TensorRecord) or not isinstance(requires_grad, bool):
        raise ValueError("invalid parameter record")
    _check_no_hooks(backward_hooks)
    return dataclasses.replace(data, is_parameter=True)


_STORAGE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch", "BFloat16Storage"): _StorageType(torch.bfloat16),
    ("torch", "FloatStorage"): _StorageType(torch.float32),
    ("torch", "HalfStorage"): _StorageType(torch.float16),
}

_TENSOR_GLOBALS: dict[tuple[str, str], Any] = {
    **_STORAGE_GLOBALS,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): OrderedDict,
}

_PROJECTION_GLOBALS: dict[tuple[str, str], Any] = {
    **_TENSOR_GLOBALS,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("models", "VisualToGPTMapping"): ReleasedVisualToGPTMapping,
    ("__main__", "VisualToGPTMapping"): ReleasedVisualToGPTMapping,
    ("torch.nn.modules.transformer", "TransformerEncoderLayer"): PickledTransformerEncoderLayer,
    ("torch.nn.modules.activation", "MultiheadAttention"): PickledMultiheadAttention,
    ("torch.nn.modules.linear", "NonDynamicallyQuantizableLinear"): PickledNonDynamicallyQuantizableLinear,
    ("torch.nn.modules.linear", "Linear"): PickledLinear,
    ("torch.nn.modules.normalization", "LayerNorm"): PickledLayerNorm,
    ("torch.nn.modules.dropout", "Dropout"): PickledDropout,
    ("torch.nn.functional", "relu"): RELU,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
}

PROJECTION_ALLOWED_GLOBALS = tuple(f"{m}.{n}" for m, n in _PROJECTION_GLOBALS)
SPECIAL_EMBEDDINGS_ALLOWED_GLOBALS = tuple(f"{m}.{n}" for m, n in _TENSOR_GLOBALS)

_MISSING = object()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only allow-listed globals; storages are `StorageRecord`s, read later."""

    def __init__(self, file, *, source: Path, allowed: Mapping[tuple[str, str], Any], load_storage: Callable):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._allowed = allowed
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name), _MISSING)
        if obj is _MISSING:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle forbidden global '{module}.{name}' "
                f"(not in the allow-list for this file; nothing was executed)"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        return self._load_storage(pid)


# What a damaged or hostile archive raises from zipfile, zlib, pickle or our checks, reported as a ValueError.
_READ_ERRORS = (
    zipfile.BadZipFile, zlib.error, NotImplementedError, RecursionError, pickle.UnpicklingError, EOFError,
    OSError, TypeError, AttributeError, KeyError, IndexError, RuntimeError, struct.error, OverflowError,
    MemoryError, ValueError,
)  # fmt: skip


@contextlib.contextmanager
def _naming_errors(path: Path, doing: str):
    """Re-raise anything reading `path` fails with as a `ValueError` naming it (`UnsafePickleError` as is)."""
    try:
        yield
    except UnsafePickleError as error:
        if str(path) in str(error):
            raise
        raise UnsafePickleError(f"{path}: {error}") from None
    except _READ_ERRORS as error:
        if isinstance(error, ValueError) and str(error).startswith(str(path)):
            raise
        message = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
        raise ValueError(f"{path}: {doing}: {message}") from error


class TorchArchive:
    """
    A ``torch.save`` zip archive read in two checked steps: `unpickle` gives the object with `TensorRecord`s in place
    of tensors (no storage is read, no class is called); `read_tensors` then reads only the storages of the tensors
    the caller checked, each after its declared size is checked against those tensors and the zip entry.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: file not found")
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as error:
            raise ValueError(
                f"{self.path}: not a torch zip archive (torch.save format of torch >= 1.6); "
                f"legacy pickle files are not supported ({error})"
            ) from error
        with self._naming_errors("reading the archive"):
            self.names = set(self.zip.namelist())
            pickles = [n for n in self.names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError(f"{self.path}: expected one '<archive>/data.pkl' record, found {len(pickles)}")
            self.prefix = pickles[0][: -len("data.pkl")]
            if any(n.endswith("constants.pkl") for n in self.names):
                raise ValueError(f"{self.path}: TorchScript archives are not supported")
            self.byteorder = "little"
            if self.prefix + "byteorder" in self.names:
                self.byteorder = self._read(self.prefix + "byteorder", 16).decode("ascii", "replace").strip()
                if self.byteorder not in ("little", "big"):
                    raise ValueError(f"{self.path}: unknown byteorder record {self.byteorder!r}")
        self.storages: dict[str, StorageRecord] = {}

    def __enter__(self) -> "TorchArchive":
        return self

    def __exit__(self, *exc_info):
        self.zip.close()

    def _naming_errors(self, doing: str):
        return _naming_errors(self.path, doing)

    def _entry(self, name: str, max_bytes: int) -> zipfile.ZipInfo:
        """The zip entry `name`, refused before any byte is inflated if it holds more than `max_bytes` or is a bomb."""
        info = self.zip.getinfo(name)
        if info.file_size > max_bytes:
            raise ValueError(f"{self.path}: record {name!r} holds {info.file_size} bytes, expected at most {max_bytes}")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_INFLATION * max(info.compress_size, 1024):
            raise ValueError(
                f"{self.path}: record {name!r} inflates {info.compress_size} compressed bytes to {info.file_size} "
                f"(more than {MAX_INFLATION}x: refused as a decompression bomb; torch.save stores records uncompressed)"
            )
        return info

    def _read(self, name: str, max_bytes: int) -> bytes:
        return self.zip.read(self._entry(name, max_bytes))

    def _load_storage(self, pid: Any) -> StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise ValueError("unsupported persistent id in pickle")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise ValueError("persistent storage id without an allowed storage type")
        if not (isinstance(key, str) and key.isdigit()) or type(numel) is not int or numel < 0:
            raise ValueError("malformed persistent storage id")
        storage = StorageRecord(key, storage_type.dtype, numel)
        if self.storages.setdefault(key, storage) != storage:
            raise ValueError(f"storage {key!r} is referenced with inconsistent sizes or types")
        if f"{self.prefix}data/{key}" not in self.names:
            raise ValueError(f"storage record '{self.prefix}data/{key}' is missing from the archive")
        return storage

    def unpickle(self, allowed: Mapping[tuple[str, str], Any]) -> Any:
        """The pickled object, resolving only `allowed` globals; tensors are `TensorRecord`s."""
        with self._naming_errors("could not read pickled data"):
            data = self._read(f"{self.prefix}data.pkl", MAX_PICKLE_BYTES)
            unpickler = _RestrictedUnpickler(
                io.BytesIO(data), source=self.path, allowed=allowed, load_storage=self._load_storage
            )
            return unpickler.load()

    def read_tensors(self, tensors: Mapping[str, TensorRecord]) -> dict[str, torch.Tensor]:
        """
        The tensors of `tensors` (checked by the caller against the layout it expects), reading each storage they
        use once: its declared size must be what those views need, and its zip entry exactly that size.
        """
        needed: dict[str, int] = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, TensorRecord):
                raise ValueError(f"{self.path}: '{name}' is a {type(tensor).__name__}, not a tensor")
            needed[tensor.storage.key] = max(needed.get(tensor.storage.key, 0), tensor.end)
        data: dict[str, torch.UntypedStorage] = {}
        with self._naming_errors("could not read tensor data"):
            for key, elements in needed.items():
                storage = self.storages[key]
                if storage.numel > elements:
                    raise ValueError(
                        f"{self.path}: storage {key!r} declares {storage.numel} elements but its tensors use only "
                        f"{elements}; refusing to read the rest"
                    )
                data[key] = self._read_storage(storage)
        out = {}
        for name, tensor in tensors.items():
            empty = torch.empty((0,), dtype=tensor.dtype)
            out[name] = empty.set_(data[tensor.storage.key], tensor.offset, tensor.shape, tensor.stride)
        return out

    def _read_storage(self, storage: StorageRecord) -> torch.UntypedStorage:
        name = f"{self.prefix}data/{storage.key}"
        info = self._entry(name, storage.nbytes)
        if info.file_size != storage.nbytes:
            raise ValueError(
                f"{self.path}: storage record {name!r} holds {info.file_size} bytes, expected {storage.nbytes}"
            )
        buffer = torch.empty(storage.nbytes, dtype=torch.uint8)
        view = buffer.numpy()
        position = 0
        with self.zip.open(info) as file:  # in chunks: nothing beyond the storage itself is held
            while position < storage.nbytes:
                chunk = file.read(min(READ_CHUNK_BYTES, storage.nbytes - position))
                if not chunk:
                    raise ValueError(f"{self.path}: storage record {name!r} ends after {position} bytes")
                view[position : position + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                position += len(chunk)
            file.read(1)  # reaching the end checks the CRC
        untyped = buffer.untyped_storage()
        if self.byteorder != sys.byteorder:
            untyped.byteswap(storage.dtype)
        return untyped


def _plain_attr(obj: Any, name: str, types: type | tuple[type, ...], path: Path, where: str) -> Any:
    types = types if isinstance(types, tuple) else (types,)
    value = vars(obj).get(name, _MISSING)
    if value is _MISSING:
        raise ValueError(f"{path}: {where} has no attribute '{name}'")
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ValueError(f"{path}: {where}.{name} has unexpected type {type(value).__name__}")
    return value


def _child(module: PickledModule, name: str, cls: type, path: Path, where: str) -> PickledModule:
    child = vars(module).get("_modules", {}).get(name)
    if not isinstance(child, cls):
        found = "nothing" if child is None else type(child).__name__
        raise ValueError(f"{path}: expected {where}.{name} to be a {cls.__name__}, found {found}")
    return child


def collect_tensor_records(module: PickledModule, path: Path) -> dict[str, TensorRecord]:
    """The module tree's tensors with the keys and order of ``module.state_dict()``, at most `MAX_MODULE_DEPTH` deep."""
    out: dict[str, TensorRecord] = OrderedDict()
    seen: set[int] = set()
    pending: list[tuple[Any, str]] = [(module, "")]
    while pending:
        mod, prefix = pending.pop()
        if not isinstance(mod, PickledModule):
            raise ValueError(f"{path}: '{prefix[:-1]}' is a {type(mod).__name__}, not a torch module")
        if id(mod) in seen:
            raise ValueError(f"{path}: module '{prefix[:-1]}' appears more than once")
        if prefix.count(".") > MAX_MODULE_DEPTH:
            raise ValueError(f"{path}: modules nested more than {MAX_MODULE_DEPTH} deep, at '{prefix[:80]}...'")
        seen.add(id(mod))
        attrs = vars(mod)
        params, buffers, children = (attrs.get(k, {}) for k in ("_parameters", "_buffers", "_modules"))
        skipped = attrs.get("_non_persistent_buffers_set", set())
        if not all(isinstance(d, dict) for d in (params, buffers, children)) or not isinstance(skipped, set):
            raise ValueError(f"{path}: module '{prefix[:-1]}' has malformed internal state")
        for kind, tensors in (("parameter", params), ("buffer", buffers)):
            for name, tensor in tensors.items():
                if tensor is None or (kind == "buffer" and name in skipped):
                    continue
                if not isinstance(tensor, TensorRecord):
                    raise ValueError(f"{path}: {kind} '{prefix}{name}' is a {type(tensor).__name__}")
                out[prefix + name] = tensor
        # depth first in declaration order, as state_dict() visits them
        pending.extend((child, f"{prefix}{name}.") for name, child in reversed(children.items()) if child is not None)
    return out


def _check_projection_shapes(state_dict: Mapping[str, TensorRecord], path: Path) -> tuple[int, int, int]:
    weight = state_dict["linear.weight"]
    if weight.dim() != 2:
        raise ValueError(f"{path}: linear.weight must be 2-D, found shape {tuple(weight.shape)}")
    text, vision = weight.shape
    ffn = state_dict["transformer_layer.linear1.weight"].shape[0]
    expected = {
        "transformer_layer.self_attn.in_proj_weight": (3 * vision, vision),
        "transformer_layer.self_attn.in_proj_bias": (3 * vision,),
        "transformer_layer.self_attn.out_proj.weight": (vision, vision),
        "transformer_layer.self_attn.out_proj.bias": (vision,),
        "transformer_layer.linear1.weight": (ffn, vision),
        "transformer_layer.linear1.bias": (ffn,),
        "transformer_layer.linear2.weight": (vision, ffn),
        "transformer_layer.linear2.bias": (vision,),
        "transformer_layer.norm1.weight": (vision,),
        "transformer_layer.norm1.bias": (vision,),
        "transformer_layer.norm2.weight": (vision,),
        "transformer_layer.norm2.bias": (vision,),
        "linear.bias": (text,),
    }
    for key, shape in expected.items():
        found = tuple(state_dict[key].shape)
        if found != shape:
            raise ValueError(f"{path}: '{key}' has shape {found}, expected {shape}")
    return vision, text, ffn


def read_projection(
    path: str | Path, vision_hidden_size: int | None = None, text_hidden_size: int | None = None
) -> ReleasedProjection:
    """
    Safely read a released ``projection``/``projection.pt`` adapter and its hyper-parameters. Given the widths it must
    have (the vision tower's and the LM's hidden sizes), a file declaring other shapes is refused before any of its
    weights is read.
    """
    path = Path(path)
    with TorchArchive(path) as archive:
        root = archive.unpickle(_PROJECTION_GLOBALS)
        if not isinstance(root, ReleasedVisualToGPTMapping):
            raise ValueError(
                f"{path}: expected a pickled models.VisualToGPTMapping module, found {type(root).__name__}"
            )
        records = collect_tensor_records(root, path)
        missing = [k for k in PROJECTION_KEYS if k not in records]
        unexpected = [k for k in records if k not in PROJECTION_KEYS]
        if missing or unexpected:
            details = []
            if missing:
                details.append(f"missing keys {missing}")
            if unexpected:
                details.append(f"unexpected keys {unexpected}")
            raise ValueError(f"{path}: not a single-encoder transformer adapter: {'; '.join(details)}")
        dtypes = {t.dtype for t in records.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(
                f"{path}: expected one floating point dtype for all weights, found {sorted(map(str, dtypes))}"
            )
        vision, text, ffn = _check_projection_shapes(records, path)
        expected = (text_hidden_size or text, vision_hidden_size or vision)
        if (text, vision) != expected:
            raise ValueError(f"{path}: adapter 'linear.weight' has shape {(text, vision)}, expected {expected}")
        hyper_parameters = _projection_hyper_parameters(root, vision, text, path)
        state_dict = archive.read_tensors(records)
    return ReleasedProjection(
        state_dict=state_dict,
        vision_hidden_size=vision,
        text_hidden_size=text,
        ffn_dim=ffn,
        dtype=next(iter(dtypes)),
        **hyper_parameters,
    )


def _projection_hyper_parameters(root: PickledModule, vision: int, text: int, path: Path) -> dict[str, Any]:
    """The adapter's plain attributes (heads, norms, dropout, activation), checked."""
    where = "VisualToGPTMapping"
    layer = _child(root, "transformer_layer", PickledTransformerEncoderLayer, path, where)
    _child(root, "linear", PickledLinear, path, where)
    lwhere = f"{where}.transformer_layer"
    attn = _child(layer, "self_attn", PickledMultiheadAttention, path, lwhere)
    dropout = _child(layer, "dropout", PickledDropout, path, lwhere)
    norm1 = _child(layer, "norm1", PickledLayerNorm, path, lwhere)
    norm2 = _child(layer, "norm2", PickledLayerNorm, path, lwhere)

    num_heads = _plain_attr(attn, "num_heads", int, path, f"{lwhere}.self_attn")
    if num_heads <= 0 or vision % num_heads:
        raise ValueError(f"{path}: num_heads={num_heads} does not divide the vision hidden size {vision}")
    batch_first = _plain_attr(attn, "batch_first", bool, path, f"{lwhere}.self_attn")
    norm_first = _plain_attr(layer, "norm_first", bool, path, lwhere)
    activation = vars(layer).get("activation", RELU)  # torch before 1.12 pickled no activation: relu
    if activation is not RELU:
        raise ValueError(f"{path}: unsupported adapter activation {activation!r:.80}")
    eps1 = _plain_attr(norm1, "eps", float, path, f"{lwhere}.norm1")
    eps2 = _plain_attr(norm2, "eps", float, path, f"{lwhere}.norm2")
    if eps1 != eps2:
        raise ValueError(f"{path}: norm1.eps={eps1} differs from norm2.eps={eps2}")
    p = _plain_attr(dropout, "p", (float, int), path, f"{lwhere}.dropout")

    num_image_tokens = vars(root).get("n_embeddings")
    if num_image_tokens is not None and (type(num_image_tokens) is not int or num_image_tokens <= 0):
        raise ValueError(f"{path}: invalid n_embeddings {num_image_tokens!r:.80}")
    embedding_dim = vars(root).get("embedding_dim")
    if embedding_dim is not None and embedding_dim != text:
        raise ValueError(f"{path}: embedding_dim={embedding_dim!r:.80} differs from linear output size {text}")
    return {
        "num_heads": num_heads,
        "dropout": float(p),
        "activation_name": "relu",
        "layer_norm_eps": eps1,
        "norm_first": norm_first,
        "num_image_tokens": num_image_tokens,
        "batch_first": batch_first,
    }


def load_projection(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's state dict (stored dtype) read safely from a released projection file."""
    return read_projection(path).state_dict


def read_special_embeddings(path: str | Path, hidden_size: int | None = None) -> dict[str, torch.Tensor]:
    """
    Safely read ``special_embeddings.pt``: exactly USER, BOT, SOI, EOI, each a 1-D tensor (of `hidden_size`, if
    given, checked before any of them is read).
    """
    path = Path(path)
    with TorchArchive(path) as archive:
        data = archive.unpickle(_TENSOR_GLOBALS)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
        missing = [k for k in SPECIAL_EMBEDDING_KEYS if k not in data]
        unexpected = [k for k in data if k not in SPECIAL_EMBEDDING_KEYS]
        expected_keys = list(SPECIAL_EMBEDDING_KEYS)
        if missing:
            raise ValueError(f"{path}: missing special embedding key(s) {missing}; expected {expected_keys}")
        if unexpected:
            raise ValueError(
                f"{path}: unexpected special embedding key(s) {unexpected!s:.200}; expected {expected_keys}"
            )
        records: dict[str, TensorRecord] = OrderedDict()
        for key in SPECIAL_EMBEDDING_KEYS:
            value = data[key]
            if not isinstance(value, TensorRecord) or not value.is_floating_point():
                raise ValueError(f"{path}: special embedding '{key}' is not a floating point tensor")
            expected = (hidden_size,) if hidden_size is not None else value.shape[:1] if value.dim() == 1 else None
            if expected is None or value.shape != expected:
                wanted = f"({hidden_size},)" if hidden_size is not None else "a 1-D shape"
                raise ValueError(f"{path}: special embedding '{key}' has shape {value.shape}, expected {wanted}")
            records[key] = value
        shapes = {v.shape for v in records.values()}
        dtypes = {v.dtype for v in records.values()}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ValueError(
                f"{path}: special embeddings disagree in shape/dtype: "
                + ", ".join(f"{k}={v.shape}/{v.dtype}" for k, v in records.items())
            )
        return archive.read_tensors(records)


_LAYOUTS = {
    "1.1": {"projection": "projection.pt", "lm": "tuned-model", "tokenizer": "tokenizer"},
    "1.0": {"projection": "projection", "lm": "OmniMistral-model", "tokenizer": "OmniMistral-tokenizer"},
}
_V11_SUBDIR = "OmniMistral-v1_1"
_WEIGHT_FILES = (
    ("safetensors", "model.safetensors.index.json", "model.safetensors"),
    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def _layout_score(root: Path, version: str) -> int:
    names = _LAYOUTS[version]
    return (root / names["projection"]).is_file() + (root / names["lm"]).is_dir() + (root / names["tokenizer"]).is_dir()


def _describe(version: str) -> str:
    names = _LAYOUTS[version]
    return f"v{version}: {names['projection']}, special_embeddings.pt, {names['lm']}/, {names['tokenizer']}/"


def _lm_weights(lm_dir: Path, problems: list[str]) -> str:
    for fmt, index_name, single_name in _WEIGHT_FILES:
        index = lm_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"{index} is not a valid weight index ({exc})")
                return fmt
            for shard in sorted(set(weight_map.values())):
                if not (lm_dir / shard).is_file():
                    problems.append(f"shard {lm_dir / shard} listed in {index.name}")
            return fmt
        if (lm_dir / single_name).is_file():
            return fmt
    problems.append(f"LM weights in {lm_dir} (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")
    return ""


def find_released_layout(input_dir: str | Path, version: str | None = None) -> ReleasedLayout:
    """Locate the pieces of a released v1.0 (repo root) or v1.1 (``OmniMistral-v1_1``) checkpoint."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: checkpoint directory not found")
    if version is not None and version not in _LAYOUTS:
        raise ValueError(f"unknown released version {version!r}; expected one of {sorted(_LAYOUTS)}")
    if version in (None, "1.1") and _layout_score(root, "1.1") == 0 and (root / _V11_SUBDIR).is_dir():
        if version == "1.1" or _layout_score(root, "1.0") == 0:
            root, version = root / _V11_SUBDIR, "1.1"
    if version is None:
        scores = {v: _layout_score(root, v) for v in _LAYOUTS}
        if max(scores.values()) == 0:
            raise FileNotFoundError(
                f"{root}: no released OmniFusion checkpoint found; expected "
                + " or ".join(_describe(v) for v in ("1.1", "1.0"))
            )
        if scores["1.0"] == scores["1.1"]:
            raise ValueError(f"{root}: ambiguous layout (files of both v1.0 and v1.1); pass version=")
        version = max(scores, key=scores.get)
    names = _LAYOUTS[version]
    projection = root / names["projection"]
    special = root / "special_embeddings.pt"
    lm_dir = root / names["lm"]
    tokenizer_dir = root / names["tokenizer"]
    problems: list[str] = []
    if not projection.is_file():
        problems.append(f"adapter file {projection}")
    if not special.is_file():
        problems.append(f"special embeddings file {special}")
    weight_format = ""
    if not lm_dir.is_dir():
        problems.append(f"language model folder {lm_dir}/")
    else:
        if not (lm_dir / "config.json").is_file():
            problems.append(f"LM config {lm_dir / 'config.json'}")
        weight_format = _lm_weights(lm_dir, problems)
    if not tokenizer_dir.is_dir():
        problems.append(f"tokenizer folder {tokenizer_dir}/")
    elif not ((tokenizer_dir / "tokenizer.model").is_file() or (tokenizer_dir / "tokenizer.json").is_file()):
        problems.append(f"tokenizer file {tokenizer_dir / 'tokenizer.model'}")
    if problems:
        raise FileNotFoundError(f"{root}: incomplete v{version} OmniFusion checkpoint; missing: " + "; ".join(problems))
    return ReleasedLayout(
        version=version,
        root=root,
        projection=projection,
        special_embeddings=special,
        lm_dir=lm_dir,
        tokenizer_dir=tokenizer_dir,
        lm_weight_format=weight_format,
    )


# --------------------------------------------------------------------------------------------------------------------
# Structure report and the encoders-mix adapter
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StructureEntry:
    """One thing found in an unpickled adapter: a module, a tensor, a list or a plain attribute."""

    path: str
    kind: str  # "module", "parameter", "buffer", "tensor", "list", "attribute"
    type_name: str
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    value: Any = None
    tensor: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    record: TensorRecord | None = dataclasses.field(default=None, repr=False, compare=False)  # before it is read

    def describe(self) -> str:
        if self.shape is not None:
            return f"{self.path}: {self.kind} {list(self.shape)} {str(self.dtype).removeprefix('torch.')}"
        if self.kind == "attribute":
            return f"{self.path}: {self.type_name} = {self.value!r}"
        return f"{self.path or '<root>'}: {self.kind} {self.type_name}"


_SCALARS = (int, float, bool, str, type(None))


def _walk_structure(value: Any, path: str, entries: list[StructureEntry], seen: set[int], depth: int = 0) -> None:
    if depth > 16:
        raise ValueError(f"'{path}' is nested more than 16 levels deep")
    if isinstance(value, PickledModule):
        if id(value) in seen:
            raise ValueError(f"module '{path}' appears more than once")
        seen.add(id(value))
        entries.append(StructureEntry(path, "module", type(value).__name__))
        attrs = vars(value)
        prefix = f"{path}." if path else ""
        for kind, key in (("parameter", "_parameters"), ("buffer", "_buffers")):
            for name, tensor in (attrs.get(key) or {}).items():
                if isinstance(tensor, TensorRecord):
                    entries.append(
                        StructureEntry(prefix + name, kind, "Tensor", tensor.shape, tensor.dtype, record=tensor)
                    )
        for name, child in (attrs.get("_modules") or {}).items():
            if child is not None:
                _walk_structure(child, prefix + name, entries, seen, depth + 1)
        for name, item in attrs.items():
            if not name.startswith("_") and name != "training":
                _walk_structure(item, prefix + name, entries, seen, depth + 1)
    elif isinstance(value, TensorRecord):
        kind = "parameter" if value.is_parameter else "tensor"
        entries.append(StructureEntry(path, kind, "Tensor", value.shape, value.dtype, record=value))
    elif isinstance(value, (list, tuple)):
        entries.append(StructureEntry(path, "list", f"{type(value).__name__}[{len(value)}]"))
        for index, item in enumerate(value):
            _walk_structure(item, f"{path}[{index}]", entries, seen, depth + 1)
    elif isinstance(value, dict):
        entries.append(StructureEntry(path, "list", f"dict[{len(value)}]"))
        for key, item in value.items():
            _walk_structure(item, f"{path}[{key!r}]", entries, seen, depth + 1)
    elif isinstance(value, _SCALARS):
        entries.append(StructureEntry(path, "attribute", type(value).__name__, value=value))
    else:  # functions and other allow-listed objects, named but never called
        name = value.name.rsplit(".", 1)[1] if isinstance(value, _Reference) else getattr(value, "__name__", None)
        entries.append(StructureEntry(path, "attribute", type(value).__name__, value=name))


def describe_projection_structure(path: str | Path, read_tensors: bool = False) -> list[StructureEntry]:
    """
    What a released adapter pickle holds, read through the same allow-list unpickler as `read_projection` (nothing
    in it runs): every submodule (direct, in a plain list or dict), parameter and tensor with its shape and dtype,
    and every plain attribute with its value, in the order the pickle stores them. With `read_tensors`, each tensor
    entry also holds its data (`TorchArchive.read_tensors`: at most what the file stores); without, none is read.
    """
    path = Path(path)
    with TorchArchive(path) as archive:
        root = archive.unpickle(_PROJECTION_GLOBALS)
        if not isinstance(root, ReleasedVisualToGPTMapping):
            raise ValueError(
                f"{path}: expected a pickled models.VisualToGPTMapping module, found {type(root).__name__}"
            )
        entries: list[StructureEntry] = []
        try:
            _walk_structure(root, "", entries, set())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if read_tensors:
            tensors = archive.read_tensors({e.path: e.record for e in entries if e.record is not None})
            entries = [dataclasses.replace(e, tensor=tensors[e.path]) if e.record is not None else e for e in entries]
    return entries


_LEAF_MODULES = ("Linear", "LayerNorm", "NonDynamicallyQuantizableLinear", "Dropout")


def format_structure(entries: list[StructureEntry], limit: int = 40) -> str:
    """
    The structure report as indented lines: one per module (a Linear or LayerNorm with its tensors' shapes and
    dtype on the same line), tensor and plain attribute; runs differing only in one number are folded
    (`clip_norm_{0..24}: LayerNorm weight [1024], bias [1024] bfloat16`).
    """
    leaves = {e.path for e in entries if e.kind == "module" and e.type_name in _LEAF_MODULES}
    lines = []
    for entry in entries:
        owner = entry.path.rsplit(".", 1)[0] if "." in entry.path else None
        if owner in leaves:
            continue
        if entry.path in leaves:
            tensors = [e for e in entries if e.path.startswith(entry.path + ".") and e.shape is not None]
            shapes = ", ".join(f"{e.path.rsplit('.', 1)[1]} {list(e.shape)}" for e in tensors)
            dtypes = sorted({str(e.dtype).removeprefix("torch.") for e in tensors})
            lines.append(f"{entry.path}: {entry.type_name} {shapes} {'/'.join(dtypes)}".rstrip())
        else:
            lines.append(entry.describe())
    folded: dict[str, list] = {}  # template (or the line itself) -> [first line, numbers], in order of appearance
    for line in lines:
        name = line.split(":", 1)[0]
        match = re.search(r"(\d+)(?=\D*$)", name)
        if match is None:
            folded[line] = [line, []]
            continue
        template = line.replace(name, name[: match.start()] + "{N}" + name[match.end() :], 1)
        folded.setdefault(template, [line, []])[1].append(int(match.group(1)))
    out = [
        template.replace("{N}", "{" + f"{min(numbers)}..{max(numbers)}" + "}", 1) if len(numbers) > 1 else line
        for template, (line, numbers) in folded.items()
    ]
    if len(out) > limit:
        out = out[:limit] + [f"... ({len(out) - limit} more)"]
    return "\n  ".join([""] + out)


@dataclasses.dataclass(frozen=True)
class ReleasedMixProjection:
    """A released encoders-mix adapter mapped onto `OmniFusionMixSumAdapter`'s parameter names."""

    state_dict: dict[str, torch.Tensor]
    width: int
    text_hidden_size: int
    layer_norm_eps: float
    dtype: torch.dtype
    num_image_tokens: int | None
    groups: tuple[str, ...]  # the released attribute groups, per encoder: norms, projections, coefficients


def _is_a(entry: StructureEntry, kind: str) -> bool:
    """`entry` is a module of `kind` ("Linear", "LayerNorm"), by class name (torch's or an allow-list stand-in's)."""
    if entry.kind != "module":
        return False
    if kind == "Linear":
        return entry.type_name.endswith("Linear") and "Quantizable" not in entry.type_name
    return kind in entry.type_name


def _indexed_groups(entries: list[StructureEntry], kind: str) -> dict[str, dict[int, str]]:
    """Paths of `kind` modules grouped by their path without its last number (`clip_norm_3` -> `clip_norm_`)."""
    groups: dict[str, dict[int, str]] = {}
    for entry in entries:
        if _is_a(entry, kind):
            match = re.fullmatch(r"(.*?)(\d+)\]?", entry.path)
            key, index = (match.group(1), int(match.group(2))) if match else (entry.path, -1)
            groups.setdefault(key, {})[index] = entry.path
    return groups


def _encoder_hint(model_type: str) -> str:
    return "dino" if model_type.startswith("dinov2") else model_type.split("_")[0]


def read_mix_projection(
    path: str | Path, encoders: list[tuple[str, int, int]], text_hidden_size: int
) -> ReleasedMixProjection:
    """
    Map a released encoders-mix adapter onto the mix_sum adapter, or raise a `ValueError` listing what was found and
    what was expected.

    `encoders`: per vision encoder in config order, `(model_type, num_hidden_states, hidden_size)`. The adapter fits
    when it holds exactly, per encoder, `num_hidden_states` LayerNorm(hidden) and Linear(hidden, width) (numbered
    attributes or plain lists) and one trainable coefficient per hidden state, plus one Linear(width,
    text_hidden_size). Groups are matched to encoders by name (`clip...`, `dino...`) where the names say it, else in
    pickle order; the shapes must agree either way.
    """
    path = Path(path)
    entries = describe_projection_structure(path, read_tensors=True)
    tensors = {e.path: e.tensor for e in entries if e.tensor is not None}
    values = {e.path: e.value for e in entries if e.kind == "attribute"}

    def shape(name: str) -> tuple[int, ...] | None:
        return tuple(tensors[name].shape) if name in tensors else None

    width = None
    finals = [
        e
        for e in entries
        if _is_a(e, "Linear")
        and not any(ch.isdigit() for ch in e.path)
        and (shape(e.path + ".weight") or (0,))[0] == text_hidden_size
    ]
    if len(finals) == 1:
        width = shape(finals[0].path + ".weight")[1]
    expected = (
        "".join(
            f"\n  encoder {i} ({model_type}): {layers} x LayerNorm({hidden}), {layers} x Linear({hidden}, W), "
            f"{layers} coefficients"
            for i, (model_type, layers, hidden) in enumerate(encoders)
        )
        + f"\n  and one Linear(W, {text_hidden_size}) (W = {width if width is not None else 'any width'})"
    )

    def misfit(reason: str) -> ValueError:
        return ValueError(
            f"{path}: the adapter does not fit the mix_sum (projection & summation) adapter: {reason}.\n"
            f"Expected:{expected}\nFound:{format_structure(entries)}"
        )

    if width is None:
        raise misfit(f"expected one final Linear(W, {text_hidden_size}), found {len(finals)}")
    norm_groups = _indexed_groups(entries, "LayerNorm")
    linear_groups = {k: v for k, v in _indexed_groups(entries, "Linear").items() if -1 not in v}
    coefficients = [
        e
        for e in entries
        if e.kind in ("parameter", "tensor")
        and e.tensor.is_floating_point()
        and e.tensor.squeeze().dim() == 1
        and not any(
            e.path.startswith(m.path + ".") for m in entries if m.path and (_is_a(m, "Linear") or _is_a(m, "LayerNorm"))
        )
        and e.path.rsplit(".", 1)[0] not in {f.path for f in finals}
    ]
    if not (len(norm_groups) == len(linear_groups) == len(coefficients) == len(encoders)):
        raise misfit(
            f"expected {len(encoders)} groups each of LayerNorms, Linears and coefficients, found "
            f"{len(norm_groups)}, {len(linear_groups)} and {len(coefficients)}"
        )

    def order(keys: list[str]) -> list[str]:
        hints = [_encoder_hint(model_type) for model_type, _, _ in encoders]
        by_name = [[k for k in keys if hint in k.lower()] for hint in hints]
        if len(set(hints)) == len(hints) and all(len(m) == 1 for m in by_name):
            return [m[0] for m in by_name]
        return keys  # pickle order

    norm_keys = order(list(norm_groups))
    linear_keys = order(list(linear_groups))
    coefficient_keys = order([e.path for e in coefficients])
    coefficient_by_path = {e.path: e.tensor.squeeze() for e in coefficients}
    state_dict: dict[str, torch.Tensor] = {}
    eps_values = set()
    for index, ((model_type, layers, hidden), norm_key, linear_key, coefficient_key) in enumerate(
        zip(encoders, norm_keys, linear_keys, coefficient_keys)
    ):
        norms, linears = norm_groups[norm_key], linear_groups[linear_key]
        coefficient = coefficient_by_path[coefficient_key]
        if (
            sorted(norms) != list(range(layers))
            or sorted(linears) != list(range(layers))
            or coefficient.numel() != layers
        ):
            raise misfit(
                f"encoder {index} ({model_type}) has {layers} hidden states but '{norm_key}' holds {len(norms)} "
                f"LayerNorms, '{linear_key}' {len(linears)} Linears and '{coefficient_key}' {coefficient.numel()} "
                "coefficients"
            )
        for layer in range(layers):
            norm, linear = norms[layer], linears[layer]
            found = {
                name: shape(f"{module}.{name.split('.')[1]}")
                for name, module in (
                    ("norm.weight", norm),
                    ("norm.bias", norm),
                    ("linear.weight", linear),
                    ("linear.bias", linear),
                )
            }
            wanted = {
                "norm.weight": (hidden,),
                "norm.bias": (hidden,),
                "linear.weight": (width, hidden),
                "linear.bias": (width,),
            }
            if found != wanted:
                raise misfit(
                    f"encoder {index} ({model_type}) layer {layer}: '{norm}' and '{linear}' hold "
                    + ", ".join(f"{k} {list(v) if v else None}" for k, v in found.items())
                    + "; expected "
                    + ", ".join(f"{k} {list(v)}" for k, v in wanted.items())
                )
            prefix = f"encoder_mixes.{index}"
            state_dict[f"{prefix}.layer_norms.{layer}.weight"] = tensors[f"{norm}.weight"]
            state_dict[f"{prefix}.layer_norms.{layer}.bias"] = tensors[f"{norm}.bias"]
            state_dict[f"{prefix}.layer_projections.{layer}.weight"] = tensors[f"{linear}.weight"]
            state_dict[f"{prefix}.layer_projections.{layer}.bias"] = tensors[f"{linear}.bias"]
            eps = values.get(f"{norm}.eps", 1e-5)
            if not isinstance(eps, (int, float)) or isinstance(eps, bool):
                raise misfit(f"'{norm}.eps' is {eps!r}, not a number")
            eps_values.add(float(eps))
        state_dict[f"encoder_mixes.{index}.layer_weights"] = coefficient.detach()
    final = finals[0].path
    if shape(f"{final}.bias") != (text_hidden_size,):
        raise misfit(f"the final Linear '{final}' has bias {shape(final + '.bias')}, expected [{text_hidden_size}]")
    state_dict["linear.weight"], state_dict["linear.bias"] = tensors[f"{final}.weight"], tensors[f"{final}.bias"]
    modules = {e.path for e in entries if e.kind == "module" and e.path}
    used = set(norm_keys) | set(linear_keys)
    unused = sorted(
        m
        for m in modules
        if m != finals[0].path and not any(m.startswith(k) and m[len(k) :].rstrip("]").isdigit() for k in used)
    )
    if unused:
        raise misfit(f"modules {unused} have no place in the mix_sum adapter")
    if len(eps_values) != 1:
        raise misfit(f"the LayerNorms use different eps values {sorted(eps_values)}")
    dtypes = {t.dtype for t in state_dict.values()}
    if len(dtypes) != 1:
        raise misfit(f"the weights mix dtypes {sorted(map(str, dtypes))}")
    num_image_tokens = next((e.value for e in entries if e.path == "n_embeddings" and e.kind == "attribute"), None)
    return ReleasedMixProjection(
        state_dict=state_dict,
        width=width,
        text_hidden_size=text_hidden_size,
        layer_norm_eps=eps_values.pop(),
        dtype=dtypes.pop(),
        num_image_tokens=num_image_tokens if type(num_image_tokens) is int else None,
        groups=tuple(f"{n} / {m} / {c}" for n, m, c in zip(norm_keys, linear_keys, coefficient_keys)),
    )
