"""``vqatune profile NAME``: switch params.yaml between the embedded default and a real run.

A profile (``configs/profiles/NAME.yaml``) is an overlay: the keys it names are written into
params.yaml, every other key and every comment stays. ``embedded.yaml`` names every key any other
profile sets, with the embedded run's values, so switching back is exact; a test holds the
committed params.yaml to it. Writing params.yaml itself (not a side file) is the point: the switch
shows in ``git diff params.yaml`` and DVC reruns exactly the stages whose keys changed.

    vqatune profile --list
    vqatune profile medgemma          # then: git diff params.yaml; dvc repro
    vqatune profile embedded          # back

The result is validated, every section as its stage reads it, before params.yaml is replaced
(atomically): a profile with a bad value changes nothing.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..outputs import write_atomic

PROFILES = Path("configs") / "profiles"


def profile_names(root: Path = Path(".")) -> list[str]:
    return sorted(p.stem for p in (root / PROFILES).glob("*.yaml"))


def load_profile(name: str, root: Path = Path(".")) -> dict:
    import yaml

    path = root / PROFILES / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no profile {name!r} in {root / PROFILES}; choose one of "
                          f"{', '.join(profile_names(root)) or '(none)'}")
    with path.open() as fh:
        overlay = yaml.safe_load(fh) or {}
    if not isinstance(overlay, dict):
        raise ConfigError(f"{path} must hold a mapping of params.yaml sections")
    base = overlay.pop("_base", None)  # a profile may start from another and change a few keys
    return _deep_update(load_profile(base, root), overlay) if base else overlay


def _deep_update(base: dict, overlay: dict) -> dict:
    for key, value in overlay.items():
        if isinstance(value, dict) and "kind" not in value and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def leaf_keys(overlay: dict, prefix: str = "") -> set[str]:
    """Dotted keys an overlay sets. A search-space entry ({kind: ...}) is one value, not a section."""
    keys = set()
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and "kind" not in value:
            keys |= leaf_keys(value, dotted + ".")
        else:
            keys.add(dotted)
    return keys


def _merge(target, overlay: dict, prefix: str, changed: list[str]) -> None:
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and "kind" not in value:
            if key not in target or not isinstance(target[key], dict):
                raise ConfigError(f"{dotted}: the profile sets a section params.yaml does not have")
            _merge(target[key], value, dotted + ".", changed)
            continue
        if key not in target:
            raise ConfigError(f"{dotted}: the profile sets a key params.yaml does not have")
        if _plain(target[key]) != value:
            changed.append(dotted)
            target[key] = _flow(value)


def _float_text(value: float) -> str:
    """Small rates as params.yaml writes them (3.0e-3, not 0.003), so switching back is byte-exact;
    the text always has a dot and a signed exponent, which YAML 1.1 readers take as a float."""
    if value != 0 and abs(value) < 1e-2:  # the exponent is negative: 3.000000e-03 -> 3.0e-3
        mantissa, exponent = f"{value:e}".split("e")
        mantissa = mantissa.rstrip("0")
        text = f"{mantissa}{'0' if mantissa.endswith('.') else ''}e{int(exponent)}"
        if float(text) == value:
            return text
    return repr(value)


def _flow(value: Any) -> Any:
    """Lists and search-space entries in flow style, one line each, as params.yaml writes them."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, (dict, list)):
        node = CommentedMap(value) if isinstance(value, dict) else CommentedSeq(value)
        node.fa.set_flow_style()
        return node
    return value


def _plain(value: Any) -> Any:
    """ruamel's commented containers as plain dicts and lists, for comparison."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def validate_params(params: dict) -> None:
    """Build every section as its stage does: a bad value raises ConfigError naming the key."""
    from ..config import ModelConfig, PrepareConfig, section
    from ..evaluation.config import EvaluateConfig
    from ..export.gguf import ExportConfig
    from ..export.merge import MergeConfig
    from ..prompts import PromptsConfig
    from ..search.config import TuneConfig
    from ..training.config import TrainConfig

    for name, cls in (("model", ModelConfig), ("prepare", PrepareConfig), ("prompts", PromptsConfig),
                      ("tune", TuneConfig), ("train", TrainConfig), ("evaluate", EvaluateConfig),
                      ("merge", MergeConfig), ("export", ExportConfig)):
        section(params, name, cls)


def apply_profile(name: str, params_path: Path = Path("params.yaml"), root: Path = Path(".")) -> list[str]:
    """Write profile ``name`` into ``params_path``; returns the dotted keys whose value changed."""
    import yaml
    from ruamel.yaml import YAML

    overlay = load_profile(name, root)
    rt = YAML()  # round trip: comments, order and quoting of untouched keys stay as they are
    rt.width = 4096
    rt.preserve_quotes = True
    # params.yaml writes null; ruamel's default would leave an empty value there.
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    rt.representer.add_representer(float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", _float_text(v)))
    text = Path(params_path).read_text()
    doc = rt.load(text)
    changed: list[str] = []
    _merge(doc, overlay, "", changed)
    out = io.StringIO()
    rt.dump(doc, out)
    validate_params(yaml.safe_load(out.getvalue()))
    if changed:
        write_atomic(params_path, out.getvalue())
    return changed


def _run(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for name in profile_names():
            print(name)
        return 0
    changed = apply_profile(args.name, Path(args.params))
    if not changed:
        print(f"{args.params} already follows profile {args.name!r}")
        return 0
    print(f"{args.params}: profile {args.name!r} set {len(changed)} keys: {', '.join(changed)}")
    print("review with `git diff params.yaml`; `dvc repro` reruns the stages they touch")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("profile", help="switch params.yaml to a profile (embedded, medgemma, ...)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a profile in configs/profiles/ (without .yaml)")
    parser.add_argument("--list", action="store_true", help="list the profiles")
    parser.add_argument("--params", default="params.yaml", help="the params file to change")
    parser.set_defaults(func=_run)
