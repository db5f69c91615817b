# Generated interfaces (msg/, srv/) and our sources can live in two folders during development
# (source tree first on sys.path, generated code in site-packages); extend_path joins them.
# Installed by colcon or pip, both land in one folder and this is a no-op.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
