"""llama.cpp's own HF -> GGUF converter, pinned, installed from PyPI at install time.

The converter (``convert_hf_to_gguf.py``, its ``conversion/`` package and the ``gguf-py`` it was
written against) is not in any wheel: neither ``gguf``'s nor ``llama-cpp-python``'s. The
``llama-cpp-python`` *source distribution* vendors llama.cpp whole, so ``make install`` (or the
export stage, lazily) fetches that one pinned sdist with pip, checks its sha256, and unpacks only
the converter's files into the virtual environment. No git clone, nothing fetched at run time once
installed, and the converter runs in our own pinned environment (checked with transformers 5.17,
torch 2.13, numpy 2.4: its requirements file pins older ones, but Gemma 3 converts with ours).

    python -m vqatune.export.converter            # install (idempotent), print the script path
    python -m vqatune.export.converter --sdist llama_cpp_python-0.3.36.tar.gz   # offline
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz as served by PyPI (checked 2026-11-27).
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# What the converter imports: the script, its model classes, and the gguf-py it inserts on
# sys.path ahead of the installed gguf (the two are released together). LICENSE travels with it.
MEMBERS = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")
SCRIPT = "convert_hf_to_gguf.py"
HOOKS = Path(__file__).resolve().with_name("convert_hooks.py")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class ConverterError(RuntimeError):
    """The converter could not be installed or failed; the message is one actionable line."""


def default_converter_dir() -> Path:
    """Inside the active virtual environment: installed with it, removed with it."""
    return Path(sys.prefix) / "share" / "vqatune" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_sdist(dest_dir: Path) -> Path:
    """``pip download`` the pinned sdist (source only, no dependencies) into ``dest_dir``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "--dest", str(dest_dir)]
    log.info("fetching the llama.cpp converter: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dest_dir / SDIST_NAME
    if result.returncode != 0 or not sdist.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConverterError(f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} failed "
                             f"({tail[0]}); download {SDIST_NAME} from PyPI and pass --sdist")
    return sdist


def _select_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    chosen = []
    for member in tar.getmembers():
        if not member.name.startswith(VENDOR):
            continue
        rel = member.name[len(VENDOR):]
        if not any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in MEMBERS):
            continue
        if "__pycache__" in rel or not (member.isfile() or member.isdir()):
            continue
        member = member.replace(name=rel)
        chosen.append(member)
    return chosen


def unpack_converter(sdist: Path, dest: Path) -> Path:
    """Extract only the converter's files of ``sdist`` into ``dest`` (flattened to the
    llama.cpp root); returns ``dest``."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = _select_members(tar)
        # filter="data" refuses absolute paths, links out of the tree and device files.
        tar.extractall(dest, members=members, filter="data")
    if not (dest / SCRIPT).exists():
        raise ConverterError(f"{sdist} holds no vendor/llama.cpp/{SCRIPT}")
    return dest


def install_converter(dest: Optional[Path] = None, sdist: Optional[Path] = None) -> Path:
    """Install the converter into ``dest`` (default: in the venv) unless it is there; returns
    the path of ``convert_hf_to_gguf.py``. ``sdist``: a local copy of the pinned tarball."""
    dest = Path(dest) if dest else default_converter_dir()
    script = dest / SCRIPT
    if (dest / ".sha256").exists() and (dest / ".sha256").read_text().strip() == SDIST_SHA256:
        return script
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".converter-") as tmp:
        tmp = Path(tmp)
        sdist = Path(sdist) if sdist else download_sdist(tmp)
        digest = sha256_of(sdist)
        if digest != SDIST_SHA256:
            raise ConverterError(f"{sdist}: sha256 {digest} is not the pinned {SDIST_SHA256} of "
                                 f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}; refusing to run it")
        staging = unpack_converter(sdist, tmp / "converter")
        (staging / ".sha256").write_text(SDIST_SHA256 + "\n")
        # Atomic for readers: a half-unpacked converter is never at ``dest``.
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    log.info("llama.cpp converter %s installed in %s", LLAMA_CPP_PYTHON_VERSION, dest)
    return script


def convert(model_dir: Path, outfile: Path, outtype: str = "f16", *, mmproj: bool = False,
            converter: Optional[Path] = None) -> Path:
    """Run the converter on a merged model folder; returns ``outfile``.

    An argument list, never a shell string: paths and names from params reach no shell.
    """
    if outtype not in OUTTYPES:
        raise ConverterError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    script = Path(converter) if converter else install_converter()
    # Through convert_hooks.py: the converter as published, plus the layer pattern and the
    # image's blank lines that llama.cpp needs to run Gemma 3 as transformers does.
    cmd = [sys.executable, str(HOOKS), str(script), str(model_dir), "--outfile", str(outfile),
           "--outtype", outtype]
    if mmproj:
        cmd.append("--mmproj")
    log.info("converting: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not Path(outfile).exists():
        raise ConverterError(f"convert_hf_to_gguf.py {'--mmproj ' if mmproj else ''}on {model_dir} -> "
                             f"{outfile} failed: {failure_reason(result)}")
    return Path(outfile)


def failure_reason(result: subprocess.CompletedProcess) -> str:
    """The converter's exception line (its progress bar, redrawn with carriage returns, often
    comes after it), else its last line of output, else its exit code."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", result.stderr + result.stdout) if ln.strip()]
    errors = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception)\b", ln)]
    return (errors or lines or [f"exit code {result.returncode}"])[-1]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None, help="install folder (default: the venv)")
    parser.add_argument("--sdist", type=Path, default=None, help=f"a local {SDIST_NAME}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(install_converter(args.dest, args.sdist))
    except ConverterError as err:
        print(f"vqatune: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
