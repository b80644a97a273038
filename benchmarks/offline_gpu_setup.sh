# Run the benchmarks (or the pipeline) on a GPU machine without internet, e.g. inside a hospital
# network: the missing Python packages travel as wheel files, and nothing asks the Hugging Face hub.
#
# What the GPU machine needs already: Python 3.12, CUDA, and torch (CUDA build), transformers,
# peft and accelerate (a typical GPU image has them). Everything else comes from two folders at
# the repository root, both git-ignored:
#
#   .whl/  wheels installed here into /tmp/site (nothing is written to the system Python):
#          trl, datasets and their dill + multiprocess, and, for the search workers (stages/tune.py,
#          ddp_bench.py without --skip-search), optuna with alembic, SQLAlchemy, Mako, colorlog.
#          Add bitsandbytes' wheel here too unless .bnb/ is used.
#   .bnb/  optional: bitsandbytes' python package unpacked, keeping only the libraries of your CUDA
#          version (here libbitsandbytes_cuda130.so, _cuda132.so and _cpu.so: ~8 MB instead of the
#          43 MB wheel); put on PYTHONPATH as it is.
#
# 1. On a machine with internet (any OS), from the repository root, download the wheels for the
#    GPU machine's platform (Linux x86_64, CPython 3.12); these are the versions tested:
#
#      pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux2014_x86_64 -d .whl \
#          trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#          optuna==5.0.0 alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 colorlog==6.12.0 \
#          bitsandbytes==0.50.2
#
# 2. Carry the repository with its .whl/ (and .bnb/ if you made one) to the GPU machine (USB
#    drive, the network's approved transfer); for a real model rather than the benchmarks' random
#    one, carry its downloaded folder (e.g. `hf download google/medgemma-4b-it --local-dir ...`)
#    too and point the pipeline's model path at it.
#
# 3. On the GPU machine, from the repository root, source this file (do not run it) and start:
#
#      source benchmarks/offline_gpu_setup.sh && python benchmarks/gpu_bench.py --out results/
#
#    It installs the wheels into /tmp/site (again after a reboot: /tmp is cleared), puts them,
#    .bnb/, src/ and benchmarks/ on PYTHONPATH, keeps the hub offline, and shows the programs GPU 0
#    only unless CUDA_VISIBLE_DEVICES is set (for several GPUs: `unset CUDA_VISIBLE_DEVICES`
#    after sourcing, as ddp_bench.py needs).
(return 0 2>/dev/null) || { echo "source this file: source benchmarks/offline_gpu_setup.sh" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/.bnb:$PWD/src:$PWD/benchmarks
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
