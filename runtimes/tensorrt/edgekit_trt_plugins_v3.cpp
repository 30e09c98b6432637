// TensorRT 10.x plugins (IPluginV3 with the V3One core/build/runtime capabilities, IPluginCreatorV3One) for the
// ai.edgekit ops, one template instantiated per op core (edgekit_trt_core.h). Written against the TensorRT 10.3
// headers' documented API (JetPack 6.1/6.2); never compiled here (no TensorRT in edgekit's CI).
#include "edgekit_trt_plugins.h"

#if NV_TENSORRT_MAJOR >= 10

#include <cstring>
#include <vector>

namespace edgekit_trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IExprBuilder;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginResourceContext;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorRTPhase;

template <typename Core>
class PluginV3 final : public IPluginV3,
                       public nvinfer1::IPluginV3OneCore,
                       public nvinfer1::IPluginV3OneBuild,
                       public nvinfer1::IPluginV3OneRuntime {
 public:
  PluginV3(const Core& core, int32_t nb_inputs) : core_(core), nb_inputs_(nb_inputs) {}
  PluginV3(const PluginV3& other) : core_(other.core_), nb_inputs_(other.nb_inputs_) {}
  ~PluginV3() override = default;

  // ---- IPluginV3 ----
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }

  IPluginV3* clone() noexcept override {
    try {
      return new PluginV3(*this);
    } catch (...) {
      log_error(std::string(Core::name()) + ": out of memory in clone()");
      return nullptr;
    }
  }

  // ---- IPluginV3OneCore ----
  char const* getPluginName() const noexcept override { return Core::name(); }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // ---- IPluginV3OneBuild ----
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
    if (!ok(core_.check_nb_inputs(nbInputs)) || nbOutputs != core_.nb_outputs() || nbInputs > kMaxDims) return -1;
    Dims dims[kMaxDims];
    for (int i = 0; i < nbInputs; ++i) dims[i] = from_trt(in[i].desc.dims);
    Dims out;
    if (!ok(core_.infer_output_shape(dims, nbInputs, out))) return -1;
    nb_inputs_ = nbInputs;
    return 0;
  }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != core_.nb_outputs() || nbInputs < 1 || nbInputs > kMaxDims) return -1;
    DType types[kMaxDims];
    for (int i = 0; i < nbInputs; ++i) types[i] = from_trt(inputTypes[i]);
    outputTypes[0] = to_trt(core_.output_type(types, nbInputs));
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                          DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override {
    if (!ok(core_.check_nb_inputs(nbInputs)) || nbOutputs != core_.nb_outputs() || nbInputs > kMaxDims) return -1;
    Dims dims[kMaxDims];
    for (int i = 0; i < nbInputs; ++i) dims[i] = from_trt(inputs[i]);
    Dims out;
    if (!ok(core_.infer_output_shape(dims, nbInputs, out))) return -1;  // checks what is known at build time
    const OutputShapeRule rule = core_.output_shape_rule();
    outputs[0] = inputs[rule.from_input];
    if (rule.last_dim >= 0 && outputs[0].nbDims > 0)
      outputs[0].d[outputs[0].nbDims - 1] = exprBuilder.constant(rule.last_dim);
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (pos < 0 || pos >= nbInputs + nbOutputs || nbInputs + nbOutputs > kMaxDims + 1) return false;
    TensorDesc io[kMaxDims + 1];
    for (int i = 0; i <= pos; ++i) io[i] = from_trt(inOut[i].desc);  // only 0..pos are valid
    return core_.supports(pos, io, nbInputs, nbOutputs);
  }

  int32_t getNbOutputs() const noexcept override { return core_.nb_outputs(); }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override {
    if (nbInputs < 1 || nbInputs > kMaxDims || nbOutputs != 1) return 0;
    TensorDesc in[kMaxDims], out[1];
    for (int i = 0; i < nbInputs; ++i) {
      in[i] = from_trt(inputs[i].desc);
      in[i].dims = from_trt(inputs[i].max);  // enough for every shape of the profile
    }
    out[0] = from_trt(outputs[0].desc);
    out[0].dims = from_trt(outputs[0].max);
    return core_.workspace_size(in, nbInputs, out);
  }

  // Plugin state is the op's fields: a timing-cache key of name + serialized fields lets TensorRT reuse timings.
  char const* getTimingCacheID() noexcept override {
    try {
      const std::vector<uint8_t> state = core_.serialize();
      static const char hex[] = "0123456789abcdef";
      timing_id_ = Core::name();
      timing_id_ += ':';
      for (uint8_t b : state) {
        timing_id_ += hex[b >> 4];
        timing_id_ += hex[b & 15];
      }
      return timing_id_.c_str();
    } catch (...) {
      return nullptr;
    }
  }

  // ---- IPluginV3OneRuntime ----
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                        int32_t nbOutputs) noexcept override {
    if (!ok(core_.check_nb_inputs(nbInputs)) || nbOutputs != core_.nb_outputs() || nbInputs > kMaxDims) return -1;
    Dims dims[kMaxDims];
    for (int i = 0; i < nbInputs; ++i) dims[i] = from_trt(in[i].dims);
    Dims out;
    if (!ok(core_.infer_output_shape(dims, nbInputs, out))) return -1;
    nb_inputs_ = nbInputs;
    return 0;
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

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

  // The fields TensorRT stores in the engine and hands back to createPlugin(kRUNTIME): the core's versioned byte
  // state (kUNKNOWN) and the input count (3 or 4 for MatMulLowBit: whether zero points are present).
  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    try {
      state_ = core_.serialize();
    } catch (...) {
      return nullptr;
    }
    serialized_[0] = PluginField(kStateField, state_.data(), PluginFieldType::kUNKNOWN, static_cast<int32_t>(state_.size()));
    serialized_[1] = PluginField(kNbInputsField, &nb_inputs_, PluginFieldType::kINT32, 1);
    collection_.nbFields = 2;
    collection_.fields = serialized_;
    return &collection_;
  }

 private:
  static bool ok(const Error& e) {
    if (!e.empty()) log_error(e);
    return e.empty();
  }

  Core core_;
  int32_t nb_inputs_ = 0;
  std::vector<uint8_t> state_;
  std::string timing_id_;
  PluginField serialized_[2];
  PluginFieldCollection collection_{};
};

template <typename Core>
class CreatorV3 final : public nvinfer1::IPluginCreatorV3One {
 public:
  CreatorV3() {
    for (const FieldSpec& f : Core::field_specs()) fields_.emplace_back(f.name, nullptr, to_trt(f.type), 1);
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
  }

  char const* getPluginName() const noexcept override { return Core::name(); }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }

  // kBUILD: the ONNX parser's fields (the node's attributes named in getFieldNames, TENSORRT.md §1).
  // kRUNTIME: what getFieldsToSerialize returned when the engine was built.
  IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override {
    try {
      Core core;
      int32_t nb_inputs = 0;
      Error e;
      const int32_t n = fc ? fc->nbFields : 0;
      if (phase == TensorRTPhase::kRUNTIME) {
        e = std::string(Core::name()) + ": serialized fields lack '" + kStateField + "'";
        for (int32_t i = 0; i < n; ++i) {
          const PluginField& f = fc->fields[i];
          if (f.name && !std::strcmp(f.name, kStateField) && f.length >= 0)
            e = Core::deserialize(f.data, static_cast<size_t>(f.length), core);
          else if (f.name && !std::strcmp(f.name, kNbInputsField) && f.type == PluginFieldType::kINT32 && f.length == 1)
            std::memcpy(&nb_inputs, f.data, sizeof(int32_t));
        }
      } else {
        for (int32_t i = 0; i < n && e.empty(); ++i) {
          const PluginField& f = fc->fields[i];
          e = core.set_field(f.name, from_trt(f.type), f.data, f.length);
        }
        if (e.empty()) e = core.validate();
      }
      if (!e.empty()) {
        log_error(std::string(name ? name : "?") + ": " + e);
        return nullptr;
      }
      return new PluginV3<Core>(core, nb_inputs);
    } catch (...) {
      log_error(std::string(Core::name()) + ": createPlugin failed (out of memory)");
      return nullptr;
    }
  }

 private:
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

}  // namespace

nvinfer1::IPluginCreatorInterface* const* creators_v3(int32_t& count) noexcept {
  static CreatorV3<MatMulLowBitCore> lowbit;
  static CreatorV3<MatMulSparse24Core> sparse24;
  static CreatorV3<AttentionInt8Core> attention;
  static nvinfer1::IPluginCreatorInterface* const list[] = {&lowbit, &sparse24, &attention};
  count = 3;
  return list;
}

}  // namespace edgekit_trt

#endif  // NV_TENSORRT_MAJOR >= 10
