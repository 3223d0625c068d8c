"""Bridges to other libraries, each imported only when used: ``cueq`` (cuEquivariance),
``export`` (TorchScript / LAMMPS), ``heads`` (the head a multi-head mace model runs), ``mace``
(mace-torch models and ASE batches), ``sevenn`` (SevenNet-0)."""
