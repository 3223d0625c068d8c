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
#include "error.h"
#include "kernels_loader.h"

#include <filesystem>
#include <string>
#include <vector>

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
  }

 private:
  std::string kernels_missing;

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
