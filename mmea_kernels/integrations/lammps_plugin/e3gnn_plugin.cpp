// Registers SevenNet's pair style with a LAMMPS that loads plugins ("plugin load e3gnn.so"), so
// that SevenNet files (sevenn's own or `mmea-kernels export --format lammps[-parallel]`) run in a
// stock LAMMPS build, without patching and rebuilding LAMMPS. Built by build.sh here
// against sevenn's pair sources (copied from the installed sevenn package at build time):
// E3GNN_PARALLEL=0 registers `pair_style e3gnn`, 1 `pair_style e3gnn/parallel`.
//
// The registration record below is LAMMPS' lammpsplugin_t (lammpsplugin.h, which LAMMPS does not
// install with its headers): five strings, the factory, the dlopen handle.
#if E3GNN_PARALLEL
#include "pair_e3gnn_parallel.h"
#define E3GNN_CLASS LAMMPS_NS::PairE3GNNParallel
#define E3GNN_NAME "e3gnn/parallel"
#else
#include "pair_e3gnn.h"
#define E3GNN_CLASS LAMMPS_NS::PairE3GNN
#define E3GNN_NAME "e3gnn"
#endif

namespace {
typedef void *(lammpsplugin_factory1)(void *);
typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    void *v2;
  } creator;
  void *handle;
} lammpsplugin_t;
typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);

LAMMPS_NS::Pair *create_pair(LAMMPS_NS::LAMMPS *lmp) { return new E3GNN_CLASS(lmp); }
}  // namespace

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc) {
  lammpsplugin_t plugin;
  plugin.version = LMP_VERSION_STRING;  // the LAMMPS version it was built against (a mismatch: a warning)
  plugin.style = "pair";
  plugin.name = E3GNN_NAME;
  plugin.info = "SevenNet pair_style " E3GNN_NAME " (plugin built by mmea-kernels lammps-build)";
  plugin.author = "SevenNet authors (pair style); mmea_kernels (plugin registration)";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &create_pair;
  plugin.handle = handle;
  (*(lammpsplugin_regfunc) regfunc)(&plugin, lmp);
}
