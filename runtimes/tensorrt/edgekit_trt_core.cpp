// Host parts of the TensorRT-free plugin core (edgekit_trt_core.h): fields, validation, serialization, shapes,
// type/format combinations, workspace sizes. No TensorRT, no CUDA: compiled with g++ for the CPU unit test too.
#include "edgekit_trt_core.h"

#include <cmath>
#include <cstring>

namespace edgekit_trt {

namespace {

// ---- little-endian byte writer / reader (explicit bytes: independent of the host's endianness) ----
class Writer {
 public:
  void u16(uint16_t v) { put(v, 2); }
  void u32(uint32_t v) { put(v, 4); }
  void i32(int32_t v) { put(static_cast<uint32_t>(v), 4); }
  void f32(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    put(bits, 4);
  }
  std::vector<uint8_t> bytes;

 private:
  void put(uint32_t v, int n) {
    for (int i = 0; i < n; ++i) bytes.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
};

class Reader {
 public:
  Reader(const void* data, size_t size) : p_(static_cast<const uint8_t*>(data)), n_(data ? size : 0) {}
  bool u16(uint16_t& v) {
    uint32_t x;
    if (!get(x, 2)) return false;
    v = static_cast<uint16_t>(x);
    return true;
  }
  bool u32(uint32_t& v) { return get(v, 4); }
  bool i32(int32_t& v) {
    uint32_t x;
    if (!get(x, 4)) return false;
    v = static_cast<int32_t>(x);
    return true;
  }
  bool f32(float& v) {
    uint32_t x;
    if (!get(x, 4)) return false;
    std::memcpy(&v, &x, 4);
    return true;
  }
  size_t left() const { return n_ - pos_; }

 private:
  bool get(uint32_t& v, int n) {
    if (left() < static_cast<size_t>(n)) return false;
    v = 0;
    for (int i = 0; i < n; ++i) v |= static_cast<uint32_t>(p_[pos_ + i]) << (8 * i);
    pos_ += n;
    return true;
  }
  const uint8_t* p_;
  size_t n_, pos_ = 0;
};

std::vector<uint8_t> frame(uint16_t op_id, const Writer& payload) {
  Writer w;
  w.u32(kStateMagic);
  w.u16(kStateFormatVersion);
  w.u16(op_id);
  w.u32(static_cast<uint32_t>(payload.bytes.size()));
  w.bytes.insert(w.bytes.end(), payload.bytes.begin(), payload.bytes.end());
  return w.bytes;
}

// Checks the header; leaves `r` at the payload. Version 1 is the only format so far: a later version must keep
// reading version-1 states (engines serialized by older plugin libraries).
Error unframe(Reader& r, uint16_t op_id, const char* op) {
  uint32_t magic = 0, length = 0;
  uint16_t version = 0, id = 0;
  if (!r.u32(magic) || !r.u16(version) || !r.u16(id) || !r.u32(length))
    return std::string(op) + ": serialized state is truncated (no header)";
  if (magic != kStateMagic) return std::string(op) + ": serialized state has a bad magic number";
  if (version == 0 || version > kStateFormatVersion)
    return std::string(op) + ": serialized state format version " + std::to_string(version) +
           " is not supported by this library (newest: " + std::to_string(kStateFormatVersion) + ")";
  if (id != op_id) return std::string(op) + ": serialized state belongs to another op (id " + std::to_string(id) + ")";
  if (length != r.left())
    return std::string(op) + ": serialized state payload is " + std::to_string(r.left()) + " bytes, header says " +
           std::to_string(length);
  return {};
}

Error read_int(const char* op, const char* field, FieldType type, const void* data, int32_t length, int32_t& out) {
  if (type != FieldType::kINT32 || length != 1 || data == nullptr)
    return std::string(op) + ": field '" + field + "' must be one INT32 (an ONNX INT attribute)";
  std::memcpy(&out, data, 4);
  return {};
}

Error read_float(const char* op, const char* field, FieldType type, const void* data, int32_t length, float& out) {
  if (type != FieldType::kFLOAT32 || length != 1 || data == nullptr)
    return std::string(op) + ": field '" + field + "' must be one FLOAT32 (an ONNX FLOAT attribute)";
  std::memcpy(&out, data, 4);
  return {};
}

Error unknown_field(const char* op, const char* field) {
  return std::string(op) + ": unknown field '" + (field ? field : "(null)") + "'";
}

bool known(int64_t d) { return d >= 0; }

Error expect_dim(const char* op, const char* what, const Dims& d, int axis, int64_t want) {
  if (known(d.d[axis]) && d.d[axis] != want)
    return std::string(op) + ": " + what + " has shape " + dims_str(d) + ", dimension " + std::to_string(axis) +
           " must be " + std::to_string(want);
  return {};
}

Error expect_rank(const char* op, const char* what, const Dims& d, int rank) {
  if (d.nb != rank)
    return std::string(op) + ": " + what + " must have rank " + std::to_string(rank) + ", got " + dims_str(d);
  return {};
}

bool is_float_io(DType t) { return t == DType::kFLOAT || t == DType::kHALF; }

Dims replace_last(const Dims& d, int64_t last) {
  Dims out = d;
  if (out.nb > 0 && last >= 0) out.d[out.nb - 1] = last;
  return out;
}

#define EK_TRY(expr)          \
  do {                        \
    Error e_ = (expr);        \
    if (!e_.empty()) return e_; \
  } while (0)

}  // namespace

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFLOAT: return "FLOAT";
    case DType::kHALF: return "HALF";
    case DType::kINT8: return "INT8";
    case DType::kINT32: return "INT32";
    case DType::kBOOL: return "BOOL";
    case DType::kUINT8: return "UINT8";
    default: return "OTHER";
  }
}

int64_t volume(const Dims& d) {
  int64_t v = 1;
  for (int i = 0; i < d.nb; ++i) {
    if (d.d[i] < 0) return -1;
    v *= d.d[i];
  }
  return v;
}

std::string dims_str(const Dims& d) {
  std::string s = "[";
  for (int i = 0; i < d.nb; ++i) s += (i ? ", " : "") + (d.d[i] < 0 ? std::string("?") : std::to_string(d.d[i]));
  return s + "]";
}

// ================================ MatMulLowBit ================================

std::vector<FieldSpec> MatMulLowBitCore::field_specs() {
  return {{"K", FieldType::kINT32}, {"N", FieldType::kINT32}, {"bits", FieldType::kINT32},
          {"group_size", FieldType::kINT32}};
}

Error MatMulLowBitCore::set_field(const char* f, FieldType type, const void* data, int32_t length) {
  const char* op = name();
  if (f && !std::strcmp(f, "K")) return read_int(op, f, type, data, length, K);
  if (f && !std::strcmp(f, "N")) return read_int(op, f, type, data, length, N);
  if (f && !std::strcmp(f, "bits")) return read_int(op, f, type, data, length, bits);
  if (f && !std::strcmp(f, "group_size")) return read_int(op, f, type, data, length, group_size);
  return unknown_field(op, f);
}

Error MatMulLowBitCore::validate() const {
  const std::string op = name();
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8))
    return op + ": bits=" + std::to_string(bits) + " is not supported; use 2, 3, 4 or 8";
  if (!(group_size == 32 || group_size == 64 || group_size == 128))
    return op + ": group_size=" + std::to_string(group_size) + " is not supported; use 32, 64 or 128";
  if (K < 1 || N < 1) return op + ": K and N must be positive, got K=" + std::to_string(K) + ", N=" + std::to_string(N);
  return {};
}

int64_t MatMulLowBitCore::row_bytes() const {
  const int64_t kp = padded_k();
  return bits == 3 ? 3 * ((kp + 7) / 8) : (kp * bits + 7) / 8;
}

std::vector<uint8_t> MatMulLowBitCore::serialize() const {
  Writer w;
  w.i32(K);
  w.i32(N);
  w.i32(bits);
  w.i32(group_size);
  return frame(kOpId, w);
}

Error MatMulLowBitCore::deserialize(const void* data, size_t size, MatMulLowBitCore& out) {
  Reader r(data, size);
  EK_TRY(unframe(r, kOpId, name()));
  MatMulLowBitCore c;
  if (!r.i32(c.K) || !r.i32(c.N) || !r.i32(c.bits) || !r.i32(c.group_size) || r.left())
    return std::string(name()) + ": serialized state payload has the wrong size";
  EK_TRY(c.validate());
  out = c;
  return {};
}

Error MatMulLowBitCore::check_nb_inputs(int32_t nb_inputs) const {
  if (nb_inputs != 3 && nb_inputs != 4)
    return std::string(name()) + ": takes 3 or 4 inputs [A, B_packed, scales(, zero_points)], got " +
           std::to_string(nb_inputs);
  return {};
}

Error MatMulLowBitCore::infer_output_shape(const Dims* in, int32_t nb_inputs, Dims& out) const {
  const char* op = name();
  EK_TRY(validate());
  EK_TRY(check_nb_inputs(nb_inputs));
  if (in[0].nb < 1) return std::string(op) + ": A must have rank >= 1";
  EK_TRY(expect_dim(op, "A", in[0], in[0].nb - 1, K));
  EK_TRY(expect_rank(op, "B_packed", in[1], 2));
  EK_TRY(expect_dim(op, "B_packed", in[1], 0, N));
  EK_TRY(expect_dim(op, "B_packed", in[1], 1, row_bytes()));
  for (int i = 2; i < nb_inputs; ++i) {
    const char* what = i == 2 ? "scales" : "zero_points";
    EK_TRY(expect_rank(op, what, in[i], 2));
    EK_TRY(expect_dim(op, what, in[i], 0, N));
    EK_TRY(expect_dim(op, what, in[i], 1, groups()));
  }
  out = replace_last(in[0], N);
  return {};
}

bool MatMulLowBitCore::supports(int32_t pos, const TensorDesc* io, int32_t nb_inputs, int32_t nb_outputs) const {
  if (pos < 0 || pos >= nb_inputs + nb_outputs || io[pos].format != Format::kLINEAR) return false;
  const DType t = io[pos].type;
  if (pos == 0) return is_float_io(t);
  if (pos == 1) return t == DType::kINT8;
  if (pos == 2) return t == DType::kFLOAT;
  if (pos == 3 && nb_inputs == 4) return t == DType::kINT8;
  return t == io[0].type;  // the output
}

size_t MatMulLowBitCore::workspace_size(const TensorDesc* in, int32_t, const TensorDesc*) const {
  if (in[0].type != DType::kHALF) return 0;
  const int64_t m = volume(in[0].dims) / (K > 0 ? K : 1);
  if (m < 0) return 0;
  return align_up(static_cast<size_t>(m) * K * 4) + align_up(static_cast<size_t>(m) * N * 4);
}

// ================================ MatMulSparse24 ================================

std::vector<FieldSpec> MatMulSparse24Core::field_specs() { return {{"K", FieldType::kINT32}, {"N", FieldType::kINT32}}; }

Error MatMulSparse24Core::set_field(const char* f, FieldType type, const void* data, int32_t length) {
  if (f && !std::strcmp(f, "K")) return read_int(name(), f, type, data, length, K);
  if (f && !std::strcmp(f, "N")) return read_int(name(), f, type, data, length, N);
  return unknown_field(name(), f);
}

Error MatMulSparse24Core::validate() const {
  const std::string op = name();
  if (K < 4 || N < 1) return op + ": K and N must be positive (K >= 4), got K=" + std::to_string(K) + ", N=" + std::to_string(N);
  if (K % 4) return op + ": K=" + std::to_string(K) + " must be a multiple of 4";
  return {};
}

std::vector<uint8_t> MatMulSparse24Core::serialize() const {
  Writer w;
  w.i32(K);
  w.i32(N);
  return frame(kOpId, w);
}

Error MatMulSparse24Core::deserialize(const void* data, size_t size, MatMulSparse24Core& out) {
  Reader r(data, size);
  EK_TRY(unframe(r, kOpId, name()));
  MatMulSparse24Core c;
  if (!r.i32(c.K) || !r.i32(c.N) || r.left()) return std::string(name()) + ": serialized state payload has the wrong size";
  EK_TRY(c.validate());
  out = c;
  return {};
}

Error MatMulSparse24Core::check_nb_inputs(int32_t nb_inputs) const {
  if (nb_inputs != 3)
    return std::string(name()) + ": takes 3 inputs [A, values, indices] (the float variant), got " +
           std::to_string(nb_inputs);
  return {};
}

Error MatMulSparse24Core::infer_output_shape(const Dims* in, int32_t nb_inputs, Dims& out) const {
  const char* op = name();
  EK_TRY(validate());
  EK_TRY(check_nb_inputs(nb_inputs));
  if (in[0].nb < 1) return std::string(op) + ": A must have rank >= 1";
  EK_TRY(expect_dim(op, "A", in[0], in[0].nb - 1, K));
  EK_TRY(expect_rank(op, "values", in[1], 2));
  EK_TRY(expect_dim(op, "values", in[1], 0, N));
  EK_TRY(expect_dim(op, "values", in[1], 1, K / 2));
  EK_TRY(expect_rank(op, "indices", in[2], 2));
  EK_TRY(expect_dim(op, "indices", in[2], 0, N));
  EK_TRY(expect_dim(op, "indices", in[2], 1, (K + 7) / 8));
  out = replace_last(in[0], N);
  return {};
}

bool MatMulSparse24Core::supports(int32_t pos, const TensorDesc* io, int32_t nb_inputs, int32_t nb_outputs) const {
  if (pos < 0 || pos >= nb_inputs + nb_outputs || io[pos].format != Format::kLINEAR) return false;
  const DType t = io[pos].type;
  if (pos == 0) return is_float_io(t);
  if (pos == 1) return t == DType::kHALF;
  if (pos == 2) return t == DType::kINT8;
  return t == io[0].type;
}

size_t MatMulSparse24Core::workspace_size(const TensorDesc* in, int32_t, const TensorDesc*) const {
  if (in[0].type != DType::kFLOAT) return 0;
  const int64_t m = volume(in[0].dims) / (K > 0 ? K : 1);
  if (m < 0) return 0;
  return align_up(static_cast<size_t>(m) * K * 2) + align_up(static_cast<size_t>(m) * N * 2);
}

// ================================ AttentionInt8 ================================

std::vector<FieldSpec> AttentionInt8Core::field_specs() {
  return {{"q_block", FieldType::kINT32}, {"k_block", FieldType::kINT32}, {"smooth_q", FieldType::kINT32},
          {"sm_scale", FieldType::kFLOAT32}};
}

Error AttentionInt8Core::set_field(const char* f, FieldType type, const void* data, int32_t length) {
  if (f && !std::strcmp(f, "q_block")) return read_int(name(), f, type, data, length, q_block);
  if (f && !std::strcmp(f, "k_block")) return read_int(name(), f, type, data, length, k_block);
  if (f && !std::strcmp(f, "smooth_q")) return read_int(name(), f, type, data, length, smooth_q);
  if (f && !std::strcmp(f, "sm_scale")) return read_float(name(), f, type, data, length, sm_scale);
  return unknown_field(name(), f);
}

Error AttentionInt8Core::validate() const {
  const std::string op = name();
  if (q_block < 1 || k_block < 1)
    return op + ": q_block and k_block must be >= 1, got " + std::to_string(q_block) + ", " + std::to_string(k_block);
  if (smooth_q != 0 && smooth_q != 1) return op + ": smooth_q must be 0 or 1, got " + std::to_string(smooth_q);
  if (!(sm_scale >= 0.f) || std::isinf(sm_scale))
    return op + ": sm_scale must be finite and > 0 (0 means 1/sqrt(head dim)), got " + std::to_string(sm_scale);
  return {};
}

float AttentionInt8Core::effective_sm_scale() const {
  return sm_scale > 0.f ? sm_scale : 1.f / std::sqrt(static_cast<float>(kHeadDim));
}

std::vector<uint8_t> AttentionInt8Core::serialize() const {
  Writer w;
  w.i32(q_block);
  w.i32(k_block);
  w.i32(smooth_q);
  w.f32(sm_scale);
  return frame(kOpId, w);
}

Error AttentionInt8Core::deserialize(const void* data, size_t size, AttentionInt8Core& out) {
  Reader r(data, size);
  EK_TRY(unframe(r, kOpId, name()));
  AttentionInt8Core c;
  if (!r.i32(c.q_block) || !r.i32(c.k_block) || !r.i32(c.smooth_q) || !r.f32(c.sm_scale) || r.left())
    return std::string(name()) + ": serialized state payload has the wrong size";
  EK_TRY(c.validate());
  out = c;
  return {};
}

Error AttentionInt8Core::check_nb_inputs(int32_t nb_inputs) const {
  if (nb_inputs != 3) return std::string(name()) + ": takes 3 inputs [Q, K, V], got " + std::to_string(nb_inputs);
  return {};
}

Error AttentionInt8Core::infer_output_shape(const Dims* in, int32_t nb_inputs, Dims& out) const {
  const char* op = name();
  EK_TRY(validate());
  EK_TRY(check_nb_inputs(nb_inputs));
  const char* names[3] = {"Q", "K", "V"};
  for (int i = 0; i < 3; ++i) {
    EK_TRY(expect_rank(op, names[i], in[i], 4));
    EK_TRY(expect_dim(op, names[i], in[i], 3, kHeadDim));  // the CUDA kernel is head dim 64 only
  }
  for (int axis = 0; axis < 4; ++axis) {
    const int64_t k = in[1].d[axis], v = in[2].d[axis];
    if (known(k) && known(v) && k != v)
      return std::string(op) + ": K " + dims_str(in[1]) + " and V " + dims_str(in[2]) + " must have the same shape";
    if (axis < 2 && known(in[0].d[axis]) && known(k) && in[0].d[axis] != k)
      return std::string(op) + ": Q " + dims_str(in[0]) + " and K " + dims_str(in[1]) + " must share batch and heads";
  }
  out = in[0];
  return {};
}

bool AttentionInt8Core::supports(int32_t pos, const TensorDesc* io, int32_t nb_inputs, int32_t nb_outputs) const {
  if (pos < 0 || pos >= nb_inputs + nb_outputs || io[pos].format != Format::kLINEAR) return false;
  if (pos == 0) return is_float_io(io[0].type);
  return io[pos].type == io[0].type;
}

AttentionLayout attention_layout(int64_t BH, int64_t S, int64_t Skv, int32_t q_block, int32_t k_block, bool convert_v,
                                 bool convert_o) {
  const size_t bh = static_cast<size_t>(BH), s = static_cast<size_t>(S), skv = static_cast<size_t>(Skv);
  const size_t d = AttentionInt8Core::kHeadDim;
  AttentionLayout L;
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off += align_up(bytes);
    return at;
  };
  L.q_mean = take(bh * d * 4);
  L.k_mean = take(bh * d * 4);
  L.q8 = take(bh * s * d);
  L.k8 = take(bh * skv * d);
  L.q_scale = take(bh * ((s + q_block - 1) / q_block) * 4);
  L.k_scale = take(bh * ((skv + k_block - 1) / k_block) * 4);
  L.k_bias = take(bh * skv * 4);
  L.v16 = take(convert_v ? bh * skv * d * 2 : 0);
  L.o16 = take(convert_o ? bh * s * d * 2 : 0);
  L.total = off;
  return L;
}

size_t AttentionInt8Core::workspace_size(const TensorDesc* in, int32_t, const TensorDesc*) const {
  const Dims& q = in[0].dims;
  const Dims& k = in[1].dims;
  if (q.nb != 4 || k.nb != 4 || volume(q) < 0 || volume(k) < 0) return 0;
  const bool f32 = in[0].type == DType::kFLOAT;
  return attention_layout(q.d[0] * q.d[1], q.d[2], k.d[2], q_block, k_block, f32, f32).total;
}

}  // namespace edgekit_trt
