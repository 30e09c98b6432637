// Registration entry points of libedgekit_trt_plugins.so (TensorRT's documented plugin-library interface):
//
// - dynamic: `setLoggerFinder` + `getCreators` (TensorRT 10: V3 creators) or `getPluginCreators` (8.x: V2
//   creators), what IPluginRegistry::loadLibrary, `trt.get_plugin_registry().load_library(path)`,
//   `trtexec --dynamicPlugins` and `--setPluginsToSerialize` use;
// - on load (only with -DEDGEKIT_TRT_REGISTER_ON_LOAD, the `_static` library): every creator registered under
//   namespace "ai.edgekit" when the library is loaded, what `trtexec --staticPlugins` and `ctypes.CDLL` need
//   (the job of REGISTER_TENSORRT_PLUGIN, which registers under the empty namespace). Kept out of the dynamic
//   library so that loadLibrary does not register the same creators twice.
#include <cstdio>
#include <mutex>

#include "edgekit_trt_plugins.h"

namespace edgekit_trt {
namespace {

std::mutex g_logger_mutex;
#if EDGEKIT_TRT_HAS_LOGGER_FINDER
nvinfer1::ILoggerFinder* g_logger_finder = nullptr;
#endif

}  // namespace

void log_error(const std::string& message) noexcept {
  try {
    std::lock_guard<std::mutex> lock(g_logger_mutex);
#if EDGEKIT_TRT_HAS_LOGGER_FINDER
    if (g_logger_finder != nullptr) {
      if (nvinfer1::ILogger* logger = g_logger_finder->findLogger()) {
        logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
        return;
      }
    }
#endif
    std::fprintf(stderr, "[edgekit TensorRT plugin] %s\n", message.c_str());
  } catch (...) {
  }
}

#ifdef EDGEKIT_TRT_REGISTER_ON_LOAD
namespace {
struct RegisterOnLoad {
  RegisterOnLoad() {
    int32_t n = 0;
#if NV_TENSORRT_MAJOR >= 10
    nvinfer1::IPluginCreatorInterface* const* list = creators_v3(n);
#else
    nvinfer1::IPluginCreator* const* list = creators_v2(n);
#endif
    // Same order as creators_v3 / creators_v2 (IPluginCreatorInterface itself has no getPluginName).
    const char* const names[] = {kMatMulLowBitName, kMatMulSparse24Name, kAttentionInt8Name};
    for (int32_t i = 0; i < n; ++i)
      if (!getPluginRegistry()->registerCreator(*list[i], kPluginNamespace))
        log_error(std::string("could not register plugin creator ") + (i < 3 ? names[i] : "?") + " under " +
                  kPluginNamespace + " (already registered?)");
  }
};
const RegisterOnLoad g_register_on_load;
}  // namespace
#endif

}  // namespace edgekit_trt

extern "C" {

#if EDGEKIT_TRT_HAS_LOGGER_FINDER
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(edgekit_trt::g_logger_mutex);
  edgekit_trt::g_logger_finder = finder;
}
#endif

#if NV_TENSORRT_MAJOR >= 10
nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  return edgekit_trt::creators_v3(nbCreators);
}
#else
nvinfer1::IPluginCreator* const* getPluginCreators(int32_t& nbCreators) {
  return edgekit_trt::creators_v2(nbCreators);
}
#endif

}  // extern "C"
