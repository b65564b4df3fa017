"""Normalise notebook metadata so that diffs show content, not noise.

Keeps outputs; drops execution timestamps and per-cell run metadata; sets the kernelspec to
python3. Usage: python .ci/normalize_notebooks.py book/*.ipynb
"""

import sys

import nbformat

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def normalize(path: str) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.metadata = {
        "kernelspec": KERNELSPEC,
        "language_info": {"name": "python"},
        **({"colab": nb.metadata["colab"]} if "colab" in nb.metadata else {}),
    }
    for cell in nb.cells:
        keep = {k: v for k, v in cell.metadata.items() if k in ("tags", "mystnb")}
        cell.metadata = keep
        cell.pop("id", None)
    nb.nbformat, nb.nbformat_minor = 4, 4
    nbformat.write(nb, path)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        normalize(p)
