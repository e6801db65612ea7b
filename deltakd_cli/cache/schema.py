"""The cache's schema: the arrays of a shard (derived from the one per-position field list,
`targets.CachedTargets`), their dtypes, chunks and codecs, how kept ids are encoded, shard names,
and how many rows each array has. docs/cache-format.md specifies the same; keep the two in step
(and bump FORMAT_VERSION when the bytes change)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec

from deltakd_cli.method.targets import (
    FIELD_KIND,
    NEEDS_STUDENT,
    PER_POSITION_FIELDS,
    SAMPLE_FIELDS,
    CachedTargets,
)

# 2: the manifest carries its own checksum; every chunk is written. 3: a target mask per token
# (every assistant turn of a conversation, every token of plain text) instead of a prompt length.
# 4: an optional [P, G] grid array (family_tail_logmass) and the manifest's `grid`; a format-3
# cache is a format-4 cache without a grid, so both are read. 5: the optional sampled tail
# ([P, M] sample_* arrays; the manifest's tail_samples, sample_seed, proposal, temperature); a
# format-4 cache is a format-5 cache without samples drawn at temperature 1. 6: the manifest names
# the kept-id count top_k (as the option and settings.json do; "k" before) and no longer repeats
# settings.json; the arrays are format 5's (cache/manifest.py maps the older names).
FORMAT_VERSION = 6
READABLE_FORMAT_VERSIONS = (3, 4, 5, 6)
ZARR_POSITION_CHUNK = 2048  # positions per zarr chunk: one chunk is ~256 KiB of ids at k=64
TOKEN_CHUNK = 65536
EXAMPLE_CHUNK = 16384
SHARD_NAME = re.compile(r"^shard-(\d{5})-of-(\d{5})$")


def ids_dtype(vocab_size: int) -> str:
    """Token ids need ceil(log2 |V|) bits: 16-bit when the vocabulary allows, else 32-bit (the
    bitshuffle codec then stores the always-zero high bits at almost no cost)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def counts_dtype(tail_samples: int) -> str:
    """A draw count is at most the number of draws M."""
    return "uint8" if tail_samples <= 255 else "uint16"


def array_specs(
    k: int,
    vocab_size: int,
    precision: str,
    has_student: bool,
    grid_size: int = 0,
    tail_samples: int = 0,
) -> dict[str, tuple]:
    """name -> (dtype, trailing shape, chunk rows, shuffle) for every array of a shard: the
    example arrays, then one per per-position field (those computed from the base student only
    when the cache has it, the grid's only when it has `grid_size` > 0 grid points, the sampled
    tail's only when it has `tail_samples` > 0 draws per position)."""
    specs: dict[str, tuple] = {
        "input_ids": (ids_dtype(vocab_size), (), TOKEN_CHUNK, "bitshuffle"),
        "token_offsets": ("int64", (), EXAMPLE_CHUNK, "bitshuffle"),
        "target_mask": ("uint8", (), TOKEN_CHUNK, "bitshuffle"),
        "example_index": ("int64", (), EXAMPLE_CHUNK, "bitshuffle"),
        "target_offsets": ("int64", (), EXAMPLE_CHUNK, "bitshuffle"),
    }
    # Measured on SmolLM2 caches: byte shuffle beats bitshuffle on the delta-coded ids.
    by_kind = {
        "ids": (ids_dtype(vocab_size), (k,)),
        "logprobs": (precision, (k,)),
        "scalar": ("float32", ()),
        "grid": (precision, (grid_size,)),
        "sample_ids": (ids_dtype(vocab_size), (tail_samples,)),
        "counts": (counts_dtype(tail_samples), (tail_samples,)),
        "sample_logprobs": (precision, (tail_samples,)),
    }
    for name in PER_POSITION_FIELDS:
        if name in NEEDS_STUDENT and not has_student:
            continue
        if FIELD_KIND[name] == "grid" and not grid_size:
            continue
        if name in SAMPLE_FIELDS and not tail_samples:
            continue
        dtype, trailing = by_kind[FIELD_KIND[name]]
        specs[name] = (dtype, trailing, ZARR_POSITION_CHUNK, "shuffle")
    return specs


def position_bytes(specs: dict[str, tuple]) -> int:
    """Bytes one target position adds to a shard before compression: a row of every
    per-position array of `specs`."""
    return sum(
        np.dtype(dtype).itemsize * int(np.prod(trailing, dtype=np.int64))
        for name, (dtype, trailing, _rows, _shuffle) in specs.items()
        if name in PER_POSITION_FIELDS
    )


def codec(dtype: str, shuffle: str) -> BloscCodec:
    # zstd level 9: ~4% smaller than level 5 on cached log-probs; the writer runs behind the
    # compute, so the extra compression time is not on the critical path.
    return BloscCodec(cname="zstd", clevel=9, shuffle=shuffle, typesize=np.dtype(dtype).itemsize)


def encode_ids(sorted_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Kept ids are sorted ascending per position and stored delta-coded along k (the first id,
    then the gaps): gaps are small numbers, which the codec packs into few bits."""
    gaps = np.diff(sorted_ids, axis=-1, prepend=0)
    return gaps.astype(ids_dtype(vocab_size))


def decode_ids(stored: np.ndarray) -> np.ndarray:
    """Inverse of encode_ids: the running sum along k."""
    return np.cumsum(stored.astype(np.int64), axis=-1)


def encode_positions(
    entries: CachedTargets, vocab_size: int, precision: str
) -> dict[str, np.ndarray]:
    """A CachedTargets (torch) -> numpy arrays in the store's dtypes and encodings."""
    stored = {}
    for name in PER_POSITION_FIELDS:
        value = getattr(entries, name)
        if value is None:
            continue
        kind = FIELD_KIND[name]
        if kind in ("ids", "sample_ids"):
            stored[name] = encode_ids(value.cpu().numpy(), vocab_size)
        elif kind == "counts":
            stored[name] = value.cpu().numpy().astype(counts_dtype(value.shape[1]))
        else:
            dtype = precision if kind in ("logprobs", "grid", "sample_logprobs") else np.float32
            stored[name] = value.float().cpu().numpy().astype(dtype)
    return stored


def decode_positions(name: str, stored: np.ndarray) -> np.ndarray:
    """One stored per-position array back to what the math reads (ids int64, values and counts
    float32)."""
    if FIELD_KIND[name] in ("ids", "sample_ids"):
        return decode_ids(stored)
    return stored.astype(np.float32)


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}"


def expected_rows(name: str, counts: dict[str, int]) -> int:
    """Rows of one array of a shard holding `counts` (examples, tokens, positions)."""
    if name in ("input_ids", "target_mask"):
        return counts["tokens"]
    if name in ("token_offsets", "target_offsets"):
        return counts["examples"] + 1
    if name == "example_index":
        return counts["examples"]
    return counts["positions"]


@dataclass
class BatchRecord:
    """What one forward batch contributes to a shard (numpy, already in storage dtypes)."""

    example_index: np.ndarray  # [B] int64
    input_ids: list[np.ndarray]  # B arrays of token ids
    target_mask: list[np.ndarray]  # B arrays of uint8: 1 where the token is a target
    positions: dict[str, np.ndarray]  # per-position arrays, rows of all B examples concatenated
