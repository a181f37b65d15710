"""Checks the built wheel and sdist in dist/: the packages, the package data, the license and the
metadata that an index shows. Usage: python .ci/check_dist.py dist"""

import email.parser
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(dist: Path) -> None:
  (wheel,) = dist.glob("tqjax-*.whl")
  (sdist,) = dist.glob("tqjax-*.tar.gz")
  data = sorted(p.name for p in (REPO / "tqjax" / "data").glob("*.json"))
  modules = sorted(str(p.relative_to(REPO)) for pkg in ("tqjax", "pallas_kernels") for p in (REPO / pkg).rglob("*.py"))
  assert data, "no package data in tqjax/data"

  names = set(zipfile.ZipFile(wheel).namelist())
  missing = [m for m in modules + [f"tqjax/data/{d}" for d in data] if m not in names]
  assert not missing, f"{wheel.name} lacks {missing}"
  stray = sorted(n for n in names if n.split("/")[0] in ("tests", "experiments", "notebooks"))
  assert not stray, f"{wheel.name} carries {stray}"
  (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), f"{wheel.name} has no LICENSE"
  meta = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
  for field in ("Name", "Version", "Summary", "License-Expression", "Author", "Requires-Python"):
    assert meta.get(field), f"{wheel.name}: METADATA has no {field}"
  assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
  assert meta.get_payload().strip(), f"{wheel.name}: METADATA has no description (README)"

  with tarfile.open(sdist) as tar:
    root = sdist.name.removesuffix(".tar.gz")
    snames = {n.removeprefix(root + "/") for n in tar.getnames()}
  missing = [m for m in ["pyproject.toml", "README.md", "LICENSE", *modules, *(f"tqjax/data/{d}" for d in data)]
             if m not in snames]
  assert not missing, f"{sdist.name} lacks {missing}"
  print(f"{wheel.name}: {len(names)} files; {sdist.name}: {len(snames)} files; "
        f"{meta['Name']} {meta['Version']}, {meta['License-Expression']}, package data {', '.join(data)}")


if __name__ == "__main__":
  main(Path(sys.argv[1]))
