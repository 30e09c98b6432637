// Shared pieces of the TensorRT wrappers: conversions from TensorRT's types to the core's plain ones, logging.
// Written against TensorRT's documented C++ API (NvInfer.h of 10.x, and 8.5/8.6 for the V2 path); NOT compiled in
// edgekit's CI, which has no TensorRT (runtimes/tensorrt/README.md says what was and was not run).
#pragma once

#include <NvInfer.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <string>

#include "edgekit_trt_core.h"

// TensorRT >= 8.6 has IPluginRegistry::loadLibrary and ILoggerFinder (entry points setLoggerFinder/getCreators).
#if NV_TENSORRT_MAJOR > 8 || (NV_TENSORRT_MAJOR == 8 && NV_TENSORRT_MINOR >= 6)
#define EDGEKIT_TRT_HAS_LOGGER_FINDER 1
#else
#define EDGEKIT_TRT_HAS_LOGGER_FINDER 0
#endif

namespace edgekit_trt {

// Logs through the ILogger TensorRT handed to setLoggerFinder (loadLibrary), else to stderr.
void log_error(const std::string& message) noexcept;

inline DType from_trt(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return DType::kFLOAT;
    case nvinfer1::DataType::kHALF: return DType::kHALF;
    case nvinfer1::DataType::kINT8: return DType::kINT8;
    case nvinfer1::DataType::kINT32: return DType::kINT32;
    case nvinfer1::DataType::kBOOL: return DType::kBOOL;
    case nvinfer1::DataType::kUINT8: return DType::kUINT8;
    default: return DType::kOTHER;
  }
}

inline nvinfer1::DataType to_trt(DType t) {
  switch (t) {
    case DType::kHALF: return nvinfer1::DataType::kHALF;
    case DType::kINT8: return nvinfer1::DataType::kINT8;
    case DType::kINT32: return nvinfer1::DataType::kINT32;
    default: return nvinfer1::DataType::kFLOAT;
  }
}

inline Format from_trt(nvinfer1::TensorFormat f) {
  return f == nvinfer1::TensorFormat::kLINEAR ? Format::kLINEAR : Format::kOTHER;
}

inline FieldType from_trt(nvinfer1::PluginFieldType t) {
  switch (t) {
    case nvinfer1::PluginFieldType::kINT32: return FieldType::kINT32;
    case nvinfer1::PluginFieldType::kFLOAT32: return FieldType::kFLOAT32;
    case nvinfer1::PluginFieldType::kCHAR: return FieldType::kCHAR;
    case nvinfer1::PluginFieldType::kUNKNOWN: return FieldType::kUNKNOWN;
    default: return FieldType::kOTHER;
  }
}

inline nvinfer1::PluginFieldType to_trt(FieldType t) {
  return t == FieldType::kFLOAT32 ? nvinfer1::PluginFieldType::kFLOAT32 : nvinfer1::PluginFieldType::kINT32;
}

inline Dims from_trt(const nvinfer1::Dims& d) {
  Dims out;
  out.nb = d.nbDims < 0 ? 0 : (d.nbDims > kMaxDims ? kMaxDims : d.nbDims);
  for (int i = 0; i < out.nb; ++i) out.d[i] = static_cast<int64_t>(d.d[i]);
  return out;
}

inline TensorDesc from_trt(const nvinfer1::PluginTensorDesc& d) {
  TensorDesc out;
  out.dims = from_trt(d.dims);
  out.type = from_trt(d.type);
  out.format = from_trt(d.format);
  return out;
}

// Build-time dims as the core sees them: constant expressions as numbers, the rest -1.
inline Dims from_trt(const nvinfer1::DimsExprs& d) {
  Dims out;
  out.nb = d.nbDims < 0 ? 0 : (d.nbDims > kMaxDims ? kMaxDims : d.nbDims);
  for (int i = 0; i < out.nb; ++i)
    out.d[i] = (d.d[i] != nullptr && d.d[i]->isConstant()) ? static_cast<int64_t>(d.d[i]->getConstantValue()) : -1;
  return out;
}

// The creators of the three plugins (edgekit_trt_plugins_v3.cpp / _v2.cpp), for registration.
#if NV_TENSORRT_MAJOR >= 10
nvinfer1::IPluginCreatorInterface* const* creators_v3(int32_t& count) noexcept;
#else
nvinfer1::IPluginCreator* const* creators_v2(int32_t& count) noexcept;
#endif

// Names of the fields that carry the serialized state between getFieldsToSerialize and createPlugin(kRUNTIME).
constexpr char kStateField[] = "edgekit_state";
constexpr char kNbInputsField[] = "edgekit_nb_inputs";

}  // namespace edgekit_trt
