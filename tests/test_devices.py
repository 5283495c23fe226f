"""The compiled decoding step, and the CUDA paths (skipped where there is no GPU)."""

import gc
import time
import weakref

import pytest
import torch

from checkpoints import TINY_GEMMA3, TINY_LLAMA, write_checkpoint, write_noisy_adapter
from conftest import run
from para.adapter_files import install_bank
from para import fast, kernels
from para.adapters import AdapterConfig, remove_adapters
from para.generation import beam_search, generate, prefill
from para.loading import load_model
from para.fast import BufferPool, FastDecoder

PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12]]   # different lengths: left padding, masks
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_adapters(model, tmp_path, n=2):
    """n PARA adapter files with random (trained-looking) generators."""
    return [write_noisy_adapter(model, AdapterConfig("para", rank=4), tmp_path / f"para-{seed}.pt", seed, 0.1)
            for seed in range(n)]


def decode_all(model, decoder=None):
    """Greedy and 3-beam tokens of PROMPTS, base rows and adapter rows mixed in one batch."""
    mixed = generate(model, PROMPTS * 2, 10, eos_ids=[], which=[0, 1, 2, 0], decoder=decoder).tokens
    beams = beam_search(model, PROMPTS, 10, eos_ids=[], num_beams=3, which=[2, 1], decoder=decoder).tokens
    return mixed, beams


@pytest.mark.slow   # compiles the decoding step: not in `make test-fast`
@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_GEMMA3], ids=["llama", "gemma3"])
def test_compiled_step_decodes_the_same_tokens_and_compiles_once_per_batch_size(tmp_path, cfg):
    write_checkpoint(tmp_path / "m", cfg)
    model = load_model(tmp_path / "m", "cpu", "float32")
    install_bank(model, random_adapters(model, tmp_path))
    eager = decode_all(model)
    torch._dynamo.reset()
    compiled = FastDecoder(model, compile=True)
    torch._dynamo.utils.counters.clear()
    limit = torch._dynamo.config.cache_size_limit
    assert decode_all(model, compiled) == eager
    # one graph per batch size, 4 (greedy) and 6 (2 prompts x 3 beams), never one per position
    # (prefills are not compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    # other prompt lengths in the same cache size (BufferPool.size: 64 slots) compile nothing new
    longer = [list(range(3, 30)), list(range(40, 50))]
    assert generate(model, longer * 2, 10, eos_ids=[], decoder=compiled).tokens == \
        generate(model, longer * 2, 10, eos_ids=[]).tokens
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert torch._dynamo.config.cache_size_limit == limit   # no global setting changed behind the caller's back
    if kernels.built():   # attention in the compiled step is para's (attention_pass.DecodingAttention)
        with torch.profiler.profile() as profile:
            generate(model, longer * 2, 2, eos_ids=[], decoder=compiled)   # a batch size compiled above
        assert any(event.name == "para::decode_attention" for event in profile.events())


@pytest.mark.slow
@torch.inference_mode()
def test_a_compiled_step_sees_its_model_change_after_it_ran(tmp_path):
    """A compiled step skips the dtype and shape checks of the projections' weights
    (FastDecoder.guards_worth_checking), and after a cache's first step all checks but the
    tensors': quantizing the projections, or installing an adapter, after it ran must still
    compile it again, and each cache's later steps must run the step compiled for it."""
    write_checkpoint(tmp_path / "m", TINY_LLAMA)
    model = load_model(tmp_path / "m", "cpu", "float32")
    torch._dynamo.reset()
    compiled = FastDecoder(model, compile=True)

    def steps_logits(decoder, which=None, prompts=PROMPTS):   # three steps of one cache
        cache, logits = prefill(model, prompts, 4, which=which, decoder=decoder)
        steps = []
        for _ in range(3):
            steps.append(decoder.step(logits.argmax(-1), cache))
            logits = steps[-1]
        return torch.stack(steps)

    before = steps_logits(compiled)
    FastDecoder(model, quantize="int8")   # the same model's projections, quantized in place
    eager = steps_logits(FastDecoder(model))
    assert not torch.allclose(eager, before, atol=1e-4, rtol=0)
    torch.testing.assert_close(steps_logits(compiled), eager, atol=1e-5, rtol=1e-5)
    install_bank(model, random_adapters(model, tmp_path))
    for which, prompts in (([1, 2], PROMPTS), (None, PROMPTS[:1]), ([2, 0], PROMPTS), (None, PROMPTS)) * 2:
        eager = steps_logits(FastDecoder(model), which, prompts)
        torch.testing.assert_close(steps_logits(compiled, which, prompts), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@torch.inference_mode()
def test_a_caches_later_compiled_steps_call_the_compiled_code_directly(tmp_path):
    """On a CPU a cache's first compiled step goes through torch.compile, and its later steps
    call the compiled code directly (fast.StepCall), with an eager decoder's logits; after a
    reorder gives the cache other tensors (its rows' adapter slots, which LoRA reads at every
    step), steps go through it again."""
    write_checkpoint(tmp_path / "m", TINY_LLAMA)
    model = load_model(tmp_path / "m", "cpu", "float32")
    install_bank(model, [write_noisy_adapter(model, AdapterConfig("lora", 2), tmp_path / f"lora-{seed}.pt", seed, 0.1)
                         for seed in (0, 1)])
    compiled, eager = FastDecoder(model, compile=True), FastDecoder(model)
    cache, logits = prefill(model, PROMPTS, 4, which=[1, 2], decoder=compiled)
    eager_cache, _ = prefill(model, PROMPTS, 4, which=[1, 2], decoder=eager)
    through_dynamo, dynamo = [], compiled.compiled
    compiled.compiled = lambda *args: through_dynamo.append(1) or dynamo(*args)
    for step in range(4):
        if step == 2:
            for c in (cache, eager_cache):
                c.reorder(torch.tensor([1, 0]))
        expected = eager.step(logits.argmax(-1), eager_cache)
        torch.testing.assert_close(compiled.step(logits.argmax(-1), cache), expected, atol=1e-5, rtol=1e-5)
        logits = expected
    assert len(through_dynamo) == 3   # the first step, and each after the reorder


@pytest.mark.slow
def test_a_compiled_decoder_and_its_model_are_freed(tmp_path):
    """torch.compile keeps what it compiled (and its backend) for the life of the process: that
    must hold neither the decoder nor the model, whose weights would stay in memory."""
    write_checkpoint(tmp_path / "m", TINY_LLAMA)

    def decode_once():
        model = load_model(tmp_path / "m", "cpu", "float32")
        decoder = FastDecoder(model, compile=True)
        generate(model, PROMPTS, 4, eos_ids=[], decoder=decoder)
        return weakref.ref(model), weakref.ref(decoder)

    refs = decode_once()
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


@pytest.mark.parametrize(("slots", "size"), [(1, 64), (64, 64), (65, 128), (306, 320), (513, 640), (1025, 1280)])
def test_compiled_cache_sizes_are_few_and_at_most_a_quarter_larger(slots, size):
    assert BufferPool.size(slots) == size


def test_a_compiled_model_reuses_a_finished_caches_buffers_never_a_live_ones(tmp_path):
    write_checkpoint(tmp_path / "m", TINY_LLAMA)
    model = load_model(tmp_path / "m", "cpu", "float32")
    decoder = FastDecoder(model, compile=True)   # nothing is compiled until a step runs
    first = decoder.new_cache(2, 30)
    assert first.max_len == 64
    second = decoder.new_cache(2, 40)   # the first is alive: other buffers
    assert second.k[0].data_ptr() != first.k[0].data_ptr()
    first.k[0].fill_(1.0)
    first.pos = 5
    address = first.k[0].data_ptr()
    del first
    third = decoder.new_cache(2, 50)   # the first's buffers, zeroed
    assert third.k[0].data_ptr() == address and third.k[0].abs().sum() == 0 and third.pos == 0
    assert decoder.new_cache(3, 50).k[0].shape[0] == 3   # another batch size: its own buffers
    for rows in range(4, 12):   # finished caches of many sizes: only the last few sets are kept
        decoder.new_cache(rows, 50)
    assert len(decoder.pool.free) == BufferPool.KEEP
    with torch.inference_mode():
        decoder.new_cache(20, 50)
    decoder.new_cache(20, 50).valid.fill_(True)   # made in inference mode, filled outside it


@torch.inference_mode()   # as generate runs
def test_a_compiled_models_para_vectors_keep_their_addresses(tmp_path):
    """A CUDA graph copies every input not at its recorded address into place at each replay:
    a compiled decoder keeps PARA's vectors (3 a layer) in pooled homes, which each step after a
    prefill or a reorder fills in place and the next call's cache reuses."""
    write_checkpoint(tmp_path / "m", TINY_LLAMA)
    model = load_model(tmp_path / "m", "cpu", "float32")
    install_bank(model, random_adapters(model, tmp_path))
    expected = prefill(model, PROMPTS, 6, which=[1, 2])[0].rows.vectors   # an eager model's vectors
    decoder = FastDecoder(model, compile=True)
    decoder.compiled = lambda model, tokens, cache: fast.decode_hidden(model, tokens, cache)   # no compiling
    cache, _ = prefill(model, PROMPTS, 6, which=[1, 2], decoder=decoder)
    decoder.step(torch.tensor([3, 4]), cache)
    homes = decoder.homes[cache]
    for layer, vectors in enumerate(cache.rows.vectors):
        for mine, home, theirs in zip(vectors, homes[layer], expected[layer]):
            assert mine is home
            torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    addresses = [t.data_ptr() for vectors in cache.rows.vectors for t in vectors]
    cache.reorder(torch.tensor([1, 0]))   # same batch size: the same homes
    decoder.step(torch.tensor([3, 4]), cache)
    assert [t.data_ptr() for vectors in cache.rows.vectors for t in vectors] == addresses
    torch.testing.assert_close(cache.rows.vectors[0].up, expected[0].up.flip(0), atol=0, rtol=0)
    cache.reorder(torch.tensor([0, 0, 1]))   # a new batch size: other homes, of 3 rows
    decoder.step(torch.tensor([3, 4, 5]), cache)
    assert cache.rows.vectors[0].q is decoder.homes[cache][0].q and len(cache.rows.vectors[0].q) == 3
    del cache, homes
    again, _ = prefill(model, PROMPTS, 6, which=[1, 2], decoder=decoder)
    decoder.step(torch.tensor([3, 4]), again)
    assert [t.data_ptr() for vectors in again.rows.vectors for t in vectors] == addresses
    torch.testing.assert_close(again.rows.vectors[1].v, expected[1].v, atol=0, rtol=0)


def test_a_compiled_step_that_ran_eagerly_keeps_the_cache_position(tmp_path):
    """Where torch.compile is disabled, the 'compiled' step runs eagerly and advances the cache
    itself: the position must still move by one."""
    write_checkpoint(tmp_path / "m", TINY_LLAMA)
    model = load_model(tmp_path / "m", "cpu", "float32")
    expected = generate(model, PROMPTS, 6, eos_ids=[]).tokens
    decoder = FastDecoder(model, compile=True)
    decoder.compiled = fast.decode_hidden   # what a disabled torch.compile runs
    assert generate(model, PROMPTS, 6, eos_ids=[], decoder=decoder).tokens == expected
    cache, _ = prefill(model, PROMPTS, 6, decoder=decoder)
    decoder.step(torch.tensor([3, 4]), cache)
    assert cache.pos == int(cache.filled) == 8


@cuda
@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_GEMMA3], ids=["llama", "gemma3"])
def test_cuda_gives_the_cpu_logits_and_tokens(tmp_path, cfg):
    write_checkpoint(tmp_path / "m", cfg)
    cpu, gpu = (load_model(tmp_path / "m", device, "float32") for device in ("cpu", "cuda"))
    ids = torch.randint(3, 90, (2, 20))
    torch.testing.assert_close(gpu(ids.cuda()).cpu(), cpu(ids), atol=1e-4, rtol=0)
    adapters = random_adapters(cpu, tmp_path)
    for model in (cpu, gpu):
        install_bank(model, adapters)
    assert decode_all(gpu) == decode_all(cpu)


@cuda
def test_cuda_graph_step_decodes_the_same_tokens(tmp_path):
    write_checkpoint(tmp_path / "m", TINY_GEMMA3)
    model = load_model(tmp_path / "m", "cuda", "float32")
    install_bank(model, random_adapters(model, tmp_path))
    eager = decode_all(model)
    compiled = FastDecoder(model, compile=True)   # mode reduce-overhead: the step is replayed as a CUDA graph
    assert decode_all(model, compiled) == eager
    recordings = torch._dynamo.utils.counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    assert recordings > 0
    assert decode_all(model, compiled) == eager   # replays: the pooled cache buffers keep their addresses
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_recorded_non_static_inputs"] == recordings


@cuda
def test_a_cuda_graph_copies_in_only_the_tokens_not_paras_vectors(tmp_path):
    """Inputs at other addresses than recorded are copied in at every replay; PARA's vectors
    (3 a layer) are read where they live (pooled homes, para/fast.py), so only the tokens are copied."""
    write_checkpoint(tmp_path / "m", TINY_LLAMA)
    model = load_model(tmp_path / "m", "cuda", "float32")
    install_bank(model, random_adapters(model, tmp_path, n=1))
    torch._dynamo.reset()
    compiled = FastDecoder(model, compile=True)
    torch._dynamo.utils.counters.clear()
    generate(model, PROMPTS, 6, eos_ids=[], which=[1, 1], decoder=compiled)   # one batch size: one recording
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_recorded_non_static_inputs"] == 1


@cuda
def test_bfloat16_on_cuda_is_close_to_float32(tmp_path):
    write_checkpoint(tmp_path / "m", TINY_LLAMA)
    full, half = (load_model(tmp_path / "m", "cuda", dtype) for dtype in ("float32", "bfloat16"))
    ids = torch.randint(3, 90, (2, 20), device="cuda")
    reference = full(ids)
    error = (half(ids).float() - reference).norm() / reference.norm()
    assert error < 2e-2
    assert len(generate(half, PROMPTS, 8, eos_ids=[]).tokens[0]) == 8


@cuda
def test_int8_on_cuda_gives_the_cpu_int8_logits_and_tokens(tmp_path):
    """Weight-only int8 on a GPU (torch's product of the converted weights, compiled as a CUDA
    graph) against the CPU's (para::linear), the same quantized weights; PARA adapters trained
    on the float base run on both."""
    write_checkpoint(tmp_path / "m", TINY_LLAMA)
    cpu, gpu = (load_model(tmp_path / "m", device, "float32") for device in ("cpu", "cuda"))
    adapters = random_adapters(cpu, tmp_path)   # on the float base
    remove_adapters(cpu)
    FastDecoder(cpu, quantize="int8")
    compiled = FastDecoder(gpu, compile=True, quantize="int8")
    assert gpu.layers[0].attn.q_proj.weight.dtype == torch.int8
    ids = torch.randint(3, 90, (2, 20))
    torch.testing.assert_close(gpu(ids.cuda()).cpu(), cpu(ids), atol=1e-4, rtol=0)
    for model in (cpu, gpu):
        install_bank(model, adapters)
    assert decode_all(gpu, compiled) == decode_all(cpu)


@cuda
def test_training_and_generation_in_bfloat16_on_cuda(tiny, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "Is {n} even or odd?", "response": "{"even" if n % 2 == 0 else "odd"}"}}\n'
                            for n in range(40)))
    run("train.py", "--model", tiny, "--data", data, "--device", "cuda", "--dtype", "bfloat16", "--epochs", "2",
        "--batch-size", "8", "--lr", "1e-2", "--out", tmp_path / "para.pt")
    out = run("generate.py", "--model", tiny, "--device", "cuda", "--dtype", "bfloat16", "--adapter",
              tmp_path / "para.pt", "--prompt", "Is 4 even or odd?", "--max-new-tokens", "4", "--compile")
    assert out.stdout.strip()


def serve_jobs(model, tokenizer, bank, compile: bool, waves) -> list[list[int]]:
    """The tokens a scheduler gives each job of `waves` (lists of (prompt, adapter name)),
    each wave submitted once the one before has started decoding."""
    from para.serving import Job, Scheduler
    scheduler = Scheduler(model, tokenizer, max_batch=4, compile=compile, bank=bank)
    scheduler.start()
    jobs = []
    try:
        for wave in waves:
            for prompt, name in wave:
                jobs.append(Job(prompt, None if name == "base" else bank.read(name), 12))
                assert scheduler.submit(jobs[-1])
            while not jobs[-1].tokens and jobs[-1].finish_reason is None:   # bounded by the job's 12 tokens
                time.sleep(0.01)
        for job in jobs:
            while job.events.get(timeout=120)[1] is None:
                pass
    finally:
        scheduler.stop()
        scheduler.join(timeout=120)
    return [job.tokens for job in jobs]


@pytest.mark.slow   # compiles the decoding step for 3 batch sizes
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_the_compiled_scheduler_answers_as_the_eager_one(tmp_path, device):
    """serve.py --compile: rows join and leave a batch padded to 1, 2 or 4 rows, one compiled
    step each (a CUDA graph on a GPU), with PARA and LoRA adapters in a bank of 2 slots for 3."""
    from para.adapter_bank import AdapterBank
    from tokenizer import Tokenizer
    from checkpoints import write_model_with_tokenizer
    folder = write_model_with_tokenizer(tmp_path / "m", TINY_LLAMA)
    model = load_model(folder, device, "float32")
    paths = random_adapters(model, tmp_path)
    write_noisy_adapter(model, AdapterConfig("lora", rank=4), tmp_path / "lora.pt", 5, 0.1)
    remove_adapters(model)
    named = {"a": paths[0], "b": paths[1], "c": tmp_path / "lora.pt"}
    waves = [[(PROMPTS[0], "a")], [(PROMPTS[1], "c"), (PROMPTS[0], "base")], [(PROMPTS[1], "b"), (PROMPTS[0], "c")]]
    tokenizer = Tokenizer.from_dir(folder)
    eager = serve_jobs(model, tokenizer, AdapterBank(model, 2, named), False, waves)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = serve_jobs(model, tokenizer, AdapterBank(model, 2, named), True, waves)
    assert compiled == eager and all(len(t) == 12 for t in eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3   # batch sizes 1, 2, 4; one cache size
