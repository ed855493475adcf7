"""The README main job: the `demo` variant of configs/im_animation.py (tiny, CPU, minutes)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "im_animation_config", os.path.join(os.path.dirname(__file__), "im_animation.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    return _base.get_config("demo")
