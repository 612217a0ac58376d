"""The live supervision tree as data, and its printable form."""

from __future__ import annotations

import msgspec

__all__ = ["TreeNode", "format_tree"]


class TreeNode(msgspec.Struct, frozen=True, kw_only=True):
    """One supervisor or actor in the live tree, with its counters at the time of asking."""

    id: str
    kind: str  # "supervisor" or "actor"
    state: str
    strategy: str | None = None
    mailbox_size: int | None = None
    depth: int = 0
    peak_depth: int = 0
    processed: int = 0
    restarts: int = 0
    last_error: str | None = None
    children: tuple[TreeNode, ...] = ()


def format_tree(node: TreeNode) -> str:
    """Render ``node`` and its children as an indented text tree, one line per node."""
    lines: list[str] = []
    _render(node, "", "", lines)
    return "\n".join(lines)


def _describe(node: TreeNode) -> str:
    if node.kind == "supervisor":
        text = f"{node.id} [supervisor {node.strategy}] {node.state}"
        if node.restarts:
            text += f" restarts={node.restarts}"
    else:
        text = (
            f"{node.id} [actor] {node.state} mailbox={node.depth}/{node.mailbox_size}"
            f" peak={node.peak_depth} processed={node.processed} restarts={node.restarts}"
        )
    if node.last_error:
        text += f" last_error={node.last_error!r}"
    return text


def _render(node: TreeNode, lead: str, child_lead: str, lines: list[str]) -> None:
    lines.append(lead + _describe(node))
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        _render(
            child,
            child_lead + ("└─ " if last else "├─ "),
            child_lead + ("   " if last else "│  "),
            lines,
        )
