// pair_style mace as a LAMMPS plugin ("plugin load DIR/mace.so"): runs the TorchScript files of
// mace-torch's LAMMPS deployment (mace/calculators/lammps_mace.py, LAMMPS_MACE; what
// `mmea-kernels export --format lammps` writes for a MACE checkpoint) in a stock LAMMPS, without
// patching and rebuilding it. Written for mmea_kernels against LAMMPS_MACE's documented interface
// (the data dict, the local/ghost mask, compute_virials); the input commands are those of ACEsuit's
// LAMMPS fork, so one input runs in both:
//
//   pair_style mace no_domain_decomposition   one process; the nodes are the owned atoms, edges to
//                                             ghost atoms become periodic shifts (unit_shifts @ cell)
//   pair_style mace                           any number of processes; the nodes are the owned atoms
//                                             and the ghosts within num_interactions hops of them, the
//                                             energy is that of the owned atoms, forces on ghosts go
//                                             back to their owners (newton on). The ghost cutoff is
//                                             raised to num_interactions * r_max + skin, the reach of
//                                             a message-passing model.
//   pair_coeff * * model.pt H C O             one element per atom type
//
// (`pair_style mace domain_decomposition` is accepted too; the fork takes no argument but the first.)
//
// The energy, the forces and the global virial (from the model's strain derivative) are computed;
// per-atom energies too; per-atom virials are refused. The model runs on the CPU, with TorchScript's
// graph optimisation off (for the whole process). Built by build.sh in this directory.
//
// Files exported with `--kernels cpp` call this package's fused adapter op
// (mmea_kernels_ext::mmea_linear): when a model does not load for want of it, the plugin loads
// mmea_ops.so from its own directory (build.sh compiles it from csrc/ next to mace.so) and tries
// again; never for other files, and never when any op of that namespace is registered already (in
// a Python process by mmea_kernels._C: a second registration would abort the process).
#include <torch/script.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "pair.h"
#include "kernels_loader.h"
#include "plugin_record.h"
#include "update.h"

using namespace LAMMPS_NS;

namespace {
const char *const ELEMENTS[] = {
    "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si", "P",  "S",  "Cl", "Ar",
    "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr",
    "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe",
    "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf",
    "Ta", "W",  "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th",
    "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs",
    "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};

int atomic_number(const std::string &symbol) {
  for (int z = 0; z < 118; z++)
    if (symbol == ELEMENTS[z]) return z + 1;
  return 0;
}

class PairMACEPlugin : public Pair {
 public:
  explicit PairMACEPlugin(LAMMPS *lmp) : Pair(lmp) {
    single_enable = 0;
    restartinfo = 0;
    one_coeff = 1;
    manybody_flag = 1;
    no_virial_fdotr_compute = 1;  // the model's strain derivative (ghosts carry no force without decomposition)
  }
  ~PairMACEPlugin() override {
    if (allocated) {
      memory->destroy(setflag);
      memory->destroy(cutsq);
    }
  }

  void settings(int narg, char **arg) override {
    decomposition = true;  // a re-issued pair_style keeps this object: start from the default
    if (narg > 1) error->all(FLERR, "pair_style mace takes one optional argument: no_domain_decomposition");
    if (narg == 1 && std::string(arg[0]) == "no_domain_decomposition") decomposition = false;
    else if (narg == 1 && std::string(arg[0]) != "domain_decomposition")
      error->all(FLERR, "pair_style mace: unknown argument {} (expected no_domain_decomposition or "
                        "domain_decomposition)", arg[0]);
  }

  void coeff(int narg, char **arg) override {
    const int ntypes = atom->ntypes;
    if (narg != 3 + ntypes)
      error->all(FLERR, "pair_coeff * * <model file> <one element per atom type>: {} atom types, {} arguments",
                 ntypes, narg);
    if (std::string(arg[0]) != "*" || std::string(arg[1]) != "*")
      error->all(FLERR, "pair_style mace needs pair_coeff * * <model file> <elements>");
    for (int attempt = 0;; ++attempt) {
      try {
        model = torch::jit::load(arg[2], torch::kCPU);
        break;
      } catch (const std::exception &e) {
        const std::string what = e.what();
        if (what.find("mmea_kernels_ext::") == std::string::npos)
          error->all(FLERR, "pair_style mace: cannot load the model file {}: {}", arg[2], what);
        const std::string why = attempt == 0 ? mmea_lammps_plugin::load_kernels() : "they are loaded, but the file still fails: " + what;
        if (!why.empty())
          error->all(FLERR, "{}", mmea_lammps_plugin::needs_kernels("mace", arg[2], why));
      }
    }
    // As SevenNet's pair styles: TorchScript's profiling executor costs ~1 s over the first three
    // calls and then runs this model ~20 % slower on the CPU than the plain interpreter (measured).
    torch::jit::setGraphExecutorOptimize(false);
    for (const char *name : {"r_max", "num_interactions", "atomic_numbers"})
      if (!model.hasattr(name))
        error->all(FLERR, "pair_style mace: {} has no {} (not a LAMMPS_MACE file: mmea-kernels export "
                          "--format lammps, or mace's create_lammps_model)", arg[2], name);
    const auto &args = model.get_method("forward").function().getSchema().arguments();  // self first
    if (args.size() != 4 || args[2].name() != "local_or_ghost")
      error->all(FLERR, "pair_style mace: {} is a MACE model but not a LAMMPS_MACE file (its forward does not "
                        "take (data, local_or_ghost, compute_virials): --format torchscript? export with "
                        "mmea-kernels export --format lammps)", arg[2]);
    torch::Tensor r = model.attr("r_max").toTensor();
    dtype = r.scalar_type();
    r_max = r.item<double>();
    num_interactions = model.attr("num_interactions").toTensor().item<int64_t>();
    torch::Tensor zs = model.attr("atomic_numbers").toTensor().to(torch::kLong).contiguous();
    num_species = zs.numel();
    const int64_t *zp = zs.data_ptr<int64_t>();
    std::string known;
    for (int64_t k = 0; k < num_species; k++)
      known += std::string(k ? " " : "") + (zp[k] >= 1 && zp[k] <= 118 ? ELEMENTS[zp[k] - 1] : "?");
    type_index.assign(ntypes + 1, -1);
    for (int t = 1; t <= ntypes; t++) {
      const int z = atomic_number(arg[2 + t]);
      if (z == 0) error->all(FLERR, "pair_coeff: {} (atom type {}) is not an element symbol", arg[2 + t], t);
      for (int64_t k = 0; k < num_species; k++)
        if (zp[k] == z) type_index[t] = k;
      if (type_index[t] < 0)
        error->all(FLERR, "pair_coeff: the model {} has no element {} (atom type {}); its elements: {}", arg[2],
                   arg[2 + t], t, known);
    }
    if (!allocated) {
      allocated = 1;
      memory->create(setflag, ntypes + 1, ntypes + 1, "pair:setflag");
      memory->create(cutsq, ntypes + 1, ntypes + 1, "pair:cutsq");
    }
    for (int i = 1; i <= ntypes; i++)
      for (int j = 1; j <= ntypes; j++) setflag[i][j] = 1;
  }

  void init_style() override {
    if (force->newton_pair == 0) error->all(FLERR, "pair_style mace requires newton pair on");
    if (strcmp(update->unit_style, "metal") != 0)
      error->all(FLERR, "pair_style mace requires units metal (eV, Å), not units {}", update->unit_style);
    for (int k = 1; k <= 3 && atom->molecular != Atom::ATOMIC; k++)
      if (force->special_lj[k] == 0.0 && force->special_coul[k] == 0.0)  // LAMMPS then drops bonded pairs
        error->all(FLERR, "pair_style mace needs every pair in its neighbour list: with bonds in the data, "
                          "set special_bonds lj/coul 1.0 1.0 1.0");
    if (decomposition) {
      neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);
      // a local energy sees num_interactions hops of r_max; the ghosts must reach that far
      const double reach = num_interactions * r_max + neighbor->skin;
      if (comm->cutghostuser < reach) comm->cutghostuser = reach;
    } else {
      if (comm->nprocs > 1)
        error->all(FLERR, "pair_style mace no_domain_decomposition runs on one process ({} here): use "
                          "pair_style mace (domain decomposition)", comm->nprocs);
      if (atom->map_style == Atom::MAP_NONE)
        error->all(FLERR, "pair_style mace no_domain_decomposition needs an atom map (atom_modify map yes)");
      neighbor->add_request(this, NeighConst::REQ_FULL);
    }
  }

  double init_one(int, int) override { return r_max; }

  void compute(int eflag, int vflag) override;

 private:
  torch::jit::Module model;
  bool decomposition = true;
  double r_max = 0.0;
  int64_t num_interactions = 0, num_species = 0;
  std::vector<int64_t> type_index;
  torch::ScalarType dtype = torch::kFloat64;

  void edges(std::vector<int64_t> &index, std::vector<double> &shift, std::vector<double> &unit);
  std::vector<int> prune(std::vector<int64_t> &index, std::vector<double> &shift, std::vector<double> &unit);
};

// The graph's edges (sender = i, receiver = j, atom indices: the vector from i to j is x[j] - x[i] +
// shift) from the full neighbour list, within r_max. Without decomposition, a ghost j stands for its
// owned atom plus a lattice translation (shift, in cell vectors: unit).
void PairMACEPlugin::edges(std::vector<int64_t> &index, std::vector<double> &shift, std::vector<double> &unit) {
  double **x = atom->x;
  const int nlocal = atom->nlocal;
  const double cut2 = r_max * r_max;
  const double *h = domain->h;  // a = (h0, 0, 0), b = (h5, h1, 0), c = (h4, h3, h2)
  const int n_i = list->inum + (decomposition ? list->gnum : 0);
  std::vector<int64_t> senders, receivers;
  for (int ii = 0; ii < n_i; ii++) {
    const int i = list->ilist[ii];
    const int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const double d[3] = {x[j][0] - x[i][0], x[j][1] - x[i][1], x[j][2] - x[i][2]};
      if (d[0] * d[0] + d[1] * d[1] + d[2] * d[2] >= cut2) continue;
      int owner = j;
      double s[3] = {0.0, 0.0, 0.0};
      if (!decomposition && j >= nlocal) {
        owner = atom->map(atom->tag[j]);
        if (owner < 0 || owner >= nlocal)
          error->one(FLERR, "pair_style mace: ghost atom {} has no owned copy", atom->tag[j]);
        for (int k = 0; k < 3; k++) s[k] = x[j][k] - x[owner][k];
      }
      const double nc = std::round(s[2] / h[2]);
      const double nb = std::round((s[1] - nc * h[3]) / h[1]);
      const double na = std::round((s[0] - nb * h[5] - nc * h[4]) / h[0]);
      senders.push_back(i);
      receivers.push_back(owner);
      shift.insert(shift.end(), s, s + 3);
      unit.insert(unit.end(), {na, nb, nc});
    }
  }
  index = senders;
  index.insert(index.end(), receivers.begin(), receivers.end());
}

// With decomposition, the part of the owned + ghost graph the owned atoms' energies depend on: a
// receiver's features after layer t read its senders' after layer t - 1, so the atoms within
// num_interactions hops of an owned atom are the nodes, and only the edges into atoms within
// num_interactions - 1 hops carry a message that reaches an owned energy (the outer ghosts' own
// features never matter beyond layer 0, the species embedding). The same numbers, fewer edges and
// nodes than the whole ghost shell. Renumbers the edges to the nodes (owned atoms first, as they
// are) and returns the atom of each node.
std::vector<int> PairMACEPlugin::prune(std::vector<int64_t> &index, std::vector<double> &shift,
                                       std::vector<double> &unit) {
  const int nlocal = atom->nlocal, nall = nlocal + atom->nghost;
  const int64_t n_edges = (int64_t) shift.size() / 3;
  const int64_t *snd = index.data(), *rcv = index.data() + n_edges;
  const int far = num_interactions + 1;
  std::vector<int> hop(nall, far);
  for (int i = 0; i < nlocal; i++) hop[i] = 0;
  for (int t = 1; t <= num_interactions; t++)  // breadth-first, one layer of edges per pass
    for (int64_t e = 0; e < n_edges; e++)
      if (hop[snd[e]] == t - 1 && hop[rcv[e]] > t) hop[rcv[e]] = t;
  std::vector<int> node(nall, -1), atom_of;
  for (int i = 0; i < nall; i++)
    if (hop[i] < far) {
      node[i] = (int) atom_of.size();
      atom_of.push_back(i);
    }
  std::vector<int64_t> s2, r2;
  std::vector<double> shift2, unit2;
  for (int64_t e = 0; e < n_edges; e++) {
    if (hop[rcv[e]] >= num_interactions) continue;
    if (node[snd[e]] < 0)
      error->one(FLERR, "pair_style mace: an edge from outside the graph (an asymmetric neighbour list)");
    s2.push_back(node[snd[e]]);
    r2.push_back(node[rcv[e]]);
    shift2.insert(shift2.end(), &shift[3 * e], &shift[3 * e] + 3);
    unit2.insert(unit2.end(), &unit[3 * e], &unit[3 * e] + 3);
  }
  index = s2;
  index.insert(index.end(), r2.begin(), r2.end());
  shift.swap(shift2);
  unit.swap(unit2);
  return atom_of;
}

void PairMACEPlugin::compute(int eflag, int vflag) {
  ev_init(eflag, vflag);
  if (vflag_atom) error->all(FLERR, "pair_style mace does not compute per-atom virials");
  const int nlocal = atom->nlocal;
  if (nlocal == 0) return;
  std::vector<int64_t> index;
  std::vector<double> shift, unit;
  edges(index, shift, unit);
  std::vector<int> atom_of;  // the atom of each graph node: the owned atoms, then the ghosts it needs
  if (decomposition) {
    atom_of = prune(index, shift, unit);
  } else {
    for (int i = 0; i < nlocal; i++) atom_of.push_back(i);
  }
  const int nodes = (int) atom_of.size();
  const int64_t n_edges = (int64_t) shift.size() / 3;

  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor pos = torch::empty({nodes, 3}, f64);
  auto p = pos.accessor<double, 2>();
  torch::Tensor species = torch::empty({nodes}, torch::kLong);
  int64_t *sp = species.data_ptr<int64_t>();
  for (int n = 0; n < nodes; n++) {
    for (int k = 0; k < 3; k++) p[n][k] = atom->x[atom_of[n]][k];
    sp[n] = type_index[atom->type[atom_of[n]]];
  }
  torch::Tensor local = (torch::arange(nodes, torch::kLong) < nlocal).to(torch::kFloat64);
  const double *h = domain->h;
  torch::Tensor cell = torch::tensor({h[0], 0.0, 0.0, h[5], h[1], 0.0, h[4], h[3], h[2]}, f64).view({3, 3});
  c10::Dict<std::string, torch::Tensor> data;
  data.insert("positions", pos.to(dtype));
  data.insert("node_attrs", torch::one_hot(species, num_species).to(dtype));
  data.insert("edge_index", torch::from_blob(index.data(), {2, n_edges}, torch::kLong).clone());
  data.insert("shifts", torch::from_blob(shift.data(), {n_edges, 3}, f64).to(dtype).clone());
  data.insert("unit_shifts", torch::from_blob(unit.data(), {n_edges, 3}, f64).to(dtype).clone());
  data.insert("cell", cell.to(dtype));
  data.insert("batch", torch::zeros({nodes}, torch::kLong));
  data.insert("ptr", torch::tensor({(int64_t) 0, (int64_t) nodes}, torch::kLong));
  data.insert("weight", torch::ones({1}, f64).to(dtype));
  c10::impl::GenericDict out = c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
  try {
    out = model.forward({data, local.to(dtype), (bool) vflag_global}).toGenericDict();
  } catch (const std::exception &e) {
    // TorchScript's message is its traceback, the error last: that line, on LAMMPS' one ERROR line
    std::string what(e.what()), last;
    for (size_t a = 0, b; a < what.size(); a = b + 1) {
      b = what.find('\n', a);
      if (b == std::string::npos) b = what.size();
      if (what.find_first_not_of(" \t\r", a) < b) last = what.substr(a, b - a);
    }
    error->one(FLERR, "pair_style mace: the model failed: {}", last.substr(0, 2000));
  }
  if (out.at("total_energy_local").isNone()) error->one(FLERR, "pair_style mace: the model returned no energy");
  torch::Tensor forces = out.at("forces").toTensor().to(torch::kFloat64).contiguous();
  auto fa = forces.accessor<double, 2>();
  for (int n = 0; n < nodes; n++)
    for (int k = 0; k < 3; k++) atom->f[atom_of[n]][k] += fa[n][k];
  if (eflag_global) eng_vdwl += out.at("total_energy_local").toTensor().sum().item<double>();
  if (eflag_atom) {
    torch::Tensor e = out.at("node_energy").toTensor().to(torch::kFloat64).contiguous();
    const double *ep = e.data_ptr<double>();
    for (int i = 0; i < nlocal; i++) eatom[i] += ep[i];
  }
  if (vflag_global) {
    torch::Tensor w = out.at("virials").toTensor().to(torch::kFloat64).reshape({3, 3}).contiguous();
    const double *wp = w.data_ptr<double>();
    const int rc[6] = {0, 4, 8, 1, 2, 5};  // xx yy zz xy xz yz of the row-major 3 x 3
    for (int k = 0; k < 6; k++) virial[k] += wp[rc[k]];
  }
}

Pair *create_pair(LAMMPS *lmp) { return new PairMACEPlugin(lmp); }

}  // namespace

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc) {
  mmea_lammps_plugin::register_pair("mace",
                                    "pair_style mace for mace-torch's LAMMPS_MACE files (plugin by mmea-kernels "
                                    "lammps-build)", "mmea_kernels", (void *) &create_pair, lmp, handle, regfunc);
}
