"""Static checks of weights files, without torch and without unpickling.

The API runs these at submission so that a file the worker would reject is
rejected with a 422 at once. A torch checkpoint is a pickle (inside a zip
archive as ``<archive>/data.pkl`` since torch 1.6, or a sequence of pickles
in the older format). Its opcodes are read with ``pickletools``, never
executed, and every class or function it names must be one that torch's
``weights_only=True`` loader allows. A pickled model object names its module
classes (``torch.nn.modules.conv.Conv2d``, the user's own classes) and is
rejected. A safetensors file must start with a readable JSON header.

The worker still loads every file with ``weights_only=True`` or safetensors,
so these checks only move the rejection earlier.
"""

from __future__ import annotations

import _compat_pickle
import json
import pickletools
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

ACCEPTED_FORMATS = (
    "accepted formats: a state dict saved with torch.save(model.state_dict()) "
    "(.pt, .pth; loaded with weights_only=True) or a .safetensors file"
)

# The first pickle of the older torch.save format, the default before torch 1.6.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
# The older format contains five pickles (magic number, protocol version,
# system information, the object and its storage keys), then the raw data.
LEGACY_PICKLES = 5
# A state dict's pickle contains names and shapes only, because the tensor
# data is stored beside it: 115 KB for torchvision's resnet152 (torch 2.14.1).
# The cap bounds the scan's work on a hostile archive.
MAX_PICKLE_BYTES = 64 * 2**20
# The safetensors library rejects longer headers (checked with safetensors 0.8.0).
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000

# The opcodes torch's weights_only unpickler executes (torch 2.14.1,
# torch/_weights_only_unpickler.py); it raises on every other opcode.
SUPPORTED_OPCODES = frozenset(
    {
        "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM",
        "SETITEMS", "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE",
        "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT",
        "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE",
        "SHORT_BINSTRING", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT",
        "LONG_BINPUT", "LONG1", "PROTO", "STOP",
    }
)  # fmt: skip


def _allowed_globals() -> frozenset[str]:
    """Return the names torch's weights_only loader allows by default.

    Matches ``torch._weights_only_unpickler._get_allowed_globals()`` of torch
    2.14.1; a test compares the two with the installed torch.
    """
    elements = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half")
    elements += ("Int", "Long", "Short")
    storages = elements + ("ComplexDouble", "ComplexFloat")
    quantized = ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")
    dtypes = [
        "bcomplex32", "bfloat16", "bits16", "bits1x8", "bits2x4", "bits4x2",
        "bits8", "bool", "complex128", "complex32", "complex64", "float16",
        "float32", "float4_e2m1fn_x2", "float64", "float8_e4m3fn",
        "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "qint32", "qint8", "quint2x4", "quint4x2", "quint8",
        "per_channel_affine", "per_channel_affine_float_qparams",
        "per_channel_symmetric", "per_tensor_affine", "per_tensor_symmetric",
    ]  # fmt: skip
    for bits in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64):
        dtypes += [f"int{bits}", f"uint{bits}"]
    rebuilds = (
        "device_tensor_from_cpu_tensor", "device_tensor_from_numpy",
        "meta_tensor_no_storage", "nested_tensor", "parameter",
        "parameter_with_state", "qtensor", "sparse_tensor", "tensor",
        "tensor_v2", "tensor_v3", "wrapper_subclass",
    )  # fmt: skip
    names = {
        "_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set",
        "collections.Counter", "collections.OrderedDict", "torch.Size",
        "torch.Tensor", "torch.device", "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout", "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage", "torch._tensor._rebuild_from_type_v2",
    }  # fmt: skip
    names.update(f"torch.{name}" for name in dtypes)
    names.update(f"torch._utils._rebuild_{name}" for name in rebuilds)
    names.update(f"torch.{name}Storage" for name in storages + quantized)
    names.update(f"torch.cuda.{name}Storage" for name in storages)
    for module in ("torch", "torch.cuda"):
        names.update(f"{module}.{name}Tensor" for name in elements)
    for module in ("torch.sparse", "torch.cuda.sparse"):
        names.update(f"{module}.{name}Tensor" for name in elements if name != "Bool")
    return frozenset(names)


ALLOWED_GLOBALS = _allowed_globals()


class RejectedWeights(Exception):
    """A weights file that cannot be loaded without running code, or at all."""


def scan_weights_file(path: Path) -> str | None:
    """Check a weights file without loading it; return why it is rejected, or None.

    Reads the pickle opcodes of a torch file, or the header of a
    ``.safetensors`` file. Never imports torch and never unpickles.
    """
    try:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        elif zipfile.is_zipfile(path):
            _check_archive(path)
        else:
            _check_legacy(path)
    except RejectedWeights as error:
        return str(error)
    except OSError as error:
        return f"the file cannot be read ({error.strerror or type(error).__name__})"
    return None


def _check_safetensors(path: Path) -> None:
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise RejectedWeights("not a safetensors file: shorter than its header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_SAFETENSORS_HEADER_BYTES, path.stat().st_size - 8):
            raise RejectedWeights("not a safetensors file: invalid header length")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RejectedWeights("not a safetensors file: invalid header") from None
    if not isinstance(header, dict):
        raise RejectedWeights("not a safetensors file: invalid header")


def _check_archive(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(_in_record(name, "constants.pkl") for name in names):
            raise RejectedWeights(
                "a TorchScript archive (torch.jit.save) contains code, not only weights"
            )
        pickles = [name for name in names if _in_record(name, "data.pkl")]
        if not pickles:
            raise RejectedWeights("a zip archive without the data.pkl of torch.save")
        for name in pickles:
            if archive.getinfo(name).file_size > MAX_PICKLE_BYTES:
                raise RejectedWeights(f"{name} is over {MAX_PICKLE_BYTES} bytes")
            with archive.open(name) as file:
                _check_pickle(file)


def _in_record(name: str, file_name: str) -> bool:
    # torch.save writes every entry into one top folder, "<record>/data.pkl".
    parts = name.split("/")
    return len(parts) == 2 and parts[1] == file_name


def _check_legacy(path: Path) -> None:
    with path.open("rb") as file:
        magic = _first_long(file)
        if magic != LEGACY_MAGIC_NUMBER:
            raise RejectedWeights(
                "not a torch checkpoint: neither a zip archive nor the older format"
            )
        file.seek(0)
        for _ in range(LEGACY_PICKLES):
            _check_pickle(file)
            if file.tell() > MAX_PICKLE_BYTES:
                raise RejectedWeights(f"the pickles are over {MAX_PICKLE_BYTES} bytes")


def _first_long(file: IO[bytes]) -> int | None:
    try:
        for opcode, argument, _ in pickletools.genops(file):
            if opcode.name == "LONG1":
                return argument
            if opcode.name not in ("PROTO", "FRAME"):
                return None
    except (ValueError, EOFError):
        return None
    return None


def _check_pickle(file: IO[bytes]) -> None:
    """Raise RejectedWeights for an opcode or a global weights_only refuses."""
    for opcode, argument in _opcodes(file):
        if opcode not in SUPPORTED_OPCODES:
            raise RejectedWeights(
                f"the pickle uses the opcode {opcode}, which weights_only "
                "loading does not execute"
            )
        if opcode == "GLOBAL":
            name = _global_name(str(argument))
            if name not in ALLOWED_GLOBALS:
                raise RejectedWeights(
                    f"the pickle references {name}, which weights_only loading "
                    "does not allow (a pickled model object?)"
                )


def _opcodes(file: IO[bytes]) -> Iterator[tuple[str, object]]:
    try:
        for opcode, argument, _ in pickletools.genops(file):
            yield opcode.name, argument
    except (ValueError, EOFError) as error:
        raise RejectedWeights(f"not a readable pickle ({error})") from None


def _global_name(argument: str) -> str:
    """Return ``module.name`` of a GLOBAL argument, with Python 2 names mapped.

    The pickle module maps names such as ``__builtin__ set`` when it loads,
    and so does torch, so the check maps them the same way.
    """
    module, _, name = argument.partition(" ")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"
