"""Keys of full KV blocks for prefix caching: SHA-256 chained over the parent block's key, the
block's token ids and what else decides its K/V (the adapter), every field length-delimited.

Why a cryptographic hash: a block found under a key is served to another request without comparing
tokens, so two different prefixes must never share a key. Python's `hash()` is not that: vLLM's
CVE-2025-25183 showed crafted prompts colliding with another tenant's prefix. Why length-delimited:
keys that run fields together (`parent + tokens + extra`) let one split of the bytes pose as
another (vLLM #44701); a length before every field makes the encoding injective.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROOT = b""  # the parent key of a sequence's first block


def length_delimited(*fields: bytes) -> bytes:
    """Each field preceded by its length (8 bytes, little-endian): one byte string per tuple of fields."""
    return b"".join(len(part).to_bytes(8, "little") + part for part in fields)


def adapter_salt(lora_int_id: int = 0, identity: bytes = b"", rope_table: int = 0, extra_tokens: int = 0) -> bytes:
    """What besides the tokens decides a block's K/V. The base model is `b"base"`; an adapter is its
    registration's unique `identity` (a new registration under an old name never meets the old
    blocks), its int id (engines without a registry), its rotary table and its added tokens."""
    if not lora_int_id:
        return b"base"
    return length_delimited(
        b"lora", lora_int_id.to_bytes(8, "little"), identity, rope_table.to_bytes(8, "little"),
        extra_tokens.to_bytes(8, "little"),
    )


def chain_block_keys(parent: bytes, blocks: np.ndarray, salt: bytes) -> list[bytes]:
    """Keys of consecutive full blocks `blocks` [N, block_size] following the block keyed `parent`."""
    keys = []
    for tokens in np.ascontiguousarray(blocks, dtype="<i8"):
        parent = hashlib.sha256(length_delimited(parent, tokens.tobytes(), salt)).digest()
        keys.append(parent)
    return keys
