"""The neighbour estimate made before any neighbour list is built (``check_geometry``) against the
neighbours ASE counts. A review (2026-12-03) found it was an atom count for partly periodic cells
(``n * prod(1 + 2r/w)``): a 512-atom graphene slab was refused as "about 856 neighbours per atom"
(30 counted) and a 960-atom nanotube as "about 1016" (40 counted)."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, graphene, nanotube
from ase.neighborlist import neighbor_list

from mmea_kernels.train.checks import DataChecks, DataError, check_geometry

R = 5.0


def _counted(a):
    i = neighbor_list("i", a, R)
    return np.bincount(i, minlength=len(a))


def _slab(reps):
    a = graphene(a=2.46, vacuum=10.0).repeat((reps, reps, 1))
    a.pbc = (True, True, False)
    return a


def _cases():
    thick = bulk("Si", "diamond", a=5.43, cubic=True).repeat((3, 3, 4))
    thick.pbc = (True, True, False)
    thick.center(vacuum=8.0, axis=2)
    wire = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 3))
    wire.pbc = (False, False, True)
    wire.center(vacuum=8.0, axis=(0, 1))
    tube = nanotube(10, 10, length=24)
    return {"graphene 512": _slab(16), "graphene 1152": _slab(24), "Si slab": thick, "Cu wire": wire,
            "nanotube": tube}


@pytest.mark.parametrize("name", list(_cases()))
def test_a_large_partly_periodic_system_is_judged_by_its_density(name):
    from mmea_kernels.train.checks import _neighbour_estimate

    a = _cases()[name]
    counted = _counted(a)
    est = _neighbour_estimate(np.asarray(a.positions), np.asarray(a.cell.array), np.asarray(a.pbc), R)
    # an estimate of the mean, from above for thin systems: within a factor of 3 of what is there
    assert counted.mean() / 3 <= est <= 3 * counted.max(), (name, est, counted.mean(), counted.max())
    check_geometry([a], "x.xyz", r_max=R)  # the default bound (500) accepts every one of them


def test_a_periodic_copy_gives_the_same_estimate_as_its_three_dimensional_version():
    from mmea_kernels.train.checks import _neighbour_estimate

    a = bulk("Si", "diamond", a=5.43, cubic=True).repeat((3, 3, 3))
    full = _neighbour_estimate(np.asarray(a.positions), np.asarray(a.cell.array), np.ones(3, bool), R)
    a.pbc = (True, True, False)  # the same crystal cut as a slab: thinner than the cell, denser
    part = _neighbour_estimate(np.asarray(a.positions), np.asarray(a.cell.array), np.asarray(a.pbc), R)
    assert full == pytest.approx(_counted(bulk("Si", "diamond", a=5.43, cubic=True).repeat((3, 3, 3))).mean(),
                                 rel=0.3)
    assert full <= part <= 1.5 * full


@pytest.mark.parametrize("pbc", [(True, True, False), (False, False, True), (True, False, False)])
def test_a_tiny_partly_periodic_cell_is_still_refused_before_a_neighbour_list(pbc):
    h = Atoms("H2", positions=[[0, 0, 0], [0.0, 0.0, 0.0]], cell=np.eye(3) * 0.01, pbc=pbc)
    h.positions[1] = [0.003, 0.004, 0.7]
    with pytest.raises(DataError, match=r"x\.xyz: frame 0: about \d+ neighbours per atom within the cutoff 5 Å "
                                        r"\(bound 500"):
        check_geometry([h], "x.xyz", r_max=R, checks=DataChecks(allow_small_cells=True))


@pytest.mark.parametrize("pbc", [(True, True, False), (False, False, True)])
def test_one_far_atom_does_not_dilute_a_dense_layer(pbc):
    """The estimate takes the densest window one cutoff sphere wide across the periodic vectors: with
    the atoms' whole extent (this change's first form, a review 2026-12-03) one atom 1e4 Å away
    let a 13,500-atom layer through as "about 20 neighbours" (counted here: ~1750)."""
    from mmea_kernels.train.checks import _neighbour_estimate

    grid = np.arange(0, 6, 0.5)
    if pbc[2]:  # a dense wire: a 6 x 6 Å column along the periodic c
        pos = np.stack(np.meshgrid(grid, grid, grid[:6], indexing="ij"), -1).reshape(-1, 3)
        cell, far = [0, 0, 3.0], [1e4, 1e4, 0]
    else:  # a dense slab 6 Å thick in a 6 x 6 Å periodic plane
        pos = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
        cell, far = [6.0, 6.0, 0], [0, 0, 1e4]
    ests = []
    for extra in ([], [far]):
        a = Atoms(f"H{len(pos) + len(extra)}", positions=np.vstack([pos, *([extra] if extra else [])]), cell=cell, pbc=pbc)
        ests.append(_neighbour_estimate(np.asarray(a.positions), np.asarray(a.cell.array), np.asarray(a.pbc), R))
        with pytest.raises(DataError, match=r"about \d+ neighbours per atom within the cutoff 5 Å \(bound 500"):
            check_geometry([a], "x.xyz", r_max=R, checks=DataChecks(allow_small_cells=True))
    assert ests[1] == ests[0] > 500  # the far atom changes nothing
    # and the layer's estimate is what is there (ASE's count of a thin version: 576 atoms)
    a = Atoms(f"H{len(pos)}", positions=pos, cell=cell, pbc=pbc)
    a = a[a.positions[:, 0 if pbc[2] else 2] < 1.9]
    est = _neighbour_estimate(np.asarray(a.positions), np.asarray(a.cell.array), np.asarray(a.pbc), R)
    counted = _counted(a)
    assert counted.mean() / 2 <= est <= 2 * counted.max(), (est, counted.mean(), counted.max())
