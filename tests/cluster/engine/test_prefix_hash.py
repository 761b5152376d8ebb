"""Block keys for prefix caching: chained, length-delimited, cryptographic, keyed by the adapter."""

from __future__ import annotations

import hashlib

import numpy as np

from cluster.engine.prefix_hash import ROOT, adapter_salt, chain_block_keys, length_delimited


def keys(tokens: list[int], salt: bytes = b"base", block_size: int = 4, parent: bytes = ROOT) -> list[bytes]:
    return chain_block_keys(parent, np.array(tokens).reshape(-1, block_size), salt)


def test_fields_are_length_delimited_so_no_split_poses_as_another():
    assert length_delimited(b"ab", b"c") != length_delimited(b"a", b"bc")
    assert length_delimited(b"", b"x") != length_delimited(b"x", b"")
    # a salt that ends like a token block cannot shift bytes into the tokens field
    assert keys([1, 2, 3, 4], salt=b"s") != chain_block_keys(ROOT, np.array([[1, 2, 3, 4]]), b"s\x00")


def test_keys_chain_over_the_parent_and_are_sha256():
    first, second = keys([1, 2, 3, 4, 5, 6, 7, 8])
    assert keys([9, 9, 9, 9, 5, 6, 7, 8])[1] != second  # same tokens, other parent: other key
    assert keys([5, 6, 7, 8], parent=first) == [second]  # the chain continues from any known key
    expected = hashlib.sha256(length_delimited(ROOT, np.array([1, 2, 3, 4], dtype="<i8").tobytes(), b"base"))
    assert first == expected.digest()  # not Python's hash(): the same in every process


def test_the_adapter_decides_the_key():
    tokens = [1, 2, 3, 4]
    salts = [
        adapter_salt(), adapter_salt(1), adapter_salt(2), adapter_salt(1, identity=b"registration-2"),
        adapter_salt(1, rope_table=1), adapter_salt(1, extra_tokens=3),
    ]
    assert len({keys(tokens, salt)[0] for salt in salts}) == len(salts)
    assert adapter_salt(1, b"x") == adapter_salt(1, b"x")
