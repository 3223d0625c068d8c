"""The exponential moving average (EMA) of the trainable weights, kept by torch's own
:class:`torch.optim.swa_utils.AveragedModel` with its EMA update (:func:`get_ema_multi_avg_fn`,
``W_ema <- lerp(W_ema, W, 1 - decay)`` after every step; ``decay`` 0 follows the weights).
Validation, checkpoints and the final model use the EMA weights; :func:`weights_in` puts them
(or any other values) into the model for a while."""
from __future__ import annotations

import contextlib
from typing import Dict, Tuple

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["make_ema", "ema_weights", "load_ema_weights", "weights_in"]


def make_ema(params: Dict[str, torch.nn.Parameter], decay: float) -> Tuple[AveragedModel, torch.nn.ParameterList]:
    """(EMA, source): an ``AveragedModel`` of ``params`` only (``source`` lists the same Parameter
    objects, so the copy it keeps is the EMA of the trainable weights and nothing else), started at
    their current values. After each optimizer step: ``ema.update_parameters(source)``."""
    source = torch.nn.ParameterList(params.values())
    ema = AveragedModel(source, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema.update_parameters(source)  # the first update copies: W_ema = W_0
    return ema, source


def ema_weights(ema: AveragedModel, params: Dict[str, torch.nn.Parameter]) -> Dict[str, torch.Tensor]:
    """``{name: EMA tensor}`` (the live tensors, detached), in the order of ``params``."""
    return {n: s.detach() for n, s in zip(params, ema.module)}


@torch.no_grad()
def load_ema_weights(ema: AveragedModel, params: Dict[str, torch.nn.Parameter], state: Dict[str, torch.Tensor]) -> None:
    for n, s in zip(params, ema.module):
        s.copy_(state[n])


@contextlib.contextmanager
def weights_in(params: Dict[str, torch.nn.Parameter], state: Dict[str, torch.Tensor]):
    """``state`` in the parameters ``params`` inside the block; their values are put back afterwards."""
    keep = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(keep[n])
