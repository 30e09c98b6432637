// CPU unit test of the TensorRT-free plugin core (no GPU, no CUDA, no TensorRT): field validation, serialization
// round trips and corruption, shape inference, type/format combinations, workspace sizes.
// Build: g++ -std=c++17 -O1 -Wall -Wextra -Werror test_core.cpp edgekit_trt_core.cpp -o test_core
// (tests/test_trt_plugins.py does, then runs it). Prints one line per failure and "OK <n> checks" on success.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "edgekit_trt_core.h"

using namespace edgekit_trt;

static int g_checks = 0, g_failures = 0;

#define CHECK(cond)                                                      \
  do {                                                                   \
    ++g_checks;                                                          \
    if (!(cond)) {                                                       \
      ++g_failures;                                                      \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);        \
    }                                                                    \
  } while (0)

// The error is non-empty and mentions `part`.
#define CHECK_ERR(expr, part)                                                                    \
  do {                                                                                           \
    const Error e_ = (expr);                                                                     \
    ++g_checks;                                                                                  \
    if (e_.empty() || e_.find(part) == std::string::npos) {                                      \
      ++g_failures;                                                                              \
      std::printf("FAIL %s:%d: %s -> '%s' (want '%s')\n", __FILE__, __LINE__, #expr, e_.c_str(), part); \
    }                                                                                            \
  } while (0)

static Dims dims(std::initializer_list<int64_t> v) {
  Dims d;
  for (int64_t x : v) d.d[d.nb++] = x;
  return d;
}

static bool same(const Dims& a, const Dims& b) {
  if (a.nb != b.nb) return false;
  for (int i = 0; i < a.nb; ++i)
    if (a.d[i] != b.d[i]) return false;
  return true;
}

static MatMulLowBitCore lowbit(int K, int N, int bits, int gs) {
  MatMulLowBitCore c;
  const int32_t v[4] = {K, N, bits, gs};
  const char* names[4] = {"K", "N", "bits", "group_size"};
  for (int i = 0; i < 4; ++i) CHECK(c.set_field(names[i], FieldType::kINT32, &v[i], 1).empty());
  return c;
}

static void test_fields() {
  MatMulLowBitCore c = lowbit(100, 48, 3, 32);
  CHECK(c.validate().empty());
  CHECK(c.K == 100 && c.N == 48 && c.bits == 3 && c.group_size == 32);
  CHECK_ERR(lowbit(64, 8, 5, 32).validate(), "bits=5");
  CHECK_ERR(lowbit(64, 8, 4, 16).validate(), "group_size=16");
  CHECK_ERR(lowbit(0, 8, 4, 32).validate(), "K and N must be positive");
  CHECK_ERR(MatMulLowBitCore{}.validate(), "bits=0");  // a missing field (parser: skipped with a warning)
  const float f = 1.f;
  const int32_t i2[2] = {1, 2};
  CHECK_ERR(c.set_field("K", FieldType::kFLOAT32, &f, 1), "must be one INT32");
  CHECK_ERR(c.set_field("K", FieldType::kINT32, i2, 2), "must be one INT32");
  CHECK_ERR(c.set_field("K", FieldType::kINT32, nullptr, 1), "must be one INT32");
  CHECK_ERR(c.set_field("accuracy_level", FieldType::kINT32, i2, 1), "unknown field 'accuracy_level'");
  CHECK_ERR(c.set_field(nullptr, FieldType::kINT32, i2, 1), "unknown field");

  MatMulSparse24Core s;
  const int32_t k = 10, n = 4;
  CHECK(s.set_field("K", FieldType::kINT32, &k, 1).empty() && s.set_field("N", FieldType::kINT32, &n, 1).empty());
  CHECK_ERR(s.validate(), "multiple of 4");
  s.K = 0;
  CHECK_ERR(s.validate(), "K >= 4");

  AttentionInt8Core a;
  CHECK(a.validate().empty() && a.q_block == 1 && a.k_block == 64 && a.smooth_q == 1);  // the op's defaults
  CHECK(std::fabs(a.effective_sm_scale() - 0.125f) < 1e-7f);
  const float sc = 0.3f, neg = -1.f, nan = std::nanf("");
  CHECK(a.set_field("sm_scale", FieldType::kFLOAT32, &sc, 1).empty() && a.effective_sm_scale() == 0.3f);
  CHECK_ERR(a.set_field("sm_scale", FieldType::kINT32, &k, 1), "must be one FLOAT32");
  AttentionInt8Core bad = a;
  bad.sm_scale = neg;
  CHECK_ERR(bad.validate(), "sm_scale");
  bad.sm_scale = nan;
  CHECK_ERR(bad.validate(), "sm_scale");
  bad = a;
  bad.smooth_q = 2;
  CHECK_ERR(bad.validate(), "smooth_q");
  bad = a;
  bad.k_block = 0;
  CHECK_ERR(bad.validate(), "k_block");
  CHECK((MatMulLowBitCore::field_specs().size() == sizeof(kMatMulLowBitFields) / sizeof(char*)));
  CHECK(!std::strcmp(AttentionInt8Core::field_specs()[3].name, "sm_scale"));
  CHECK(AttentionInt8Core::field_specs()[3].type == FieldType::kFLOAT32);
}

template <typename Op>
static void check_round_trip(const Op& op) {
  const std::vector<uint8_t> s = op.serialize();
  Op back;
  CHECK(Op::deserialize(s.data(), s.size(), back).empty());
  CHECK(back.serialize() == s);
  // header: "EKTP", format version 1 (u16 LE), op id (u16 LE), payload length (u32 LE)
  CHECK(s.size() >= 12 && s[0] == 'E' && s[1] == 'K' && s[2] == 'T' && s[3] == 'P');
  CHECK(s[4] == 1 && s[5] == 0 && s[6] == Op::kOpId && s[7] == 0);
  CHECK(s[8] == s.size() - 12 && s[9] == 0 && s[10] == 0 && s[11] == 0);
  CHECK_ERR(Op::deserialize(s.data(), s.size() - 1, back), "payload is");
  CHECK_ERR(Op::deserialize(s.data(), 5, back), "truncated");
  CHECK_ERR(Op::deserialize(nullptr, 0, back), "truncated");
  std::vector<uint8_t> t = s;
  t[0] = 'X';
  CHECK_ERR(Op::deserialize(t.data(), t.size(), back), "magic");
  t = s;
  t[4] = 2;
  CHECK_ERR(Op::deserialize(t.data(), t.size(), back), "format version 2");
  t = s;
  t[6] = static_cast<uint8_t>(Op::kOpId + 1);
  CHECK_ERR(Op::deserialize(t.data(), t.size(), back), "another op");
  t = s;
  t.push_back(0);
  CHECK_ERR(Op::deserialize(t.data(), t.size(), back), "payload is");
}

static void test_serialization() {
  check_round_trip(lowbit(4096, 11008, 3, 128));
  MatMulSparse24Core s;
  s.K = 4096;
  s.N = 1024;
  check_round_trip(s);
  AttentionInt8Core a;
  a.q_block = 32;
  a.k_block = 16;
  a.smooth_q = 0;
  a.sm_scale = 0.0625f;
  check_round_trip(a);
  AttentionInt8Core back;
  const std::vector<uint8_t> st = a.serialize();
  CHECK(AttentionInt8Core::deserialize(st.data(), st.size(), back).empty());
  CHECK(back.q_block == 32 && back.k_block == 16 && back.smooth_q == 0 && back.sm_scale == 0.0625f);
  // a state that decodes but breaks validation is refused
  std::vector<uint8_t> bad = lowbit(64, 8, 4, 32).serialize();
  bad[12 + 8] = 5;  // bits
  MatMulLowBitCore lb;
  CHECK_ERR(MatMulLowBitCore::deserialize(bad.data(), bad.size(), lb), "bits=5");
  // a state of one op does not load as another
  CHECK_ERR(MatMulSparse24Core::deserialize(st.data(), st.size(), s), "another op");
}

static void test_shapes() {
  MatMulLowBitCore c = lowbit(100, 48, 3, 32);  // Kp 128 -> 3-bit rows of 48 bytes, 4 groups
  CHECK(c.padded_k() == 128 && c.groups() == 4 && c.row_bytes() == 48);
  CHECK(lowbit(100, 48, 2, 32).row_bytes() == 32 && lowbit(100, 48, 4, 64).row_bytes() == 64);
  CHECK(lowbit(100, 48, 8, 128).row_bytes() == 128 && lowbit(4096, 1, 3, 128).row_bytes() == 1536);
  Dims in[4] = {dims({2, 5, 100}), dims({48, 48}), dims({48, 4}), dims({48, 4})};
  Dims out;
  CHECK(c.infer_output_shape(in, 3, out).empty() && same(out, dims({2, 5, 48})));
  CHECK(c.infer_output_shape(in, 4, out).empty() && same(out, dims({2, 5, 48})));
  in[0] = dims({-1, -1, 100});  // dynamic batch and sequence stay symbolic
  CHECK(c.infer_output_shape(in, 3, out).empty() && same(out, dims({-1, -1, 48})));
  CHECK(c.output_shape_rule().from_input == 0 && c.output_shape_rule().last_dim == 48);
  in[0] = dims({2, 64});
  CHECK_ERR(c.infer_output_shape(in, 3, out), "dimension 1 must be 100");
  in[0] = dims({2, 100});
  in[1] = dims({48, 50});
  CHECK_ERR(c.infer_output_shape(in, 3, out), "B_packed has shape [48, 50], dimension 1 must be 48");
  in[1] = dims({48, 48});
  in[3] = dims({48, 3});
  CHECK_ERR(c.infer_output_shape(in, 4, out), "zero_points");
  CHECK_ERR(c.infer_output_shape(in, 2, out), "takes 3 or 4 inputs");

  MatMulSparse24Core s;
  s.K = 20;
  s.N = 6;
  Dims si[3] = {dims({7, 20}), dims({6, 10}), dims({6, 3})};
  CHECK(s.infer_output_shape(si, 3, out).empty() && same(out, dims({7, 6})));
  si[2] = dims({6, 5});
  CHECK_ERR(s.infer_output_shape(si, 3, out), "indices");
  CHECK_ERR(s.infer_output_shape(si, 4, out), "takes 3 inputs");

  AttentionInt8Core a;
  Dims ai[3] = {dims({2, 12, 128, 64}), dims({2, 12, 77, 64}), dims({2, 12, 77, 64})};
  CHECK(a.infer_output_shape(ai, 3, out).empty() && same(out, dims({2, 12, 128, 64})));
  CHECK(a.output_shape_rule().last_dim == -1);
  ai[0] = dims({-1, 12, -1, 64});
  CHECK(a.infer_output_shape(ai, 3, out).empty() && same(out, dims({-1, 12, -1, 64})));
  ai[0] = dims({2, 12, 128, 32});
  CHECK_ERR(a.infer_output_shape(ai, 3, out), "dimension 3 must be 64");
  ai[0] = dims({2, 12, 128, 64});
  ai[2] = dims({2, 12, 78, 64});
  CHECK_ERR(a.infer_output_shape(ai, 3, out), "same shape");
  ai[2] = dims({2, 12, 77, 64});
  ai[1] = dims({2, 8, 77, 64});
  CHECK_ERR(a.infer_output_shape(ai, 3, out), "same shape");
  ai[0] = dims({2, 8, 77, 64});
  ai[2] = dims({2, 8, 77, 64});
  CHECK(a.infer_output_shape(ai, 3, out).empty());
  ai[0] = dims({2, 4, 77, 64});
  CHECK_ERR(a.infer_output_shape(ai, 3, out), "batch and heads");
  ai[0] = dims({12, 128, 64});
  CHECK_ERR(a.infer_output_shape(ai, 3, out), "rank 4");
}

static TensorDesc td(DType t, Dims d = Dims{}, Format f = Format::kLINEAR) {
  TensorDesc x;
  x.type = t;
  x.dims = d;
  x.format = f;
  return x;
}

static void test_formats_and_workspace() {
  MatMulLowBitCore c = lowbit(100, 48, 3, 32);
  TensorDesc io[5] = {td(DType::kFLOAT), td(DType::kINT8), td(DType::kFLOAT), td(DType::kINT8), td(DType::kFLOAT)};
  for (int pos = 0; pos < 5; ++pos) CHECK(c.supports(pos, io, 4, 1));
  TensorDesc io3[4] = {td(DType::kFLOAT), td(DType::kINT8), td(DType::kFLOAT), td(DType::kFLOAT)};
  CHECK(c.supports(3, io3, 3, 1));  // with 3 inputs, position 3 is the output (FLOAT like A)
  io3[3].type = DType::kINT8;
  CHECK(!c.supports(3, io3, 3, 1));
  io[0].type = DType::kHALF;
  CHECK(c.supports(0, io, 4, 1) && !c.supports(4, io, 4, 1));  // output must follow A: HALF
  io[4].type = DType::kHALF;
  CHECK(c.supports(4, io, 4, 1));
  io[1].type = DType::kUINT8;
  CHECK(!c.supports(1, io, 4, 1));  // packed bytes are INT8, never UINT8 (TENSORRT.md rule 4)
  io[1] = td(DType::kINT8, Dims{}, Format::kOTHER);
  CHECK(!c.supports(1, io, 4, 1));
  CHECK(!c.supports(5, io, 4, 1) && !c.supports(-1, io, 4, 1));
  const DType in_types[2] = {DType::kHALF, DType::kINT8};
  CHECK(c.output_type(in_types, 2) == DType::kHALF);

  TensorDesc ws_in[1] = {td(DType::kFLOAT, dims({3, 100}))};
  CHECK(c.workspace_size(ws_in, 3, nullptr) == 0);
  ws_in[0].type = DType::kHALF;  // fp32 copies of A (3 x 100) and Y (3 x 48)
  CHECK(c.workspace_size(ws_in, 3, nullptr) == align_up(3 * 100 * 4) + align_up(3 * 48 * 4));

  MatMulSparse24Core s;
  s.K = 20;
  s.N = 6;
  TensorDesc sio[4] = {td(DType::kFLOAT), td(DType::kHALF), td(DType::kINT8), td(DType::kFLOAT)};
  for (int pos = 0; pos < 4; ++pos) CHECK(s.supports(pos, sio, 3, 1));
  sio[1].type = DType::kFLOAT;
  CHECK(!s.supports(1, sio, 3, 1));  // values are fp16 (the exporter converts them)
  TensorDesc sws[1] = {td(DType::kHALF, dims({7, 20}))};
  CHECK(s.workspace_size(sws, 3, nullptr) == 0);
  sws[0].type = DType::kFLOAT;
  CHECK(s.workspace_size(sws, 3, nullptr) == align_up(7 * 20 * 2) + align_up(7 * 6 * 2));

  AttentionInt8Core a;
  TensorDesc aio[4] = {td(DType::kHALF), td(DType::kHALF), td(DType::kHALF), td(DType::kHALF)};
  for (int pos = 0; pos < 4; ++pos) CHECK(a.supports(pos, aio, 3, 1));
  aio[2].type = DType::kFLOAT;
  CHECK(!a.supports(2, aio, 3, 1));
  aio[0].type = DType::kINT8;
  CHECK(!a.supports(0, aio, 3, 1));
  TensorDesc aws[3] = {td(DType::kFLOAT, dims({2, 3, 100, 64})), td(DType::kFLOAT, dims({2, 3, 70, 64})),
                       td(DType::kFLOAT, dims({2, 3, 70, 64}))};
  const AttentionLayout L = attention_layout(6, 100, 70, 1, 64, true, true);
  CHECK(a.workspace_size(aws, 3, nullptr) == L.total);
  const size_t offs[9] = {L.q_mean, L.k_mean, L.q8, L.k8, L.q_scale, L.k_scale, L.k_bias, L.v16, L.o16};
  const size_t sizes[9] = {6 * 64 * 4, 6 * 64 * 4, 6 * 100 * 64, 6 * 70 * 64, 6 * 100 * 4, 6 * 2 * 4,
                           6 * 70 * 4, 6 * 70 * 64 * 2, 6 * 100 * 64 * 2};
  for (int i = 0; i < 9; ++i) {
    CHECK(offs[i] % kWorkspaceAlign == 0);
    CHECK(offs[i] + sizes[i] <= (i < 8 ? offs[i + 1] : L.total));
  }
  aws[0].type = DType::kHALF;
  CHECK(a.workspace_size(aws, 3, nullptr) == attention_layout(6, 100, 70, 1, 64, false, false).total);
  CHECK(attention_layout(6, 100, 70, 1, 64, false, false).total < L.total);
  aws[0].dims = dims({2, 3, -1, 64});
  CHECK(a.workspace_size(aws, 3, nullptr) == 0);  // unknown until TensorRT passes the profile's max dims
}

static void test_identity() {
  CHECK(!std::strcmp(kPluginNamespace, "ai.edgekit") && !std::strcmp(kPluginVersion, "1"));
  CHECK(!std::strcmp(MatMulLowBitCore::name(), "EdgekitMatMulLowBit"));
  CHECK(!std::strcmp(MatMulSparse24Core::name(), "EdgekitMatMulSparse24"));
  CHECK(!std::strcmp(AttentionInt8Core::name(), "EdgekitAttentionInt8"));
  CHECK(volume(dims({2, 3, 4})) == 24 && volume(dims({2, -1})) == -1 && volume(Dims{}) == 1);
  CHECK(dims_str(dims({2, -1})) == "[2, ?]");
}

int main() {
  test_fields();
  test_serialization();
  test_shapes();
  test_formats_and_workspace();
  test_identity();
  if (g_failures) {
    std::printf("FAILED %d of %d checks\n", g_failures, g_checks);
    return 1;
  }
  std::printf("OK %d checks\n", g_checks);
  return 0;
}
