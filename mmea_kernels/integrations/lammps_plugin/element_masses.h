// Standard atomic masses (amu) by element symbol, Z = 1..118, as ASE's ase.data.atomic_masses (the
// masses an extended-XYZ -> LAMMPS data conversion writes): the e3gnn plugins compare each atom type's
// mass with the element pair_coeff maps it to, and warn when they differ (an element order that does
// not follow the atom types gives wrong energies and forces without any other message).
#pragma once
#include <cmath>
#include <cstring>

namespace mmea_lammps_plugin {
struct ElementMass {
  const char *symbol;
  double mass;
};
static const ElementMass kElementMasses[] = {
    {"H", 1.0080}, {"He", 4.0026}, {"Li", 6.9400}, {"Be", 9.0122}, {"B", 10.8100}, {"C", 12.0110},
    {"N", 14.0070}, {"O", 15.9990}, {"F", 18.9984}, {"Ne", 20.1797}, {"Na", 22.9898}, {"Mg", 24.3050},
    {"Al", 26.9815}, {"Si", 28.0850}, {"P", 30.9738}, {"S", 32.0600}, {"Cl", 35.4500}, {"Ar", 39.9480},
    {"K", 39.0983}, {"Ca", 40.0780}, {"Sc", 44.9559}, {"Ti", 47.8670}, {"V", 50.9415}, {"Cr", 51.9961},
    {"Mn", 54.9380}, {"Fe", 55.8450}, {"Co", 58.9332}, {"Ni", 58.6934}, {"Cu", 63.5460}, {"Zn", 65.3800},
    {"Ga", 69.7230}, {"Ge", 72.6300}, {"As", 74.9216}, {"Se", 78.9710}, {"Br", 79.9040}, {"Kr", 83.7980},
    {"Rb", 85.4678}, {"Sr", 87.6200}, {"Y", 88.9058}, {"Zr", 91.2240}, {"Nb", 92.9064}, {"Mo", 95.9500},
    {"Tc", 97.9072}, {"Ru", 101.0700}, {"Rh", 102.9055}, {"Pd", 106.4200}, {"Ag", 107.8682}, {"Cd", 112.4140},
    {"In", 114.8180}, {"Sn", 118.7100}, {"Sb", 121.7600}, {"Te", 127.6000}, {"I", 126.9045}, {"Xe", 131.2930},
    {"Cs", 132.9055}, {"Ba", 137.3270}, {"La", 138.9055}, {"Ce", 140.1160}, {"Pr", 140.9077}, {"Nd", 144.2420},
    {"Pm", 144.9128}, {"Sm", 150.3600}, {"Eu", 151.9640}, {"Gd", 157.2500}, {"Tb", 158.9254}, {"Dy", 162.5000},
    {"Ho", 164.9303}, {"Er", 167.2590}, {"Tm", 168.9342}, {"Yb", 173.0540}, {"Lu", 174.9668}, {"Hf", 178.4900},
    {"Ta", 180.9479}, {"W", 183.8400}, {"Re", 186.2070}, {"Os", 190.2300}, {"Ir", 192.2170}, {"Pt", 195.0840},
    {"Au", 196.9666}, {"Hg", 200.5920}, {"Tl", 204.3800}, {"Pb", 207.2000}, {"Bi", 208.9804}, {"Po", 208.9824},
    {"At", 209.9872}, {"Rn", 222.0176}, {"Fr", 223.0197}, {"Ra", 226.0254}, {"Ac", 227.0277}, {"Th", 232.0377},
    {"Pa", 231.0359}, {"U", 238.0289}, {"Np", 237.0482}, {"Pu", 244.0642}, {"Am", 243.0614}, {"Cm", 247.0703},
    {"Bk", 247.0703}, {"Cf", 251.0796}, {"Es", 252.0830}, {"Fm", 257.0951}, {"Md", 258.0984}, {"No", 259.1010},
    {"Lr", 262.1100}, {"Rf", 267.1220}, {"Db", 268.1260}, {"Sg", 271.1340}, {"Bh", 270.1330}, {"Hs", 269.1338},
    {"Mt", 278.1560}, {"Ds", 281.1650}, {"Rg", 281.1660}, {"Cn", 285.1770}, {"Nh", 286.1820}, {"Fl", 289.1900},
    {"Mc", 289.1940}, {"Lv", 293.2040}, {"Ts", 293.2080}, {"Og", 294.2140}};

// the standard mass of `symbol`, or a negative number when it is no element symbol
inline double element_mass(const char *symbol) {
  for (const ElementMass &e : kElementMasses)
    if (std::strcmp(e.symbol, symbol) == 0) return e.mass;
  return -1.0;
}
}  // namespace mmea_lammps_plugin
