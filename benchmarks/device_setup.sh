# Sourced at the start of every GPU-machine call (repo root): carried packages, offline hub.
#   source benchmarks/device_setup.sh && python benchmarks/gpu_bench.py --out $OUT
# The machine has torch, transformers, peft, accelerate but not bitsandbytes, trl, datasets; they
# travel in two git-ignored folders named in the call's `carry`:
#   .whl/  trl-1.16.0, datasets-5.2.0, dill-0.4.1, multiprocess-0.70.19 (py312) wheels, and for
#          the search workers optuna-5.0.0, alembic-1.20.1, SQLAlchemy-2.1.9, Mako-1.4.3, colorlog-6.12.0:
#          pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#          --platform manylinux2014_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#          optuna==5.0.0 alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 colorlog==6.12.0
#   .bnb/  bitsandbytes 0.50.2's python package with only its CUDA 13 libraries
#          (libbitsandbytes_cuda130.so, _cuda132.so, _cpu.so; ~8 MB instead of the 43 MB wheel).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/.bnb:$PWD/src:$PWD/benchmarks
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
