"""Lightning's FSDPStrategy on CPU processes over gloo: the sharded code paths tested without a GPU.

torch's FSDP runs on CPU; Lightning refuses it there (its guard checks `type(strategy) is FSDPStrategy`, which a
subclass passes) and wraps with `device_id=root_device.index`, None on a CPU, whereupon FSDP asks for an
accelerator. This subclass wraps with device_id=cpu and is otherwise Lightning's strategy. For tests and
debugging only (conf/trainer/fsdp_cpu.yaml); on GPUs use FSDPStrategy (conf/trainer/fsdp.yaml).
"""

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> FullyShardedDataParallel:
        return FullyShardedDataParallel(
            model,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
