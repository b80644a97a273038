"""Check every object of a DVC cache against its name (DVC 3 names an object by the md5 of its
bytes), and remove the corrupt ones so ``dvc fetch`` / ``dvc pull`` downloads them again.

DVC re-hashes a cache object only when it is not read-only and its inode, mtime and size differ
from DVC's state record: an object that a tool rewrote is caught (``dvc pull``, ``dvc checkout``
and ``dvc status`` delete it, and ``dvc pull`` fetches it again), but bit rot, or a write that
kept the file's mode and mtime, is found by no DVC command and ``dvc pull`` checks the damaged
bytes out. This reads every byte:

    python -m vqatune.dvc_cache [--cache .dvc/cache] [--remove]   # then: dvc fetch

An output already checked out from a corrupt object keeps its damaged bytes, and DVC (trusting its
record) calls it up to date, even after ``dvc checkout --force``: delete it, then ``dvc checkout``.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def corrupt_objects(cache_dir: str | Path) -> list[Path]:
    """The objects of ``cache_dir`` whose md5 is not their name, in path order."""
    bad = []
    for obj in sorted((Path(cache_dir) / "files" / "md5").glob("??/*")):
        if not obj.is_file() or obj.name.endswith(".unpacked"):
            continue
        digest = hashlib.md5(usedforsecurity=False)
        with obj.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != obj.parent.name + obj.name.removesuffix(".dir"):
            bad.append(obj)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=".dvc/cache", help="the DVC cache folder (default: .dvc/cache)")
    parser.add_argument("--remove", action="store_true", help="delete the corrupt objects")
    args = parser.parse_args(argv)
    if not (Path(args.cache) / "files" / "md5").is_dir():
        print(f"dvc_cache: {args.cache}/files/md5 not found; pass --cache (see `dvc cache dir`)", file=sys.stderr)
        return 2
    bad = corrupt_objects(args.cache)
    for obj in bad:
        if args.remove:
            obj.unlink()
        print(f"corrupt{' (removed)' if args.remove else ''}: {obj}")
    if bad:
        fix = "run `dvc fetch`" if args.remove else "rerun with --remove, then `dvc fetch`"
        print(f"dvc_cache: {len(bad)} corrupt object(s) in {args.cache}; {fix}; an output checked out "
              "from one stays wrong (DVC trusts its record): delete it and `dvc checkout` it", file=sys.stderr)
        return 1
    print(f"dvc_cache: every object in {args.cache} matches its md5", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
