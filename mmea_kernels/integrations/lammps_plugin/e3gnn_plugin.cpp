// Registers SevenNet's pair style with a LAMMPS that loads plugins ("plugin load e3gnn.so"), so
// that SevenNet files (sevenn's own or `mmea-kernels export --format lammps[-parallel]`) run in a
// stock LAMMPS build, without patching and rebuilding LAMMPS. Built by build.sh here
// against sevenn's pair sources (copied from the installed sevenn package at build time):
// E3GNN_PARALLEL=0 registers `pair_style e3gnn`, 1 `pair_style e3gnn/parallel`.
#if E3GNN_PARALLEL
#include "pair_e3gnn_parallel.h"
#define E3GNN_CLASS LAMMPS_NS::PairE3GNNParallel
#define E3GNN_NAME "e3gnn/parallel"
#else
#include "pair_e3gnn.h"
#define E3GNN_CLASS LAMMPS_NS::PairE3GNN
#define E3GNN_NAME "e3gnn"
#endif
#include "atom.h"
#include "comm.h"
#include "error.h"
#include "element_masses.h"
#include "kernels_loader.h"

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <caffe2/serialize/inline_container.h>
#include <torch/script.h>
#include "plugin_record.h"

namespace {
// SevenNet's pair loads the model in its own coeff(), so this package's kernels (for files exported
// with --kernels cpp) are loaded when the pair is created, where mmea_ops.so exists. Where they did
// not load, SevenNet's coeff() would fail on a --kernels cpp file with torch's "Unknown builtin op:
// mmea_kernels_ext::mmea_linear": this subclass then loads the files first and, if one needs the
// kernels, says so and what to do.
class PairWithKernels : public E3GNN_CLASS {
 public:
  PairWithKernels(LAMMPS_NS::LAMMPS *lmp, std::string why) : E3GNN_CLASS(lmp), kernels_missing(std::move(why)) {}

  void coeff(int narg, char **arg) override {
    check_files(narg, arg);
    if (!kernels_missing.empty()) {
      for (const std::string &file : model_files(narg, arg)) {
        try {
          torch::jit::load(file, torch::kCPU);
        } catch (const std::exception &e) {  // torch::jit::ErrorReport (unknown op) is not a c10::Error
          if (std::string(e.what()).find("mmea_kernels_ext::") != std::string::npos)
            error->all(FLERR, "{}", mmea_lammps_plugin::needs_kernels(E3GNN_NAME, file, kernels_missing));
        }  // anything else: SevenNet's coeff() reports it as before
      }
    }
    E3GNN_CLASS::coeff(narg, arg);
    check_masses(narg, arg);
  }

 private:
  std::string kernels_missing;

  // a metadata entry SevenNet's deploy writes into a file ("extra/<key>"), "" where there is none or
  // the file is no TorchScript archive
  static std::string meta(const std::string &file, const std::string &key) {
    try {
      caffe2::serialize::PyTorchStreamReader reader(file);
      if (!reader.hasRecord("extra/" + key)) return "";
      auto record = reader.getRecord("extra/" + key);
      return std::string(static_cast<const char *>(std::get<0>(record).get()), std::get<1>(record));
    } catch (const std::exception &) {
      return "";
    }
  }

  // the mix-ups SevenNet's own coeff() reports as "Exception: stod", "basic_string: construction from
  // null", "Argument passed to at() was not in the map", a KeyError at the first step or a segfault
  void check_files(int narg, char **arg) {
#if E3GNN_PARALLEL
    if (narg < 4) error->all(FLERR, "pair_coeff for e3gnn/parallel: * * N DIR element1 element2 ...");
    int n = 0;
    try {
      n = std::stoi(arg[2]);
    } catch (const std::exception &) {
      error->all(FLERR, "pair_coeff for e3gnn/parallel: * * N DIR ...: N (the model's layer count) is '{}'", arg[2]);
    }
    if (std::filesystem::is_directory(arg[3])) {
      int have = 0;
      while (std::filesystem::is_regular_file(std::string(arg[3]) + "/deployed_parallel_" + std::to_string(have) + ".pt"))
        have++;
      if (have != n)
        error->all(FLERR, "{} holds {} layer files (deployed_parallel_0..{}.pt) but pair_coeff gives N = {}: "
                   "use pair_coeff * * {} {} ...", arg[3], have, have - 1, n, have, arg[3]);
    } else if (!std::filesystem::is_regular_file(arg[3])) {
      error->all(FLERR, "pair_style e3gnn/parallel: no directory or file {} (a --format lammps-parallel export is a "
                 "directory of deployed_parallel_<i>.pt files)", arg[3]);
    }
    for (const std::string &file : model_files(narg, arg))
      if (meta(file, "comm_size").empty())
        error->all(FLERR, "{} is no layer of a SevenNet parallel export ({}): pair_style e3gnn/parallel takes "
                   "`mmea-kernels export --format lammps-parallel` (or sevenn's deploy_parallel) output", file,
                   meta(file, "chemical_symbols_to_index").empty() ? "no SevenNet metadata: a MACE file runs with "
                   "pair_style mace" : "a serial e3gnn file: run it with pair_style e3gnn");
#else
    if (comm->nprocs > 1)
      error->all(FLERR, "pair_style e3gnn runs on one process ({} here); for several, use pair_style e3gnn/parallel "
                 "with a --format lammps-parallel export", comm->nprocs);
    if (narg < 3) error->all(FLERR, "pair_coeff for e3gnn: * * FILE element1 element2 ...");
    if (!std::filesystem::is_regular_file(arg[2]))
      error->all(FLERR, "pair_style e3gnn: no file {}", arg[2]);
    if (!meta(arg[2], "comm_size").empty())
      error->all(FLERR, "{} is one layer of a SevenNet parallel export: run the directory with pair_style "
                 "e3gnn/parallel, or export with --format lammps for pair_style e3gnn", arg[2]);
    if (meta(arg[2], "chemical_symbols_to_index").empty() || meta(arg[2], "cutoff").empty())
      error->all(FLERR, "{} is no SevenNet deployment (no chemical_symbols_to_index / cutoff in it): pair_style "
                 "e3gnn takes `mmea-kernels export --format lammps` of a SevenNet checkpoint or sevenn's deploy; "
                 "a MACE file runs with pair_style mace", arg[2]);
#endif
  }

  // pair_coeff's elements follow the atom types: a type whose mass is far from its element's standard
  // mass is most likely listed in another order (isotopes aside), which gives wrong numbers silently
  void check_masses(int narg, char **arg) {
#if E3GNN_PARALLEL
    int first = std::filesystem::is_directory(arg[3]) ? 4 : 3 + std::stoi(arg[2]);
#else
    int first = 3;
#endif
    for (int type = 1; type <= atom->ntypes && first + type - 1 < narg; type++) {
      const char *element = arg[first + type - 1];
      double standard = mmea_lammps_plugin::element_mass(element);
      if (atom->mass == nullptr || !atom->mass_setflag[type] || standard < 0) continue;
      if (std::fabs(atom->mass[type] - standard) > 0.5)
        error->warning(FLERR, "atom type {} has mass {:.3f} but pair_coeff maps it to {} (standard mass {:.3f}): the "
                       "elements must be listed in the order of the atom types; check it (an isotope's mass is "
                       "fine)", type, atom->mass[type], element, standard);
    }
  }

  // the files SevenNet's coeff() loads: `* * FILE ...` (serial), `* * N DIR|FILE_0 .. FILE_N-1 ...` (parallel)
  static std::vector<std::string> model_files(int narg, char **arg) {
    std::vector<std::string> files;
#if E3GNN_PARALLEL
    if (narg < 4) return files;
    int n = 0;
    try {
      n = std::stoi(arg[2]);
    } catch (const std::exception &) {
      return files;
    }
    for (int i = 0; i < n; i++) {
      if (std::filesystem::is_directory(arg[3]))
        files.push_back(std::string(arg[3]) + "/deployed_parallel_" + std::to_string(i) + ".pt");
      else if (3 + i < narg)
        files.push_back(arg[3 + i]);
    }
#else
    if (narg >= 3) files.push_back(arg[2]);
#endif
    std::vector<std::string> exist;
    for (const auto &f : files)
      if (std::filesystem::is_regular_file(f)) exist.push_back(f);
    return exist;
  }
};

LAMMPS_NS::Pair *create_pair(LAMMPS_NS::LAMMPS *lmp) {
  return new PairWithKernels(lmp, mmea_lammps_plugin::load_kernels());
}
}  // namespace

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc) {
  mmea_lammps_plugin::register_pair(E3GNN_NAME,
                                    "SevenNet pair_style " E3GNN_NAME " (plugin built by mmea-kernels lammps-build)",
                                    "SevenNet authors (pair style); mmea_kernels (plugin registration)",
                                    (void *) &create_pair, lmp, handle, regfunc);
}
