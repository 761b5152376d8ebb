"""Every process must ask torch for the same build of a kernel, whatever order it builds them in:
torch rebuilds an extension whose build command changed, so two orders would rebuild each other's."""

from __future__ import annotations

import torch.utils.cpp_extension

from workers import cpu_extension
from workers.cpu_extension import CpuExtension


def test_build_flags_do_not_depend_on_what_was_built_before(monkeypatch):
    seen: list[tuple[list[str], list[str]]] = []

    def load_inline(name, cpp_sources, functions, extra_cflags, extra_ldflags, verbose):
        seen.append((list(extra_cflags), list(extra_ldflags)))
        extra_ldflags.extend(["-L/torch/lib", "-ltorch"])  # what torch does to the list it is given
        extra_cflags.append("-DAPPENDED")
        return object()

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", load_inline)
    monkeypatch.setattr(cpu_extension, "_compiler_allowed", lambda: True)
    first, second = (CpuExtension(name, "int f() { return 0; }", ["f"]) for name in ("first", "second"))
    assert first.module() is not None and second.module() is not None
    assert len(seen) == 2 and seen[0] == seen[1]
