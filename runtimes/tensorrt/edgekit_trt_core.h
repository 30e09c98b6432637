// TensorRT-free core of edgekit's TensorRT plugins: one class per ai.edgekit op holding the plugin's fields, their
// validation, a versioned byte serialization, output shape inference, the supported type/format combinations,
// the workspace size and the enqueue (which calls the CUDA launchers of edgekit/kernels/cuda/*.cu).
//
// Nothing here includes a TensorRT or CUDA header: the host parts (edgekit_trt_core.cpp) compile with any C++17
// compiler and are unit-tested on the CPU (test_core.cpp); enqueue lives in edgekit_trt_enqueue.cu. The TensorRT
// wrappers (edgekit_trt_plugins_v3.cpp, edgekit_trt_plugins_v2.cpp) convert TensorRT's types to the plain ones below
// and delegate. The names, version, namespace and field names are mirrored by edgekit/export/trt_plugins.py (the
// single source of truth; tests/test_trt_plugins.py checks that the two agree).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace edgekit_trt {

// ---- identity: the ONNX node (op_type, plugin_version, plugin_namespace) the TensorRT parser maps to a creator ----
constexpr char kPluginNamespace[] = "ai.edgekit";
constexpr char kPluginVersion[] = "1";
constexpr char kMatMulLowBitName[] = "EdgekitMatMulLowBit";
constexpr char kMatMulSparse24Name[] = "EdgekitMatMulSparse24";
constexpr char kAttentionInt8Name[] = "EdgekitAttentionInt8";

// Field names the creators advertise (getFieldNames); the parser passes only these attributes.
constexpr const char* kMatMulLowBitFields[] = {"K", "N", "bits", "group_size"};
constexpr const char* kMatMulSparse24Fields[] = {"K", "N"};
constexpr const char* kAttentionInt8Fields[] = {"q_block", "k_block", "smooth_q", "sm_scale"};

// Serialized state: magic "EKTP", u16 format version, u16 op id, u32 payload bytes, payload (little-endian).
constexpr uint32_t kStateMagic = 0x50544B45u;  // bytes 'E' 'K' 'T' 'P'
constexpr uint16_t kStateFormatVersion = 1;
constexpr int kMaxDims = 8;

// Numeric values equal nvinfer1::DataType's where both exist; the wrappers still convert with a switch.
enum class DType : int32_t { kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3, kBOOL = 4, kUINT8 = 5, kOTHER = 99 };
enum class Format : int32_t { kLINEAR = 0, kOTHER = 99 };
// PluginFieldType subset the parser produces (TENSORRT.md §1): INT -> kINT32, FLOAT -> kFLOAT32, STRING -> kCHAR.
enum class FieldType : int32_t { kINT32, kFLOAT32, kCHAR, kUNKNOWN, kOTHER };

struct Dims {
  int32_t nb = 0;
  int64_t d[kMaxDims] = {};  // -1: not known yet (build time, dynamic shapes)
};

struct TensorDesc {
  Dims dims;
  DType type = DType::kFLOAT;
  Format format = Format::kLINEAR;
};

struct FieldSpec {
  const char* name;
  FieldType type;
};

// One output's shape as a rule the TensorRT wrappers turn into IDimensionExpr: input `from_input`'s dims, with
// the last one replaced by `last_dim` when last_dim >= 0.
struct OutputShapeRule {
  int32_t from_input = 0;
  int64_t last_dim = -1;
};

// Errors are strings (empty: success); no exceptions cross the wrappers' noexcept functions.
using Error = std::string;

const char* dtype_name(DType t);
int64_t volume(const Dims& d);  // -1 if any dimension is unknown
std::string dims_str(const Dims& d);

// ---- MatMulLowBit: Y[..., N] = A[..., K] @ dequant(B_packed, scales, zero_points)^T ----
// Inputs: A fp32|fp16 [..., K]; B_packed int8 (the uint8 bytes reinterpreted) [N, row_bytes(Kp, bits)];
// scales fp32 [N, groups]; zero_points int8 [N, groups] optional. Output: A's type, [..., N].
// fp16 A/Y are converted to fp32 in the workspace (the kernel is fp32).
class MatMulLowBitCore {
 public:
  static constexpr uint16_t kOpId = 1;
  static const char* name() { return kMatMulLowBitName; }
  static std::vector<FieldSpec> field_specs();

  int32_t K = 0, N = 0, bits = 0, group_size = 0;

  Error set_field(const char* field, FieldType type, const void* data, int32_t length);
  Error validate() const;
  std::vector<uint8_t> serialize() const;
  static Error deserialize(const void* data, size_t size, MatMulLowBitCore& out);

  int32_t padded_k() const { return (K + group_size - 1) / group_size * group_size; }
  int32_t groups() const { return (K + group_size - 1) / group_size; }
  int64_t row_bytes() const;  // packed bytes of one row of padded_k() values

  Error check_nb_inputs(int32_t nb_inputs) const;  // 3 or 4
  int32_t nb_outputs() const { return 1; }
  OutputShapeRule output_shape_rule() const { return {0, N}; }
  Error infer_output_shape(const Dims* inputs, int32_t nb_inputs, Dims& out) const;
  DType output_type(const DType* input_types, int32_t nb_inputs) const { return nb_inputs ? input_types[0] : DType::kFLOAT; }
  bool supports(int32_t pos, const TensorDesc* in_out, int32_t nb_inputs, int32_t nb_outputs) const;
  size_t workspace_size(const TensorDesc* inputs, int32_t nb_inputs, const TensorDesc* outputs) const;
  // Launches on `stream` (a cudaStream_t). Returns a cudaError_t value, or -1 for an invalid configuration.
  int32_t enqueue(const TensorDesc* in, int32_t nb_inputs, const TensorDesc* out, const void* const* inputs,
                  void* const* outputs, void* workspace, void* stream) const;
};

// ---- MatMulSparse24 (float variant): Y[..., N] = A[..., K] @ W^T, W 2:4-sparse as fp16 values + indices ----
// Inputs: A fp32|fp16 [..., K]; values fp16 [N, K/2]; indices int8 [N, ceil(K/8)]. Output: A's type, [..., N].
// The CUDA kernel is fp16 in and out: fp32 A/Y go through the workspace. The int8 variants are not plugins
// (TensorRT has no UINT8 intermediate tensors; use TensorRT's own INT8 2:4 sparsity, TENSORRT.md §4).
class MatMulSparse24Core {
 public:
  static constexpr uint16_t kOpId = 2;
  static const char* name() { return kMatMulSparse24Name; }
  static std::vector<FieldSpec> field_specs();

  int32_t K = 0, N = 0;

  Error set_field(const char* field, FieldType type, const void* data, int32_t length);
  Error validate() const;
  std::vector<uint8_t> serialize() const;
  static Error deserialize(const void* data, size_t size, MatMulSparse24Core& out);

  Error check_nb_inputs(int32_t nb_inputs) const;  // 3
  int32_t nb_outputs() const { return 1; }
  OutputShapeRule output_shape_rule() const { return {0, N}; }
  Error infer_output_shape(const Dims* inputs, int32_t nb_inputs, Dims& out) const;
  DType output_type(const DType* input_types, int32_t nb_inputs) const { return nb_inputs ? input_types[0] : DType::kFLOAT; }
  bool supports(int32_t pos, const TensorDesc* in_out, int32_t nb_inputs, int32_t nb_outputs) const;
  size_t workspace_size(const TensorDesc* inputs, int32_t nb_inputs, const TensorDesc* outputs) const;
  int32_t enqueue(const TensorDesc* in, int32_t nb_inputs, const TensorDesc* out, const void* const* inputs,
                  void* const* outputs, void* workspace, void* stream) const;
};

// ---- AttentionInt8: O[B, H, S, 64] = softmax(Q K^T * sm_scale) V with INT8 Q.K^T (attention.py) ----
// Inputs Q [B, H, S, 64], K and V [B, H, Skv, 64], all fp32 or all fp16; output Q's type and shape. enqueue
// smooths and quantizes Q and K on the GPU (attention.quantize) into the workspace, then runs the kernel.
class AttentionInt8Core {
 public:
  static constexpr uint16_t kOpId = 3;
  static constexpr int32_t kHeadDim = 64;
  static const char* name() { return kAttentionInt8Name; }
  static std::vector<FieldSpec> field_specs();

  int32_t q_block = 1, k_block = 64, smooth_q = 1;
  float sm_scale = 0.f;  // 0: 1 / sqrt(head dim)

  Error set_field(const char* field, FieldType type, const void* data, int32_t length);
  Error validate() const;
  std::vector<uint8_t> serialize() const;
  static Error deserialize(const void* data, size_t size, AttentionInt8Core& out);

  Error check_nb_inputs(int32_t nb_inputs) const;  // 3
  int32_t nb_outputs() const { return 1; }
  OutputShapeRule output_shape_rule() const { return {0, -1}; }
  Error infer_output_shape(const Dims* inputs, int32_t nb_inputs, Dims& out) const;
  DType output_type(const DType* input_types, int32_t nb_inputs) const { return nb_inputs ? input_types[0] : DType::kFLOAT; }
  bool supports(int32_t pos, const TensorDesc* in_out, int32_t nb_inputs, int32_t nb_outputs) const;
  size_t workspace_size(const TensorDesc* inputs, int32_t nb_inputs, const TensorDesc* outputs) const;
  float effective_sm_scale() const;
  int32_t enqueue(const TensorDesc* in, int32_t nb_inputs, const TensorDesc* out, const void* const* inputs,
                  void* const* outputs, void* workspace, void* stream) const;
};

// Workspace carving: segments rounded up to 256 bytes (the launchers need 16-byte alignment).
constexpr size_t kWorkspaceAlign = 256;
inline size_t align_up(size_t n) { return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

// Byte offsets of AttentionInt8's workspace segments (shared by workspace_size and enqueue).
struct AttentionLayout {
  size_t q_mean = 0, k_mean = 0, q8 = 0, k8 = 0, q_scale = 0, k_scale = 0, k_bias = 0, v16 = 0, o16 = 0;
  size_t total = 0;
};
AttentionLayout attention_layout(int64_t BH, int64_t S, int64_t Skv, int32_t q_block, int32_t k_block,
                                 bool convert_v, bool convert_o);

}  // namespace edgekit_trt
