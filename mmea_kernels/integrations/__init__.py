"""Bridges to other libraries, each imported only when used: ``cueq`` (cuEquivariance),
``export`` (TorchScript / LAMMPS), ``mace`` (mace-torch models and ASE batches), ``sevenn``
(SevenNet-0)."""
