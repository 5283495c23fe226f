"""para against llama.cpp (through llama-cpp-python) on the same weights, at each precision:
float32 / F32, bfloat16 / BF16, int8 (--quantize int8) / Q8_0. Batch 1, a 274-token prompt,
32 greedy tokens, the same threads; prefill, decode and the whole call, the median of the runs,
the two interleaved.

    python bench/bench_llamacpp.py --llama-python /tmp/llvenv/bin/python [--runs 5] [--compile]

llama-cpp-python is never a dependency of para: build it in a scratch venv outside the
repository (python -m venv /tmp/llvenv; /tmp/llvenv/bin/pip install llama-cpp-python gguf,
about 15 minutes on 2 cores) and name that interpreter. Only the worker below, run by that
interpreter, imports it.

The weights: the default model's GGUF (SmolLM2-135M-Instruct in Q4_1, the file weights/fetch.py
converts) dequantized to float32 tensor by tensor, which is what para's float32 checkpoint
holds, written back as an F32 GGUF with every metadata field copied; llama.cpp's own quantizer
makes the BF16 and Q8_0 files from it. para reads its float32 checkpoint, as bfloat16 with
--dtype bfloat16, and quantizes it to int8 with --quantize int8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

NEW_TOKENS = 32
PRECISIONS = {"float32": ("F32", None), "bfloat16": ("BF16", "LLAMA_FTYPE_MOSTLY_BF16"),
              "int8": ("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0")}


# ---- the worker: runs under the scratch venv's interpreter ----

def write_f32_gguf(source: str, target: str) -> None:
    """The source GGUF with every tensor dequantized to float32 and its metadata copied."""
    import gguf
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_ggufs(source: str, folder: str) -> dict[str, str]:
    """F32, BF16 and Q8_0 files in folder (made once)."""
    import ctypes
    import llama_cpp
    paths = {precision: str(Path(folder) / f"model-{name}.gguf") for precision, (name, _) in PRECISIONS.items()}
    if not Path(paths["float32"]).exists():
        write_f32_gguf(source, paths["float32"] + ".tmp")
        Path(paths["float32"] + ".tmp").rename(paths["float32"])
    for precision, (_, ftype) in PRECISIONS.items():
        if ftype and not Path(paths[precision]).exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = getattr(llama_cpp, ftype), 2
            if llama_cpp.llama_model_quantize(paths["float32"].encode(), (paths[precision] + ".tmp").encode(),
                                              ctypes.byref(params)) != 0:
                raise SystemExit(f"llama.cpp could not quantize to {ftype}")
            Path(paths[precision] + ".tmp").rename(paths[precision])
    return paths


def llama_worker(path: str, threads: int, repack: bool = True) -> None:
    """Load a GGUF, then for each prompt (a JSON list of ids) read from stdin, answer one JSON
    line: prefill and decode seconds and the greedy tokens (a warm-up run first). repack=False is
    llama.cpp's --no-repack (no "extra buffer types": weights not repacked, e.g. for AMX)."""
    import llama_cpp
    import numpy as np
    if not repack:   # Llama() takes no such argument: its default model parameters, changed
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_repacking():
            params = defaults()
            params.use_extra_bufts = False
            return params
        llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)

    def argmax() -> int:   # of the last token's logits (Llama.eval keeps none unless logits_all)
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    def run(prompt: list[int]) -> dict:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [argmax()]
        prefilled = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):   # the first token came from the prefill, as in para's generate
            llm.eval(tokens[-1:])
            tokens.append(argmax())
        return {"prefill": prefilled - start, "decode": time.perf_counter() - prefilled, "tokens": tokens}

    for line in sys.stdin:
        prompt = json.loads(line)
        run(prompt)   # warm-up
        print(json.dumps(run(prompt)), flush=True)


# ---- the driver: runs under para's interpreter ----

def para_run(decoder, prompt: list[int]) -> dict:
    from para.generation import generate
    generate(decoder.model, [prompt], NEW_TOKENS, eos_ids=[], decoder=decoder)   # warm-up
    result = generate(decoder.model, [prompt], NEW_TOKENS, eos_ids=[], decoder=decoder)
    return {"prefill": result.prefill_seconds, "decode": result.decode_seconds, "tokens": result.tokens[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-python", help="an interpreter that has llama-cpp-python and gguf (a scratch venv)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="compile para's decoding step")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--llama-no-repack", action="store_true",
                        help="llama.cpp's --no-repack: its AMX kernels for Q8_0, which it uses where the CPU "
                             "has AMX, crashed on an Intel Xeon VM (docs/usage.md)")
    parser.add_argument("--gguf-dir", type=Path, default=Path("runs/llamacpp"), help="where the GGUF files go (made once)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)   # JSON arguments of make_ggufs or llama_worker
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        if "source" in job:
            print(json.dumps(make_ggufs(**job)))
        else:
            llama_worker(**job)
        return
    if not args.llama_python:
        sys.exit("--llama-python: name the interpreter of a scratch venv with llama-cpp-python and gguf installed")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import tempfile

    import torch

    import para
    from common import PROMPT_TOKENS, TEXT
    from para.fast import FastDecoder
    from para.loading import model_dir
    from weights.fetch import BUILT_IN, DEFAULT, download_gguf

    folder = model_dir(None)
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    if not all((args.gguf_dir / f"model-{name}.gguf").exists() for name, _ in PRECISIONS.values()):
        with tempfile.TemporaryDirectory() as tmp:
            source = download_gguf(BUILT_IN[DEFAULT], Path(tmp))
            job = json.dumps({"source": str(source), "folder": str(args.gguf_dir)})
            subprocess.run([args.llama_python, __file__, "--worker", job], check=True)
    threads = torch.get_num_threads()
    model, tokenizer = para.load(folder, "cpu", "float32")
    prompt = tokenizer.encode(TEXT * 20, add_special_tokens=False)[:PROMPT_TOKENS]
    del model

    times = {p: {"para": [], "llama.cpp": []} for p in args.precisions}
    same_tokens = {}
    for precision in args.precisions:
        dtype = "bfloat16" if precision == "bfloat16" else "float32"
        decoder = FastDecoder(para.load_model(folder, "cpu", dtype), compile=args.compile,
                              quantize="int8" if precision == "int8" else None)
        gguf = args.gguf_dir / f"model-{PRECISIONS[precision][0]}.gguf"
        job = json.dumps({"path": str(gguf), "threads": threads, "repack": not args.llama_no_repack})
        worker = subprocess.Popen([args.llama_python, __file__, "--worker", job], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        for _ in range(args.runs):   # interleaved: one of ours, one of theirs
            mine = para_run(decoder, prompt)
            worker.stdin.write(json.dumps(prompt) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            if not line:
                sys.exit(f"llama.cpp stopped (exit code {worker.wait()}) on {gguf}; where it crashes on a CPU "
                         "with AMX, run again with --llama-no-repack")
            theirs = json.loads(line)
            times[precision]["para"].append(mine)
            times[precision]["llama.cpp"].append(theirs)
            same_tokens[precision] = mine["tokens"] == theirs["tokens"]
        worker.stdin.close()
        worker.wait()
        del decoder

    version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, llama-cpp-python {version}, CPU, {threads} threads, {folder.name}, "
          f"batch 1, prompt {len(prompt)} tokens, {NEW_TOKENS} greedy tokens, para {'compiled' if args.compile else 'eager'}, "
          f"median of {args.runs} interleaved runs{', llama.cpp --no-repack' if args.llama_no_repack else ''}")
    print("| precision | prefill tok/s para / llama.cpp | decode tok/s para / llama.cpp | decode ratio | whole call ratio | same tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for precision in args.precisions:
        median = {who: {key: statistics.median(run[key] for run in runs) for key in ("prefill", "decode")}
                  for who, runs in times[precision].items()}
        prefill = {who: len(prompt) / m["prefill"] for who, m in median.items()}
        decode = {who: (NEW_TOKENS - 1) / m["decode"] for who, m in median.items()}
        call = {who: m["prefill"] + m["decode"] for who, m in median.items()}
        print(f"| {precision} / {PRECISIONS[precision][0]} | {prefill['para']:.0f} / {prefill['llama.cpp']:.0f} "
              f"| {decode['para']:.1f} / {decode['llama.cpp']:.1f} | {decode['para'] / decode['llama.cpp']:.2f}x "
              f"| {call['llama.cpp'] / call['para']:.2f}x | {'yes' if same_tokens[precision] else 'no'} |")


if __name__ == "__main__":
    main()
