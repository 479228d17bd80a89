"""A GGUF file's layout checked before anything reads it: the header, every metadata value and the tensor table are
walked with bounds, so that an empty, foreign, truncated or hostile file is refused in one line naming the file and
what is wrong, instead of ending in a traceback, a huge allocation or a loop over 2^40 phantom entries.

The layout (GGUF versions 2 and 3, llama.cpp's `gguf.md`), little-endian (or all big-endian):

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:  key (u64 length + UTF-8) | value type u32 | value (a scalar, a string, or an array: item type u32,
               count u64, items)
    tensors:   name (string) | n_dims u32 | dims u64 x n_dims | type u32 | offset u64 (from the data section)
    padding to `general.alignment` (default 32), then the data section.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import EcellmError

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# value type -> struct format of the scalar types; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MIN_BYTES = {STRING: 8, ARRAY: 12}  # the smallest encoding of an empty string (its length) and an empty array
MIN_METADATA_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, no dims, type, offset


class GGUFError(EcellmError, ValueError):
    """A GGUF file that is not well-formed, or describes a model ecellm cannot convert."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: its name, dims (GGUF order: the fastest-varying first), type and the byte range
    [offset, offset + n_bytes) of its data, counted from the start of the data section."""

    name: str
    dims: tuple[int, ...]
    type: int
    offset: int
    n_bytes: int


class _Cursor:
    """Reads fields of a mapped file in order, refusing (naming the file and the field) to read past its end."""

    def __init__(self, data: mmap.mmap, path: Path):
        self.data, self.path, self.pos, self.order = data, path, 0, "<"

    def left(self) -> int:
        return len(self.data) - self.pos

    def read(self, fmt: str, what: str):
        """The next value of struct format `fmt` (one field)."""
        size = struct.calcsize(self.order + fmt)
        if size > self.left():
            raise GGUFError(f"{self.path}: cut short: the file ends inside {what} (at byte {self.pos} of "
                            f"{len(self.data)})")
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items that take at least `min_item_bytes` each, refused when the rest of the file cannot
        hold that many."""
        n = self.read("Q", what)
        if n * min_item_bytes > self.left():
            raise GGUFError(f"{self.path}: {what} is {n}, more than the {self.left()} bytes left in the file can hold "
                            "(a corrupt or cut-short file)")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"the length of {what}", 1)
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not UTF-8 text ({raw[:40]!r})") from None


def _value(cur: _Cursor, kind: int, key: str):
    """Read one metadata value of type `kind` (arrays are walked, their items checked; only scalars are returned)."""
    what = f"the value of {key!r}"
    if kind in SCALARS:
        return cur.read(SCALARS[kind], what)
    if kind == STRING:
        return cur.string(what)
    if kind != ARRAY:
        raise GGUFError(f"{cur.path}: metadata key {key!r} has the unknown value type {kind}")
    item = cur.read("I", f"the item type of {key!r}")
    if item not in SCALARS and item not in MIN_BYTES:
        raise GGUFError(f"{cur.path}: metadata array {key!r} has the unknown item type {item}")
    item_bytes = struct.calcsize(cur.order + SCALARS[item]) if item in SCALARS else MIN_BYTES[item]
    n = cur.count(f"the length of the array {key!r}", item_bytes)
    if item in SCALARS:
        cur.pos += n * item_bytes
    else:
        for _ in range(n):
            _value(cur, item, key)
    return None


def _preamble(cur: _Cursor) -> tuple[int, int]:
    """(tensor count, metadata count) after checking the magic and the version."""
    magic = bytes(cur.data[:4])
    if magic != b"GGUF":
        raise GGUFError(f"{cur.path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
    cur.pos = 4
    version = cur.read("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cur.order, cur.pos = ">", 4
        version = cur.read("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{cur.path}: GGUF version {version} is not supported (supported: "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors = cur.count("the tensor count", MIN_TENSOR_INFO_BYTES)
    return n_tensors, cur.count("the metadata count", MIN_METADATA_BYTES)


def _metadata(cur: _Cursor, n_entries: int) -> int:
    """Walk the metadata; returns the data alignment (`general.alignment`, a power of two)."""
    keys, alignment = set(), DEFAULT_ALIGNMENT
    for i in range(n_entries):
        key = cur.string(f"metadata key {i}")
        if key in keys:
            raise GGUFError(f"{cur.path}: metadata key {key!r} appears twice")
        keys.add(key)
        kind = cur.read("I", f"the value type of {key!r}")
        value = _value(cur, kind, key)
        if key == "general.alignment":
            if kind != 4 or value == 0 or value & (value - 1):
                raise GGUFError(f"{cur.path}: general.alignment is {value!r}; expected a power of two (u32)")
            alignment = value
    return alignment


def _tensor_info(cur: _Cursor, index: int, quant_sizes: dict[int, tuple[int, int]]) -> TensorInfo:
    """One tensor table entry, with its dims, type and size checked."""
    name = cur.string(f"the name of tensor {index}")
    n_dims = cur.read("I", f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"{cur.path}: tensor {name!r} has {n_dims} dimensions; expected 1 to {MAX_DIMS}")
    dims = tuple(cur.read("Q", f"the dims of tensor {name!r}") for _ in range(n_dims))
    kind = cur.read("I", f"the type of tensor {name!r}")
    offset = cur.read("Q", f"the data offset of tensor {name!r}")
    if kind not in quant_sizes:
        raise GGUFError(f"{cur.path}: tensor {name!r} has the unknown tensor type {kind}")
    block, block_bytes = quant_sizes[kind]
    if 0 in dims or dims[0] % block:
        raise GGUFError(f"{cur.path}: tensor {name!r} has dims {dims}, which its type {kind} (blocks of {block}) "
                        "cannot hold")
    n_elements = 1
    for d in dims:
        n_elements *= d
    return TensorInfo(name, dims, kind, offset, n_elements // block * block_bytes)


def _check_data(path: Path, tensors: list[TensorInfo], data_bytes: int, alignment: int) -> None:
    """Every tensor's data aligned, inside the file, and overlapping no other's."""
    names = set()
    for t in tensors:
        if t.name in names:
            raise GGUFError(f"{path}: tensor {t.name!r} appears twice")
        names.add(t.name)
        if t.offset % alignment:
            raise GGUFError(f"{path}: tensor {t.name!r} starts at offset {t.offset}, not a multiple of the "
                            f"alignment {alignment}")
        if t.offset + t.n_bytes > data_bytes:
            raise GGUFError(f"{path}: cut short: tensor {t.name!r} needs bytes {t.offset} to {t.offset + t.n_bytes} "
                            f"of the data section, which holds {data_bytes}")
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.offset + a.n_bytes:
            raise GGUFError(f"{path}: tensors {a.name!r} (bytes {a.offset} to {a.offset + a.n_bytes}) and {b.name!r} "
                            f"(from byte {b.offset}) overlap")


def check_gguf_file(path: str | Path, quant_sizes: dict[int, tuple[int, int]]) -> list[TensorInfo]:
    """Walk a GGUF file's header, metadata and tensor table with bounds, and refuse what is not well-formed.

    Args:
        path: the .gguf file.
        quant_sizes: tensor type -> (elements per block, bytes per block) of the types that may appear
            (`gguf.GGML_QUANT_SIZES`).
    Returns:
        the tensor table.
    Raises:
        GGUFError: naming the file and what is wrong: empty, not GGUF, an unsupported version, cut short, a count
            larger than the file can hold, an unknown value or tensor type, a key or tensor name twice, tensor data
            outside the file or overlapping another's.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise GGUFError(f"{path}: the file is empty, not a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cur = _Cursor(data, path)
        if len(data) < 4:
            raise GGUFError(f"{path}: not a GGUF file ({len(data)} bytes)")
        n_tensors, n_metadata = _preamble(cur)
        alignment = _metadata(cur, n_metadata)
        tensors = [_tensor_info(cur, i, quant_sizes) for i in range(n_tensors)]
        data_start = cur.pos + (-cur.pos) % alignment
        _check_data(path, tensors, len(data) - data_start, alignment)
    return tensors
