// A C entry point that drives the plugin core the way the TensorRT wrappers do (deserialize the state, check the
// input count, infer the output shape, check every type/format position, size the workspace, enqueue), without
// TensorRT: check_core_gpu.py calls it through ctypes on a GPU to test everything below the TensorRT API.
#include <cstring>

#include "edgekit_trt_core.h"

namespace {

using namespace edgekit_trt;

void put_error(char* err, size_t err_size, const std::string& msg) {
  if (err && err_size) {
    std::strncpy(err, msg.c_str(), err_size - 1);
    err[err_size - 1] = '\0';
  }
}

DType to_dtype(int t) {
  switch (t) {
    case 0: return DType::kFLOAT;
    case 1: return DType::kHALF;
    case 2: return DType::kINT8;
    case 3: return DType::kINT32;
    default: return DType::kOTHER;
  }
}

template <typename Op>
int run(const void* state, size_t state_size, int nb_inputs, const int* types, const int* ranks,
        const long long* dims, const void* const* inputs, void* output, void* workspace, size_t workspace_size,
        void* stream, long long* out_dims, int* out_rank, size_t* ws_needed, char* err, size_t err_size) {
  Op op;
  Error e = Op::deserialize(state, state_size, op);
  if (e.empty()) e = op.check_nb_inputs(nb_inputs);
  if (!e.empty()) return put_error(err, err_size, e), 1;
  TensorDesc io[kMaxDims + 1];
  Dims in_dims[kMaxDims];
  for (int i = 0; i < nb_inputs; ++i) {
    if (ranks[i] < 0 || ranks[i] > kMaxDims) return put_error(err, err_size, "bad rank"), 1;
    io[i].dims.nb = ranks[i];
    for (int a = 0; a < ranks[i]; ++a) io[i].dims.d[a] = dims[i * kMaxDims + a];
    io[i].type = to_dtype(types[i]);
    in_dims[i] = io[i].dims;
  }
  DType in_types[kMaxDims];
  for (int i = 0; i < nb_inputs; ++i) in_types[i] = io[i].type;
  e = op.infer_output_shape(in_dims, nb_inputs, io[nb_inputs].dims);
  if (!e.empty()) return put_error(err, err_size, e), 1;
  io[nb_inputs].type = op.output_type(in_types, nb_inputs);
  for (int pos = 0; pos <= nb_inputs; ++pos)
    if (!op.supports(pos, io, nb_inputs, 1))
      return put_error(err, err_size, std::string(Op::name()) + ": unsupported type " + dtype_name(io[pos].type) +
                                          " at position " + std::to_string(pos)),
             1;
  *out_rank = io[nb_inputs].dims.nb;
  for (int a = 0; a < io[nb_inputs].dims.nb; ++a) out_dims[a] = io[nb_inputs].dims.d[a];
  *ws_needed = op.workspace_size(io, nb_inputs, io + nb_inputs);
  if (inputs == nullptr) return 0;  // query only
  if (workspace_size < *ws_needed) return put_error(err, err_size, "workspace too small"), 1;
  const int rc = op.enqueue(io, nb_inputs, io + nb_inputs, inputs, &output, workspace, stream);
  if (rc != 0) put_error(err, err_size, std::string(Op::name()) + ": enqueue failed with code " + std::to_string(rc));
  return rc;
}

}  // namespace

// op_name: a plugin name (EdgekitMatMulLowBit, ...); state: the core's serialize() bytes; types: DType values;
// dims: nb_inputs rows of kMaxDims (8) int64. inputs == nullptr only infers (out_dims, out_rank, ws_needed).
extern "C" int edgekit_trt_core_run(const char* op_name, const void* state, size_t state_size, int nb_inputs,
                                    const int* types, const int* ranks, const long long* dims,
                                    const void* const* inputs, void* output, void* workspace, size_t workspace_size,
                                    void* stream, long long* out_dims, int* out_rank, size_t* ws_needed, char* err,
                                    size_t err_size) {
  if (nb_inputs < 1 || nb_inputs > kMaxDims) return put_error(err, err_size, "bad input count"), 1;
#define EK_RUN(OP)                                                                                              \
  if (!std::strcmp(op_name, OP::name()))                                                                        \
    return run<OP>(state, state_size, nb_inputs, types, ranks, dims, inputs, output, workspace, workspace_size, \
                   stream, out_dims, out_rank, ws_needed, err, err_size);
  EK_RUN(MatMulLowBitCore)
  EK_RUN(MatMulSparse24Core)
  EK_RUN(AttentionInt8Core)
#undef EK_RUN
  put_error(err, err_size, std::string("unknown plugin ") + (op_name ? op_name : "(null)"));
  return 1;
}

// The serialized state of an op from its fields as (name, INT32 or FLOAT32 value) pairs, like a creator's
// createPlugin(kBUILD): writes up to `cap` bytes, returns the state's size (0 on error, message in err).
extern "C" size_t edgekit_trt_core_state(const char* op_name, int nb_fields, const char* const* names,
                                         const int* is_float, const void* const* values, unsigned char* out,
                                         size_t cap, char* err, size_t err_size) {
  auto build = [&](auto op) -> size_t {
    for (int i = 0; i < nb_fields; ++i) {
      Error e = op.set_field(names[i], is_float[i] ? FieldType::kFLOAT32 : FieldType::kINT32, values[i], 1);
      if (!e.empty()) return put_error(err, err_size, e), size_t{0};
    }
    Error e = op.validate();
    if (!e.empty()) return put_error(err, err_size, e), size_t{0};
    const std::vector<uint8_t> s = op.serialize();
    if (s.size() <= cap) std::memcpy(out, s.data(), s.size());
    return s.size();
  };
  if (!std::strcmp(op_name, MatMulLowBitCore::name())) return build(MatMulLowBitCore{});
  if (!std::strcmp(op_name, MatMulSparse24Core::name())) return build(MatMulSparse24Core{});
  if (!std::strcmp(op_name, AttentionInt8Core::name())) return build(AttentionInt8Core{});
  put_error(err, err_size, std::string("unknown plugin ") + (op_name ? op_name : "(null)"));
  return 0;
}
