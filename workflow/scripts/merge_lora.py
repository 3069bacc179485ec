"""Merge a LoRA adapter into its base model, shard by shard, block by block.

    merge_lora.py --base-model PATH_OR_HUB_ID --adapter ADAPTER_DIR --out MERGED_DIR [--threads N]

The arithmetic is mcqa.lora's (W' = W + scale * B @ A in fp32, rounded once;
DoRA's row magnitudes; modules_to_save weights replaced), and so is the check
that the adapter is one it merges exactly. Shards are merged in parallel (up
to --threads at a time), each one streamed in blocks of rows: read, merged
and appended to its output shard.
Peak memory is the adapter plus 20 MB per shard in progress, never a whole
safetensors shard (.bin shards are memory-mapped, so their pages add up).
.bin shards are read with torch.load(weights_only=True): no pickled code runs.
Output: safetensors shards + index, config, generation config, tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterator

import torch

from mcqa.lora import MergeError, fit_problems, merge_tensor, read_adapter
from mcqa.progress import format_duration
from mcqa.storage import disk_full_message

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
BLOCK_BYTES = 4 * 2**20  # rows read, merged and written at a time: cache-sized, and reused
MAX_PARALLEL_SHARDS = 8


def resolve_checkpoint(base_model: str, revision: str | None = None) -> Path:
    """A local directory, or a hub id fetched (weights and configs only, at `revision`) into the HF cache."""
    path = Path(base_model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base_model, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.py", "*.txt"]))


def shard_map(checkpoint: Path) -> dict[str, list[str]]:
    """Shard file -> the weight names it holds, in file order."""
    for index in INDEX_FILES:
        if (checkpoint / index).exists():
            weight_map = json.loads((checkpoint / index).read_text())["weight_map"]
            shards: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                shards.setdefault(shard, []).append(name)
            return shards
    for single in SINGLE_FILES:
        if (checkpoint / single).exists():
            with ShardReader(checkpoint / single) as reader:
                return {single: reader.names}
    raise MergeError(f"{checkpoint}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found")


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class ShardReader:
    """One checkpoint shard, read tensor by tensor, in blocks of rows.

    safetensors shards are read with positioned reads (no memory map, so only
    the block in hand is resident); .bin shards through torch.load(mmap=True).
    """

    def __init__(self, path: Path):
        self.path = path
        self.safetensors = path.suffix == ".safetensors"
        if self.safetensors:
            self._fd = os.open(path, os.O_RDONLY)
            (size,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, size, 8))
            header.pop("__metadata__", None)
            self._data_start = 8 + size
            self._entries = {name: (TORCH_DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"][0])
                             for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])}
        else:
            self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._entries = {name: (t.dtype, tuple(t.shape), None) for name, t in self._state.items()}
        self.names = list(self._entries)

    def meta(self, name: str) -> torch.Tensor:
        """A tensor on the meta device with the stored dtype and shape (no data read)."""
        dtype, shape, _ = self._entries[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def rows(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows start:stop of a tensor as (rows, elements per row), read into `buffer` (bytes).

        A 0-d tensor is one row of one element. A block larger than the
        buffer gets a buffer of its own.
        """
        dtype, shape, offset = self._entries[name]
        row_elements = math.prod(shape[1:])
        itemsize = dtype.itemsize
        size = (stop - start) * row_elements * itemsize
        block = (buffer if size <= buffer.numel() else torch.empty(size, dtype=torch.uint8))[:size]
        if self.safetensors:
            view, position = memoryview(block.numpy()), self._data_start + offset + start * row_elements * itemsize
            while view:
                got = os.preadv(self._fd, [view], position)
                if not got:
                    raise MergeError(f"{self.path}: file ends inside tensor {name}; the shard is truncated")
                view, position = view[got:], position + got
        else:
            tensor = self._state[name]
            block.view(dtype).copy_((tensor[start:stop] if tensor.dim() else tensor).reshape(-1))
        return block.view(dtype).reshape(stop - start, row_elements)

    def close(self) -> None:
        if self.safetensors:
            os.close(self._fd)

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def row_blocks(meta: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of about BLOCK_BYTES each."""
    rows = meta.shape[0] if meta.dim() else 1
    row_bytes = max(1, math.prod(meta.shape[1:]) * meta.element_size())
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def write_safetensors(path: Path, specs: list[tuple[str, torch.Tensor]],
                      blocks: Callable[[str, torch.Tensor], Iterator[torch.Tensor]]) -> int:
    """Write a safetensors file block by block, so only a block is in memory.

    safetensors' save_file needs every tensor at once; here the header comes
    from `specs` (name, meta tensor) and `blocks(name, meta)` yields each
    tensor's data in row order. Returns the number of data bytes written.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, meta in specs:
        size = math.prod(meta.shape) * meta.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, meta in specs:
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            written = 0
            for block in blocks(name, meta):
                if block.dtype != meta.dtype:
                    raise MergeError(f"{name}: merged block is {block.dtype}, expected {meta.dtype}")
                written += fh.write(block.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if written != expected:
                raise MergeError(f"{name}: wrote {written} bytes, expected {expected} for {meta.dtype} "
                                 f"{tuple(meta.shape)}")
    return offset


def check_fit(checkpoint: Path, shards: dict[str, list[str]], pairs: dict, replacements: dict) -> None:
    """Fail before writing anything if the adapter was made for another base."""
    shapes: dict[str, tuple[int, ...]] = {}
    for shard, names in shards.items():
        with ShardReader(checkpoint / shard) as reader:
            shapes.update({n: tuple(reader.meta(n).shape) for n in names})
    if problems := fit_problems(shapes, pairs, replacements):
        raise MergeError("the adapter does not fit this base model:\n  " + "\n  ".join(problems))


def merge_shard(source: Path, names: list[str], target: Path, pairs: dict, replacements: dict) -> int:
    """Merge one shard into target, block by block; returns the data bytes written."""
    buffer = torch.empty(BLOCK_BYTES, dtype=torch.uint8)
    scratch = torch.empty(BLOCK_BYTES, dtype=torch.float32)  # a block's elements in fp32, whatever its dtype
    with ShardReader(source) as reader:
        def blocks(name: str, meta: torch.Tensor) -> Iterator[torch.Tensor]:
            for start, stop in row_blocks(meta):
                yield merge_tensor(name, reader.rows(name, start, stop, buffer), pairs, replacements, start, scratch)

        return write_safetensors(target, [(name, reader.meta(name)) for name in names], blocks)


def copy_side_files(checkpoint: Path, adapter_dir: Path, out: Path) -> None:
    """Configs and tokenizer from the base, then the tokenizer the adapter was trained with."""
    weight_like = set(INDEX_FILES) | set(SINGLE_FILES)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in weight_like and path.suffix not in (".safetensors", ".bin"):
            shutil.copy2(path, out / path.name)
    for path in adapter_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens_map", "chat_template")) or path.suffix == ".model":
            shutil.copy2(path, out / path.name)


def merge(base_model: str, adapter_dir: Path, out: Path, threads: int = 1) -> None:
    start = time.perf_counter()
    config, pairs, replacements = read_adapter(adapter_dir)
    # The hub revision the adapter was trained on (train_lora records base_model_revision there).
    checkpoint = resolve_checkpoint(base_model, config.get("revision"))
    shards = shard_map(checkpoint)
    check_fit(checkpoint, shards, pairs, replacements)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parallel = max(1, min(len(shards), threads, MAX_PARALLEL_SHARDS))
    torch.set_num_threads(max(1, threads // parallel))
    print(f"{len(shards)} shard(s) of {checkpoint}, {len(pairs)} LoRA weights read in "
          f"{time.perf_counter() - start:.1f} s; merging {parallel} shard(s) at a time", file=sys.stderr, flush=True)
    names_out = {shard: f"model-{n:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
                 for n, shard in enumerate(sorted(shards), 1)}
    weight_map, total_size = {}, 0
    with ThreadPoolExecutor(parallel) as pool:
        jobs = {pool.submit(merge_shard, checkpoint / shard, shards[shard], tmp / names_out[shard], pairs,
                            replacements): shard for shard in sorted(shards)}
        for done, job in enumerate(as_completed(jobs), 1):
            shard = jobs[job]
            total_size += job.result()
            weight_map.update(dict.fromkeys(shards[shard], names_out[shard]))
            print(f"shard {done}/{len(shards)} {shard} -> {names_out[shard]}  "
                  f"({format_duration(time.perf_counter() - start)})", file=sys.stderr, flush=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copy_side_files(checkpoint, adapter_dir, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"merged {len(pairs)} LoRA weights and replaced {len(replacements)} into {out} "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shards merged at a time, at most 8)")
    args = parser.parse_args(argv)
    try:
        merge(args.base_model, args.adapter, args.out, args.threads)
    except MergeError as exc:
        print(f"ERROR merging {args.adapter} into {args.base_model}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if (full := disk_full_message(exc, args.out)) is None:
            raise
        print(f"ERROR {full}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
