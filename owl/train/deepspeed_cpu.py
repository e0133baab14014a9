"""What owl tells DeepSpeed before it starts on CPU.

DeepSpeed's CPU communication backend (deepspeed.comm.torch.TorchBackend) compiles a C++
shared-memory op, `deepspeed_shm_comm`, the first time it starts on a machine: 1 to 2.5 minutes on
2 cores for the first stage a user ever runs, and a build killed half-way leaves a lock file under
~/.cache/torch_extensions that makes every later start wait forever. The op serves only
`inference_all_reduce`, which training never calls: a training stage's collectives go through
torch.distributed (gloo). So owl marks the op unavailable, which DeepSpeed (0.19.x) reads from
`deepspeed.ops.__compatible_ops__` before building it, and DeepSpeed goes on without it. Numerics
are unchanged: no training collective used the op.
"""

from __future__ import annotations

SHM_COMM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.comm.ShareMemCommBuilder.NAME


def skip_shm_comm() -> None:
    """Mark DeepSpeed's shared-memory communication op unavailable (call before DeepSpeed
    initializes its communication backend: `deepspeed.initialize` or `deepspeed.zero.Init`).
    Nothing to do where DeepSpeed's accelerator has no such op (a GPU)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        return  # this accelerator has no such op (a GPU): DeepSpeed will not build it
    # Reading it runs DeepSpeed's own probe of every op once (as its first start would); the
    # entry for the shm op is then switched off in the dict DeepSpeed keeps and consults.
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
