"""The fast path, kept apart from the model it speeds up (as gpt-fast keeps compilation in its
generate.py): para/model.py knows nothing of it, and a FastDecoder takes a model from outside.

A FastDecoder is what generation calls to make caches and run decoding steps:
- on a CPU, the model's projections multiply with para::linear where it reads the weights faster
  than torch's product (para/kernels, para/fast_linear.py), in int8 with quantize="int8";
- greedy steps take the argmax from an int8 (or bfloat16) copy of the output projection, which
  reads fewer bytes for the same token (para/greedy_head.py);
- with compile=True, the decoding step is compiled (torch.compile; on a GPU replayed as a CUDA
  graph, which removes the launch overhead of a few hundred small kernels per token; on a CPU
  called directly after a cache's first step, without dynamo's per-step work: StepCall). A step's
  shapes never change: the cache is preallocated, and a step writes its slot through a tensor
  and attends the whole buffer under the validity mask (para/cache.py). So it compiles once per
  batch size and cache size, never per position. Caches come in a few sizes from a BufferPool
  that hands a finished cache's buffers to the next one, and PARA's vectors are copied into
  pooled homes: a CUDA graph then finds every input at the address it recorded. On a CPU a graph
  pass puts para::decode_attention in place of torch's attention (para/attention_pass.py);
- on a CPU a 16-bit model's keys and values are kept in float32, where attention is faster;
- on a CPU glibc's malloc is asked to keep freed memory for the next tensors (kernels.keep_freed_memory).
Nothing here changes a global torch setting: the dynamo limit raised, and the stance that skips
all but the tensors' guards after a cache's first step, hold around the compiled call only.
"""

from __future__ import annotations

import weakref
from typing import Callable, NamedTuple

import torch

from para import greedy_head, kernels
from para.cache import KVCache, PromptVectors, new_buffers
from para.fast_linear import FastLinear, use_fast_linears
from para.model import Transformer

# Past this many compilations of one function torch.compile runs it eagerly: allow a few batch
# sizes times a few cache sizes (cache_size_limit is the setting's older name, which newer torch keeps).
RECOMPILE_LIMIT = 64


def decode_hidden(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decoding step up to the output projection: a token per row (B,) -> final-normed
    hidden states (B, d_model)."""
    return model.hidden(tokens[:, None], cache=cache)[:, -1]


def cache_tensors(cache: KVCache) -> tuple[int, ...]:
    """Which tensors `cache` holds (their ids): its buffers, its rows' adapter slots, PARA's vectors."""
    vectors = [t for layer in cache.rows.vectors if layer is not None for t in layer]
    return tuple(map(id, (*cache.k, *cache.v, cache.valid, cache.lengths, cache.filled, cache.rows.which, *vectors)))


class StepCall(NamedTuple):
    """A compiled step's call as dynamo made it at a cache's first step, to make again at the
    cache's later steps with only the tokens changed: between two steps of a cache the step
    reads the same tensors (the cache's buffers and the vectors' homes are written in place, and
    a model is changed between generations, docs/design.md). Called directly, a step skips
    dynamo's gathering of its 300-odd inputs in Python and its tensor checks: 1.1-1.4 ms of a
    12 ms bfloat16 step on the AMD EPYC."""
    compiled: Callable            # inductor's compiled step
    args: tuple                   # what dynamo passed it
    token_index: int              # where the tokens are in args
    output_index: int             # where the hidden states are in its outputs
    tokens: tuple                 # the tokens' shape, strides, dtype and device
    cache: tuple[int, ...]        # cache_tensors of the cache

    @staticmethod
    def of(call: tuple, tokens: torch.Tensor, hidden: torch.Tensor, cache: tuple[int, ...]) -> StepCall | None:
        """The StepCall of `call` (compiled, args, outputs) for these tokens and cache tensors, or
        None where the tokens or the hidden states cannot be told apart from the rest."""
        compiled, args, outputs = call
        token_index = [i for i, arg in enumerate(args) if arg is tokens]
        output_index = [i for i, output in enumerate(outputs) if output is hidden]
        if len(token_index) != 1 or len(output_index) != 1:
            return None
        return StepCall(compiled, args, token_index[0], output_index[0], StepCall.form(tokens), cache)

    @staticmethod
    def form(tokens: torch.Tensor) -> tuple:
        return tokens.shape, tokens.stride(), tokens.dtype, tokens.device

    def fits(self, tokens: torch.Tensor, cache: KVCache) -> bool:
        """Whether this is the call for `tokens` and `cache` (else dynamo finds or compiles the step)."""
        return StepCall.form(tokens) == self.tokens and cache_tensors(cache) == self.cache

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[self.token_index] = tokens
        return self.compiled(*args)[self.output_index]


def noting_calls(last_call: list) -> Callable:
    """A torch.compile backend: inductor's compilation (what backend="inductor" makes), whose
    compiled step notes each call dynamo makes of it in `last_call` (for StepCall). It holds no
    decoder or model: torch.compile keeps it for the life of the process."""
    def backend(graph: torch.fx.GraphModule, inputs: list, options: dict) -> Callable:
        from torch._inductor.compile_fx import compile_fx   # here: importing it takes a second
        compiled = compile_fx(graph, inputs, config_patches=options)

        def step(*args):
            outputs = compiled(*args)
            last_call[:] = [(compiled, args, outputs)]
            return outputs
        return step
    return backend


class BufferPool:
    """Buffers that a compiled model's caches reuse. A compiled step is specialised to its
    buffers' sizes (one compilation each) and a CUDA graph to their addresses (one recording
    each), so caches come in a few sizes (`size`) and a finished cache's buffers go to the next
    cache of that size. Besides the buffers of live caches the pool keeps the KEEP sets returned
    last, so that a run through many sizes does not hold a set for each."""

    KEEP = 4

    def __init__(self):
        self.free: list[tuple[tuple, list[torch.Tensor]]] = []   # (key, buffers), oldest first

    @staticmethod
    def size(slots: int) -> int:
        """slots rounded up to a multiple of 64, or above 256 slots of an eighth of the next
        power of two: at most a quarter more there, four sizes per doubling."""
        step = max(64, (1 << (slots - 1).bit_length()) // 8)
        return -(-slots // step) * step

    def take(self, owner: object, key: tuple, allocate) -> list[torch.Tensor]:
        """A free set of buffers under `key` (or allocate() new ones); they come back to the
        pool when `owner` is garbage-collected."""
        for i in reversed(range(len(self.free))):
            if self.free[i][0] == key:
                buffers = self.free.pop(i)[1]
                break
        else:
            with torch.inference_mode(False):   # ordinary tensors: a later cache may fill them outside inference mode
                buffers = allocate()
        weakref.finalize(owner, self.give_back, key, buffers)
        return buffers

    def give_back(self, key: tuple, buffers: list[torch.Tensor]) -> None:
        self.free.append((key, buffers))
        del self.free[:-self.KEEP]


class FastDecoder:
    """Caches and decoding steps for `model`: new_cache, step (-> logits) and greedy_step
    (-> tokens). Eager unless compile=True. On a CPU, or with quantize="int8", the model's
    projections become FastLinears, in place (para/fast_linear.py)."""

    def __init__(self, model: Transformer, compile: bool = False, quantize: str | None = None):
        self.model = model
        if model.device.type == "cpu" or quantize:   # para::linear where faster, int8 weights where asked
            use_fast_linears(model, quantize)
        if model.device.type == "cpu":   # a prefill's tensors in memory freed before, not in fresh pages
            kernels.keep_freed_memory()
        # On a CPU a 16-bit model's keys and values are kept in float32 (exact copies), where attention
        # runs 7x faster: torch's bfloat16 attention took 214 against 31 us a layer (docs/design.md)
        self.cache_dtype = torch.float32 if model.device.type == "cpu" and model.dtype.itemsize == 2 else model.dtype
        self.pool = BufferPool() if compile else None
        self.homes: weakref.WeakKeyDictionary[KVCache, list[PromptVectors]] = weakref.WeakKeyDictionary()
        # each cache's (batch size, slots) when a compiled step of it last ran with all its guards
        self.checked: weakref.WeakKeyDictionary[KVCache, tuple[int, int]] = weakref.WeakKeyDictionary()
        # on a CPU, each cache's StepCall (CUDA graphs, not tried with it, keep dynamo's calls)
        self.calls: weakref.WeakKeyDictionary[KVCache, StepCall] = weakref.WeakKeyDictionary()
        self.last_call: list[tuple] = []   # [(compiled, args, outputs)] of dynamo's call under way (noting_calls)
        self.compiled = None
        if compile:
            # (torch.compile takes a mode or options.) size_asserts: the compiled code would check
            # every input's sizes and strides again at each step, after the guards (and FastLinears'
            # weights never change: guards_worth_checking); 3-4% of a CPU step (docs/design.md)
            options = {"guard_filter_fn": self.guards_worth_checking, "size_asserts": False}
            if model.device.type == "cuda":   # mode "reduce-overhead": CUDA graphs
                options["triton.cudagraphs"] = True
            else:   # C++ calls the kernels instead of Python: a step 1.5 ms faster, a compilation 45 s longer
                options["cpp_wrapper"] = True
                if kernels.built():   # (imported here: importing inductor takes a second)
                    from para.attention_pass import DecodingAttention
                    options["post_grad_custom_post_pass"] = DecodingAttention()
            # isolate_recompiles: this decoder's compiled steps are its own, never another decoder's
            # (their guards are fewer: guards_worth_checking)
            self.compiled = torch.compile(decode_hidden, fullgraph=True, dynamic=False, options=options,
                                          backend=noting_calls(self.last_call), isolate_recompiles=True)

    def guards_worth_checking(self, guards: list) -> list[bool]:
        """torch.compile checks before every step that each tensor it read still has its dtype,
        shape and strides: about 1 ms a step for a model's few hundred weights on a CPU. The
        projections' weights are FastLinears' own, made above and never replaced but by making
        new FastLinears, which other guards see (a float FastLinear's scale is None); so their
        checks are dropped, and every other guard is kept (a tied output projection's weight is
        the embedding's, which anyone may change)."""
        embedding = self.model.embed.weight
        owned = {id(t) for m in self.model.modules() if isinstance(m, FastLinear)
                 for t in (m.weight, m.scale, m.bias) if t is not None and t is not embedding}
        return [not (guard.guard_type == "TENSOR_MATCH" and id(guard.value) in owned) for guard in guards]

    def new_cache(self, batch_size: int, max_len: int, which: torch.Tensor | None = None) -> KVCache:
        """An empty cache for at least max_len slots (see Transformer.new_cache); compiled, from the pool."""
        size, allocate = (max_len, None) if self.pool is None else (BufferPool.size(max_len), self.take_buffers)
        return KVCache(self.model.config, batch_size, size, self.model.device, self.cache_dtype, which, allocate=allocate)

    def take_buffers(self, cache: KVCache, batch_size: int, max_len: int) -> list[torch.Tensor]:
        """A cache's buffers from the pool, with homes for PARA's vectors when the model has PARA."""
        config, device, dtype = cache.config, cache.device, cache.dtype
        para = any(block.vg is not None for block in self.model.layers)
        widths = (config.q_width, config.kv_width, config.intermediate_size) if para else ()

        def allocate() -> list[torch.Tensor]:
            homes = [torch.empty(batch_size, 1, width, device=device, dtype=self.model.dtype)
                     for _ in range(config.num_layers) for width in widths]
            return new_buffers(config, batch_size, max_len, device, dtype) + homes

        buffers = self.pool.take(cache, (batch_size, max_len, device, dtype, self.model.dtype, para), allocate)
        if device.type == "cuda":   # tell torch.compile these keep their addresses: a CUDA graph writes them in place
            for buffer in buffers:
                torch._dynamo.mark_static_address(buffer)
        kv, homes = buffers[:2 * config.num_layers + 3], buffers[2 * config.num_layers + 3:]
        self.homes[cache] = [PromptVectors(*homes[i:i + 3]) for i in range(0, len(homes), 3)]
        return kv

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step: a token per row (B,) -> the next logits (B, vocab)."""
        return self.model.logits(self.hidden(tokens, cache))

    def greedy_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One greedy decoding step: a token per row (B,) -> the argmax of step's logits (B,)."""
        h = self.hidden(tokens, cache)
        weight = self.model.output_weight
        head = greedy_head.head_for(weight)
        if head is None:   # (max's index is argmax's, the first maximum: 45 against 83-186 us over 49,152 logits)
            return self.model.logits(h).max(-1).indices
        return head(h, weight, self.model.config.final_logit_softcapping)

    def hidden(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """decode_hidden, compiled where asked. A cache's first compiled step checks all of
        torch.compile's guards; its later steps, on a CPU, call the compiled code directly
        (StepCall), elsewhere check only the tensors' guards (1.3 against 0.2 ms a step): between
        two steps of one cache only tensors change. Change a model between generations."""
        if self.compiled is None:
            return decode_hidden(self.model, tokens, cache)
        self.move_vectors_home(cache)
        start = cache.check_room(1)   # here: a compiled step reads no Python position
        if cache.device.type == "cuda":   # (0.13 ms a call on a CPU, where there is nothing to mark)
            torch.compiler.cudagraph_mark_step_begin()   # the last step's outputs are no longer read
        call, shape = self.calls.get(cache), (len(cache.lengths), cache.max_len)
        if call is not None and call.fits(tokens, cache):
            h = call(tokens)
        elif self.checked.get(cache) == shape:   # not the cache's first step: only the tensors' checks
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                h = self.compiled(self.model, tokens, cache)
        else:
            tensors = cache_tensors(cache)
            with torch._dynamo.config.patch(cache_size_limit=max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)):
                h = self.compiled(self.model, tokens, cache)
            self.checked[cache] = shape
            # (no StepCall where torch.compile ran the step eagerly, or dynamo gave the cache other tensors)
            if cache.device.type == "cpu" and self.last_call and cache_tensors(cache) == tensors:
                call = StepCall.of(self.last_call[0], tokens, h, tensors)
                if call is not None:
                    self.calls[cache] = call
        self.last_call.clear()   # its tensors are the model's and the cache's: not kept past the step
        cache.pos = start + 1   # (set, not added: where torch.compile is disabled the step ran eagerly and set it)
        return h.clone()   # a CUDA graph's next replay overwrites its output

    def move_vectors_home(self, cache: KVCache) -> None:
        """PARA's vectors into the cache's pooled homes, where a prefill or a reorder made new
        ones: a CUDA graph reads them in place instead of copying 3 inputs a layer each step."""
        vectors = cache.rows.vectors
        for layer, home in enumerate(self.homes.get(cache, ())):
            if vectors[layer] is not None and vectors[layer].q is not home.q:
                for mine, new in zip(home, vectors[layer]):
                    mine.copy_(new)
                vectors[layer] = home
