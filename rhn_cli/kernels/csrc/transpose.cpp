// transpose_into (the recurrent weights' transposed copy for the RHN backward) and
// release (pages of dead buffers back to the system); see transpose.h.
#include "transpose.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace rhn {

void transpose_into(Tensor dst, const Tensor& src) {
  TORCH_CHECK(src.dim() >= 2 && dst.dim() == src.dim() && src.stride(-1) == 1 &&
                  dst.stride(-1) == 1 && dst.size(-1) == src.size(-2) &&
                  dst.size(-2) == src.size(-1) && dst.scalar_type() == src.scalar_type(),
              "rhn native kernels: transpose_into(dst [..., m, n], src [..., n, m]), unit "
              "column strides");
  const auto s3 = src.reshape({-1, src.size(-2), src.size(-1)});
  auto d3 = dst.view({-1, dst.size(-2), dst.size(-1)});
  const int64_t count = s3.size(0), n = s3.size(1), m = s3.size(2);
  const int64_t blocks = (m + 15) / 16;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "rhn_transpose", [&] {
    const scalar_t* from = s3.data_ptr<scalar_t>();
    scalar_t* to = d3.data_ptr<scalar_t>();
    at::parallel_for(0, count * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / blocks, block = task % blocks;
        transpose_columns<scalar_t>(from + k * s3.stride(0), s3.stride(1), n, m,
                                    to + k * d3.stride(0), d3.stride(1), block, block + 1);
      }
      fence_streaming_stores();
    });
  });
}

// MADV_DONTNEED: the pages read as zeros when touched again, and cost a page fault each
// then; for a buffer whose contents are dead but which is kept for reuse: the RHN
// backward's p, once its steps are done, in windows too large to keep all of p.
int64_t release(const Tensor& tensor) {
  TORCH_CHECK(tensor.is_contiguous() && tensor.device().is_cpu(),
              "rhn native kernels: release a contiguous CPU tensor");
#if defined(__linux__)
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const auto first = (begin + page - 1) / page * page;
  const auto last = (begin + tensor.nbytes()) / page * page;
  if (last > first && madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) == 0)
    return static_cast<int64_t>(last - first);
#endif
  return 0;
}

}  // namespace rhn
