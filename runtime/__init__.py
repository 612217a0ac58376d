"""symbiote.runtime: the actor kernel, the runtime object and its facades.

The kernel (actors, refs, supervisors, child specs, the loop guard) knows nothing of DuckDB.
"""

from symbiote.runtime._actor import Actor, ActorRef, ActorState, Inbox, Overload, Request
from symbiote.runtime._budget import RestartBudget
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

__all__ = [
    "Actor",
    "ActorCrashed",
    "ActorRef",
    "ActorState",
    "ActorStopped",
    "BadArgument",
    "Busy",
    "ChildSpec",
    "ConfigError",
    "DeadlineExceeded",
    "Failure",
    "Inbox",
    "Overload",
    "Request",
    "RestartBudget",
    "Supervisor",
    "SupervisorEscalation",
    "SupervisorSpec",
    "SymbioteError",
    "TreeNode",
    "WrongMessage",
    "format_tree",
    "open_supervisor",
]
