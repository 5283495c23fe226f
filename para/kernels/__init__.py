"""The matrix products of a CPU decoding step: para::linear (linear.cpp) or torch's own, chosen
per machine by measurement; its attention, para::decode_attention (attention.cpp), which
para/fast.py puts in a compiled step; and a prompt's float32 products: oneDNN's or torch's
default (MKL), chosen by measurement too.

A decoding step multiplies a few rows (one per sequence) by every weight matrix, so its speed is
the rate at which the product reads the weights. torch's F.linear calls MKL, which reads them
near the memory's rate on an Intel Xeon but at a fifth of it on an AMD EPYC (12 against 62 GB/s
measured, float32, batch 1), and reads bfloat16 slower still. linear.cpp streams each weight row
once for all the rows, converting bfloat16 or int8 weights to float32 in registers.

Both are compiled on first use with torch.utils.cpp_extension (about 30 s on 2 cores; torch keeps
the build in ~/.cache/torch_extensions) for this CPU (-march=native). Which product is faster
for 1 row and for 2-8 rows is then measured on a model's own weights, once per machine and model
shape, and kept in ~/.cache/para/kernels-<machine>-<sources>.json; so is how many weight rows
para::linear reads together for one row of x (its tile). Where the C++ cannot be built (no
compiler), torch's product is used, with a one-line warning.

PARA_KERNELS=torch uses torch's products only; PARA_KERNELS=para uses linear.cpp wherever it
applies, without measuring. PARA_KERNELS_MARCH builds for another instruction set (target()).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from para.files import WriteError, atomic_write

SOURCES = [Path(__file__).with_name(name) for name in ("linear.cpp", "attention.cpp")]
MAX_ROWS = 8           # rows of x per pass over the weights; more rows go to torch's matrix product


def target() -> str:
    """The instruction set the kernels are built for (-march): this CPU's own, or PARA_KERNELS_MARCH
    (the tests build for x86-64-v3, AVX2 without AVX-512, to run the loops other CPUs take)."""
    return os.environ.get("PARA_KERNELS_MARCH", "native")


def machine(threads: bool = True) -> str:
    """A short name for this CPU, this torch and the target (and the threads in use): a build
    holds for these only, a measured choice for these threads too."""
    cpu = platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line for line in info.splitlines() if line.startswith("model name")) + \
            next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    key = f"{cpu}|{torch.__version__}|{target()}" + (f"|{torch.get_num_threads()}" if threads else "")
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def mode() -> str:
    return os.environ.get("PARA_KERNELS", "measure")


@functools.cache
def built() -> bool:
    """Compile and load linear.cpp once; False (with a warning) where that is not possible."""
    if mode() == "torch":
        return False
    from torch.utils import cpp_extension
    try:
        # one build per CPU, torch, target and copy of the source: two checkouts, or a checkout and an
        # installed package, would otherwise rebuild each other's (torch rebuilds when the path changes)
        where = hashlib.sha256(str(SOURCES[0].parent).encode()).hexdigest()[:8]
        cpp_extension.load(name=f"para_kernels_{machine(threads=False)}_{where}",
                           sources=[str(source) for source in SOURCES],
                           extra_cflags=["-O3", f"-march={target()}", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:   # no compiler, no headers: the products and attention stay torch's
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"para: warning: para/kernels could not be built ({reason}); "
              "decoding uses torch's products and attention", file=sys.stderr)
        return False

    @torch.library.register_fake("para::linear")
    def _(x, weight, scale=None, bias=None, tile=1):   # the output's shape, for torch.compile
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("para::decode_attention")
    def _(q, k, v, mask, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    return True


HUGE_PAGE, CACHE_LINE = 2 << 20, 64


def homes_in_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Empty tensors shaped as each of `tensors` (CPU tensors), one after another, each at a cache
    line, in one area of memory that Linux is asked to back with 2 MB pages (transparent huge
    pages, madvise); None where not possible. A decoding step streams every weight: in huge pages
    it walks the page tables 512 times less often, and weights laid out in the order it reads
    them make nearly one stream of a whole step. On a 2-core AMD EPYC VM a step's 210 bfloat16
    products read 29-38 GB/s laid out so, against 25-27 each in its own memory (docs/design.md)."""
    sizes = [-(-t.nbytes // CACHE_LINE) * CACHE_LINE for t in tensors]
    if any(t.device.type != "cpu" for t in tensors) or sum(sizes) < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    # private and anonymous (a shared mapping would be shmem, which Linux backs with small pages); page-aligned:
    # the first huge-page boundary in it is found below
    area = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(area)) % HUGE_PAGE
    homes = []
    for t, size in zip(tensors, sizes):
        home = torch.frombuffer(area, dtype=torch.uint8, count=t.nbytes, offset=offset)
        homes.append(home.view(t.dtype).view(t.shape))
        offset += size
    return homes


# glibc's malloc settings (mallopt): the largest block it may take from its heap (the most it
# allows on 64-bit Linux), and how much freed memory its heap may keep (int-sized)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BLOCKS_BELOW, KEEP_FREED = 32 << 20, 2 ** 31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory torch frees for its next tensors, instead of returning
    each large block to Linux and taking it back page by page: a prefill of 8 x 274 tokens made
    its intermediate tensors from 100,000-300,000 fresh pages (page faults, each page zeroed by
    Linux), and took 1.76-1.90 against 2.02-2.38 s (SmolLM2, float32, Intel Xeon). The process
    then keeps its largest heap (up to 2 GB of freed memory) for its life; blocks over 32 MB are
    still mapped and returned. Process-wide, once; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version   # glibc's; another C library's malloc has its own settings
    except (OSError, AttributeError):
        return False
    # both: setting either ends glibc's own adjustment of the other (the heap then returned memory at once)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_BELOW)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED))


def torch_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, product=F.linear) -> torch.Tensor:
    """The same product with torch's own kernels (`product`): int8 weights are converted to x's
    dtype first (as gpt-fast does; on a GPU torch.compile fuses the conversion into the product)."""
    y = product(x, weight.to(x.dtype))
    if scale is not None:
        y = y * scale.to(y.dtype)
    return y if bias is None else y + bias.to(y.dtype)


@functools.cache
def sources_version() -> str:
    """A short hash of the kernels' sources (they do not change under a running process)."""
    return hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES)).hexdigest()[:8]


def choice_file() -> Path:
    """Where the choices measured on this machine are kept: one file per machine and version of
    the kernels' sources (a choice measured on another version does not hold)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "para" / f"kernels-{machine()}-{sources_version()}.json"


def kept_choice(key: str, measure) -> object:
    """choice_file()[key], measured (measure()) and written there the first time."""
    path = choice_file()
    try:
        choices = json.loads(path.read_text())
    except (OSError, ValueError):
        choices = {}
    if key not in choices:
        choices[key] = measure()
        try:
            atomic_write(path, lambda f: f.write(json.dumps(choices, indent=1).encode()))
        except WriteError:   # a cache it cannot keep: the choice holds for this process only
            pass
    return choices[key]


def product_key(products: list[tuple[torch.Tensor, torch.Tensor | None]]) -> str:
    """The dtype and shapes of a list of weights, as a choice is kept under them."""
    shapes = [(tuple(weight.shape), weight.dtype) for weight, _ in products]
    dtype = str(products[0][0].dtype).removeprefix("torch.")
    return f"{dtype}, {len(shapes)} weights {hashlib.sha256(repr(shapes).encode()).hexdigest()[:12]}"


TILES = (1, 2, 4)   # the weight rows para::linear can read together for one row of x


def single_row_tile(products: list[tuple[torch.Tensor, torch.Tensor | None]]) -> int:
    """How many weight rows (of TILES) para::linear reads together for one row of x, multiplying
    by these weights (with their int8 scales, or None) fastest on this machine: measured on the
    weights themselves, once per machine and list of shapes, then read from choice_file(). On the
    Intel Xeon 2 rows for float32 weights and 4 for bfloat16 and int8 made a step's products 6-29%
    faster than 1, chosen before on the AMD EPYC (docs/design.md). 1 where not measured."""
    if not built() or not products or mode() == "para":
        return 1
    tile = kept_choice(f"{product_key(products)}, tile",
                       lambda: quickest({tile: functools.partial(torch.ops.para.linear, tile=tile) for tile in TILES},
                                        sample_calls(products, 1)))
    return tile if tile in TILES else 1   # (a file edited by hand)


def para_rows(products: list[tuple[torch.Tensor, torch.Tensor | None]], tile: int = 1) -> frozenset[int]:
    """The row counts (of 1..MAX_ROWS) at which para::linear (with `tile` for one row) multiplies
    by these weights (with their int8 scales, or None) faster than torch's product on this
    machine. Measured on the weights themselves (a model's projections in the order a step reads
    them), once per machine and list of shapes, then read from choice_file(): the faster product
    depends on the shapes as well as the CPU (on the Intel Xeon MKL reads 4096-wide rows faster,
    para::linear SmolLM2's 576-wide ones, docs/design.md)."""
    if not built() or not products:
        return frozenset()
    if mode() == "para":
        return frozenset(range(1, MAX_ROWS + 1))
    choice = kept_choice(f"{product_key(products)}, tile {tile}",
                         lambda: {str(rows): faster(products, rows, tile) for rows in (1, MAX_ROWS)})
    one, several = choice["1"], choice[str(MAX_ROWS)]
    return frozenset(rows for rows in range(1, MAX_ROWS + 1) if (one if rows == 1 else several) == "para")


@functools.cache
def onednn_prefill() -> bool:
    """Whether oneDNN's float32 matrix product beats torch's default (MKL) for many rows (a
    prompt's) on this machine: measured once, then read from choice_file(). On the AMD EPYC it
    took a prefill of 8 x 274 tokens from 4.70 to 4.01 s (MKL's slow paths again)."""
    if mode() == "torch" or not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return mode() == "para" or kept_choice("float32 prefill", faster_prefill) == "onednn"


def quickest(products: dict, calls: list[tuple]) -> object:
    """The key of the product that runs `calls` (argument tuples) fastest, interleaved, best of 3."""
    seconds = {}
    with torch.inference_mode():
        for name, product in list(products.items()) * 3:
            start = time.perf_counter()
            for args in calls:
                product(*args)
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - start)
    return min(seconds, key=seconds.get)


ONEDNN_WEIGHTS = (torch.float32, torch.int8)   # int8 weights are converted to float32 first, as for torch's


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def faster_prefill() -> str:
    """'onednn' or 'torch': which multiplies 512 float32 rows by a few 2048 x 2048 weights faster."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2048, generator=generator)
    calls = [(x, torch.randn(2048, 2048, generator=generator)) for _ in range(3)]
    return quickest({"onednn": onednn_linear, "torch": F.linear}, calls)


MEASURED_BYTES = 256 << 20   # of a model's weights: enough to stream from memory past a CPU's caches


def sample_calls(products: list[tuple[torch.Tensor, torch.Tensor | None]], rows: int) -> list[tuple]:
    """(x, weight, scale) for `rows` random rows of x by each of these weights (their first
    MEASURED_BYTES); x is float32 for int8 weights, else of the weights' dtype."""
    generator = torch.Generator().manual_seed(0)
    calls, measured, xs = [], 0, {}
    for weight, scale in products:
        if measured >= MEASURED_BYTES:
            break
        dtype = torch.float32 if weight.dtype == torch.int8 else weight.dtype
        if (weight.shape[1], dtype) not in xs:
            xs[weight.shape[1], dtype] = torch.randn(rows, weight.shape[1], generator=generator).to(dtype)
        calls.append((xs[weight.shape[1], dtype], weight, scale))
        measured += weight.nbytes
    return calls


def faster(products: list[tuple[torch.Tensor, torch.Tensor | None]], rows: int, tile: int = 1) -> str:
    """'para' (with `tile` for one row) or 'torch': which multiplies `rows` rows of x by these
    weights faster."""
    para = functools.partial(torch.ops.para.linear, tile=tile)
    return quickest({"para": para, "torch": torch_linear}, sample_calls(products, rows))


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, fast_rows: frozenset[int] = frozenset(),
           onednn: bool | None = None, tile: int = 1) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T, times scale (N,) for int8 weights, plus bias, with
    para::linear where x has one of fast_rows rows (para_rows chooses them; `tile` for one row),
    and with oneDNN for more than MAX_ROWS float32 rows (float32 or int8 weights) where `onednn`
    (default: onednn_prefill()) and not compiling (inductor failed to lower the call, 9 or more
    rows in a compiled step); a compiled caller passes both, looked up beforehand. Neither has a
    backward: where a gradient is needed, torch's product runs."""
    rows, needs_grad = x.numel() // x.shape[-1], torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.device.type == "cpu" and rows in fast_rows and weight.is_contiguous() and not needs_grad:
        return torch.ops.para.linear(x, weight, scale, bias, tile)
    if x.device.type == "cpu" and rows > MAX_ROWS and x.dtype == torch.float32 and weight.dtype in ONEDNN_WEIGHTS \
            and not needs_grad and not torch.compiler.is_compiling() and (onednn_prefill() if onednn is None else onednn):
        return torch_linear(x, weight, scale, bias, product=onednn_linear)
    return torch_linear(x, weight, scale, bias)
