"""The learning curve of a run (``learning_curve.png``): training and validation loss, and the
validation energy and force MAE, per epoch."""
from __future__ import annotations

import pathlib

from .atomic import atomic_path

__all__ = ["plot_history"]


def plot_history(history, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].semilogy(ep, [h["train_loss"] for h in history], label="train")
    ax[0].semilogy(ep, [h["valid"]["loss"] for h in history], label="valid")
    ax[0].set_xlabel("epoch"); ax[0].set_ylabel("loss"); ax[0].legend()
    ax[1].semilogy(ep, [h["valid"]["energy_mae_meV"] for h in history], label="E MAE (meV)")
    ax[1].semilogy(ep, [h["valid"]["forces_mae_meV_per_A"] for h in history], label="F MAE (meV/Å)")
    ax[1].set_xlabel("epoch"); ax[1].set_title("validation"); ax[1].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:  # whole or not at all, like the run's other files
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
