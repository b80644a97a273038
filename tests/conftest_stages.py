"""Import a DVC stage script (stages/<name>.py) as a module, so tests call its main() directly."""
import importlib.util
from pathlib import Path

STAGES = Path(__file__).resolve().parents[1] / "stages"


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
