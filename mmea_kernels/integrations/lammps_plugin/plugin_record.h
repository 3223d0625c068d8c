// LAMMPS' plugin registration record (lammpsplugin_t of lammpsplugin.h, which LAMMPS does not install
// with its headers: five strings, the factory, the dlopen handle) and the call that registers a pair
// style with it. Shared by this directory's plugins (build.sh).
#pragma once

namespace mmea_lammps_plugin {
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

// version: the LAMMPS version built against (LAMMPS warns on a mismatch)
inline void register_pair(const char *name, const char *info, const char *author, void *factory, void *lmp,
                          void *handle, void *regfunc) {
  lammpsplugin_t plugin;
  plugin.version = LMP_VERSION_STRING;
  plugin.style = "pair";
  plugin.name = name;
  plugin.info = info;
  plugin.author = author;
  plugin.creator.v1 = (lammpsplugin_factory1 *) factory;
  plugin.handle = handle;
  (*(lammpsplugin_regfunc) regfunc)(&plugin, lmp);
}
}  // namespace mmea_lammps_plugin
