"""The project's custom ops registered with inductor as calls it makes as they are, before anything compiles.

Inductor runs an op it has no lowering for as an "implicit fallback" (the op's own code, called from the compiled
graph), but torch 2.11 first formats the call's inputs for a log line, whether or not anything logs it. That
string spells out the inputs' whole graph, and where the project's ops feed each other (each block's residual add
+ norm feeds the next block's, both outputs of one into the other) it doubles with each layer: the 12-layer study
models did not finish compiling in 7 minutes. Registering the same fallbacks up front, with the layout constraint
inductor would give them itself (by the op's tags, else its default for custom ops), skips that string; the
compiled code is the same.
"""

from __future__ import annotations

import torch

# The modules that define the hybridctl namespace's ops (tests check that none is missing); importing them
# registers the ops, which are then read back from the dispatcher.
OP_MODULES = ("add_norm", "fused_loss", "gdn_fused", "rope", "swiglu")


def op_names() -> list[str]:
    """The ops of the hybridctl namespace that are registered now."""
    return [name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("hybridctl::")]


def register() -> bool:
    """Registers the fallbacks (once; the op modules need Triton). False where they cannot be registered (no
    Triton, or a torch whose inductor internals differ): compiling then takes inductor's own path, correct but
    slow to compile at depth on torch 2.11."""
    import importlib

    try:
        from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag

        for module in OP_MODULES:
            importlib.import_module(f"hybridctl.core.kernels.{module}")
        for name in op_names():
            op = getattr(torch.ops.hybridctl, name).default
            if op not in lowerings:
                constraint = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
                make_fallback(op, layout_constraint=constraint, warn=False)
    except (ImportError, AttributeError, TypeError):
        return False
    return True
