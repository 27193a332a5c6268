"""The autocast precisions a run trains and evaluates in (`train.amp`): each name and its dtype (None: fp32)."""

import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
