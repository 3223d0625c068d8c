"""The fine-tuning workflow (needs ASE and a model library), one concern per module:

- :mod:`.config`: :class:`FinetuneConfig`, the settings of a run;
- :mod:`.device`: where a run runs (:func:`~.device.resolve_device`: auto, cpu, cuda, cuda:N);
- :mod:`.data`: labelled frames (:func:`read_frames`), splits, batches;
- :mod:`.e0s`: per-element reference energies (:func:`refit_e0s`);
- :mod:`.loss`: the loss, error metrics (:func:`errors`) and their table (:func:`format_table`);
- :mod:`.ema`: the moving average of the weights (torch's ``AveragedModel``);
- :mod:`.checkpoint`: checkpoints and training states; :func:`load_finetuned`,
  :func:`evaluate_checkpoint`;
- :mod:`.loop`: :func:`finetune`, the training loop (train / train_one_epoch / take_step /
  evaluate / finish), data-parallel under torchrun;
- :mod:`.plot`: the learning curve;
- :mod:`.methods`, :mod:`.foundation`: fine-tuning methods and base models; :mod:`.checks`,
  :mod:`.safe_load`, :mod:`.selfcheck`, :mod:`.guard`: data checks and safety.

The names below were the public names of ``mmea_kernels.finetune``, which is now an alias of
this package."""
from .checkpoint import CHECKPOINT_FORMAT, evaluate_checkpoint, load_finetuned
from .config import FinetuneConfig
from .data import make_batches, read_frames
from .e0s import refit_e0s, set_e0s
from .loop import finetune
from .loss import errors, format_table, loss

__all__ = ["FinetuneConfig", "finetune", "load_finetuned", "evaluate_checkpoint", "read_frames", "CHECKPOINT_FORMAT",
           "refit_e0s", "set_e0s", "errors", "loss", "format_table", "make_batches"]
