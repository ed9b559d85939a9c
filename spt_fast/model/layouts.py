"""Where the soft prompt sits in a sequence: the one placement rule every path reads.

A layout gives, per row, the position inside the row's context where the L prompt rows go:

    context[:pos] ++ P_k ++ context[pos:] ++ response          (pos = layout.position(...))

so the response always starts at ctx_len + L. Training (the generic K·B forward and the
shared-context engine), generation (the engine and the Hugging Face oracle) and the benchmarks
all place prompts through `prompt_positions`; adding a layout means registering one here.

- prefix: pos = 0, `[P_k][context][response]` (the paper's).
- shared: pos = ctx_len - tag_len, `[context][P_k][ R:][response]` (the engine's fast variant): the
  prompt sits before the context's final speaker tag, so the reply still starts right after
  ` R:` as in the training text, and all of the context but its tag runs once for the K prompts.
- shared-old: pos = ctx_len, `[context][P_k][response]`, the first shared placement (the prompt
  read as the start of the reply: its first token suffered); kept so the study can compare.

A layout that `shares_context` puts the prompt after a non-empty part of the context that never
sees it (`context[:pos]`, pos > 0 for every row): that part runs once for all K prompts in
training (model.shared) and its KV cache can be reused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SPTError


@dataclass(frozen=True)
class Layout:
    name: str
    # (ctx_len [B], tag_len [B]: tokens of the context's final speaker tag) -> pos [B], 0 <= pos <= ctx_len
    position: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    shares_context: bool
    description: str


LAYOUTS: dict[str, Layout] = {}
AUTO = "auto"  # shared where the model supports it, else prefix (model.build.resolve_layout)


def register_layout(layout: Layout) -> Layout:
    if layout.name in LAYOUTS or layout.name == AUTO:
        raise ValueError(f"layout {layout.name!r} is already defined")
    LAYOUTS[layout.name] = layout
    return layout


def unregister_layout(name: str) -> None:
    LAYOUTS.pop(name, None)


def layout_choices() -> tuple[str, ...]:
    """Every name a user may ask for (the CLI's choices)."""
    return (AUTO, *LAYOUTS)


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise SPTError(f"layout must be one of {layout_choices()}, got {name!r}") from None


def prompt_positions(layout: str, ctx_len: torch.Tensor, tag_len: torch.Tensor | None = None) -> torch.Tensor:
    """Position of each row's prompt inside its context, [B] int64 on ctx_len's device."""
    if tag_len is None:
        tag_len = torch.zeros_like(ctx_len)
    pos = get_layout(layout).position(ctx_len, tag_len.to(ctx_len.device))
    return pos.to(torch.long)


register_layout(Layout("prefix", lambda ctx_len, tag_len: torch.zeros_like(ctx_len), shares_context=False,
                       description="[P][context][response]: the paper's layout, any causal LM"))
register_layout(Layout("shared", lambda ctx_len, tag_len: ctx_len - tag_len, shares_context=True,
                       description="[context][P][ R:][response]: the context but its final tag runs once "
                                   "for all K prompts (Llama architectures)"))
register_layout(Layout("shared-old", lambda ctx_len, tag_len: ctx_len, shares_context=True,
                       description="[context][P][response]: the first shared placement, for comparison"))
