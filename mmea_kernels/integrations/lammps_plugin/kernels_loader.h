// This package's C++ kernels for the LAMMPS plugins: files exported with `--kernels cpp` call
// mmea_kernels_ext::mmea_linear, which DIR/mmea_ops.so registers (build.sh compiles it from csrc/
// next to the plugins). load_kernels() dlopens it from the directory of the plugin that calls it,
// unless the kernels' ops are registered already: a second registration (e.g. on top of
// mmea_kernels._C in a Python process) would abort the process.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <string>

namespace mmea_lammps_plugin {

// "" when the fused adapter op is registered now, else why not
inline std::string load_kernels() {
  auto &dispatcher = c10::Dispatcher::singleton();
  if (dispatcher.findSchema({"mmea_kernels_ext::mmea_linear", ""})) return "";
  if (dispatcher.findSchema({"mmea_kernels_ext::gate_mul", ""}))
    return "an older build of the kernels without it is loaded in this process (mmea_kernels._C?)";
  Dl_info info;
  if (dladdr(reinterpret_cast<void *>(&load_kernels), &info) == 0 || info.dli_fname == nullptr)
    return "cannot find this plugin's directory";
  std::string path(info.dli_fname);
  path = path.substr(0, path.find_last_of('/') + 1) + "mmea_ops.so";
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) return std::string(dlerror());
  return dispatcher.findSchema({"mmea_kernels_ext::mmea_linear", ""}) ? "" : path + " has no mmea_linear";
}

// the error of a pair style whose model file needs the kernels when they did not load (why)
inline std::string needs_kernels(const std::string &style, const std::string &file, const std::string &why) {
  return "pair_style " + style + ": " + file + " was exported with --kernels cpp and needs this package's kernels "
         "(mmea_ops.so beside this plugin), which did not load: " + why + "; rebuild with mmea-kernels "
         "lammps-build (its output's kernels must not be null), or export with the default --kernels aten";
}

}  // namespace mmea_lammps_plugin
