"""llama.cpp's own tools, from the package registry, installed once into FINETUNE_TOOLS.

PyPI has no wheel of llama.cpp's converter, and PyPI `gguf` has no converter at all; the sdist of
llama-cpp-python carries both llama.cpp's `convert_hf_to_gguf.py` (with the gguf-py it must use: PyPI gguf
0.19 lacks what it needs) and the C++ sources. So:
  converter  the sdist's convert_hf_to_gguf.py + conversion/ + gguf-py/, run as a subprocess (it puts its own
             gguf-py first on sys.path; never imported next to transformers' GGUF reader)   ~1 min, once
  runtime    llama-cpp-python built from that sdist with GGML_NATIVE=OFF (a native build crashed on quantized
             models on an AMX CPU), installed with pip --target: K-quants (llama_model_quantize) and a
             llama.cpp runtime to check an export's greedy tokens                           ~5 min, once
Both are built under temp names and renamed, so a half-finished install is never used.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile

from finetune import fsio
from finetune.errors import UserError

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}"
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
RUNTIME_DEPS = ("diskcache>=5.6",)   # llama-cpp-python's one dependency the venv lacks (numpy, jinja2 are there)


def root() -> str:
    base = os.environ.get("FINETUNE_TOOLS") or os.path.join(os.path.expanduser("~"), ".cache", "finetune", "tools")
    return os.path.join(base, f"llama-cpp-python-{VERSION}")


def converter_script() -> str:
    return os.path.join(root(), "converter", "convert_hf_to_gguf.py")


def runtime_dir() -> str:
    return os.path.join(root(), "python")


def _pip(args: list[str], what: str, env: dict | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
        raise UserError(f"{what} failed ({tail[0][:200]}); check that PyPI can be reached, then retry")


def _sdist(work: str) -> str:
    """The downloaded sdist, unpacked; returns its folder."""
    print(f"Downloading llama-cpp-python {VERSION} (llama.cpp's converter and sources, ~77 MB) ...", flush=True)
    _pip(["download", "--no-binary", ":all:", "--no-deps", "-d", work, f"llama-cpp-python=={VERSION}"],
         f"downloading llama-cpp-python {VERSION}")
    archive = glob.glob(os.path.join(work, f"{SDIST}.tar.gz"))[0]
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return os.path.join(work, SDIST)


@contextlib.contextmanager
def _source(src: str | None):
    """`src` when the caller already has the unpacked sdist, else a fresh download (removed afterwards)."""
    if src:
        yield src
        return
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as work:
        yield _sdist(work)


def ensure_converter(src: str | None = None) -> str:
    script = converter_script()
    if os.path.isfile(script):
        return script

    def build(tmp: str) -> None:
        with _source(src) as unpacked:
            vendor = os.path.join(unpacked, "vendor", "llama.cpp")
            import shutil

            shutil.copy2(os.path.join(vendor, "convert_hf_to_gguf.py"), tmp)
            shutil.copy2(os.path.join(vendor, "LICENSE"), tmp)
            for sub in ("conversion", "gguf-py"):
                if os.path.isdir(os.path.join(vendor, sub)):
                    shutil.copytree(os.path.join(vendor, sub), os.path.join(tmp, sub))

    fsio.build_dir(os.path.dirname(script), build)
    return script


def ensure_runtime(src: str | None = None) -> str:
    target = runtime_dir()
    if os.path.isdir(os.path.join(target, "llama_cpp")):
        return target

    def build(tmp: str) -> None:
        with _source(src) as unpacked, tempfile.TemporaryDirectory(prefix="llama-build-") as work:
            print("Building llama.cpp (llama-cpp-python, portable CPU build; about 5 minutes, once) ...", flush=True)
            env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
            _pip(["wheel", "--no-deps", "-w", os.path.join(work, "wheel"), unpacked], "building llama-cpp-python", env)
            wheel = glob.glob(os.path.join(work, "wheel", "*.whl"))[0]
            _pip(["install", "--no-deps", "--target", tmp, wheel, *RUNTIME_DEPS], "installing llama-cpp-python")

    fsio.build_dir(target, build)
    return target


def install() -> list[str]:
    """Both tools (`finetune export --install-tools`, which CI runs before the tests), from one download."""
    if os.path.isfile(converter_script()) and os.path.isdir(os.path.join(runtime_dir(), "llama_cpp")):
        return [converter_script(), runtime_dir()]
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as work:
        src = _sdist(work)
        return [ensure_converter(src), ensure_runtime(src)]


def convert(model_dir: str, outtype: str, out_file: str) -> None:
    """llama.cpp's converter: a Hugging Face folder -> one GGUF (f32/f16/bf16/q8_0), written to `out_file`."""
    script = ensure_converter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    done = subprocess.run([sys.executable, script, model_dir, "--outtype", outtype, "--outfile", out_file],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        text = done.stdout + done.stderr
        line = next((ln for ln in text.splitlines() if "is not supported" in ln), None)
        if line:
            arch = line.split("Model ")[-1].split(" is not")[0]
            raise UserError(f"llama.cpp's converter ({VERSION}) does not support the architecture {arch}; "
                            "export --merge still works, GGUF needs a model llama.cpp knows")
        if "pre-tokenizer was not recognized" in text:
            raise UserError("llama.cpp's converter does not recognise this model's tokenizer (a custom BPE "
                            "pre-tokenizer); GGUF export needs a tokenizer llama.cpp knows (Llama, Qwen, SmolLM...)")
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["?"]
        raise UserError(f"llama.cpp's converter failed on {model_dir}: {tail[0][:200]}")


def _run_runtime(code: str, *args: str) -> str:
    """Run `code` in a subprocess that imports llama_cpp from the tools folder; its stdout."""
    env = {**os.environ, "PYTHONPATH": ensure_runtime()}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"llama.cpp failed: {tail[:200]}")
    return done.stdout


QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""

GREEDY = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, verbose=False, seed=0)
out = []
for prompt in json.loads(sys.argv[2]):
    ids = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        ids.append(int(tok))
        if tok == llm.token_eos() or len(ids) >= int(sys.argv[3]):
            break
    out.append(ids)
print(json.dumps(out))
"""


def quantize(f16_file: str, out_file: str, quant: str) -> None:
    """A K-quant (e.g. Q4_K_M) from an f16 GGUF, with llama.cpp's own quantizer."""
    _run_runtime(QUANTIZE, f16_file, out_file, quant.upper())


def greedy(gguf_file: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids llama.cpp generates for each prompt (ids in, ids out: no tokenizer differences)."""
    return json.loads(_run_runtime(GREEDY, gguf_file, json.dumps(prompts), str(max_new_tokens)).strip().splitlines()[-1])
