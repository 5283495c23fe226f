"""The fast path's products (para/kernels, para/fast_linear.py): para::linear against torch's
products, the per-machine choice, FastLinear in a model, and weight-only int8."""

import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoints import TINY_GEMMA2, TINY_LLAMA, write_checkpoint
from para import kernels
from para.adapters import AdapterConfig, add_adapter, adapter_state, install
from para.fast import FastDecoder
from para.fast_linear import FastLinear, int8_per_channel, use_fast_linears
from para.generation import beam_search, generate
from para.loading import load_model


def tiny(config, tmp_path, name="base", dtype=None):
    write_checkpoint(tmp_path / name, config)
    return load_model(tmp_path / name, device="cpu", dtype=dtype)


def plain_decoder(model):
    """A FastDecoder that leaves the model's nn.Linear projections as they are (new ones swap them)."""
    decoder = object.__new__(FastDecoder)
    decoder.model, decoder.pool, decoder.compiled, decoder.homes = model, None, None, {}
    decoder.cache_dtype = model.dtype
    return decoder


needs_kernel = pytest.mark.skipif(not kernels.built(), reason="para/kernels could not be built here")


def test_the_kernel_builds_where_a_compiler_is():
    if shutil.which("c++") or shutil.which("g++"):
        assert kernels.built()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize(("rows", "tile"), [(1, 1), (1, 2), (1, 4), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1),
                                            (8, 1), (11, 1), (9, 4)])
def test_para_linear_matches_torch(dtype, rows, tile):
    # odd sizes: a row's tail shorter than 16 and a last tile of W shorter than the others (3 or 4 rows)
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(203, 147, generator=generator)
    x = torch.randn(rows, 147, generator=generator)
    bias = torch.randn(203, generator=generator)
    scale = None
    if dtype == torch.int8:
        weight, scale = int8_per_channel(weight)
    else:
        weight = weight.to(dtype)
    expected = F.linear(x.double(), weight.double()) * (1 if scale is None else scale.double()) + bias.double()
    got = torch.ops.para.linear(x, weight, scale, bias, tile)
    assert got.dtype == torch.float32 and got.shape == (rows, 203)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)
    # bfloat16 rows in, bfloat16 out, summed in float32
    low = torch.ops.para.linear(x.bfloat16(), weight, scale, bias, tile)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected.float(), atol=0.1, rtol=2 ** -7)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@needs_kernel
def test_decode_attention_of_no_rows_is_empty():
    q, k = torch.zeros(0, 9, 1, 64), torch.zeros(0, 3, 16, 64)
    assert torch.ops.para.decode_attention(q, k, k, None, 0.3).shape == (0, 9, 1, 64)


@needs_kernel
@pytest.mark.parametrize(("rows", "heads", "kv_heads", "slots", "dim"),
                         [(1, 9, 3, 320, 64), (3, 4, 2, 37, 24), (2, 2, 2, 5, 16), (2, 4, 1, 700, 32),
                          (1, 4, 1, 320, 256), (2, 8, 2, 50, 128), (1, 5, 1, 33, 64),
                          (8, 9, 3, 37, 64), (3, 20, 4, 40, 64)])
def test_decode_attention_matches_torchs(rows, heads, kv_heads, slots, dim, two_threads):
    """(Groups of 3, and of 5 taken as 4 + 1, are kept whole with 4 groups a thread: 2 threads here.)"""
    generator = torch.Generator().manual_seed(slots)
    q = torch.randn(rows, heads, 1, dim, generator=generator)
    k, v = (torch.randn(rows, kv_heads, slots, dim, generator=generator) * 3 for _ in range(2))
    valid = torch.rand(rows, 1, 1, slots, generator=generator) > 0.3
    valid[0, ..., slots // 3:] = False   # most slots masked (a cache not yet filled)
    valid[..., -1] = True   # a query sees at least itself

    def torchs(q, mask):   # in float64: float32 sums in two orders differ by more than 1e-5 here
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.3,
                                              enable_gqa=True).float()
    additive = torch.where(valid, 0.0, float("-inf"))
    for mask in (valid, additive):
        torch.testing.assert_close(torch.ops.para.decode_attention(q, k, v, mask, 0.3), torchs(q, valid), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.ops.para.decode_attention(q, k, v, None, 0.3), torchs(q, None), atol=1e-5, rtol=1e-5)
    shared = valid[:1]   # one mask for every row, broadcast
    torch.testing.assert_close(torch.ops.para.decode_attention(q, k, v, shared, 0.3), torchs(q, shared), atol=1e-5, rtol=1e-5)
    # scores far apart: e^x of large negative differences is 0, never NaN
    far = torch.ops.para.decode_attention(q * 1e3, k, v, additive, 1.0)
    assert torch.isfinite(far).all()
    # what a masked slot holds is never read (a pooled cache's slots hold an earlier cache's values)
    expected = torchs(q, valid)
    v[~valid.expand(rows, kv_heads, 1, slots)[..., 0, :]] = float("nan")
    torch.testing.assert_close(torch.ops.para.decode_attention(q, k, v, valid, 0.3), expected, atol=1e-5, rtol=1e-5)


def test_compiled_steps_are_kept_under_the_kernels_sources(tmp_path, monkeypatch):
    """Inductor keeps compiled steps on disk under the graph pass's uuid: a step compiled against an
    older para::linear (fewer arguments) must not be found after the kernels' sources change."""
    from para.attention_pass import DecodingAttention
    uuids = set()
    for version in ("one", "another"):   # (in two files: within a process torch hashes a file once)
        source = tmp_path / version / "linear.cpp"
        source.parent.mkdir()
        source.write_text(f"// {version} version")
        monkeypatch.setattr(kernels, "SOURCES", [source])
        uuids.add(DecodingAttention().uuid())
    assert len(uuids) == 2


@needs_kernel
def test_para_linear_keeps_leading_dimensions():
    x, weight = torch.randn(2, 1, 64), torch.randn(40, 64)
    assert torch.ops.para.linear(x, weight).shape == (2, 1, 40)
    torch.testing.assert_close(torch.ops.para.linear(x, weight), F.linear(x, weight), atol=1e-5, rtol=1e-5)


def test_choice_is_measured_once_per_shape_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PARA_KERNELS", "measure")
    monkeypatch.setattr(kernels, "built", lambda: True)
    measured = []
    monkeypatch.setattr(kernels, "faster", lambda products, rows, tile: measured.append((len(products), rows))
                        or ("para" if rows == 1 else "torch"))
    model = [(torch.randn(40, 64), None), (torch.randn(64, 40), None)]
    assert kernels.para_rows(model) == {1}
    assert measured == [(2, 1), (2, kernels.MAX_ROWS)]
    assert kernels.para_rows([(torch.randn(40, 64), None), (torch.randn(64, 40), None)]) == {1}
    assert len(measured) == 2   # the same shapes (another process, another model of them): read from the file
    kernels.para_rows([(torch.randn(40, 64), None)])
    assert len(measured) == 4   # other shapes: measured
    choices = json.loads(kernels.choice_file().read_text())
    assert len(choices) == 2 and all(key.startswith("float32, ") for key in choices)


@needs_kernel
def test_the_single_row_tile_is_measured_once_per_shape_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PARA_KERNELS", "measure")
    timed = []
    real = kernels.quickest
    monkeypatch.setattr(kernels, "quickest", lambda products, calls: timed.append((sorted(products), calls))
                        or real(products, calls))
    weights = [(torch.randn(48, 32), None), (torch.randn(32, 48), None)]
    tile = kernels.single_row_tile(weights)
    assert tile in kernels.TILES
    [(candidates, calls)] = timed
    assert candidates == list(kernels.TILES)
    assert [(x.shape, w) for x, w, _ in calls] == [((1, 32), weights[0][0]), ((1, 48), weights[1][0])]
    assert kernels.single_row_tile([(torch.randn(48, 32), None), (torch.randn(32, 48), None)]) == tile
    assert len(timed) == 1   # the same shapes: read from the file
    int8 = [int8_per_channel(torch.randn(48, 32))]
    assert kernels.single_row_tile(int8) in kernels.TILES and len(timed) == 2   # other weights: measured
    monkeypatch.setenv("PARA_KERNELS", "para")   # para::linear everywhere, unmeasured: one row at a time
    assert kernels.single_row_tile(weights) == 1


@needs_kernel
def test_a_models_projections_take_the_measured_tile(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "single_row_tile", lambda products: 4)
    tiles_asked = []
    monkeypatch.setattr(kernels, "para_rows", lambda products, tile: tiles_asked.append(tile) or frozenset({1, 2}))
    model = tiny(TINY_LLAMA, tmp_path)
    use_fast_linears(model)
    linears = [m for m in model.modules() if isinstance(m, FastLinear)]
    assert tiles_asked == [4]   # para::linear with the tile is what is set against torch's product
    assert linears and all(linear.tile == 4 and linear.fast_rows == {1, 2} for linear in linears)
    calls = []
    monkeypatch.setattr(torch.ops.para, "linear", lambda *args: calls.append(args[4]) or F.linear(args[0], args[1]))
    linears[0](torch.randn(1, linears[0].in_features))
    assert calls == [4]


def test_the_choice_is_measured_on_the_weights_given():
    if not kernels.built():
        pytest.skip("para/kernels not built here")
    weights = [(torch.randn(48, 32), None), (torch.randn(32, 48).to(torch.int8), torch.rand(32))]
    assert kernels.faster(weights, 3) in ("para", "torch")
    bfloat16 = [(torch.randn(48, 32).to(torch.bfloat16), None)]   # a bfloat16 model's rows are bfloat16
    assert kernels.faster(bfloat16, 1) in ("para", "torch")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_a_prompts_float32_rows_through_onednn_match_torch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 147, generator=generator)
    weight, bias = torch.randn(203, 147, generator=generator), torch.randn(203, generator=generator)
    got = kernels.linear(x, weight, None, bias, frozenset(), onednn=True)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    values, scale = int8_per_channel(weight)   # an int8 model's prefill: converted to float32 first
    got = kernels.linear(x, values, scale, bias, frozenset(), onednn=True)
    torch.testing.assert_close(got, F.linear(x, values.float()) * scale + bias, atol=1e-5, rtol=1e-5)
    # in a compiled step (a server's batch of more than 8 rows), torch's product is compiled
    compiled = torch.compile(lambda x: kernels.linear(x, weight, None, bias, frozenset(), onednn=True), fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    # with a gradient to compute, torch's product runs: oneDNN's is called without one
    weight.requires_grad_(True)
    kernels.linear(x, weight, None, bias, frozenset(), onednn=True).sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(dim=(0, 1)).expand(203, 147).contiguous())


def test_the_prefill_choice_is_measured_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PARA_KERNELS", "measure")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    measured = []
    monkeypatch.setattr(kernels, "faster_prefill", lambda: measured.append(1) or "onednn")
    kernels.onednn_prefill.cache_clear()
    try:
        assert kernels.onednn_prefill() and measured == [1]
        kernels.onednn_prefill.cache_clear()   # a new process: read from the file
        assert kernels.onednn_prefill() and measured == [1]
        assert json.loads(kernels.choice_file().read_text()) == {"float32 prefill": "onednn"}
        monkeypatch.setenv("PARA_KERNELS", "torch")
        kernels.onednn_prefill.cache_clear()
        assert not kernels.onednn_prefill()
    finally:
        kernels.onednn_prefill.cache_clear()


def test_torch_products_only_when_asked(monkeypatch):
    monkeypatch.setenv("PARA_KERNELS", "torch")
    kernels.built.cache_clear()
    try:
        assert not kernels.built() and kernels.para_rows([(torch.randn(8, 16), None)]) == frozenset()
        linear = FastLinear(torch.nn.Linear(16, 8), quantize="int8")
        assert linear.fast_rows == frozenset()
        x = torch.randn(1, 16)
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight.float()) * linear.scale + linear.bias)
    finally:
        kernels.built.cache_clear()


def test_int8_per_channel_rounds_each_row_to_its_scale():
    weight = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]
    values, scale = int8_per_channel(weight)
    assert values.dtype == torch.int8 and scale.shape == (64,)
    assert (values.abs().amax(dim=1) == 127).all()
    assert ((values.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GEMMA2], ids=["llama", "gemma2"])
def test_fast_linears_give_the_same_logits(config, tmp_path):
    model = tiny(config, tmp_path)
    ids = torch.randint(0, config["vocab_size"], (3, 9))
    reference = model(ids)
    use_fast_linears(model)
    assert isinstance(model.layers[0].attn.q_proj, FastLinear) and isinstance(model.lm_head, FastLinear)
    torch.testing.assert_close(model(ids), reference, atol=1e-5, rtol=1e-5)
    # a decoding step: 3 rows, through para::linear where it is chosen
    cache = model.new_cache(3, 12)
    model.hidden(ids[:, :8], cache=cache)
    torch.testing.assert_close(model(ids[:, 8:9], cache=cache)[:, -1], reference[:, 8], atol=1e-5, rtol=1e-5)


def test_tied_output_projection_shares_the_embedding(tmp_path):
    model = tiny(TINY_GEMMA2, tmp_path)
    assert model.lm_head is None
    use_fast_linears(model)
    assert model.lm_head.weight is model.embed.weight


huge_pages = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages here")


@huge_pages
def test_homes_in_huge_pages_lie_one_after_another():
    tensors = [torch.randn(1000, 600), torch.randn(7).bfloat16(), torch.randint(-9, 9, (512, 1000), dtype=torch.int8)]
    homes = kernels.homes_in_huge_pages(tensors)
    assert [(h.shape, h.dtype) for h in homes] == [(t.shape, t.dtype) for t in tensors]
    starts = [h.data_ptr() for h in homes]
    assert starts[0] % kernels.HUGE_PAGE == 0 and all(start % kernels.CACHE_LINE == 0 for start in starts)
    assert starts[1] == starts[0] + 1000 * 600 * 4 and starts[2] == starts[1] + kernels.CACHE_LINE
    assert kernels.homes_in_huge_pages([torch.randn(10)]) is None   # too small to gain


# Large enough (2.4 MB of weights) for the projections to be moved into huge pages
WIDE_LLAMA = dict(TINY_LLAMA, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@huge_pages
def test_a_steps_weights_are_laid_out_in_the_order_it_reads_them(tmp_path):
    model = tiny(WIDE_LLAMA, tmp_path)
    ids = torch.randint(0, WIDE_LLAMA["vocab_size"], (2, 9))
    reference = model(ids)
    use_fast_linears(model)
    order = [getattr(block.attn if site in "qkvo" else block.mlp, f"{site}_proj")
             for block in model.layers for site in ("q", "k", "v", "o", "up", "gate", "down")] + [model.lm_head]
    starts = [linear.weight.data_ptr() for linear in order]
    assert starts == sorted(starts) and starts[-1] - starts[0] < sum(linear.weight.nbytes for linear in order)
    assert model.layers[0].attn.q_proj.weight is model.get_parameter("layers.0.attn.q_proj.weight")   # shared, not copied
    torch.testing.assert_close(model(ids), reference, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_a_16_bit_model_keeps_float32_keys_on_a_cpu(tmp_path):
    # torch's bfloat16 attention is several times slower on a CPU: keys and values are kept as
    # exact float32 copies, and attention runs in float32 (para/fast.py)
    full, half = tiny(TINY_LLAMA, tmp_path, "f"), tiny(TINY_LLAMA, tmp_path, "h", dtype="bfloat16")
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 9))
    decoder = FastDecoder(half)
    cache = decoder.new_cache(2, 12)
    assert cache.k[0].dtype == torch.float32 and half.dtype == torch.bfloat16
    half.hidden(ids[:, :8], cache=cache)
    step = decoder.step(ids[:, 8], cache)
    assert step.dtype == torch.bfloat16
    torch.testing.assert_close(step.float(), full(ids)[:, 8], atol=0.05, rtol=0.05)
    assert torch.equal(cache.k[0][:, :, :8].bfloat16().float(), cache.k[0][:, :, :8])   # values of bfloat16 keys


@pytest.mark.parametrize("tile", kernels.TILES)
@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GEMMA2], ids=["llama", "gemma2"])
def test_fast_decoder_gives_the_teaching_models_tokens(config, tile, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "single_row_tile", lambda products: tile)   # as if measured so
    fast, plain = tiny(config, tmp_path, "a"), tiny(config, tmp_path, "b")
    prompts = [[5, 9, 2, 7], [3, 3, 8]]
    for batch in (prompts, prompts[:1]):   # 2 rows and 1 row a step
        decoder = FastDecoder(fast)
        assert generate(fast, batch, 8, eos_ids=[], decoder=decoder).tokens == \
            generate(plain, batch, 8, eos_ids=[], decoder=plain_decoder(plain)).tokens
        assert beam_search(fast, batch, 6, eos_ids=[], num_beams=3, decoder=decoder).tokens == \
            beam_search(plain, batch, 6, eos_ids=[], num_beams=3, decoder=plain_decoder(plain)).tokens
    assert not isinstance(plain.layers[0].attn.q_proj, FastLinear)


@torch.no_grad()
def test_int8_model_is_close_and_runs_an_adapter_trained_on_float(tmp_path):
    model = tiny(TINY_LLAMA, tmp_path)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 10))
    config = AdapterConfig("para", rank=4)
    add_adapter(model, config)
    for name, p in model.named_parameters():
        if "vg." in name:
            p.add_(torch.randn_like(p) * 0.05)
    state = adapter_state(model)
    end = torch.tensor([8, 8])   # the prompts: the first 9 tokens
    reference = model(ids, prompt_end=end)
    FastDecoder(model, quantize="int8")
    q_proj = model.layers[0].attn.q_proj
    assert q_proj.weight.dtype == torch.int8 and model.lm_head.weight.dtype == torch.int8
    assert model.embed.weight.dtype == torch.float32          # the table stays float
    assert model.layers[0].vg.w_down.dtype == torch.float32   # PARA's generator too
    quantized = model(ids, prompt_end=end)
    error = float((quantized - reference).norm() / reference.norm())
    assert 0 < error < 0.05, error   # on real weights: see bench/RESULTS.md
    # the adapter installed again on the int8 base: the same outputs
    install(model, [(config, state)], bank=False)
    torch.testing.assert_close(model(ids, prompt_end=end), quantized, atol=1e-5, rtol=1e-5)
    assert model.layers[0].attn.q_proj.weight.dtype == torch.int8
    # a decoding step of the int8 model (para::linear where chosen) agrees with its forward
    cache = model.new_cache(2, 10)
    model.hidden(ids[:, :9], cache=cache, prompt_end=end)
    torch.testing.assert_close(model(ids[:, 9:], cache=cache)[:, -1], quantized[:, 9], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_generate_quantized_from_the_command_line(tiny):
    from conftest import run
    out = run("generate.py", "--model", tiny, "--prompt", "hello", "--max-new-tokens", "4", "--json", "--quantize", "int8")
    assert json.loads(out.stdout)["new_tokens"] == 4


def test_the_server_quantizes_its_model(tmp_path):
    import para
    from para.serving import Scheduler
    from checkpoints import write_model_with_tokenizer
    model, tokenizer = para.load(write_model_with_tokenizer(tmp_path / "m"), "cpu", "float32")
    Scheduler(model, tokenizer, quantize="int8")
    assert model.layers[0].mlp.down_proj.weight.dtype == torch.int8


MANY_FREED = """
import resource, sys, torch
from para import kernels
if sys.argv[1] == "keep":
    assert kernels.keep_freed_memory()

def page_faults():   # tensors alive together, then freed (as a prefill's intermediate ones)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [torch.ones(3 << 18) for _ in range(100)]
    del live
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

page_faults()
print(sum(page_faults() for _ in range(3)))
"""


def glibc() -> bool:   # (without calling keep_freed_memory, which would set this process's malloc)
    try:
        return bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not glibc(), reason="the C library is not glibc")
def test_freed_memory_is_kept_for_the_next_tensors():
    """A process whose malloc keeps freed memory makes its next tensors in it, without new pages;
    glibc's own settings return some of it to Linux and take it back (page faults)."""
    def faults(setting: str) -> int:   # (glibc adapts its thresholds differently by the process's threads: 1 here)
        out = subprocess.run([sys.executable, "-c", MANY_FREED, setting], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        return int(out.stdout.split()[-1])
    returned = faults("glibc's own")
    if returned < 1000:
        pytest.skip("glibc's own settings kept this memory too: nothing to tell apart")
    assert faults("keep") < returned / 20


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
                    or not (shutil.which("c++") or shutil.which("g++")), reason="an x86-64 CPU with AVX2 and a compiler")
def test_the_kernels_built_without_avx512_match_torch(tmp_path):
    """The kernels' loops for CPUs without AVX-512 (most laptops), which this machine's own build
    (-march=native) never runs: this file's checks of them, with the kernels built for AVX2 in
    a process of their own (one process loads one build)."""
    env = {**os.environ, "PARA_KERNELS_MARCH": "x86-64-v3", "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "matches_torch"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "42 passed," in out.stdout   # every case ran (33 products, 9 attentions), none skipped
