"""Where this process sits in the world, from the environment torch's launcher sets."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    job: str
    namespace: str

    @classmethod
    def from_env(cls, job: str, namespace: str) -> WorldContext:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))),
            job=job,
            namespace=namespace,
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0
