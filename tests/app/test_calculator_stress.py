"""The ASE calculator's stress (periodic structures): ``(1/V) dE/dε`` in ASE's Voigt order and sign,
against ASE's own finite differences of the energy under strain, for a MACE with random MMEA and
ELoRA adapters in a triclinic cell; a structure that is not periodic in all three directions gets
energies and forces and a stress request that names why it cannot be had."""
import numpy as np
import pytest
import torch

pytest.importorskip("mace")

import mmea_kernels as mk  # noqa: E402
from mmea_kernels.app.calculator import MMEACalculator  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import build_mace  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapted(method: str):
    torch.manual_seed(0)
    net = build_mace("tiny").double()
    mk.inject_adapters(net, method=method, rank=4)
    with torch.no_grad():  # adapters that change the model (at initialisation they are the identity)
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    return net


def _periodic_ethanol():
    a = toy_molecules("ethanol", 1, seed=3)[0]
    a.positions += 1.0
    a.cell = np.diag([6.5, 7.0, 7.5]) + 0.3 * np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])  # triclinic
    a.pbc = True
    return a


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_stress_is_the_strain_derivative_of_the_energy(method):
    calc = MMEACalculator(module=_adapted(method))
    atoms = _periodic_ethanol()
    atoms.calc = calc
    stress = atoms.get_stress()
    ref = calc.calculate_numerical_stress(atoms, d=1e-5)  # ASE: central differences of E under strain
    assert np.abs(ref).max() > 1e-5  # a stress worth comparing
    np.testing.assert_allclose(stress, ref, rtol=1e-6, atol=1e-10)
    assert set(calc.results) >= {"energy", "forces", "stress"}  # one evaluation gives all three (NPT, relaxations)


def test_stress_without_a_periodic_cell_names_why():
    from ase.calculators.calculator import PropertyNotImplementedError

    calc = MMEACalculator(module=_adapted("mmea"))
    for pbc in (False, [True, True, False]):
        atoms = _periodic_ethanol()
        atoms.pbc = pbc
        atoms.calc = calc
        assert np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()
        with pytest.raises(PropertyNotImplementedError, match=r"stress needs a structure periodic in all three "
                                                              r"directions .*pbc=\["):
            atoms.get_stress()
