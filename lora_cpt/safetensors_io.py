"""Row-range reads and streaming writes of safetensors files, with memory bounded by one chunk.

The safetensors layout is: 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`), then the raw little-endian bytes.
Reading rows with `os.pread` keeps only the requested rows in memory (a memory map would count
every touched page of a multi-GB shard in the process's RSS); writing with a header planned in
advance lets tensors be produced chunk by chunk.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cpt.errors import DamagedFile

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):  # what this torch has
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class TensorInfo:
    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file, in file order. A file whose layout does not hold together (header
    length past the end, a header that is not JSON, tensors outside the file, a file cut short) is a DamagedFile
    naming it: checked here, from the header alone, before any tensor is read."""
    path = Path(path)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise _damaged(path, f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            raise _damaged(path, f"its header length ({n:,} bytes) runs past the end of the {size:,}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _damaged(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    infos, end = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            valid = all(isinstance(x, int) and x >= 0 for x in (*shape, begin, stop)) and isinstance(dtype, str)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise _damaged(path, f"tensor '{name}' has a malformed entry in the header")
        if dtype not in SAFETENSORS_DTYPES:
            raise DamagedFile(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        if stop - begin != math.prod(shape) * itemsize(SAFETENSORS_DTYPES[dtype]):
            raise _damaged(path, f"tensor '{name}' has {stop - begin} bytes for shape {list(shape)}")
        end = max(end, stop)
        infos[name] = TensorInfo(name, path, SAFETENSORS_DTYPES[dtype], shape, 8 + n + begin)
    if 8 + n + end > size:
        raise _damaged(path, f"truncated: {size:,} bytes where its tensors need {8 + n + end:,}")
    return dict(sorted(infos.items(), key=lambda kv: kv[1].offset))


def _damaged(path: Path, why: str) -> DamagedFile:
    return DamagedFile(f"{path}: not a readable safetensors file ({why}); it is damaged or incomplete: copy or "
                       "write it again")


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file, from its header (None: nothing)."""
    try:
        read_header(path)
    except DamagedFile as e:
        return str(e)
    except OSError as e:
        return f"{path}: cannot read ({e.strerror or e})"
    return None


def read_rows(info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of a tensor (the whole tensor by default), as a new tensor."""
    stop = info.rows if stop is None else stop
    row_bytes = info.row_numel * itemsize(info.dtype)
    buf = bytearray((stop - start) * row_bytes)
    fd = os.open(info.path, os.O_RDONLY)
    try:
        view, pos, done = memoryview(buf), info.offset + start * row_bytes, 0
        while done < len(buf):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise ValueError(f"{info.path}: file ends inside tensor '{info.name}'")
            done += n
    finally:
        os.close(fd)
    if not buf:
        return torch.empty((0, *info.shape[1:]), dtype=info.dtype)
    t = torch.frombuffer(buf, dtype=info.dtype)
    return t.reshape((stop - start, *info.shape[1:])) if info.shape else t.reshape(())


def row_chunks(rows: int, row_numel: int, max_elements: int) -> list[tuple[int, int]]:
    step = max(1, max_elements // max(row_numel, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)] or [(0, 0)]


class BackgroundWriter:
    """Writes buffers to an open file from a thread, so disk writes overlap the caller's compute (file writes
    release the GIL). At most two buffers wait; a write error is re-raised in the caller's thread by the next
    `put` or by `finish`. Used by StreamWriter here and by the GGUF export."""

    def __init__(self, f):
        self.f = f
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.f.write(memoryview(data))
                except BaseException as e:  # re-raised in the caller's thread
                    self.error = e

    def put(self, data) -> None:
        """Queue a buffer (bytes, a numpy array, a memoryview) for writing."""
        if self.error is not None:
            raise self.error
        self.queue.put(data)

    def finish(self) -> None:
        """Wait until everything queued is written; re-raise a write error."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def stop(self) -> None:
        """After a failure: drop what is queued and end the thread."""
        self.error = self.error or RuntimeError("aborted")
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


class StreamWriter:
    """Write one safetensors file whose tensors (names, dtypes, shapes) are known up front.

        w = StreamWriter(path, [("a", torch.bfloat16, (4, 8)), ...])
        w.write(chunk)   # chunks in planned order, each a run of rows of the current tensor
        w.close()        # checks that every planned byte was written
    """

    def __init__(self, path: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        header, offset = {}, 0
        self.sizes = []
        for name, dtype, shape in plan:
            size = math.prod(shape) * itemsize(dtype)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes.append((name, dtype, size))
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total = offset
        self.f = self.path.open("wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.index, self.written_in_tensor, self.written = 0, 0, 0
        self.writer = BackgroundWriter(self.f)

    def write(self, chunk: torch.Tensor) -> None:
        name, dtype, size = self.sizes[self.index]
        if chunk.dtype != dtype:
            raise TypeError(f"tensor '{name}': planned {dtype}, got {chunk.dtype}")
        chunk = chunk.contiguous()
        nbytes = chunk.numel() * chunk.element_size()
        if self.written_in_tensor + nbytes > size:
            raise ValueError(f"tensor '{name}': more bytes than planned")
        self.writer.put(chunk.reshape(-1).view(torch.uint8).numpy())  # a view: the array keeps the tensor alive
        self.written_in_tensor += nbytes
        self.written += nbytes
        if self.written_in_tensor == size:  # an empty tensor is done by one empty write
            self.index += 1
            self.written_in_tensor = 0

    def close(self) -> None:
        try:
            self.writer.finish()
            self.f.flush()
            os.fsync(self.f.fileno())  # durable before the folder is renamed into place
        finally:
            self.f.close()
        if self.written != self.total:
            raise ValueError(f"{self.path}: wrote {self.written} of {self.total} planned bytes")

    def abort(self) -> None:
        """Stop the writer thread after a failure (the caller removes the file)."""
        self.writer.stop()
        self.f.close()


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; plain numbers are bytes."""
    from lora_cpt.util import size_in_bytes

    size = size_in_bytes(text)
    if size is None or size[0] < 1:
        raise ValueError(f"'{text}' is not a size; use e.g. 5GB or 500MB")
    return int(size[0])
