"""symbiote.runtime: the actor kernel, the runtime object and its facades.

The kernel (actors, refs, supervisors, child specs, the loop guard, the facades) knows
nothing of DuckDB. The composition root (:func:`open_runtime`, :func:`start_blocking`,
:class:`Runtime`) wires the data actors into a tree; it is loaded on first use, because the
actors import the kernel from this package.
"""

from typing import TYPE_CHECKING, Any

from symbiote.runtime._actor import Actor, ActorRef, ActorState, Inbox, Overload, Request
from symbiote.runtime._asyncio import AsyncioPortal, open_in_asyncio
from symbiote.runtime._blocking import BlockingHost
from symbiote.runtime._budget import RestartBudget
from symbiote.runtime._coalesce import Coalescer, Ticket
from symbiote.runtime._config import Config
from symbiote.runtime._guard import LoopBlocked, LoopGuard, guard_loop
from symbiote.runtime._specs import ChildSpec, SupervisorSpec
from symbiote.runtime._supervisor import Supervisor, open_supervisor
from symbiote.runtime._tree import TreeNode, format_tree
from symbiote.schema.errors import (
    ActorCrashed,
    ActorStopped,
    BadArgument,
    Busy,
    ConfigError,
    DeadlineExceeded,
    Failure,
    SupervisorEscalation,
    SymbioteError,
    WrongMessage,
)

if TYPE_CHECKING:
    from symbiote.runtime._system import BlockingRuntime, Runtime, open_runtime, start_blocking

_COMPOSITION_ROOT = frozenset({"BlockingRuntime", "Runtime", "open_runtime", "start_blocking"})


def __getattr__(name: str) -> Any:
    if name in _COMPOSITION_ROOT:
        from symbiote.runtime import _system

        return getattr(_system, name)
    raise AttributeError(f"module 'symbiote.runtime' has no attribute {name!r}")


__all__ = [
    "Actor",
    "ActorCrashed",
    "ActorRef",
    "ActorState",
    "ActorStopped",
    "AsyncioPortal",
    "BadArgument",
    "BlockingHost",
    "BlockingRuntime",
    "Busy",
    "ChildSpec",
    "Coalescer",
    "Config",
    "ConfigError",
    "DeadlineExceeded",
    "Failure",
    "Inbox",
    "LoopBlocked",
    "LoopGuard",
    "Overload",
    "Request",
    "RestartBudget",
    "Runtime",
    "Supervisor",
    "SupervisorEscalation",
    "SupervisorSpec",
    "SymbioteError",
    "Ticket",
    "TreeNode",
    "WrongMessage",
    "format_tree",
    "guard_loop",
    "open_in_asyncio",
    "open_runtime",
    "open_supervisor",
    "start_blocking",
]
