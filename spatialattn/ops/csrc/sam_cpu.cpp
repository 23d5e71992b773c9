// Fused CPU kernels for CBAM spatial attention (SAM).
//
// Built on first use by spatialattn.ops._cpp (torch.utils.cpp_extension.load, with
// -fopenmp: at::parallel_for is an inline template and runs on one thread without it).
// float32 / float64 / float16 / bfloat16 (half formats computed in float32, see "Storage and
// compute types"), NCHW-contiguous or channels_last-contiguous inputs. Hot loops use
// GCC/Clang vector extensions (64-byte vectors) so that they vectorise whatever the
// compiler thinks of compares and selects; no -ffast-math (NaN must propagate). Threads
// through at::parallel_for (torch's own OpenMP pool).
//
// Layout of the work (see sam_cpu/sam.h, "the fused SAM"): whole images per thread, each image
// streamed in bands of rows so its second read comes from L2; non-temporal stores once
// input + output exceed the last-level cache.
//
// Notation: x [N, C, H, W], s = optional channel scale [N, C] (x' = x * s),
// a = spatial gate [N, HW], "kinds" = pooling order, 0 = max, 1 = mean.
// Semantics follow spatialattn/ops/reference.py (amax: the gradient at ties is
// split evenly between the tied channels).

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// The kernels, one concept per part (sam_cpu/*.h), in dependency order:
#include "sam_cpu/simd.h"
#include "sam_cpu/rows.h"
#include "sam_cpu/pool.h"
#include "sam_cpu/multiply.h"
#include "sam_cpu/reduce.h"
#include "sam_cpu/gradx.h"
#include "sam_cpu/global_pool.h"
#include "sam_cpu/small_maps.h"
#include "sam_cpu/bands.h"
#include "sam_cpu/tensors.h"
#include "sam_cpu/ops.h"
#include "sam_cpu/sam.h"
#include "sam_cpu/sam_shared_backward.h"
#include "sam_cpu/sam_batchnorm.h"
#include "sam_cpu/channel_mlp.h"
#include "sam_cpu/cbam.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels run without the GIL, as torch's own operators do: other Python threads (a
  // data-loading thread, a second model in a threaded server) go on while a kernel runs. The
  // arguments are converted before the release and the results after the GIL is taken back;
  // nothing in between touches Python. (The knobs below are for tests, set between calls.)
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("pool_forward", &pool_forward, nogil);
  m.def("pool_backward", &pool_backward, nogil);
  m.def("gate_forward", &gate_forward, nogil);
  m.def("gate_backward", &gate_backward, nogil);
  m.def("sam_forward", &sam_forward, nogil);
  m.def("sam_backward", &sam_backward, nogil);
  m.def("sam_forward_bn", &sam_forward_bn, nogil);
  m.def("sam_backward_bn", &sam_backward_bn, nogil);
  m.def("bn_update_running", &bn_update_running);  // a few scalars: kept with the GIL
  m.def("global_pool", &global_pool, nogil);
  m.def("channel_mlp_forward", &channel_mlp_forward, nogil);
  m.def("channel_mlp_backward", &channel_mlp_backward, nogil);
  m.def("cbam_forward", &cbam_forward, nogil);
  m.def("global_pool_counted", &global_pool_counted, nogil);
  m.def("global_pool_backward", &global_pool_backward, py::arg("grad"), py::arg("x"), py::arg("out"),
        py::arg("kinds"), py::arg("into") = py::none(), py::arg("counts") = py::none(), nogil);
  m.def("set_stream_bytes", [](int64_t b) { kStreamBytes = b; });
  m.def("set_band_bytes", [](int64_t b) { kBandBytes = b; });
  m.def("set_band_bytes_nchw", [](int64_t b) { kBandBytesNchw = b; });
  m.def("set_band_rows", [](int64_t r) { kBandRows = r; });
  m.def("set_whole_image_bytes", [](int64_t b) { kWholeImageBytes = b; });
  m.def("set_gp_tile_bytes", [](int64_t b) { kGpTileBytes = b < 0 ? kGpTileDefault : b; });
  m.def("set_shared_backward_bytes", [](int64_t b) { kSharedBwdBytes = b; });
  m.def("set_shared_bytes", [](int64_t b) { kSharedBytes = b < 0 ? kSharedDefault : b; });
  m.def("set_max_bits", [](bool on) { kUseMaxBits = on; });
  m.def("set_max_bits_phase_bytes", [](int64_t b) { kMaxBitsPhaseBytes = b < 0 ? (2 << 20) : b; });
  m.def("has_max_bits", []() { return kMaxBits; });
  m.def("set_one_stream_reduce", [](int v) { kOneStreamReduce = v; });
  m.def("one_stream_reduce", &one_stream_reduce);  // the rule in reduce.h, for tests
  m.def("l2_bytes", &l2_bytes);
  m.def("set_min_run_bytes", [](int64_t b) { kMinRunBytes = b < 0 ? kMinRunDefault : b; });
  m.def("set_pool_short", [](bool on) { kPoolShort = on; });
  m.def("set_pool_wide_bytes", [](int64_t b) { kPoolWideBytes = b < 0 ? kPoolWideDefault : b; });
  m.def("set_row_prefetch", [](int v) { kRowPrefetch = v; });
  // the bytes of work the NCHW pooling and pass A prefetch ahead for x of `elems` float32 elements (0: none)
  m.def("row_prefetch_bytes", [](int64_t elems) { return row_prefetch_bytes<float>(elems); });
  m.def("set_flat_rows_max_hw",
        [](int64_t v) { kFlatRowsMaxHW = v < 0 ? kFlatRowsDefault : std::min(v, kFlatRowsDefault); });
  m.def("set_flat_backward_max_block", [](int64_t v) { kFlatBackwardMaxBlock = v < 0 ? kFlatBackwardBlockDefault : v; });
  // the rows of the backward's blocks (0: by rows) for NCHW (nhwc false) images, the rule in reduce.h, for tests
  m.def("backward_block_rows", &backward_block_rows, py::arg("nhwc"), py::arg("scaled"), py::arg("C"), py::arg("HW"));
  m.def("set_gp_backward_block_bytes",
        [](int64_t b) { kGpBackwardBlockBytes = b < 0 ? kGpBackwardBlockDefault : b; });
  m.def("set_gp_lane_block_max_hw", [](int64_t v) { kGpLaneBlockMaxHW = v < 0 ? kGpLaneBlockDefault : v; });
  m.def("whole_image_bytes", &whole_image_bytes);
  m.def("llc_bytes", &llc_bytes);  // the last-level cache the kernels size their work by
  m.def("band_rows", &band_rows, py::arg("row_bytes"), py::arg("lag"), py::arg("H"), py::arg("nhwc"),
        py::arg("channel_row_bytes") = 0, py::arg("in_llc") = true);  // the rule above, for tests
}
