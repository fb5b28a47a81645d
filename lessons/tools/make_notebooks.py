"""The source of the lesson notebooks: nbNN.py holds the cells of lessons/NN-*.ipynb, nbgen.py
the first two cells every notebook shares (dependencies, plotting and table helpers).

    python3 lessons/tools/make_notebooks.py [nb01 ...]   # rewrites the notebooks, without outputs
    bash scripts/lessons.sh --inplace [lessons/NN-….ipynb] # executes them, writing the outputs in

Edit the cells here rather than in the .ipynb files, which this script overwrites."""
import importlib
import os
import sys

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from nbgen import notebook  # noqa: E402

LESSONS = {
    "nb01": "01-kv-cache.ipynb",
    "nb02": "02-memory-math.ipynb",
    "nb03": "03-quantization-basics.ipynb",
    "nb04": "04-kivi.ipynb",
    "nb05": "05-kvquant.ipynb",
    "nb06": "06-hf-and-wkvquant.ipynb",
    "nb07": "07-gpu.ipynb",
    "nb08": "08-choosing.ipynb",
}

if __name__ == "__main__":
    only = sys.argv[1:]
    for mod, name in LESSONS.items():
        if only and mod not in only and name not in only:
            continue
        cells = importlib.import_module(mod).cells()
        notebook(cells, os.path.join(HERE, "..", name))
        print("wrote", name)
