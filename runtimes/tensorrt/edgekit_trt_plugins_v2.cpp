// TensorRT 8.x plugins (IPluginV2DynamicExt, IPluginCreator) for the ai.edgekit ops: JetPack 6.0 (TensorRT 8.6.2)
// and 5.1 (8.5.2), where the ONNX parser knows only IPluginCreator (TENSORRT.md §1, §5). Built only when
// NV_TENSORRT_MAJOR < 10 (TensorRT 10 gets the V3 plugins). Written against the 8.5/8.6 headers' documented API;
// never compiled here (no TensorRT in edgekit's CI).
#include "edgekit_trt_plugins.h"

#if NV_TENSORRT_MAJOR < 10

#include <cstring>
#include <vector>

namespace edgekit_trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IExprBuilder;
using nvinfer1::IPluginV2;
using nvinfer1::IPluginV2DynamicExt;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginTensorDesc;

// Serialized V2 plugin: int32 input count (little-endian) followed by the core's versioned state.
template <typename Core>
class PluginV2 final : public IPluginV2DynamicExt {
 public:
  PluginV2(const Core& core, int32_t nb_inputs) : core_(core), nb_inputs_(nb_inputs) {}

  IPluginV2DynamicExt* clone() const noexcept override {
    try {
      auto* p = new PluginV2(core_, nb_inputs_);
      p->setPluginNamespace(namespace_.c_str());
      return p;
    } catch (...) {
      return nullptr;
    }
  }

  DimsExprs getOutputDimensions(int32_t outputIndex, DimsExprs const* inputs, int32_t nbInputs,
                                IExprBuilder& exprBuilder) noexcept override {
    DimsExprs out{};
    if (outputIndex != 0 || !ok(core_.check_nb_inputs(nbInputs)) || nbInputs > kMaxDims) return out;
    Dims dims[kMaxDims];
    for (int i = 0; i < nbInputs; ++i) dims[i] = from_trt(inputs[i]);
    Dims shape;
    if (!ok(core_.infer_output_shape(dims, nbInputs, shape))) return out;
    const OutputShapeRule rule = core_.output_shape_rule();
    out = inputs[rule.from_input];
    if (rule.last_dim >= 0 && out.nbDims > 0)
      out.d[out.nbDims - 1] = exprBuilder.constant(static_cast<int32_t>(rule.last_dim));  // int32 in 8.x
    return out;
  }

  bool supportsFormatCombination(int32_t pos, PluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (pos < 0 || pos >= nbInputs + nbOutputs || nbInputs + nbOutputs > kMaxDims + 1) return false;
    TensorDesc io[kMaxDims + 1];
    for (int i = 0; i <= pos; ++i) io[i] = from_trt(inOut[i]);
    return core_.supports(pos, io, nbInputs, nbOutputs);
  }

  void configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                       int32_t) noexcept override {
    if (!ok(core_.check_nb_inputs(nbInputs)) || nbInputs > kMaxDims) return;
    Dims dims[kMaxDims];
    for (int i = 0; i < nbInputs; ++i) dims[i] = from_trt(in[i].desc.dims);
    Dims out;
    if (ok(core_.infer_output_shape(dims, nbInputs, out))) nb_inputs_ = nbInputs;
  }

  size_t getWorkspaceSize(PluginTensorDesc const* inputs, int32_t nbInputs, PluginTensorDesc const* outputs,
                          int32_t nbOutputs) const noexcept override {
    if (nbInputs < 1 || nbInputs > kMaxDims || nbOutputs != 1) return 0;
    TensorDesc in[kMaxDims], out[1];
    for (int i = 0; i < nbInputs; ++i) in[i] = from_trt(inputs[i]);
    out[0] = from_trt(outputs[0]);
    return core_.workspace_size(in, nbInputs, out);
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    if (nb_inputs_ < 1 || nb_inputs_ > kMaxDims) return -1;
    TensorDesc in[kMaxDims], out[1];
    for (int i = 0; i < nb_inputs_; ++i) in[i] = from_trt(inputDesc[i]);
    out[0] = from_trt(outputDesc[0]);
    const int32_t rc = core_.enqueue(in, nb_inputs_, out, inputs, outputs, workspace, stream);
    if (rc != 0) log_error(std::string(Core::name()) + ": enqueue failed with code " + std::to_string(rc));
    return rc;
  }

  DataType getOutputDataType(int32_t index, DataType const* inputTypes, int32_t nbInputs) const noexcept override {
    DType types[kMaxDims];
    const int32_t n = nbInputs > kMaxDims ? kMaxDims : nbInputs;
    for (int i = 0; i < n; ++i) types[i] = from_trt(inputTypes[i]);
    return index == 0 ? to_trt(core_.output_type(types, n)) : DataType::kFLOAT;
  }

  char const* getPluginType() const noexcept override { return Core::name(); }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  int32_t getNbOutputs() const noexcept override { return core_.nb_outputs(); }
  int32_t initialize() noexcept override { return 0; }
  void terminate() noexcept override {}

  size_t getSerializationSize() const noexcept override { return 4 + core_.serialize().size(); }

  void serialize(void* buffer) const noexcept override {
    auto* p = static_cast<uint8_t*>(buffer);
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(static_cast<uint32_t>(nb_inputs_) >> (8 * i));
    const std::vector<uint8_t> state = core_.serialize();
    std::memcpy(p + 4, state.data(), state.size());
  }

  void destroy() noexcept override { delete this; }
  void setPluginNamespace(char const* ns) noexcept override { namespace_ = ns ? ns : ""; }
  char const* getPluginNamespace() const noexcept override { return namespace_.c_str(); }

 private:
  static bool ok(const Error& e) {
    if (!e.empty()) log_error(e);
    return e.empty();
  }

  Core core_;
  int32_t nb_inputs_ = 0;
  std::string namespace_ = kPluginNamespace;
};

template <typename Core>
class CreatorV2 final : public nvinfer1::IPluginCreator {
 public:
  CreatorV2() {
    for (const FieldSpec& f : Core::field_specs()) fields_.emplace_back(f.name, nullptr, to_trt(f.type), 1);
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
  }

  char const* getPluginName() const noexcept override { return Core::name(); }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }

  IPluginV2* createPlugin(char const* name, PluginFieldCollection const* fc) noexcept override {
    try {
      Core core;
      Error e;
      for (int32_t i = 0; fc && i < fc->nbFields && e.empty(); ++i) {
        const PluginField& f = fc->fields[i];
        e = core.set_field(f.name, from_trt(f.type), f.data, f.length);
      }
      if (e.empty()) e = core.validate();
      if (!e.empty()) {
        log_error(std::string(name ? name : "?") + ": " + e);
        return nullptr;
      }
      auto* p = new PluginV2<Core>(core, 0);  // the input count arrives with configurePlugin
      p->setPluginNamespace(namespace_.c_str());
      return p;
    } catch (...) {
      return nullptr;
    }
  }

  IPluginV2* deserializePlugin(char const* name, void const* serialData, size_t serialLength) noexcept override {
    try {
      const auto* p = static_cast<const uint8_t*>(serialData);
      if (p == nullptr || serialLength < 4) {
        log_error(std::string(name ? name : "?") + ": serialized plugin is truncated");
        return nullptr;
      }
      uint32_t nb = 0;
      for (int i = 0; i < 4; ++i) nb |= static_cast<uint32_t>(p[i]) << (8 * i);
      Core core;
      const Error e = Core::deserialize(p + 4, serialLength - 4, core);
      if (!e.empty()) {
        log_error(std::string(name ? name : "?") + ": " + e);
        return nullptr;
      }
      auto* plugin = new PluginV2<Core>(core, static_cast<int32_t>(nb));
      plugin->setPluginNamespace(namespace_.c_str());
      return plugin;
    } catch (...) {
      return nullptr;
    }
  }

  void setPluginNamespace(char const* ns) noexcept override { namespace_ = ns ? ns : ""; }
  char const* getPluginNamespace() const noexcept override { return namespace_.c_str(); }

 private:
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
  std::string namespace_ = kPluginNamespace;
};

}  // namespace

nvinfer1::IPluginCreator* const* creators_v2(int32_t& count) noexcept {
  static CreatorV2<MatMulLowBitCore> lowbit;
  static CreatorV2<MatMulSparse24Core> sparse24;
  static CreatorV2<AttentionInt8Core> attention;
  static nvinfer1::IPluginCreator* const list[] = {&lowbit, &sparse24, &attention};
  count = 3;
  return list;
}

}  // namespace edgekit_trt

#endif  // NV_TENSORRT_MAJOR < 10
