"""Lazy, memory-mapped safetensors reading (single file or sharded with an index json).

We parse the format ourselves (8-byte little-endian header length, JSON header, raw buffer) so
tensors stay memory-mapped until a device asks for its slice, bf16 works without torch, and a
truncated or corrupt file fails with a message naming the file and tensor.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
CONVERT_HINT = ("convert it once with `python -m didr_jax.convert --input={path} "
                "--output={stem}.safetensors` (needs torch)")

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class WeightFileError(ValueError):
  """A weight file or folder that cannot be read as safetensors."""


def _refuse_pickle(path: str):
  stem = os.path.splitext(path)[0]
  raise WeightFileError(f"{path}: pickled checkpoints are never loaded at runtime; "
                        + CONVERT_HINT.format(path=path, stem=stem))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Return {key: memory-mapped array} for one .safetensors file."""
  if path.endswith(PICKLE_SUFFIXES):
    _refuse_pickle(path)
  if not os.path.isfile(path):
    raise WeightFileError(f"{path}: file not found")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise WeightFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > size - 8:
      if raw[:2] == b"PK" or raw[:1] == b"\x80":
        _refuse_pickle(path)
      raise WeightFileError(f"{path}: not a safetensors file or truncated header "
                            f"(header length {header_len}, file size {size})")
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise WeightFileError(f"{path}: corrupt safetensors header ({e})") from e
  header.pop("__metadata__", None)
  data_start = 8 + header_len
  out = {}
  for key, info in header.items():
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise WeightFileError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if data_start + end > size:
      raise WeightFileError(f"{path}: truncated file: tensor {key!r} needs bytes up to "
                            f"{data_start + end}, file has {size}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - begin != nbytes:
      raise WeightFileError(f"{path}: tensor {key!r} spans {end - begin} bytes, shape {shape} "
                            f"of {info['dtype']} needs {nbytes}")
    if nbytes == 0:
      out[key] = np.zeros(shape, dtype)
    else:
      out[key] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
  return out


def read_weights_folder(folder: str, stem: str) -> dict[str, np.ndarray]:
  """Read ``{stem}.safetensors`` or the shards listed in ``{stem}.safetensors.index.json``.

  ``stem`` is e.g. ``diffusion_pytorch_model`` (diffusers) or ``model`` (transformers).
  """
  if not os.path.isdir(folder):
    raise WeightFileError(f"{folder}: weight folder not found")
  single = os.path.join(folder, f"{stem}.safetensors")
  index = os.path.join(folder, f"{stem}.safetensors.index.json")
  if os.path.isfile(single):
    return read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise WeightFileError(f"{index}: no 'weight_map' in the index")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      tensors = read_safetensors(os.path.join(folder, shard))
      for key, value in tensors.items():
        if weight_map.get(key) != shard:
          raise WeightFileError(f"{index}: key {key!r} found in {shard} but the index says "
                                f"{weight_map.get(key)!r}")
        out[key] = value
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise WeightFileError(f"{index}: keys listed in the index but absent from the shards: {missing[:10]}")
    return out
  pickles = [n for n in sorted(os.listdir(folder)) if n.endswith(PICKLE_SUFFIXES)]
  if pickles:
    _refuse_pickle(os.path.join(folder, pickles[0]))
  raise WeightFileError(f"{folder}: neither {stem}.safetensors nor {stem}.safetensors.index.json found")


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
  """Write tensors atomically (tmp file + rename), in the safetensors layout."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for key in sorted(tensors):
    arr = np.ascontiguousarray(np.asarray(tensors[key]))
    if arr.dtype not in _DTYPE_NAMES:
      raise WeightFileError(f"{path}: tensor {key!r} has unsupported dtype {arr.dtype}")
    header[key] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * ((8 - len(blob) % 8) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())
  os.replace(tmp, path)
