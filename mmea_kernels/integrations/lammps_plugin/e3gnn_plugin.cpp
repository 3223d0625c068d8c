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
#include "kernels_loader.h"
#include "plugin_record.h"

namespace {
// SevenNet's pair loads the model in its own coeff(), so this package's kernels (for files exported
// with --kernels cpp) are loaded when the pair is created, where mmea_ops.so exists; without it a
// --kernels cpp file fails in SevenNet's coeff() with torch's "Unknown builtin op: mmea_kernels_ext::..."
LAMMPS_NS::Pair *create_pair(LAMMPS_NS::LAMMPS *lmp) {
  mmea_lammps_plugin::load_kernels();
  return new E3GNN_CLASS(lmp);
}
}  // namespace

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc) {
  mmea_lammps_plugin::register_pair(E3GNN_NAME,
                                    "SevenNet pair_style " E3GNN_NAME " (plugin built by mmea-kernels lammps-build)",
                                    "SevenNet authors (pair style); mmea_kernels (plugin registration)",
                                    (void *) &create_pair, lmp, handle, regfunc);
}
